r"""``audiodiff-calibrate``: fits a distilled student's guidance input to its teacher.

    audiodiff-calibrate --student=runs/student8 --prompts=train_prompts.jsonl \
        --out=runs/student8_calibration --export=exports/student8

A few-step student tends to sound like its teacher at a lower guidance scale than the
one it is given. This makes the teacher's songs (its own sampler; two seeds) and the
student's at each offset of ``--offsets`` added to its guidance input (the same prompts
and noise), for the prompt rows of ``--prompts`` (a JSONL file as ``audiodiff-sample``
reads: captions the student trained on, never those it will be evaluated on), and
picks the offset whose songs are nearest the teacher's by the Fréchet distance in
``--embedding``, beside the distance between the teacher's two seeds
(``audiodiff_jax/sweeps/calibrate.py``).

Writes ``OUT/calibration.json`` and ``OUT/calibration.png`` (distance against offset)
with the songs, and with ``--export`` the calibrated student: an export of the same
weights whose config sets ``distill.guidance_offset``, which ``audiodiff-sample`` and
sweeps apply (a request for guidance ``w`` gives the student ``w + offset``).

``--teacher`` defaults to the teacher the student's config names. Rerunning with the same
``--out`` reuses the songs already made.

Exit status: 0 when done, 2 for bad input (not a student, a bad prompts file, offsets
outside the student's trained inputs, an export folder that is not empty).
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from audiodiff_jax.programs import cli

_STUDENT = flags.DEFINE_string("student", None, "The student: run workdir, checkpoint step or export.")
_TEACHER = flags.DEFINE_string("teacher", "", "Its teacher (default: the one its config names).")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL file of prompt rows the student trained on.")
_OUT = flags.DEFINE_string("out", None, "Folder for the songs, calibration.json and the plot.")
_EXPORT = flags.DEFINE_string("export", "", "Write the calibrated student here (a new or empty folder).")
_GUIDANCE = flags.DEFINE_float(
    "guidance", None, "Guidance scale to fit at (default: the student's sample.guidance)."
)
_OFFSETS = flags.DEFINE_list(
    "offsets", ["0", "0.25", "0.5", "0.75", "1", "1.25", "1.5"], "Candidate offsets."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the songs compared (the teacher's second run: seed + 1).")
_SECONDS = flags.DEFINE_float("seconds", 12.0, "Seconds per song.")
_EMBEDDING = flags.DEFINE_string("embedding", "spectral", "Embedding of the Fréchet distance.")
_CODEC = flags.DEFINE_string(
    "codec", "", "Codec that decodes the songs (default: the student's dataset card's)."
)


def main(argv):
    del argv
    from audiodiff_jax.sweeps import calibrate, sweep  # noqa: PLC0415

    if not _STUDENT.value or not _PROMPTS.value or not _OUT.value:
        raise app.UsageError("--student, --prompts and --out are required")
    student = calibrate.open_student(_STUDENT.value)
    teacher = _TEACHER.value or student.cfg.distill.teacher
    if not teacher:
        raise calibrate.CalibrationError(f"{_STUDENT.value} names no teacher: give --teacher")
    rows, issues = sweep.read_prompts_file(_PROMPTS.value)
    if issues:
        raise calibrate.CalibrationError(f"{issues[0].where}: {issues[0].message}")
    try:
        offsets = [float(x) for x in _OFFSETS.value]
    except ValueError as e:
        raise app.UsageError(f"--offsets={','.join(_OFFSETS.value)}: {e}") from e
    guidance = _GUIDANCE.value if _GUIDANCE.value is not None else student.cfg.sample.guidance[0]
    result = calibrate.fit_offset(
        _STUDENT.value,
        teacher,
        [r for _, r in rows],
        _OUT.value,
        guidance=guidance,
        offsets=offsets,
        # Only a codec typed here may name code (module:factory); the card's is data.
        codec=sweep.load_named_codec(_CODEC.value, allow_code=True)
        if _CODEC.value
        else sweep.load_named_codec(student.card.codec.name, allow_code=False),
        seed=_SEED.value,
        seconds=_SECONDS.value,
        embedding=_EMBEDDING.value,
    )
    logging.info("calibration: %s", json.dumps(result))
    print(
        f"audiodiff-calibrate: offset {result['offset']:+g} (distance {result['distance']:.4g}, "
        f"{result['ratio']:.2f}x the teacher's two seeds'; uncalibrated {result['uncalibrated_ratio']:.2f}x)"
    )
    if _EXPORT.value:
        calibrate.write_calibrated(_STUDENT.value, _EXPORT.value, result)
        print(f"audiodiff-calibrate: wrote {_EXPORT.value}")


def run():
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
