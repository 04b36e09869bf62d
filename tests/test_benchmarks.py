"""The accelerator benchmark suite (benchmarks/suite.py) runs end to end on CPU at tiny sizes.

One run of ``--profile=tiny`` in a subprocess, as ``benchmarks/gpu_suite.sh`` runs the
``gpu`` profile: every part must report every figure, finite and positive, and the
derived figures must follow from the measured ones.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import flops, profiler
from configs import tiny
from tests.helpers import REPO

PEAK_TFLOPS = 0.5  # a nominal CPU peak, so that MFU is computed here too


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("suite"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a one-GPU machine
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/suite.py",
            "--profile=tiny",
            f"--out_dir={out}",
            f"--peak_tflops={PEAK_TFLOPS}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "suite.json")) as f:
        return out, json.load(f), proc.stdout


def _positive(value, what):
    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, f"{what}={value!r}"


def test_every_part_reports_every_figure(suite):
    out, report, stdout = suite
    assert list(report["parts"]) == ["train", "sample", "codec", "loader", "curves"]
    assert not report["skipped_parts"]
    for name, part in report["parts"].items():
        assert "error" not in part, (name, part)
    train = report["parts"]["train"]
    for key in ("step_time_s", "tflops_per_s_per_device", "mfu", "peak_memory_gib", "latent_frames_per_s"):
        _positive(train[key], f"train.{key}")
    ck = train["checkpoint"]
    for key in (
        "state_gib",
        "save_blocking_median_s",
        "save_blocking_share_of_step",
        "last_save_background_wait_s",
    ):
        _positive(ck[key], f"train.checkpoint.{key}")
    (row,) = report["parts"]["sample"]["rows"]
    for key in ("compile_s", "loop_s", "loop_realtime_factor", "decode_s", "realtime_factor_with_decode"):
        _positive(row[key], f"sample.{key}")
    codec = report["parts"]["codec"]
    for key in ("encode_audio_s_per_s", "decode_audio_s_per_s"):
        _positive(codec[key], f"codec.{key}")
    for r in report["parts"]["loader"]["rows"]:
        for key in ("latent_frames_per_s", "frames_per_s_per_core"):
            _positive(r[key], f"loader.{key}")
    curves = report["parts"]["curves"]["rows"]
    assert {(r["path"], r["seconds"]) for r in curves} == {
        (p, s) for p in ("one_pass", "windowed") for s in (1.0, 2.0)
    }
    for r in curves:
        _positive(r["s_per_song_s"], f"curves.{r['path']}.{r['seconds']}")
        _positive(r["compile_s"], "curves.compile_s")
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "suite.md")) as f:
        assert f.read() in stdout  # the table printed is the one written


def test_train_part_saves_a_profile_of_the_step(suite):
    """One traced step, where TensorBoard's profile plugin finds it (``OUT/profile``)."""
    out, report, _ = suite
    prof = report["parts"]["train"]["profile"]
    (trace,) = profiler.xplane_files(os.path.join(out, "profile"))
    assert str(trace) == prof["trace"] and trace.parent.name == prof["run"] == "train_tiny_8x32"
    steps = [
        dict(e.stats)["step_num"]
        for p in profiler.load(trace).planes
        for line in p.lines
        for e in line.events
        if e.name == "train"
    ]
    assert steps == [1] == list(range(1, prof["steps"] + 1))
    _positive(prof["traced_s"], "train.profile.traced_s")


def test_derived_figures_follow_from_the_measured_ones(suite):
    _, report, _ = suite
    train = report["parts"]["train"]
    cfg = config_lib.from_configdict(tiny.get_config())
    step_flops = flops.train_flops_per_step(
        cfg.model, cfg.data.global_batch_size, cfg.data.window_frames, cfg.model.text.max_len
    )
    assert train["model_tflop_per_step"] == pytest.approx(step_flops / 1e12, abs=1e-4)
    assert train["peak_tflops_per_device"] == PEAK_TFLOPS
    assert train["mfu"] == pytest.approx(train["tflops_per_s_per_device"] / PEAK_TFLOPS, rel=1e-2)
    ck = train["checkpoint"]
    assert ck["save_blocking_share_of_step"] == pytest.approx(
        ck["save_blocking_median_s"] / train["step_time_s"], rel=1e-2
    )
    (row,) = report["parts"]["sample"]["rows"]
    assert row["loop_realtime_factor"] == pytest.approx(row["seconds"] / row["loop_s"], rel=1e-2)
    assert row["realtime_factor_with_decode"] < row["loop_realtime_factor"]
    # At the demo latent rate (21.53 Hz) 2 s are 44 frames: two 32-frame windows, 1 s one.
    windows = {(r["path"], r["seconds"]): r["windows"] for r in report["parts"]["curves"]["rows"]}
    assert windows == {("one_pass", 1.0): 1, ("one_pass", 2.0): 1, ("windowed", 1.0): 1, ("windowed", 2.0): 2}
