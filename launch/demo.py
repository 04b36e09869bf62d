"""``make demo`` (``python -m launch.demo``): the main job end to end on the embedded
default, on a CPU. It drives every stage (pipeline, training, sampling, evaluation),
so it lives with the launchers, outside the library.

1. Renders the prompted corpus (``data_pipeline/corpus_prompts.py``): generated
   four-bar pieces whose caption states key, tempo and instrument exactly, with one
   (key, tempo) pairing per key held out of training.
2. Encodes it with the codec shipped in the package (``audiodiff_jax.codec``) into
   ArrayRecord latent shards plus a dataset card (``data_pipeline/precompute.py``).
3. Trains the ``configs/demo.py`` DiT with the real loop (Grain loader, sharded jitted
   step, async Orbax checkpoints, TensorBoard metrics), continuing from the weights
   shipped in ``audiodiff_jax/demo_weights`` (their recipe: RECIPE.md there); the
   shards take those weights' latent statistics and tokenizer. ``--from_scratch``
   trains from a random init instead.
4. Samples a short song for each held-out prompt and measures key, tempo and onsets
   with the built-in evaluation (``launch/demo_prompts.py``), beside renders of the
   same prompts (the estimators' ceiling).
5. Samples full-length songs window by window, with their seam ratios.
6. Writes ``OUT/report.html``: prompted against measured key and tempo per prompt,
   the accuracies against chance and the targets, the loss curve (the pretraining's
   and this run's), the run's facts, links to the songs.

Every stage skips what is already done, so running it again resumes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import flags, logging

import audiodiff_jax
from audiodiff_jax.checkpoints import export, source
from audiodiff_jax.codec import load_codec
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import paths, report
from audiodiff_jax.core.logs import quiet_library_logs
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.evaluation import evaluate_folder
from audiodiff_jax.programs import cli
from audiodiff_jax.sampling import generation, seams
from audiodiff_jax.sweeps import sweep
from audiodiff_jax.training import dit_trainer
from configs import demo as demo_config
from data_pipeline import corpus_prompts, precompute
from launch import demo_prompts

# The weights make demo continues from (an audiodiff-export folder, RECIPE.md inside).
DEMO_WEIGHTS = os.path.join(os.path.dirname(audiodiff_jax.__file__), "demo_weights")
# The few-step student distilled from them (its recipe: RECIPE.md there), shipped alike.
DEMO_STUDENT = os.path.join(os.path.dirname(audiodiff_jax.__file__), "demo_student")
PRETRAIN_LOSS = "pretrain_loss.json"  # {step: loss} of the pretraining, beside the weights

# Flag holders, set by define_flags() when the program runs (importing the module, as
# the report tests do, must not add --out/--steps beside another program's).
_OUT = _STEPS = _NUM_CLIPS = _CLIP_SECONDS = _SONG_SECONDS = _NUM_SONGS = _SAMPLE_STEPS = None
_PROMPT_SECONDS = _FROM_SCRATCH = _GUIDANCE = None


def define_flags() -> None:
    global _OUT, _STEPS, _NUM_CLIPS, _CLIP_SECONDS, _SONG_SECONDS, _NUM_SONGS, _SAMPLE_STEPS
    global _PROMPT_SECONDS, _FROM_SCRATCH, _GUIDANCE
    _OUT = flags.DEFINE_string("out", "demo_out", "Output folder.")
    _STEPS = flags.DEFINE_integer("steps", 0, "Override the demo config's train.num_steps (0 = keep).")
    _NUM_CLIPS = flags.DEFINE_integer("num_clips", 128, "Clips of the prompted corpus to train on.")
    _CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 12.0, "Length of each rendered clip.")
    _FROM_SCRATCH = flags.DEFINE_bool(
        "from_scratch",
        False,
        "Train configs/demo.py from a random init (800 steps) instead of continuing from "
        "the shipped weights (audiodiff_jax/demo_weights).",
    )
    _PROMPT_SECONDS = flags.DEFINE_float(
        "prompt_seconds", 12.0, "Length of the song sampled for each held-out prompt."
    )
    _GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale of every song.")
    _SONG_SECONDS = flags.DEFINE_float("song_seconds", 180.0, "Length of each full song.")
    _NUM_SONGS = flags.DEFINE_integer("num_songs", 2, "Full songs to sample (held-out prompts).")
    _SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "Sampler steps per window.")


LOSS_PNG = "loss.png"


def loss_curve_figure(history: dict[int, float], pretrain: dict[int, float] | None = None):
    """The training loss per step on a log scale (a matplotlib ``Figure``, no pyplot),
    or None with fewer than two steps. ``pretrain``: the loss of the run this one
    continues, drawn first (this run's steps then count on from its last step)."""
    from matplotlib.figure import Figure

    steps = sorted(history)
    if len(steps) < 2:
        return None
    pre = sorted(pretrain or {})
    offset = pre[-1] if pre else 0
    fig = Figure(figsize=(6.4, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if pre:
        ax.plot(
            pre, [max(pretrain[s], 1e-12) for s in pre], color="#8b949e", linewidth=1.2, label="pretraining"
        )
    values = np.array([history[s] for s in steps])
    if pre:  # beside the pretraining's 50-step means: this run's 10-step running mean
        k = min(10, len(values))
        values = np.convolve(values, np.ones(k) / k, mode="valid")
        steps = steps[k - 1 :]
    ax.plot(
        [offset + s for s in steps],
        np.maximum(values, 1e-12),
        color="#1f6feb",
        linewidth=1.5,
        label="this run" if pre else None,
    )
    ax.set_yscale("log")
    ax.set_xlim((pre or steps)[0], offset + steps[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    if pre:
        ax.legend(loc="upper right")
    return fig


def write_report(
    out: str,
    workdir: str,
    cfg,
    facts: dict,
    songs_report: str = "",
    *,
    prompts: dict | None = None,
    pretrain_loss: dict[int, float] | None = None,
) -> str:
    """Writes ``out/report.html`` (and ``out/loss.png``, the loss curve); returns its path.

    ``prompts``: the held-out prompt table (``rows``: :class:`demo_prompts.PromptRow`,
    ``verdicts``, ``ceiling``, links), when the demo measured it."""
    del cfg  # the resolved config is in ``facts["config"]``
    fig = loss_curve_figure(read_loss_history(workdir), pretrain_loss)
    if fig is not None:
        report.save_figure_png(fig, os.path.join(out, LOSS_PNG))
    return report.render_page(
        "demo_report.html",
        os.path.join(out, "report.html"),
        songs_report=songs_report,
        loss_png=LOSS_PNG if fig is not None else "",
        facts=facts,
        prompts=prompts,
        tensorboard_dir=os.path.join(workdir, "tensorboard"),
        config_text=json.dumps(facts.get("config", {}), indent=1),
    )


# The demo's shards take the latent statistics and tokenizer of the weights it continues
# (data_pipeline/precompute.py:adopt_base_card; the card records where they came from).
ADOPTED = precompute.ADOPTED
adopt_weights_card = precompute.adopt_base_card


def pretrain_loss(weights_dir: str) -> dict[int, float]:
    path = os.path.join(weights_dir, PRETRAIN_LOSS)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(k): float(v) for k, v in json.load(f).items()}


def main(argv):
    del argv
    quiet_library_logs()
    out = os.path.abspath(_OUT.value)
    corpus_dir = os.path.join(out, "corpus")
    shards_dir = os.path.join(out, "shards")
    workdir = os.path.join(out, "run")
    prompts_dir = os.path.join(out, "heldout_songs")
    renders_dir = os.path.join(out, "heldout_renders")
    coded_dir = os.path.join(out, "heldout_renders_codec")
    songs_dir = os.path.join(out, "songs")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    timings = {}
    continued = not _FROM_SCRATCH.value
    if continued and not export.is_export(DEMO_WEIGHTS):
        raise SystemExit(f"{DEMO_WEIGHTS}: the shipped demo weights are missing (or use --from_scratch)")

    codec = load_codec("default")
    card = codec.card
    if not os.path.exists(os.path.join(corpus_dir, "manifest.jsonl")):
        logging.info("[1/6] rendering %d prompted clips into %s", _NUM_CLIPS.value, corpus_dir)
        corpus_prompts.render_clips(
            corpus_dir,
            _NUM_CLIPS.value,
            seed=0,
            sample_rate=card.sample_rate,
            channels=card.audio_channels,
            clip_seconds=_CLIP_SECONDS.value,
            workers=max(1, min(4, os.cpu_count() or 1)),
            progress=True,
        )
    else:
        logging.info("[1/6] corpus already in %s", corpus_dir)
    timings["render"] = time.time() - t0

    t = time.time()
    if not os.path.exists(os.path.join(shards_dir, "dataset_card.json")):
        logging.info("[2/6] encoding the corpus with the shipped codec %r into %s", card.name, shards_dir)
        summary = precompute.precompute(
            precompute.FolderCorpus(corpus_dir),
            shards_dir,
            codec,
            files_per_shard=32,
            tokenizer_vocab_size=0 if continued else 256,
        )
        print(precompute.format_summary(summary))
    else:
        logging.info("[2/6] latent shards already in %s", shards_dir)
    # Also on a rerun: a demo stopped between the precompute and this adoption has shards
    # without the weights' tokenizer, and training from the weights would stop on them.
    if continued and ADOPTED not in DatasetCard.load(shards_dir).metadata:
        adopt_weights_card(shards_dir, DEMO_WEIGHTS)
    timings["encode"] = time.time() - t

    cd = demo_config.get_config("continue" if continued else None)
    cd.data.shards_dir = shards_dir
    cd.model.latent_channels = card.latent_channels
    if continued:
        cd.train.init_from = DEMO_WEIGHTS
    if _STEPS.value:
        cd.train.num_steps = _STEPS.value
    cfg = config_lib.from_configdict(cd)
    t = time.time()
    logging.info(
        "[3/6] training configs/demo.py for %d steps in %s, %s",
        cfg.train.num_steps,
        workdir,
        f"continuing from {DEMO_WEIGHTS}" if continued else "from scratch",
    )
    result = dit_trainer.train(cfg, workdir)
    timings["train"] = time.time() - t

    common = dict(
        seeds=(0,),
        guidance=_GUIDANCE.value,
        steps=_SAMPLE_STEPS.value,
        sampler="dpmpp_2m",
        codec=codec,
    )
    t = time.time()
    controls = bool(cfg.model.controls)
    heldout = demo_prompts.held_out_rows(controls)
    logging.info(
        "[4/6] %d held-out prompts, %.0f s each: sampling, then measuring key, tempo and onsets",
        len(heldout),
        _PROMPT_SECONDS.value,
    )
    prompt_songs = sweep.generate_songs(
        workdir,
        heldout,
        prompts_dir,
        seconds=_PROMPT_SECONDS.value,
        title="audiodiff-jax demo: held-out prompts",
        batch_size=8,  # prompts denoised 8 at a time (every batch padded to 8: one program)
        **common,
    )
    rows, acc = demo_prompts.measure(prompts_dir)
    order_pairs = []
    if "tempo" in cfg.model.controls:
        # The same prompt and seed at 80 and at 162 bpm: do the tempos come out in order?
        order_dir = os.path.join(out, "tempo_order")
        order_songs = sweep.generate_songs(
            workdir,
            demo_prompts.tempo_order_rows(),
            order_dir,
            seconds=_PROMPT_SECONDS.value,
            title="audiodiff-jax demo: one prompt at 80 and at 162 bpm",
            batch_size=8,
            **common,
        )
        acc["tempo_order"], order_pairs = demo_prompts.tempo_order(
            evaluate_folder(order_dir, transcribe=False, progress=True).rows
        )
        prompt_songs.issues.extend(order_songs.issues)
    ceiling = {}
    for name, folder, through in (("renders", renders_dir, None), ("through the codec", coded_dir, codec)):
        demo_prompts.write_renders(
            folder,
            seed=0,
            sample_rate=card.sample_rate,
            channels=card.audio_channels,
            seconds=_PROMPT_SECONDS.value,
            codec=through,
        )
        ceiling[name] = demo_prompts.measure(folder)[1]
    timings["held-out prompts"] = time.time() - t

    few_step = None
    if export.is_export(DEMO_STUDENT):
        low, high = source.WeightsSource(DEMO_STUDENT).cfg.distill.requested_range()
        if low <= _GUIDANCE.value <= high:
            t = time.time()
            logging.info(
                "[4b/6] the same %d prompts from the shipped few-step student %s", len(heldout), DEMO_STUDENT
            )
            few_step = few_step_rows(prompts_dir, os.path.join(out, "heldout_student"), heldout, codec, acc)
            timings["few-step student"] = time.time() - t
        else:
            logging.warning(
                "[4b/6] no few-step row: the shipped student accepts guidance %g to %g, not --guidance=%g",
                low,
                high,
                _GUIDANCE.value,
            )

    t = time.time()
    full = heldout[: _NUM_SONGS.value]
    logging.info("[5/6] sampling %d songs of %.0f s: %s", len(full), _SONG_SECONDS.value, full)
    songs = sweep.generate_songs(
        workdir,
        full,
        songs_dir,
        seconds=_SONG_SECONDS.value,
        title="audiodiff-jax demo songs",
        batch_size=max(1, len(full)),
        **common,
    )
    timings["songs"] = time.time() - t
    t = time.time()
    seam_facts = seam_comparison(workdir, codec, songs.rows)
    timings["seams"] = time.time() - t
    logging.info("[6/6] writing the report")
    verdicts = demo_prompts.verdicts(acc)
    facts = {
        "weights": (
            f"continued from {DEMO_WEIGHTS} for {cfg.train.num_steps} steps"
            if continued
            else f"trained from scratch for {cfg.train.num_steps} steps"
        ),
        "final step": result.final_step,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "DiT parameters": sum(x.size for x in jax.tree.leaves(result.state.params)),
        "codec": f"{card.name}: {card.sample_rate} Hz, {card.audio_channels} ch, "
        f"{card.latent_channels} latent channels at {card.latent_rate:.2f} Hz",
        "corpus": f"{corpus_dir} ({_NUM_CLIPS.value} clips of {_CLIP_SECONDS.value:g} s)",
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "held-out prompt songs": f"{len(prompt_songs.rows)} written, {len(prompt_songs.issues)} issues",
        "full songs": f"{len(songs.rows)} written, {len(songs.issues)} issues: {songs.report}",
        **seam_facts,
        "timings (s)": {k: round(v, 1) for k, v in timings.items()},
        "wall time (s)": round(time.time() - t0, 1),
        "config": json.loads(config_lib.to_json(cfg)),
    }
    prompts = {
        "rows": rows,
        "verdicts": verdicts,
        "accuracy": acc,
        "ceiling": ceiling,
        "songs_report": os.path.relpath(prompt_songs.report, out),
        "renders": {
            "renders": os.path.relpath(renders_dir, out),
            "through the codec": os.path.relpath(coded_dir, out),
        },
        "order_pairs": order_pairs,
        "few_step": few_step,
        "tempo_tolerance": demo_prompts.TEMPO_TOLERANCE,
        "min_onset_rate": demo_prompts.MIN_ONSET_RATE,
    }
    path = write_report(
        out,
        workdir,
        cfg,
        facts,
        songs_report=os.path.relpath(songs.report, out),
        prompts=prompts,
        pretrain_loss=pretrain_loss(DEMO_WEIGHTS) if continued else None,
    )
    summary = {
        "held_out_prompts": len(rows),
        "accuracy": acc,
        "few_step": few_step,
        "estimator_ceiling": ceiling,
        "verdicts": verdicts,
        "wall_time_s": round(time.time() - t0, 1),
    }
    paths.atomic_write(os.path.join(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
    print(
        f"demo done in {time.time() - t0:.0f}s: report {path}, songs {songs.report}, "
        f"checkpoints in {workdir}/checkpoints"
    )
    for name, text in verdicts.items():
        print(f"  held-out prompts, {name}: {text}")
    for r in few_step or []:
        print(
            f"  {r['model']}: {r['model_evals']:.0f} model evaluations and {r['seconds_per_song']:.2f} s "
            f"a 12 s song; key {r['key']:.0%}, tempo {r['tempo']:.0%}, onsets {r['onsets']:.0%}"
        )
    issues = prompt_songs.issues + songs.issues
    if issues:
        raise SystemExit(f"some songs failed: {issues}")


def few_step_rows(teacher_dir: str, student_dir: str, rows: list, codec, teacher_acc: dict) -> list[dict]:
    """The held-out prompts from the shipped student (``DEMO_STUDENT``, its own steps), and
    a row each for the teacher's songs (``teacher_dir``) and the student's: steps, model
    evaluations and seconds per song (sampling and decoding, compilation apart), adherence."""
    sweep.generate_songs(
        DEMO_STUDENT,
        rows,
        student_dir,
        seconds=_PROMPT_SECONDS.value,
        seeds=(0,),
        guidance=_GUIDANCE.value,
        codec=codec,
        batch_size=8,
        title="audiodiff-jax demo: held-out prompts, few-step student",
    )
    out = []
    for model, folder, acc in (
        ("the demo model (teacher)", teacher_dir, teacher_acc),
        ("the few-step student", student_dir, demo_prompts.measure(student_dir)[1]),
    ):
        made = sweep.read_manifest(os.path.join(folder, sweep.MANIFEST))[0].values()
        t = [r["timings"] for r in made]
        first = next(iter(made))
        out.append(
            {
                "model": model,
                "sampler": f"{first['steps']} {first['sampler']} steps"
                + (f", {first['distillation']} distillation" if first.get("distillation") else ", guided")
                + (f", guidance input {first['guidance_offset']:+g}" if first.get("guidance_offset") else ""),
                "model_evals": float(np.mean([r["model_evals"] for r in made])),
                "seconds_per_song": float(np.mean([x["denoise_s_per_output"] + x["decode_s"] for x in t])),
                **{k: float(acc[k]) for k in ("key", "tempo", "onsets")},
            }
        )
    return out


def seam_comparison(workdir: str, codec, rows: list[dict]) -> dict[str, str]:
    """The windowed songs' seam ratio (``audiodiff_jax/sampling/seams.py``) next to the first song's
    prompt and seed made in one pass (no seams: the ratio at the same frames is the
    yardstick). The one-pass song is cut to its first minute: one pass costs the square of
    the length in attention, and a minute already holds a dozen seam positions."""
    ratios = [r["seam_ratio"] for r in rows if "seam_ratio" in r]
    if not ratios:
        return {}
    row = next(r for r in rows if "seam_ratio" in r)
    one_pass = generation.open_generator(workdir, codec, window_frames=0)[0]
    params = generation.SampleParams(
        prompt=row["prompt"],
        seconds=min(row["seconds"], 60.0),
        seed=row["seed"],
        guidance=row["guidance"],
        steps=row["steps"],
        sampler=row["sampler"],
        schedule=row["schedule"],
        **{k: row[k] for k in ("bpm", "key", "time_signature") if k in row},
    )
    lat = one_pass.generate_latents([params]).latents[0]
    # The windowed plan of the same model (no weights needed: the windows only).
    windowed = generation.Generator(one_pass.cfg, one_pass.card, one_pass.tokenizer, mesh=one_pass.mesh)
    cuts = generation.window_seams(lat.shape[0], windowed.window, windowed.overlap)
    audio = one_pass.decode(lat, seconds=params.seconds)
    one = seams.latent_seam_ratio(one_pass.card.normalize(lat), cuts)
    one_audio = seams.audio_seam_ratio(audio, codec.card.hop, cuts)
    audio_ratios = [r["audio_seam_ratio"] for r in rows if "audio_seam_ratio" in r]
    song_seams = len(generation.window_seams(row["frames"], windowed.window, windowed.overlap))
    return {
        "seam ratio, windowed songs (latents / audio)": (
            f"{np.mean(ratios):.3f} / {np.mean(audio_ratios):.3f} over {len(ratios)} songs, "
            f"{song_seams} seams each (1.0 = seams like any other frame)"
        ),
        f"seam ratio, the first prompt and seed in one pass, {params.seconds:g} s (latents / audio)": (
            f"{one:.3f} / {one_audio:.3f} at the same {len(cuts)} seam positions"
        ),
    }


def run():
    define_flags()
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
