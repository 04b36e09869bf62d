"""``audiodiff-sample``: songs and sweeps from a checkpoint (the sampling program).

    audiodiff-sample --checkpoint=runs/dit1b --out=samples/sweep1 \
        --prompt="a slow piano piece in C minor" --prompt="fast jazz trumpet" \
        --seconds=180,300 --seeds=0,1,2 --guidance=3,5,7 --steps=50 --sampler=dpmpp_2m,heun

    audiodiff-sample --checkpoint=runs/dit1b --out=samples/evals --prompts_file=prompts.jsonl

Restores the EMA weights (``--raw`` for the raw ones) of the latest (or ``--step``)
checkpoint, with the config saved in it, onto a mesh of this machine's devices
(``--mesh_data=-1`` by default; ``--mesh_sequence=N`` splits long songs over N devices).
Every combination of the grid flags is generated for every prompt; a prompts file
(JSONL) row may fix any of them (``{"prompt": "...", "seconds": 240, "seed": 7}``).
Writes WAVs, spectrograms, ``manifest.jsonl``, ``sweep_issues.jsonl`` and
``report.html`` into ``--out``; run again to finish an interrupted sweep.

Edits: ``--continue_audio=a.wav`` continues a recording, ``--inpaint_audio=a.wav
--inpaint_range=30,45`` regenerates seconds 30-45 of it, ``--init_audio=a.wav
--strength=0.6`` makes a variation.

Exit status: 0 when every output was made, 1 when some were not (bad rows, failed
batches; listed in the log and on the page), 2 for bad input that stops everything.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run workdir, its checkpoints folder, or a step folder."
)
_OUT = flags.DEFINE_string("out", None, "Output folder (WAVs, manifest, report).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest complete).")
_RAW = flags.DEFINE_bool("raw", False, "Use the raw weights instead of the EMA weights.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A caption (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "JSONL file of prompt rows.")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", "", "Negative prompt for guidance (default: empty caption)."
)
_SECONDS = flags.DEFINE_list("seconds", ["180"], "Durations in seconds.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_GUIDANCE = flags.DEFINE_list("guidance", ["5"], "Classifier-free guidance scales (1 = off).")
_STEPS = flags.DEFINE_list("steps", ["50"], "Sampler steps.")
_SAMPLER = flags.DEFINE_list("sampler", ["dpmpp_2m"], "Samplers: ddim, dpmpp_2m, euler, heun.")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi in [0, 1].")
_SCHEDULE = flags.DEFINE_enum("schedule", "uniform", ["uniform", "logsnr", "karras"], "Step schedule.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per batch (0 = the mesh's data x fsdp size).")
_CODEC = flags.DEFINE_string("codec", "", "Codec for load_codec (default: the checkpoint dataset card's).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "Tokenizer model (default: the copy saved with the checkpoint)."
)
_WINDOW = flags.DEFINE_integer(
    "window_frames", -1, "Longest one-pass sequence (-1 = training window, 0 = all)."
)
_OVERLAP = flags.DEFINE_integer("overlap_frames", -1, "Window overlap in frames (-1 = window / 4).")
_MIN_S = flags.DEFINE_float("min_seconds", 10.0, "Shortest accepted duration.")
_MAX_S = flags.DEFINE_float("max_seconds", 300.0, "Longest accepted duration.")
_MESH = {
    axis: flags.DEFINE_integer(
        f"mesh_{axis}", -1 if axis == "data" else 1, f"Sampling mesh size of '{axis}'."
    )
    for axis in ("data", "fsdp", "sequence", "tensor")
}
_INIT_AUDIO = flags.DEFINE_string("init_audio", "", "Audio for a variation (with --strength).")
_STRENGTH = flags.DEFINE_float("strength", 1.0, "Variation strength in (0, 1]: how far toward noise.")
_CONTINUE_AUDIO = flags.DEFINE_string("continue_audio", "", "Audio whose continuation to generate.")
_INPAINT_AUDIO = flags.DEFINE_string("inpaint_audio", "", "Audio to inpaint (with --inpaint_range).")
_INPAINT_RANGE = flags.DEFINE_list("inpaint_range", [], "start,end seconds to regenerate.")

EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2


def _parse_list(flag, tp, name):
    try:
        return tuple(tp(v) for v in flag.value)
    except ValueError as e:
        raise ValueError(f"--{name}={','.join(flag.value)}: {e}") from e


def _edit(gen):
    import soundfile as sf

    chosen = [f for f in (_INIT_AUDIO, _CONTINUE_AUDIO, _INPAINT_AUDIO) if f.value]
    if len(chosen) > 1:
        raise ValueError("give at most one of --init_audio, --continue_audio, --inpaint_audio")
    if not chosen:
        return None, ""
    path = chosen[0].value
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises LibsndfileError / RuntimeError
        raise ValueError(f"cannot read audio {path!r}: {e}") from e
    audio = audio.T
    if chosen[0] is _INIT_AUDIO:
        return gen.variation(audio, sr), f"variation:{path}"
    if chosen[0] is _CONTINUE_AUDIO:
        return gen.continuation(audio, sr), f"continuation:{path}"
    if len(_INPAINT_RANGE.value) != 2:
        raise ValueError("--inpaint_audio needs --inpaint_range=START,END (seconds)")
    a, b = (float(v) for v in _INPAINT_RANGE.value)
    return gen.inpainting(audio, sr, a, b), f"inpaint:{path}:{a}-{b}"


def main(argv):
    del argv
    from audiodiff_jax import generation, sharding
    from audiodiff_jax.config import ConfigError, MeshConfig
    from audiodiff_jax.train_main import init_distributed

    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    init_distributed()
    try:
        grid = generation.Grid(
            guidance=_parse_list(_GUIDANCE, float, "guidance"),
            steps=_parse_list(_STEPS, int, "steps"),
            samplers=_parse_list(_SAMPLER, str, "sampler"),
            seeds=_parse_list(_SEEDS, int, "seeds"),
            seconds=_parse_list(_SECONDS, float, "seconds"),
            guidance_rescale=_RESCALE.value,
            schedule=_SCHEDULE.value,
            eta=_ETA.value,
            negative_prompt=_NEGATIVE.value,
            strength=_STRENGTH.value,
        )
        rows, issues = [], []
        for n, prompt in enumerate(_PROMPT.value):
            where = f"--prompt #{n + 1}"
            try:
                rows.append((where, generation.parse_prompt_row({"prompt": prompt}, where)))
            except generation.GenerationError as e:
                issues.append(generation.SweepIssue(where, str(e)))
        if _PROMPTS_FILE.value:
            file_rows, file_issues = generation.read_prompts_file(_PROMPTS_FILE.value)
            rows += file_rows
            issues += file_issues
        if not rows:
            raise ValueError(
                "no usable prompt: give --prompt or --prompts_file"
                + "".join(f"\n  {i.where}: {i.message}" for i in issues)
            )
        mesh = sharding.make_mesh(MeshConfig(**{a: f.value for a, f in _MESH.items()}))
        step_dir, _ = generation.find_checkpoint(_CHECKPOINT.value, _STEP.value)
        _, card = generation.read_checkpoint_meta(step_dir)
        codec = generation.load_named_codec(_CODEC.value or card.codec.name)
        gen = generation.Generator(
            _CHECKPOINT.value,
            codec,
            step=_STEP.value,
            use_ema=not _RAW.value,
            mesh=mesh,
            tokenizer_path=_TOKENIZER.value or None,
            window_frames=None if _WINDOW.value < 0 else _WINDOW.value,
            overlap_frames=None if _OVERLAP.value < 0 else _OVERLAP.value,
            min_seconds=_MIN_S.value,
            max_seconds=_MAX_S.value,
        )
        edit, edit_tag = _edit(gen)
    except (ValueError, ConfigError) as e:  # GenerationError is a ValueError
        logging.error("%s", e)
        print(f"audiodiff-sample: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    items = generation.expand_grid(rows, grid)
    result = generation.run_sweep(
        gen, items, _OUT.value, issues=issues, batch_size=_BATCH.value or None, edit=edit, edit_tag=edit_tag
    )
    print(
        f"audiodiff-sample: {len(result.rows)} output(s) in {_OUT.value} ({result.generated} new), "
        f"{len(result.issues)} problem(s); page {result.report}"
    )
    for i in result.issues:
        print(f"  {i.where}: {i.message}", file=sys.stderr)
    if result.issues:
        sys.exit(EXIT_INCOMPLETE)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
