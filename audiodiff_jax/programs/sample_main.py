r"""``audiodiff-sample``: songs and sweeps from a checkpoint (the sampling program).

    audiodiff-sample --checkpoint=runs/dit1b --out=samples/sweep1 \
        --prompt="a slow piano piece in C minor" --prompt="fast jazz trumpet" \
        --seconds=180,300 --seeds=0,1,2 --guidance=3,5,7 --steps=50 --sampler=dpmpp_2m,heun

    audiodiff-sample --checkpoint=runs/dit1b --out=samples/evals --prompts_file=prompts.jsonl

    audiodiff-sample --checkpoint=runs/dit1b --out=samples/ckpts --prompt="solo cello" \
        --step=2000,4000,latest --weights=ema0.999,ema0.9999,raw --schedule=uniform,karras

Restores the weight sets ``--weights`` (``raw``, ``ema`` = the EMA of the run's
``optim.ema_decay``, ``ema<decay>`` for each EMA the run keeps; default: the
checkpoint config's ``sample.weights``) of the latest checkpoint, or of each of
``--step``, with the config saved in it, onto a mesh of this machine's devices
(``--mesh_data=-1`` by default; ``--mesh_sequence=N`` splits long songs over N devices).
Each checkpoint step is restored once, all its weight sets in one read (never the
optimizer state). ``--checkpoint`` may also be an export folder (``audiodiff-export``).
The older ``--raw`` is ``--weights=raw``.

``--adapters=waltz@1,flute@0.5`` stacks low-rank adapters on those weights (merged in,
each at its scale; an adapter made for other weights is refused); the flag given several
times (``--adapters=none --adapters=waltz@0.5 --adapters=waltz@1``) makes the stacks
another axis of the sweep, recorded in every manifest row.
Every combination of the grid flags is generated for every prompt; a prompts file
(JSONL) row may fix any of them (``{"prompt": "...", "seconds": 240, "seed": 7}``).
Writes WAVs, spectrograms, ``manifest.jsonl``, ``sweep_issues.jsonl`` and
``report.html`` into ``--out``; run again to finish an interrupted sweep.

``--profile_songs=N`` traces the sampling of the first N songs (the batches that make
them; a first batch's compilation is in the trace, marked) into ``OUT/profile``:
``tensorboard --logdir=OUT/profile`` opens it in the profile plugin.

Edits: ``--continue_audio=a.wav`` continues a recording, ``--inpaint_audio=a.wav
--inpaint_range=30,45`` regenerates seconds 30-45 of it, ``--init_audio=a.wav
--strength=0.6`` makes a variation.

Exit status: 0 when every output was made, 1 when some were not (bad rows, failed
batches; listed in the log and on the page), 2 for bad input that stops everything.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from audiodiff_jax.checkpoints import source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import distributed, names, sharding
from audiodiff_jax.programs import cli, sample_flags
from audiodiff_jax.sampling import generation
from audiodiff_jax.sweeps import share, sweep

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run workdir, its checkpoints folder, or a step folder."
)
_OUT = flags.DEFINE_string("out", None, "Output folder (WAVs, manifest, report).")
_STEP = flags.DEFINE_list(
    "step",
    [source.LATEST],
    "Checkpoint steps, numbers or 'latest' (the latest complete one), e.g. --step=2000,4000,latest.",
)
_RAW = flags.DEFINE_bool("raw", False, "Older flag, kept for scripts: the same as --weights=raw.")
_ADAPTERS = flags.DEFINE_multi_string(
    "adapters",
    [],
    "Low-rank adapters stacked on the weights: PATH[@SCALE],... (an adapter folder written by "
    "audiodiff-export, or an adapter run; scale 1 when not given; scale 0 is the weights alone). "
    "Give the flag again for a sweep over stacks ('none': the weights alone).",
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A caption (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "JSONL file of prompt rows.")
_CODEC = flags.DEFINE_string("codec", "", "Codec for load_codec (default: the checkpoint dataset card's).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "Tokenizer model (default: the copy saved with the checkpoint)."
)
_MESH = {
    axis: flags.DEFINE_integer(
        f"mesh_{axis}", getattr(config_lib.MeshConfig(), axis), f"Sampling mesh size of '{axis}'."
    )
    for axis in names.MESH_AXES
}
_EVAL = flags.DEFINE_bool(
    "eval",
    True,
    "Measure every song at the end (tempo, key, loudness, notes, adherence to the prompt's labels; "
    "audiodiff-eval): metrics.jsonl beside the manifest and a section of report.html. Needs the eval extra.",
)
_EVAL_REFERENCE = flags.DEFINE_string(
    "eval_reference", "", "A folder of reference audio: the Fréchet distance of the songs to it."
)
_INIT_AUDIO = flags.DEFINE_string("init_audio", "", "Audio for a variation (with --strength).")
_CONTINUE_AUDIO = flags.DEFINE_string("continue_audio", "", "Audio whose continuation to generate.")
_INPAINT_AUDIO = flags.DEFINE_string("inpaint_audio", "", "Audio to inpaint (with --inpaint_range).")
_INPAINT_RANGE = flags.DEFINE_list("inpaint_range", [], "start,end seconds to regenerate.")
_PROFILE_SONGS = flags.DEFINE_integer(
    "profile_songs",
    0,
    "Trace the sampling of the first N songs (jax.profiler) into OUT/profile for TensorBoard's "
    "profile plugin; 0 = no trace.",
    lower_bound=0,
)

EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2
_flag_name = sample_flags.flag_name


def sample_overrides() -> dict:
    """The sample fields given as flags (``sample_flags``), parsed and checked on their own.

    Raises:
      ValueError: naming the flag and its value (ConfigError is one).
    """
    out = sample_flags.given()
    if _RAW.present:
        if "weights" in out:
            raise ValueError("give --weights or the older --raw, not both (--raw is --weights=raw)")
        out["weights"] = ("raw",) if _RAW.value else ("ema",)
        logging.warning("--raw%s is read as --weights=%s", "" if _RAW.value else "=false", out["weights"][0])
    config_lib.check_sample_values(out, _flag_name)
    return out


def checkpoint_steps() -> list[int | str]:
    """``--step``: numbers and ``latest``, checked on their own (ValueError names the flag)."""
    out = []
    for v in _STEP.value or [source.LATEST]:
        if v == source.LATEST:
            out.append(v)
            continue
        try:
            step = int(v)
        except ValueError:
            raise ValueError(
                f"--step={','.join(_STEP.value)}: {v!r} is not a step number or 'latest'"
            ) from None
        if step < 0:
            raise ValueError(f"--step={','.join(_STEP.value)}: {v!r} must be >= 0")
        out.append(step)
    return out


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


def _bad_input(e: Exception):
    logging.error("%s", e)
    print(f"audiodiff-sample: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv):
    del argv
    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    # The flags alone first: a bad value stops here, before the checkpoint is read.
    try:
        overrides = sample_overrides()
        wanted_steps = checkpoint_steps()
    except ValueError as e:  # ConfigError is a ValueError
        _bad_input(e)
    # The same command on every process: the launcher's variables give this process its
    # share of the grid (share.py); no jax.distributed, no collective between them.
    index, count = distributed.work_share(join=False)
    try:
        rows, issues = [], []
        for n, prompt in enumerate(_PROMPT.value):
            where = f"--prompt #{n + 1}"
            try:
                rows.append((where, sweep.parse_prompt_row({"prompt": prompt}, where)))
            except generation.GenerationError as e:
                issues.append(sweep.SweepIssue(where, str(e)))
        if _PROMPTS_FILE.value:
            file_rows, file_issues = sweep.read_prompts_file(_PROMPTS_FILE.value)
            rows += file_rows
            issues += file_issues
        if not rows:
            raise ValueError(
                "no usable prompt: give --prompt or --prompts_file"
                + "".join(f"\n  {i.where}: {i.message}" for i in issues)
            )
        mesh = sharding.make_mesh(config_lib.MeshConfig(**{a: f.value for a, f in _MESH.items()}))
        steps = source.resolve_steps(_CHECKPOINT.value, wanted_steps)
        src = source.WeightsSource(_CHECKPOINT.value, steps[0])
        # The flags over the sample section saved with the weights, checked together
        # before the weights are restored.
        sample = sweep.resolve_sample(src.sample_section(), overrides, _flag_name)
        # Only a codec typed here may name code (module:factory); the card's is data.
        if _CODEC.value:
            codec = sweep.load_named_codec(_CODEC.value, allow_code=True)
        else:
            codec = sweep.load_named_codec(src.card.codec.name, allow_code=False)
        gen, src = generation.open_generator(
            src,
            codec,
            weights=sample.weights[0],
            restore=False,  # the sweep restores each step once, all its weight sets together
            mesh=mesh,
            tokenizer_path=_TOKENIZER.value or None,
            **generation.section_kwargs(sample),
        )
        # Musical controls given as flags, against what the model takes (a model without
        # the control, a meter it never saw: one line, exit 2, before anything is written).
        for name in config_lib.SAMPLE_CONTROLS:
            if name in overrides:
                for value in getattr(sample, name):
                    probe = generation.SampleParams("", seconds=gen.min_seconds, **{name: value})
                    try:
                        gen.check_controls(probe)
                    except generation.GenerationError as e:
                        raise generation.GenerationError(f"{_flag_name(name)}={value}: {e}") from None
        for step in steps:  # every step holds every weight set, before anything is restored
            src.check_weights(step, sample.weights, what=_flag_name("weights"))
        # Every adapter read whole and checked against every set of weights it is stacked
        # on (their content hashes), before anything is sampled or written.
        stacks = source.open_adapter_stacks(_ADAPTERS.value)
        for step in steps:
            for name in sample.weights:
                for stack in stacks:
                    for adapter, _ in stack.layers:
                        src.check_adapter(adapter, step, name)
        edit, edit_tag = _edit(gen)
    except ValueError as e:  # GenerationError and ConfigError are ValueErrors
        _bad_input(e)
    items = sweep.expand_grid(rows, sweep.Grid.from_config(sample))
    result = share.run_share(
        gen,
        items,
        _OUT.value,
        index=index,
        count=count,
        source=src,
        checkpoint_steps=steps,
        weights=sample.weights,
        adapters=stacks,
        issues=issues,
        batch_size=sample.batch_size or None,
        edit=edit,
        edit_tag=edit_tag,
        evaluate=_EVAL.value,
        eval_reference=_EVAL_REFERENCE.value or None,
        profile_songs=_PROFILE_SONGS.value,
        profile_dir=os.path.join(_OUT.value, "profile"),
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
    cli.run(main, module=(__name__, sample_flags.__name__, distributed.__name__))


if __name__ == "__main__":
    run()
