"""Calibrating a distilled student's guidance input against its teacher (``audiodiff-calibrate``).

A student (``model.guidance_input``, ``training/distill_trainer.py``) learns the teacher's
guided sampling as a function of the guidance scale it is given. Few-step students
tend to come out under-guided: their songs sound like the teacher's at a lower scale
(the demo's 8-step student at 4 sounds like its teacher at about 3; BENCHMARKS.md,
"Few-step students"). The calibration measures that and corrects it without touching
the weights: for the scale ``w`` a user asks for, the student is given ``w + offset``
(``distill.guidance_offset``, which sampling applies and a next distillation phase
honours).

:func:`fit_offset` makes the teacher's songs (its own sampler, seeds ``seed`` and
``seed + 1``) and the student's at every candidate offset (seed ``seed``: the same
prompts and noise) for prompt rows the user gives, and picks the offset whose songs are
nearest the teacher's by the Fréchet distance in an embedding (the built-in
``spectral`` one by default). The teacher's second seed gives the distance two teacher
runs differ by, the scale the result is read against. The rows should be captions the
student was trained on, never those it is evaluated on: an offset fitted on the
evaluation prompts would be fitted on what it is judged by.

:func:`write_calibrated` writes the student as an export with the offset in its config
and the fit in ``export.json`` (``calibration``); the weights are the student's, byte for
byte (the same content hash).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath

from audiodiff_jax.checkpoints import export, exporting, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import paths, report
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.evaluation.folder import set_distance

RESULT = "calibration.json"
PLOT = "calibration.png"


class CalibrationError(UserError):
    """A student, teacher or prompt set that cannot be calibrated, named."""


def open_student(path: str) -> source.WeightsSource:
    src = source.WeightsSource(source.resolve(path))
    if not src.cfg.model.guidance_input:
        raise CalibrationError(
            f"{path} is not a distilled student (its model.guidance_input is off): only a "
            "student takes the guidance scale as input"
        )
    return src


def candidate_offsets(d: config_lib.DistillConfig, guidance: float, offsets: Sequence[float]) -> list[float]:
    """The offsets whose student input ``guidance + offset`` lies in its trained range."""
    inside = [o for o in offsets if d.guidance_min <= guidance + o <= d.guidance_max]
    if not inside:
        raise CalibrationError(
            f"no offset of {list(offsets)} keeps guidance {guidance:g} + offset within the student's "
            f"trained inputs {d.guidance_min:g} to {d.guidance_max:g}"
        )
    dropped = sorted(set(offsets) - set(inside))
    if dropped:
        logging.warning(
            "offsets %s left out: guidance %g + offset leaves the student's trained inputs %g to %g",
            dropped,
            guidance,
            d.guidance_min,
            d.guidance_max,
        )
    return inside


def fit_offset(
    student: str,
    teacher: str,
    rows: Sequence[dict],
    out: str,
    *,
    guidance: float,
    offsets: Sequence[float],
    codec: Any,
    seed: int = 0,
    seconds: float = 12.0,
    embedding: str = "spectral",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Songs of ``teacher`` and ``student`` for ``rows`` into ``out``; the offset whose
    student songs are nearest the teacher's (module docstring). Rerunning skips the songs
    already made. Returns the fit (also written to ``out/calibration.json``, with a plot)."""
    from audiodiff_jax.sweeps import sweep  # noqa: PLC0415 (sweep imports this module's users)

    src = open_student(student)
    d = src.cfg.distill
    offsets = candidate_offsets(d, guidance, offsets)
    if len(rows) < 2:
        raise CalibrationError(f"{len(rows)} prompt row(s): a Fréchet distance needs several songs")
    os.makedirs(out, exist_ok=True)
    common = {"seconds": seconds, "codec": codec, "batch_size": batch_size}
    for s in (seed, seed + 1):
        logging.info("calibration: the teacher's songs, seed %d (%d prompts)", s, len(rows))
        sweep.generate_songs(
            teacher, rows, os.path.join(out, f"teacher_s{s}"), seeds=(s,), guidance=guidance, **common
        )
    reference = os.path.join(out, f"teacher_s{seed}")
    floor = set_distance(os.path.join(out, f"teacher_s{seed + 1}"), reference, embedding)["frechet_distance"]
    distances = {}
    for o in offsets:
        folder = os.path.join(out, f"student_offset{o:+g}")
        # The student as it is (its own offset applied by sampling): ask for the scale
        # whose input is guidance + o.
        asked = guidance + o - d.guidance_offset
        logging.info("calibration: the student's songs at offset %+g (input %g)", o, guidance + o)
        sweep.generate_songs(student, rows, folder, seeds=(seed,), guidance=asked, **common)
        distances[o] = set_distance(folder, reference, embedding)["frechet_distance"]
        logging.info(
            "calibration: offset %+g: distance %.4g (%.2fx two teacher seeds')",
            o,
            distances[o],
            distances[o] / floor,
        )
    best = min(distances, key=distances.get)
    tsrc = source.WeightsSource(teacher)
    result = {
        "student": student,  # as given (a shipped name stays a name)
        "student_hash": src.identity(None, src.default_weights())["hash"],
        "teacher": teacher,
        "teacher_hash": tsrc.identity(None, tsrc.default_weights())["hash"],
        "guidance": guidance,
        "embedding": embedding,
        "prompts": len(rows),
        "seed": seed,
        "seconds": seconds,
        "teacher_seed_distance": floor,
        "distance_by_offset": {f"{o:g}": v for o, v in distances.items()},
        "offset": best,
        "distance": distances[best],
        "ratio": distances[best] / floor if floor > 0 else math.inf,
        "uncalibrated_ratio": distances.get(0.0, math.nan) / floor if floor > 0 else math.inf,
    }
    paths.atomic_write(os.path.join(out, RESULT), json.dumps(result, indent=1).encode())
    _plot(result, os.path.join(out, PLOT))
    return result


def _plot(result: dict[str, Any], path: str) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib only where a picture is drawn)

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    xs = [float(k) for k in result["distance_by_offset"]]
    ys = list(result["distance_by_offset"].values())
    ax.plot(xs, ys, "o-", label="student (seed 0) to teacher (seed 0)")
    ax.axhline(result["teacher_seed_distance"], color="k", ls="--", label="teacher seed 1 to seed 0")
    ax.axvline(result["offset"], color="C3", ls=":", label=f"chosen offset {result['offset']:+g}")
    ax.set_xlabel(f"guidance offset (the student's input at guidance {result['guidance']:g})")
    ax.set_ylabel(f"Fréchet distance ({result['embedding']})")
    ax.set_yscale("log")
    ax.set_title(f"{result['prompts']} prompts, {result['seconds']:g} s songs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    report.save_figure_png(fig, path)


def write_calibrated(student: str, out: str, result: dict[str, Any]) -> str:
    """The student as an export in ``out`` (new or empty) with ``distill.guidance_offset``
    set to ``result["offset"]`` and the fit in ``export.json``; returns ``out``."""
    dest = epath.Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CalibrationError(f"export folder {out} exists and is not empty; give a new folder")
    src = open_student(student)
    tmp = f"{out.rstrip('/')}.calibrating-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    if src.is_export:
        shutil.copytree(src.path, tmp)
    else:
        exporting.export_checkpoint(src.path, tmp)
    config_path = os.path.join(tmp, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    calibrated = dataclasses.replace(src.cfg.distill, guidance_offset=float(result["offset"]))
    config["distill"]["guidance_offset"] = calibrated.guidance_offset
    # Its default scales, those of the calibrated range (as distill_trainer.student_config).
    config["sample"]["guidance"] = list(calibrated.accepted_guidance(config["sample"]["guidance"]))
    config_lib.from_configdict(config)  # still a valid config
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    meta_path = os.path.join(tmp, export.META)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["calibration"] = {k: v for k, v in result.items() if k != "student"}
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if dest.exists():
        dest.rmdir()
    os.rename(tmp, out)
    logging.info("wrote the calibrated student (distill.guidance_offset=%g) to %s", result["offset"], out)
    return out
