"""The page of ``audiodiff-serve`` (Gradio): a Generate tab over a warm model, a Blind A/B
tab over an A/B test, one queue.

What happens on the page is the library's (``audiodiff_jax/sweeps/warm.py``: songs,
checks, uploads; ``audiodiff_jax/sweeps/listening.py``: pairs, judgements); this module
turns form values into its arguments, its errors into messages on the page
(``gr.Error``: the server goes on), its progress into Gradio's progress bar, and its
results into players, pictures and text. Requests that touch the model share one
concurrency group of one slot: two listeners' requests run in turn, the second waiting
in the queue (and told its place) rather than failing.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
from absl import logging

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import music
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.evaluation import judgements
from audiodiff_jax.sampling.generation import SampleParams
from audiodiff_jax.sweeps import listening, warm

MODEL_QUEUE = "model"  # the concurrency group of every request that samples
MAX_LISTENER_CHARS = 80
# Shown in the song's table, in this order, when measured.
METRICS = (
    ("key", "key"),
    ("key_label", "key asked"),
    ("key_ok", "key as asked"),
    ("tempo_bpm", "tempo (bpm)"),
    ("tempo_label", "tempo asked"),
    ("tempo_ok", "tempo as asked"),
    ("lufs", "loudness (LUFS)"),
    ("true_peak_dbtp", "true peak (dBTP)"),
    ("onset_rate", "onsets per s"),
    ("note_density", "notes per s"),
    ("pitch_class_entropy", "pitch-class entropy (bits)"),
    ("silence_share", "silence share"),
    ("drone", "drone"),
)


def _number(value: Any, name: str, kind: type = float):
    """A form number as ``kind``; UserError names an empty or non-whole one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{name} is empty")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(x):
        raise UserError(f"{name}={value!r} is not a finite number")
    if kind is int:
        if not x.is_integer():
            raise UserError(f"{name}={value!r} must be a whole number")
        return int(x)
    return x


def _progress(progress: gr.Progress) -> warm.Progress:
    return lambda fraction, what: progress(fraction, desc=what)


def song_text(song: warm.Song) -> str:
    """The timings (compilation apart) and metrics of a song, as Markdown."""
    t = song.timings
    compiled = (
        f"compiled: yes (a new sampling program, {t['compile_s']:.2f} s)"
        if t["compiled"]
        else "compiled: no (the sampling program for this shape was reused)"
    )
    lines = [
        f"**{compiled}** · denoising {t['denoise_s']:.2f} s over {t['windows']} window(s) "
        f"(x{t['realtime_factor']:g} real time) · decoding {t['decode_s']:.2f} s · "
        f"measuring {t['measure_s']:.2f} s",
        f"song `{song.id}` · seed {song.params.seed} · step {song.source['checkpoint_step']}, "
        f"weights {song.source['weights']}"
        + (f", adapters {song.source['adapters']}" if song.source["adapters"] else "")
        + (f" · edit {song.edit.split(':sha256:')[0]}" if song.edit else ""),
    ]
    if song.metrics:
        rows = [(label, song.metrics[key]) for key, label in METRICS if song.metrics.get(key) is not None]
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {label} | {f'{v:.3g}' if isinstance(v, float) else v} |" for label, v in rows]
    else:
        lines.append("(not measured: the eval extra is not installed, or --measure=false)")
    return "\n".join(lines)


def _generate_tab(model: warm.WarmModel, limits: warm.Limits, prompt: str) -> None:
    s, g = model.sample, model.gen
    gr.Markdown(
        f"Model **{model.name}**: step {g.step}, weights {g.weights}"
        + (f", adapters {g.adapters.text}" if g.adapters.text else "")
        + f" · songs of {g.min_seconds:g} to {g.max_seconds:g} s"
    )
    with gr.Row():
        text = gr.Textbox(label="Prompt", value=prompt, lines=2, elem_id="prompt")
        negative = gr.Textbox(
            label="Negative prompt", value=s.negative_prompt, lines=2, elem_id="negative_prompt"
        )
    with gr.Row():
        seconds = gr.Number(label="Seconds", value=s.seconds[0], elem_id="seconds")
        seed = gr.Number(label="Seed", value=s.seeds[0], precision=0, elem_id="seed")
        guidance = gr.Number(label="Guidance (1 = off)", value=s.guidance[0], elem_id="guidance")
        steps = gr.Number(label="Steps", value=s.steps[0], precision=0, elem_id="steps")
    with gr.Row():
        sampler = gr.Dropdown(
            list(config_lib.SAMPLERS), value=s.samplers[0], label="Sampler", elem_id="sampler"
        )
        schedule = gr.Dropdown(
            list(config_lib.SCHEDULES), value=s.schedule[0], label="Step schedule", elem_id="schedule"
        )
        rescale = gr.Number(label="Guidance rescale (0-1)", value=s.guidance_rescale[0], elem_id="rescale")
        eta = gr.Number(label="DDIM eta (0-1)", value=s.eta, elem_id="eta")
    controls = g.cfg.model.controls  # the musical controls this model takes, if any
    with gr.Row(visible=bool(controls)):
        bpm = gr.Number(
            label="Tempo (bpm; 0 = none)", value=s.bpm[0], visible="tempo" in controls, elem_id="bpm"
        )
        key = gr.Textbox(
            label="Key ('F# minor'; empty = none)", value=s.key[0], visible="key" in controls, elem_id="key"
        )
        meter = gr.Dropdown(
            ["", *music.METERS],
            value=s.time_signature[0],
            label="Time signature (empty = none)",
            visible="meter" in controls,
            elem_id="time_signature",
        )
    with gr.Accordion("Edit an uploaded song: continuation, inpainting, variation", open=False):
        mode = gr.Radio(list(warm.EDITS), value="none", label="Edit", elem_id="edit_mode")
        upload = gr.File(
            label=f"Audio file (at most {limits.max_upload_mb:g} MB and {limits.max_upload_seconds:g} s)",
            type="filepath",
            elem_id="upload",
        )
        with gr.Row():
            start = gr.Number(label="Inpaint from (s)", value=None, elem_id="inpaint_start")
            end = gr.Number(label="Inpaint to (s)", value=None, elem_id="inpaint_end")
            strength = gr.Number(label="Variation strength (0-1]", value=s.strength, elem_id="strength")
    button = gr.Button("Generate", variant="primary", elem_id="generate")
    audio = gr.Audio(label="Song", type="filepath", interactive=False, buttons=["download"], elem_id="song")
    picture = gr.Image(label="Spectrogram", type="filepath", interactive=False, elem_id="spectrogram")
    info = gr.Markdown(elem_id="song_info")

    def generate(
        prompt_text, negative_text, seconds_v, seed_v, guidance_v, steps_v, sampler_v, schedule_v,
        rescale_v, eta_v, bpm_v, key_v, meter_v, mode_v, upload_v, start_v, end_v, strength_v,
        progress=gr.Progress(),
    ):  # fmt: skip
        try:
            p = SampleParams(
                prompt=prompt_text or "",
                seconds=_number(seconds_v, "seconds"),
                seed=_number(seed_v, "seed", int),
                negative_prompt=negative_text or "",
                guidance=_number(guidance_v, "guidance"),
                guidance_rescale=_number(rescale_v, "guidance rescale"),
                steps=_number(steps_v, "steps", int),
                sampler=sampler_v,
                schedule=schedule_v,
                eta=_number(eta_v, "eta"),
                strength=_number(strength_v, "strength"),
                bpm=_number(bpm_v, "tempo"),
                key=key_v or "",
                time_signature=meter_v or "",
            )
            model.check(p)  # before an upload is encoded
            inpaint = mode_v == "inpainting"
            edit, tag = model.edit(
                mode_v,
                upload_v,
                _number(start_v, "inpaint from") if inpaint else None,
                _number(end_v, "inpaint to") if inpaint else None,
            )
            song = model.song(p, edit=edit, edit_tag=tag, progress=_progress(progress))
        except UserError as e:
            logging.warning("serve: request refused: %s", e)
            raise gr.Error(str(e), duration=None) from e
        except Exception as e:  # noqa: BLE001 - a failed request must not stop the server
            logging.exception("serve: request failed")
            raise gr.Error(f"the request failed: {type(e).__name__}: {e}", duration=None) from e
        return song.wav, song.spectrogram, song_text(song)

    inputs = [
        text,
        negative,
        seconds,
        seed,
        guidance,
        steps,
        sampler,
        schedule,
        rescale,
        eta,
        bpm,
        key,
        meter,
    ]
    inputs += [mode, upload, start, end, strength]
    button.click(
        generate,
        inputs,
        [audio, picture, info],
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
        api_name="generate",
    )


def _ab_tab(ab: listening.ABTest) -> None:
    gr.Markdown(
        "Listen to both songs of a pair, then choose the better one, or **Same**. The sides are "
        "shuffled and nothing tells the two sources apart. Every choice is recorded in "
        f"`{ab.judgements_dir}/{judgements.JUDGEMENTS_FILE}`."
    )
    listener = gr.Textbox(label="Your name (optional; recorded with your choices)", elem_id="listener")
    state = gr.State(None)  # {"pair": Pair | None, "count": pairs drawn in this session}
    draw = gr.Button("Next pair", variant="primary", elem_id="next_pair")
    with gr.Row():
        # No download or share buttons: nothing on the players but the sound.
        left = gr.Audio(label="Left", type="filepath", interactive=False, buttons=[], elem_id="left")
        right = gr.Audio(label="Right", type="filepath", interactive=False, buttons=[], elem_id="right")
    with gr.Row():
        buttons = {
            judgements.LEFT: gr.Button("Left is better", elem_id="pick_left"),
            judgements.SAME: gr.Button("Same", elem_id="pick_same"),
            judgements.RIGHT: gr.Button("Right is better", elem_id="pick_right"),
        }
    status = gr.Markdown("Press **Next pair** to start.", elem_id="ab_status")

    def next_pair(st, progress=gr.Progress()):
        count = (st or {}).get("count", 0)
        try:
            pair = ab.draw(progress=_progress(progress))
        except UserError as e:
            raise gr.Error(str(e), duration=None) from e
        except Exception as e:  # noqa: BLE001 - a failed request must not stop the server
            logging.exception("serve: drawing a pair failed")
            raise gr.Error(f"drawing a pair failed: {type(e).__name__}: {e}", duration=None) from e
        st = {"pair": pair, "count": count + 1}
        return pair.left["file"], pair.right["file"], st, f"Pair {count + 1}: listen to both, then choose."

    draw.click(
        next_pair,
        [state],
        [left, right, state, status],
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
        api_name="next_pair",
    )

    def picker(choice: str):
        def pick(st, name, request: gr.Request):
            if not st or st.get("pair") is None:
                raise gr.Error("no pair to judge: press Next pair first")
            who = (name or "").strip()[:MAX_LISTENER_CHARS]
            session = getattr(request, "session_hash", None) or ""
            ab.judge(st["pair"], choice, listener=who, session=session, index=st["count"])
            st = {"pair": None, "count": st["count"]}
            return st, f"Recorded: **{choice}** for pair {st['count']}. Press **Next pair** for another."

        return pick

    for choice, b in buttons.items():
        b.click(picker(choice), [state, listener], [state, status], api_name=f"pick_{choice}")


def build(
    model: warm.WarmModel | None, ab: listening.ABTest | None, *, limits: warm.Limits, prompt: str = ""
) -> gr.Blocks:
    """The page: a Generate tab for ``model``, a Blind A/B tab for ``ab`` (each if given)."""
    with gr.Blocks(title="audiodiff-serve", analytics_enabled=False) as page:
        gr.Markdown("## audiodiff-serve")
        if model is not None:
            with gr.Tab("Generate", elem_id="tab_generate"):
                _generate_tab(model, limits, prompt)
        if ab is not None:
            with gr.Tab("Blind A/B", elem_id="tab_ab"):
                _ab_tab(ab)
    return page


def launch(
    page: gr.Blocks, *, host: str, port: int, limits: warm.Limits, queue_size: int, allowed: list[str]
) -> None:
    """Serves ``page`` until interrupted: one queue, uploads capped at the size limit,
    only the songs' folder (and Gradio's own cache) served as files."""
    page.queue(max_size=queue_size, default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=int(limits.max_upload_mb * 2**20),
        allowed_paths=allowed,
        show_error=True,
        footer_links=[],
        mcp_server=False,
        ssr_mode=False,
        quiet=False,
    )
