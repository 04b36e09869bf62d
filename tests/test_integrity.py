"""Checkpoints and exports that prove their integrity, and jobs that restart themselves,
through the real programs.

One module run (``configs/tiny.py``, 8 steps, checkpoints at steps 4 and 8) trained by
``audiodiff-train``; every test works on copies of it. Damage is what an operator meets
as bit rot: 16 bytes flipped in the middle of the largest data file of a step (which
Orbax reads back without complaint) or of an export's tensor file. The subprocesses
share the session's JAX compilation cache (tests/conftest.py), so only the first one
compiles.
"""

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flax import traverse_util
from safetensors.numpy import load_file

from audiodiff_jax.checkpoints import checkpointing, export, integrity, scrub, source
from audiodiff_jax.core.errors import GenerationError
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.programs import export_main
from audiodiff_jax.training import goodput
from launch import local
from tests.helpers import REPO, assert_trees_equal, bin_path, read_state, write_shards

NUM_STEPS = 8
CODEC = "--codec=tests.test_generation:make_codec"


@pytest.fixture(scope="module")
def env():
    return {
        **os.environ,
        "PYTHONPATH": REPO,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=16)


def _train_args(shards, workdir):
    return [
        "--config=" + os.path.join(REPO, "configs", "tiny.py"),
        f"--workdir={workdir}",
        f"--config.data.shards_dir={shards}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=4",
        "--config.checkpoint.keep_last=3",
    ]


def _run(cmd, env, timeout=300):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def run(shards, env, tmp_path_factory):
    """The uninterrupted run every other one is compared with."""
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    res = _run([bin_path("audiodiff-train"), *_train_args(shards, workdir)], env)
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def _flip(path: str, offset: int | None = None) -> None:
    """Inverts 16 bytes at ``offset`` (default: the middle) of a file."""
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _data_files(step_dir: str) -> list[str]:
    """The data files of a step's ``state`` (TensorStore/OCDBT ``d/`` folders), largest first."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        if os.path.basename(root) == "d"
        for name in names
    ]
    return sorted(files, key=os.path.getsize, reverse=True)


def _damage_weights(step_dir: str) -> str:
    """Flips 16 bytes of a data file of a step where they change the raw weights
    (``params``) and the file still reads back (what bit rot does unnoticed); returns
    the array part hit, as the scrubber names it. The arrays are compressed, so where
    a given array lies is not known: positions are tried in a fixed order."""
    for file in _data_files(step_dir):
        size = os.path.getsize(file)
        for k in (4, 2, 6, 1, 3, 5, 7):
            _flip(file, size * k // 8)
            found = integrity.scrub_step(epath.Path(step_dir))
            if len(found) == 1 and found[0].what.startswith("array params."):
                return found[0].what.removeprefix("array ").removesuffix(" does not match its sha256")
            _flip(file, size * k // 8)  # flipped back
    raise AssertionError(f"no flip in {step_dir} changes params and reads back")


@pytest.fixture(scope="module")
def damaged(run, tmp_path_factory):
    """A copy of the run with bytes flipped in a data file of step 8, inside the raw
    weights; the array part they hit."""
    workdir = str(tmp_path_factory.mktemp("damaged") / "run")
    shutil.copytree(run, workdir)
    part = _damage_weights(os.path.join(workdir, "checkpoints", "8"))
    return workdir, part


def test_every_array_of_a_step_has_hashes_that_match_it(run):
    for step in (4, 8):
        hashes = integrity.read(epath.Path(run) / "checkpoints" / str(step))
        leaves = {
            integrity.key_path(kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(read_state(run, step))[0]
        }
        assert set(hashes.arrays) == set(leaves)
        for path, (shape, dtype, parts) in hashes.arrays.items():
            x = leaves[path]
            assert shape == x.shape and dtype == str(x.dtype), path
            # The parts tile the array, and each hash is the SHA-256 of its bytes.
            assert sum(math.prod(b - a for a, b in bounds) for bounds, _ in parts) == x.size, path
            for bounds, h in parts:
                region = np.ascontiguousarray(x[tuple(slice(a, b) for a, b in bounds)])
                assert h == hashlib.sha256(region.tobytes()).hexdigest(), (path, bounds)
    report = scrub.scrub(run)
    assert report.findings == [] and len(report.checked) == 2


def test_flipped_bytes_are_named_by_the_scrubber_export_and_sampling(damaged, env, tmp_path):
    workdir, part = damaged
    name = part.split("[")[0]
    res = _run([sys.executable, "-m", "audiodiff_jax.programs.scrub_main", f"--checkpoint={workdir}"], env)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    step8 = os.path.join(workdir, "checkpoints", "8")
    assert lines[:-1] == [f"DAMAGED {step8}: array {part} does not match its sha256"], res.stdout
    assert lines[-1] == f"audiodiff-scrub: checked 2 step(s) of {workdir}: 1 damaged item(s)"

    out = tmp_path / "export"
    res = _run(
        [bin_path("audiodiff-export"), f"--checkpoint={workdir}", "--weights=raw", f"--out={out}"], env
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("audiodiff-export: error:")]
    assert len(errors) == 1 and f"array {name}" in errors[0] and "sha256" in errors[0], res.stderr[-3000:]
    assert not out.exists()
    # The intact step still exports.
    export_main.export_checkpoint(workdir, str(out), step=4, weights="raw")

    # Sampling reads through the weights source: the library error, and the program's
    # one line and status 2, with no song written.
    src = source.WeightsSource(workdir)
    with pytest.raises(GenerationError, match=re.escape(f"{step8}: array {part} does not match")):
        src.restore(None, ["raw"], None)
    songs = tmp_path / "songs"
    cmd = [bin_path("audiodiff-sample"), f"--checkpoint={workdir}", f"--out={songs}", "--weights=raw"]
    res = _run([*cmd, "--prompt=a slow harp", "--noeval", CODEC], env)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("audiodiff-sample: error:")]
    assert len(errors) == 1 and f"array {part} does not match" in errors[0], res.stderr[-3000:]
    assert not list(songs.glob("*.wav"))

    # A missing or empty path is bad input.
    res = _run([sys.executable, "-m", "audiodiff_jax.programs.scrub_main", f"--checkpoint={tmp_path}/x"], env)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_resume_sets_a_damaged_step_aside_and_resumes_an_older_one_without_hashes(
    run, damaged, shards, env, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(damaged[0], workdir)
    name = damaged[1].split("[")[0]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    shutil.rmtree(os.path.join(ckpt_dir, "4", integrity.ITEM))  # as written before hashes existed
    res = _run([bin_path("audiodiff-train"), *_train_args(shards, workdir)], env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stderr
    named = [line for line in log.splitlines() if f"checkpoint: step 8 in {ckpt_dir} cannot be read" in line]
    assert len(named) == 1 and f"IntegrityError: checkpoint step 8 in {ckpt_dir}: array {name}" in named[0]
    assert "moved unreadable step 8 to" in log
    (aside,) = os.listdir(ckpt_dir + ".unreadable")
    assert aside.startswith("8-")
    old = [line for line in log.splitlines() if "carries no content hashes" in line]
    assert len(old) == 1 and f"checkpoint step 4 in {ckpt_dir}" in old[0], log[-3000:]
    # It trained steps 5-8 again, exactly as the first time, and step 8 has hashes again.
    a, b = read_state(run), read_state(workdir)
    assert int(b["step"]) == NUM_STEPS
    assert_trees_equal(a, b, "state")
    assert integrity.read(epath.Path(ckpt_dir) / "8") is not None


def _abstract_params(meta):
    flat = {
        tuple(k.split(export.SEP)): jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"]))
        for k, v in meta["params"].items()
    }
    return traverse_util.unflatten_dict(flat)


def test_exports_carry_hashes_and_a_damaged_one_is_refused(run, env, tmp_path, caplog):
    out = str(tmp_path / "export")
    export_main.export_checkpoint(run, out, weights="ema")
    meta = export.read_meta(out)
    arrays = load_file(os.path.join(out, export.PARAMS))
    assert meta["hash_algorithm"] == "sha256"
    for k, v in arrays.items():
        assert meta["params"][k]["hash"] == hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
    assert scrub.scrub(out).findings == []

    # An export written before hashes existed loads, with one line saying so.
    old = str(tmp_path / "old")
    shutil.copytree(out, old)
    old_meta = json.loads(open(os.path.join(old, export.META)).read())
    del old_meta["hash_algorithm"]
    for v in old_meta["params"].values():
        del v["hash"]
    open(os.path.join(old, export.META), "w").write(json.dumps(old_meta))
    caplog.clear()
    params = export.load_params(old, _abstract_params(meta))
    assert_trees_equal(params, export.load_params(out, _abstract_params(meta)), "old export")
    assert [r for r in caplog.records if "carries no content hashes" in r.getMessage()]

    # Bytes flipped inside the largest tensor: refused in one line by every reader.
    largest = max(arrays, key=lambda k: arrays[k].nbytes)
    raw = open(os.path.join(out, export.PARAMS), "rb").read()
    start, header = integrity.safetensors_layout(raw)
    a, b = header[largest]["data_offsets"]
    _flip(os.path.join(out, export.PARAMS), start + (a + b) // 2)
    report = scrub.scrub(out)
    assert [f.line() for f in report.findings] == [
        f"DAMAGED {out}: tensor {largest} does not match its sha256"
    ]
    with pytest.raises(checkpointing.WeightsUnusable, match=f"tensor {largest} does not match its sha256"):
        source.restore_params(out, _abstract_params(meta))  # train.init_from=EXPORT
    cmd = [bin_path("audiodiff-sample"), f"--checkpoint={out}", f"--out={tmp_path / 'songs'}"]
    res = _run([*cmd, "--prompt=a slow harp", CODEC], env)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("audiodiff-sample: error:")]
    assert len(errors) == 1 and f"tensor {largest}" in errors[0] and "refusing it" in errors[0], errors


@pytest.mark.slow
def test_a_job_killed_by_a_planted_fault_restarts_by_itself_and_ends_bit_identical(
    run, shards, env, tmp_path
):
    workdir, logs, marker = str(tmp_path / "run"), tmp_path / "logs", str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "launch.local", "--num_processes=1", "--devices_per_process=8"]
    cmd += ["--restarts=2", "--restart_backoff_s=1", "--timeout_s=300", f"--logs_to={logs}", "--"]
    cmd += [sys.executable, "-m", "tests.fault_train", "--kill_at_step=6", f"--marker={marker}", "--"]
    # Saves that finish before the next step: the step-4 checkpoint is complete when the
    # fault fires at step 6, whatever the machine's speed (the state is the same either way).
    cmd += ["audiodiff-train", *_train_args(shards, workdir), "--config.checkpoint.async_save=False"]
    res = _run(cmd, env, timeout=600)
    log = (logs / "process_0.log").read_text()
    assert res.returncode == 0, res.stderr[-2000:] + log[-3000:]
    assert open(marker).read().startswith("killed at step 6")
    assert "launch.local: the job was killed by SIGKILL; restart 1 of 2 in 1s" in res.stderr
    assert "restart 2 of 2" not in res.stderr
    assert f"resuming from checkpoint step 4 in {workdir}" in log
    a, b = read_state(run), read_state(workdir)
    assert int(b["step"]) == NUM_STEPS
    assert_trees_equal(a, b, "state")
    assert read_loss_history(run) == read_loss_history(workdir)
    # Goodput: the restart is an incarnation the launcher started, its wait lost time.
    record = goodput.load(workdir)
    assert [r.restarted for r in record] == ["", "restart 1 of 2 after the job was killed by SIGKILL"]
    summary = goodput.summarize(record)
    assert summary.automatic_restarts == 1 and summary.lost_s["restart"] >= 1.0
    assert "(1 restarted by the launcher)" in summary.line()


COUNTED = r"""
import os, sys
runs = open(sys.argv[1]).read().split() if os.path.exists(sys.argv[1]) else []
with open(sys.argv[1], "a") as f:
    f.write(f"{len(runs)} ")
with open(sys.argv[1] + ".env", "a") as f:
    f.write(os.environ.get("AUDIODIFF_RESTART", "-") + "\n")
sys.exit(int(sys.argv[2 + min(len(runs), len(sys.argv) - 3)]))
"""


@pytest.mark.parametrize(
    "statuses,runs,status",
    [
        ((5, 1, 0), 3, 0),  # failures are restarted until the job succeeds
        ((5, 5, 5, 5), 3, 5),  # ... or the budget is spent
        ((2, 0), 1, 2),  # a user error is not restarted
        ((3, 0), 1, 3),  # nor a diverged run
    ],
)
def test_launcher_restarts_failures_that_are_not_user_errors(tmp_path, statuses, runs, status):
    counter, waits = str(tmp_path / "runs"), []
    got = local.launch_with_restarts(
        [sys.executable, "-c", COUNTED, counter, *map(str, statuses)],
        restarts=2,
        backoff_s=1.0,
        sleep=waits.append,
        num_processes=1,
        devices_per_process=0,
        log_dir=str(tmp_path / "logs"),
        env={**os.environ, goodput.RESTART_ENV: "from an outer launcher"},
    )
    assert got == status
    assert len(open(counter).read().split()) == runs
    assert waits == [1.0, 2.0][: runs - 1]  # the back-off doubles
    restarts = open(counter + ".env").read().splitlines()
    assert restarts[0] == "-" and restarts[1:] == [
        f"restart {k} of 2 after the job exited with status {statuses[k - 1]}" for k in range(1, runs)
    ]
