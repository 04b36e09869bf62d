r"""The accelerator benchmark suite: every figure of BENCHMARKS.md's GPU rows in one run.

    # On a GPU machine (benchmarks/gpu_suite.sh installs the GPU extra, then runs this):
    python benchmarks/suite.py --profile=gpu --out_dir=/tmp/suite
    # The same parts on a CPU at tiny sizes (tests/test_benchmarks.py runs this):
    JAX_PLATFORMS=cpu python benchmarks/suite.py --profile=tiny --out_dir=/tmp/suite

Runs the existing benchmarks as parts, in one process, in this order:

1. ``train``: ``train_bench.run``: the DiT train step (step time, model TFLOP/s, MFU
   against ``flops.PEAK_BF16_FLOPS``, peak memory), a profile of a few more steps
   (``OUT_DIR/profile``: ``tensorboard --logdir=OUT_DIR/profile`` shows where a step's
   time goes) and the blocking part of asynchronous checkpoint saves of the real train
   state against the step time;
2. ``sample``: ``sample_bench.run``: one song through ``generation.Generator``
   (compilation apart), real-time factor with and without the codec decode;
3. ``student``: ``sample_bench.run_weights``: a 300 s song of the shipped distilled
   student (``--student``, default ``audiodiff_jax/demo_student``, an export) as
   ``audiodiff-sample`` makes it, decoding included, against its target (``STUDENT_TARGET``:
   at most 1.3 s on one H200); not run, with the reason in ``suite.json``
   (``{"not_run": ...}``), when that folder holds no export or run;
4. ``codec``: ``codec_bench.speed``: encode / decode throughput of the codec;
5. ``loader``: ``loader_bench.run``: the Grain loader at several worker counts;
6. ``curves``: ``sample_bench.run`` at several song lengths, one pass and windowed,
   without decoding (seconds per song-second; ``curves.png``).

After each part the suite rewrites ``suite.json`` (every figure so far, with the
machine) and ``suite.md`` (a table), so a run stopped by a time limit still leaves
what it measured. A part that raises is recorded as ``{"error": ...}`` and the suite
goes on; a part given ``fallback`` changes (e.g. XLA attention when cuDNN's fails) is
retried once with them. Parts not started within ``--budget_s`` are skipped, and the
curves stop taking new lengths at the budget.

Profiles (``PROFILES``): ``gpu`` sizes every part for one H100 / H200 in at most
9 minutes, compilation included (DiT-1B, 6,460 frames, 300 s songs, 50 steps with
CFG, the 64-channel ``stable`` codec at random weights); ``tiny`` runs every part but
``student`` in seconds on a CPU (``configs/tiny.py``, the ``tiny`` codec preset at
random weights). Its ``student`` part (12 s songs) runs when asked: a CPU dry run of
the step, ``--parts=student --student=audiodiff_jax/demo_weights`` on any export.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from typing import Any

import jax
from absl import app, flags

from audiodiff_jax.checkpoints import export
from audiodiff_jax.core import config as config_lib
from benchmarks import codec_bench, loader_bench, sample_bench, train_bench
from configs import dit, tiny

_PROFILE = flags.DEFINE_enum("profile", "tiny", ["tiny", "gpu"], "Sizes of every part (PROFILES).")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/audiodiff_suite", "suite.json, suite.md, curves.png go here.")
_PARTS = flags.DEFINE_list("parts", [], "Run only these parts (default: all, in order).")
_BUDGET = flags.DEFINE_float("budget_s", 0.0, "Wall-time budget (0 = the profile's).")
_STUDENT = flags.DEFINE_string(
    "student", "audiodiff_jax/demo_student", "The student part's weights: an export or a run."
)
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0 = flops.PEAK_BF16_FLOPS by device kind)."
)

PARTS = ("train", "sample", "student", "codec", "loader", "curves")
# What the student part's figure is measured against (the distillation issue's target).
STUDENT_TARGET = {
    "what": "a 300 s song in at most 1.3 s on one H200, decoding included",
    "seconds": 300.0,
    "song_s": 1.3,
}

# Config overrides per profile (``config_lib.replace`` keys), and each part's settings.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {
        "budget_s": 500.0,
        "parts": PARTS,
        "config": (dit.get_config, "1B"),
        "overrides": {"model.attention": "cudnn", "mesh.fsdp": -1},
        # After a failure (cuDNN attention unsupported, or memory): XLA attention, half the batch.
        "fallback": {"model.attention": "xla", "data.global_batch_size": 2},
        "train": {
            "overrides": {"data.window_frames": 6460, "data.global_batch_size": 4},
            "steps": 10,
            "warmup": 2,
            "profile_steps": 2,
            "saves": 2,
        },
        "sample": {"seconds": [300.0], "steps": 50, "guidance": 5.0, "repeats": 2, "codec": "random:stable"},
        "student": {"seconds": 300.0, "paths": ["shipped", "one_pass"], "repeats": 2},
        "codec": {"codec": "random:stable", "seconds": 300.0},
        "loader": {
            "window_frames": 6460,
            "batch": 8,
            "channels": 64,
            "workers": [0, 4, 8, 14],
            "batches": 30,
        },
        "curves": {
            "seconds": [300.0, 120.0, 30.0, 60.0, 180.0],  # longest first: the most telling rows
            "paths": ["windowed", "one_pass"],
            "window_frames": 1024,
            "steps": 50,
            "guidance": 5.0,
            "repeats": 1,
        },
    },
    "tiny": {
        "budget_s": 600.0,
        "parts": tuple(p for p in PARTS if p != "student"),  # --parts=student: a CPU dry run
        "config": (tiny.get_config, None),
        "overrides": {},
        "fallback": None,
        "train": {"overrides": {}, "steps": 2, "warmup": 1, "profile_steps": 1, "saves": 1},
        "sample": {"seconds": [1.0], "steps": 2, "guidance": 5.0, "repeats": 1, "codec": "random:tiny"},
        "student": {"seconds": 12.0, "paths": ["shipped"], "repeats": 1},
        "codec": {"codec": "random:tiny", "seconds": 2.0},
        "loader": {"window_frames": 32, "batch": 8, "channels": 8, "workers": [0], "batches": 5},
        "curves": {
            "seconds": [1.0, 2.0],
            "paths": ["windowed", "one_pass"],
            "window_frames": 32,
            "steps": 2,
            "guidance": 5.0,
            "repeats": 1,
        },
    },
}


def machine() -> dict:
    d = jax.devices()[0]
    return {
        "devices": f"{jax.device_count()} x {d.device_kind}",
        "platform": d.platform,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def make_cfg(profile: dict, extra: dict | None = None, fallback: bool = False):
    make, arg = profile["config"]
    cfg = config_lib.from_configdict(make(arg))
    changes = {**profile["overrides"], **(extra or {})}
    if fallback and profile["fallback"]:
        changes.update(profile["fallback"])
    return config_lib.replace(cfg, **changes) if changes else cfg


def student_part(path: str, p: dict, deadline: float) -> dict:
    """The student part: ``sample_bench.run_weights`` on ``path`` beside ``STUDENT_TARGET``;
    ``{"not_run": why}`` when ``path`` holds no weights (the student not shipped yet)."""
    target = dict(STUDENT_TARGET)
    if not (export.is_export(path) or os.path.isdir(os.path.join(path, "checkpoints"))):
        why = "absent" if not os.path.exists(path) else "holds no export.json (not an export) nor checkpoints"
        return {"not_run": f"no distilled student at {path!r} ({why}); --student=PATH", "target": target}
    result = sample_bench.run_weights(
        path, seconds=p["seconds"], paths=p["paths"], repeats=p["repeats"], deadline=deadline
    )
    best = min((r["song_s_with_decode"] for r in result["rows"]), default=None)
    # Only a song of the target's length is held to it (the tiny profile's dry run is not).
    met = None if best is None or p["seconds"] != target["seconds"] else best <= target["song_s"]
    result["target"] = {**target, "best_song_s": best, "met": met}
    if not result["student"]:
        result["target"]["note"] = "not a student (model.guidance_input is off): the target is a student's"
    return result


def run_part(name: str, profile: dict, out_dir: str, deadline: float, peak_tflops: float, fallback: bool):
    p = profile[name]
    if name == "train":
        extra = dict(p["overrides"])
        if peak_tflops:
            extra["train.peak_tflops_per_device"] = peak_tflops
        cfg = make_cfg(profile, extra, fallback)
        return train_bench.run(
            cfg,
            steps=p["steps"],
            warmup=p["warmup"],
            saves=p["saves"],
            profile_dir=os.path.join(out_dir, "profile"),
            profile_steps=p["profile_steps"],
        )
    if name == "sample":
        cfg = make_cfg(profile, fallback=fallback)
        codec = sample_bench.open_codec(p["codec"], cfg.model.latent_channels)
        return sample_bench.run(
            cfg,
            seconds=p["seconds"],
            paths=["one_pass"],
            steps=p["steps"],
            guidance=p["guidance"],
            repeats=p["repeats"],
            codec=codec,
        )
    if name == "student":
        return student_part(_STUDENT.value, p, deadline)
    if name == "codec":
        return codec_bench.speed(codec_bench.open_codec(p["codec"]), p["seconds"])
    if name == "loader":
        return loader_bench.run(
            window_frames=p["window_frames"],
            batch=p["batch"],
            latent_channels=p["channels"],
            workers=p["workers"],
            batches=p["batches"],
            warmup=max(2, p["batches"] // 5),
        )
    if name == "curves":
        cfg = make_cfg(profile, fallback=fallback)
        result = sample_bench.run(
            cfg,
            seconds=sorted(p["seconds"]) if len(p["seconds"]) < 3 else p["seconds"],
            paths=p["paths"],
            steps=p["steps"],
            guidance=p["guidance"],
            window_frames=p["window_frames"],
            repeats=p["repeats"],
            deadline=deadline,
        )
        result["rows"].sort(key=lambda r: (r["path"], r["seconds"]))
        sample_bench.plot_curves(result, os.path.join(out_dir, "curves.png"))
        return result
    raise ValueError(f"unknown part {name!r}; one of {PARTS}")


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(report: dict) -> str:
    """The figures as a Markdown table (one line per figure)."""
    lines = [
        f"Suite profile `{report['profile']}` on {report['machine']['devices']} "
        f"({report['machine']['cpu_count']} CPU cores), {report['elapsed_s']:.0f} s.",
        "",
        "| part | figure | value |",
        "|---|---|---|",
    ]
    parts = report["parts"]

    def add(part, figure, value):
        lines.append(f"| {part} | {figure} | {_fmt(value)} |")

    for name, r in parts.items():
        if "error" in r:
            add(name, "error", r["error"].splitlines()[-1][:100])
            continue
        if "not_run" in r:
            add(name, "not run", r["not_run"])
            continue
        if name == "train":
            what = f"{r['preset']} x{r['global_batch']} x {r['window_frames']} frames, {r['attention']}"
            add(name, f"step time (s), {what}", r["step_time_s"])
            add(name, "model TFLOP/s per device", r["tflops_per_s_per_device"])
            add(name, f"MFU (peak {_fmt(r['peak_tflops_per_device'])} TF/s)", r["mfu"])
            add(name, f"peak memory (GiB, {r['peak_memory_kind']})", r["peak_memory_gib"])
            if r.get("profile"):
                pr = r["profile"]
                add(name, f"profile: {pr['steps']} steps traced (s), {pr['trace']}", pr["traced_s"])
            if "checkpoint" in r:
                c = r["checkpoint"]
                add(name, f"checkpoint blocking (s), state {c['state_gib']} GiB", c["save_blocking_median_s"])
                add(name, "checkpoint blocking / step time", c["save_blocking_share_of_step"])
                add(
                    name,
                    f"checkpoint blocking / {c['checkpoint_every_steps']} steps",
                    c["save_blocking_share_of_training"],
                )
                add(name, "last save's background write (s)", c["last_save_background_wait_s"])
        elif name in ("sample", "curves"):
            for row in r["rows"]:
                what = f"{row['path']} {row['seconds']:g} s ({row['windows']} windows)"
                if name == "sample":
                    add(name, f"compile (s), {what}", row["compile_s"])
                    add(name, f"loop real-time factor, {what}", row["loop_realtime_factor"])
                    if "realtime_factor_with_decode" in row:
                        add(name, f"real-time factor with decode, {what}", row["realtime_factor_with_decode"])
                else:
                    add(name, f"s per song-second, {what}", row["s_per_song_s"])
            for s in r.get("skipped", []):
                add(name, f"skipped (budget): {s['path']} {s['seconds']:g} s", None)
        elif name == "student":
            evals = f"{r['steps']} {r['sampler']} steps"
            for row in r["rows"]:
                what = f"{row['path']} {row['seconds']:g} s ({row['windows']} windows, {evals})"
                add(name, f"compile (s), {what}", row["compile_s"])
                add(name, f"song with decode (s), {what}", row["song_s_with_decode"])
                add(name, f"of which decode (s), {what}", row["decode_s"])
            t = r["target"]
            add(name, f"target: {t['what']}; met", {True: "yes", False: "no"}.get(t["met"]))
            for s in r.get("skipped", []):
                add(name, f"skipped (budget): {s['path']} {s['seconds']:g} s", None)
        elif name == "codec":
            add(
                name, f"encode audio s/s ({r['codec']}, {r['signal_seconds']:g} s)", r["encode_audio_s_per_s"]
            )
            add(name, "decode audio s/s", r["decode_audio_s_per_s"])
        elif name == "loader":
            for row in r["rows"]:
                add(name, f"frames/s, {row['workers']} workers", row["latent_frames_per_s"])
                add(name, f"frames/s per core, {row['workers']} workers", row["frames_per_s_per_core"])
    for name, why in report.get("skipped_parts", {}).items():
        add(name, "skipped", why)
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str) -> None:
    tmp = os.path.join(out_dir, "suite.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "suite.json"))
    with open(os.path.join(out_dir, "suite.md"), "w") as f:
        f.write(table(report))


def run_suite(profile_name: str, out_dir: str, parts=None, budget_s: float = 0.0, peak_tflops: float = 0.0):
    """Runs the parts of ``PROFILES[profile_name]``; returns the report (also written)."""
    profile = PROFILES[profile_name]
    parts = list(parts or profile["parts"])
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; one of {PARTS}")
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    deadline = start + (budget_s or profile["budget_s"])
    report = {
        "profile": profile_name,
        "machine": machine(),
        "parts": {},
        "skipped_parts": {},
        "elapsed_s": 0.0,
    }
    for name in parts:
        if time.monotonic() > deadline:
            report["skipped_parts"][name] = "budget spent before it started"
            print(f"[suite] {name}: skipped (budget)", flush=True)
            continue
        print(f"[suite] {name}: start at {time.monotonic() - start:.0f} s", flush=True)
        t0 = time.monotonic()
        try:
            result = run_part(name, profile, out_dir, deadline, peak_tflops, fallback=False)
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
            err = f"{type(e).__name__}: {e}"
            print(f"[suite] {name}: failed: {err}\n{traceback.format_exc()}", flush=True)
            result = {"error": err}
            if profile["fallback"] and name in ("train", "sample", "curves"):
                print(f"[suite] {name}: retrying with {profile['fallback']}", flush=True)
                try:
                    result = run_part(name, profile, out_dir, deadline, peak_tflops, fallback=True)
                    result["fallback"] = {"changes": profile["fallback"], "first_error": err}
                except Exception as e2:  # noqa: BLE001
                    result = {"error": f"{err}; with {profile['fallback']}: {type(e2).__name__}: {e2}"}
        result["part_wall_s"] = round(time.monotonic() - t0, 2)
        report["parts"][name] = result
        report["elapsed_s"] = round(time.monotonic() - start, 2)
        write(report, out_dir)
        print(
            f"[suite] {name}: done in {result['part_wall_s']:.0f} s; wrote {out_dir}/suite.json", flush=True
        )
    report["elapsed_s"] = round(time.monotonic() - start, 2)
    write(report, out_dir)
    return report


def main(argv):
    del argv
    report = run_suite(_PROFILE.value, _OUT_DIR.value, _PARTS.value, _BUDGET.value, _PEAK.value)
    sys.stdout.write(table(report))


if __name__ == "__main__":
    app.run(main)
