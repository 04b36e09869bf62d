"""A host that dies: the others fail cleanly and fast, and the restarted job resumes exactly.

Two processes x 4 fake CPU devices on localhost (``launch/local.py``), joined by
jax.distributed. Process 1 is SIGKILLed mid-run; process 0 must exit by itself within
30 s, with status 5 and one line naming the lost peer, not by jax's heartbeat abort
(its timeout is set far longer, as is the launcher's grace period). A half-written
checkpoint (an Orbax temporary directory) is planted; the restarted job must ignore
it, resume from the last complete checkpoint and end bit for bit where an
uninterrupted run ends. The goodput record must account for the restart.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from audiodiff_jax.training import goodput, loop
from tests.helpers import REPO, bin_path, last_logged_step
from tests.test_resume import NUM_STEPS, _args, _compare_runs, _env

pytestmark = pytest.mark.slow

HEARTBEAT_S = 60  # jax's own detection: far later than the peer monitor's
PEER_TIMEOUT_S = 5
# Bound on how long the surviving process may take to notice and exit: its next
# collective fails at once and it exits without waiting for jax.distributed's shutdown.
SURVIVOR_EXIT_BOUND_S = 30


@pytest.fixture(scope="module")
def shards(resume_shards):
    return resume_shards


def _launch(shards, workdir, logdir, grace_s=300):
    mesh = {"data": -1, "fsdp": 2, "sequence": 1, "tensor": 1}
    cmd = [
        sys.executable,
        "-m",
        "launch.local",
        "--num_processes=2",
        "--devices_per_process=4",
        "--timeout_s=500",
        f"--grace_s={grace_s}",
        f"--logs_to={logdir}",
        "--",
        bin_path("audiodiff-train"),
        *_args(shards, workdir, mesh),
        f"--heartbeat_timeout_s={HEARTBEAT_S}",
        f"--peer_timeout_s={PEER_TIMEOUT_S}",
        "--shutdown_timeout_s=30",
    ]
    return subprocess.Popen(cmd, env=_env(4), cwd=REPO)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the launcher) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def _log(logdir, k):
    return open(os.path.join(logdir, f"process_{k}.log")).read()


def test_dead_host_fails_cleanly_and_restart_resumes_exactly(shards, two_full, tmp_path):
    full, crashed = two_full, str(tmp_path / "crashed")  # the uninterrupted run: tests/conftest.py

    logs = tmp_path / "logs_a"
    p = _launch(shards, crashed, logs)
    start = time.monotonic()
    while last_logged_step(crashed) < 7:  # past the step-5 checkpoint
        assert p.poll() is None, _log(logs, 0)[-3000:]
        assert time.monotonic() - start < 400, "run made no progress"
        time.sleep(0.05)
    pid0 = int(open(logs / "process_0.pid").read())
    pid1 = int(open(logs / "process_1.pid").read())
    os.kill(pid1, signal.SIGKILL)
    killed_at = time.monotonic()
    while _alive(pid0):
        assert time.monotonic() - killed_at < SURVIVOR_EXIT_BOUND_S, (
            "process 0 still running after its peer died:\n" + _log(logs, 0)[-3000:]
        )
        time.sleep(0.2)
    survivor_s = time.monotonic() - killed_at
    status = p.wait(timeout=60)
    log0 = _log(logs, 0)
    # The survivor's own status (5: peer lost), passed on by the launcher, and one line
    # saying what happened; no abort.
    assert status == loop.PeerLost.EXIT_CODE, (status, log0[-3000:])
    assert "audiodiff-train: process 1 of 2 has not been seen alive" in log0 or (
        "audiodiff-train: step " in log0 and "a peer process died or was cut off" in log0
    ), log0[-3000:]
    assert "SIGABRT" not in log0 and "Fatal Python error" not in log0, log0[-3000:]
    print(f"survivor exited {survivor_s:.1f}s after its peer was killed")

    ckpt_dir = os.path.join(crashed, "checkpoints")
    complete = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    last = complete[-1]
    assert last >= 5
    # A save that was cut short: what Orbax leaves behind when a job dies mid-write.
    planted = os.path.join(ckpt_dir, f"{last + 1}.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(ckpt_dir, str(last)), planted)

    logs_b = tmp_path / "logs_b"
    p = _launch(shards, crashed, logs_b, grace_s=20)
    assert p.wait(timeout=600) == 0, _log(logs_b, 0)[-3000:]
    log0 = _log(logs_b, 0)
    assert f"resuming from checkpoint step {last} " in log0, log0[-3000:]
    assert "never finished" in log0 and "orbax-checkpoint-tmp" in log0
    _compare_runs(full, crashed, last)

    # Goodput: two incarnations, time lost to the restart, steps redone after it.
    record = goodput.load(crashed)
    assert len(record) == 2
    assert record[0].last_checkpoint == last and record[1].first_step == last
    assert record[1].finished and record[1].last_step == NUM_STEPS
    summary = goodput.summarize(record)
    assert summary.restarts == 1 and summary.lost_s["restart"] > 0 and summary.lost_s["compile"] > 0
    assert 0 < summary.fraction < 1
    rows = [json.loads(line) for line in open(os.path.join(crashed, "metrics.jsonl"))]
    final = [r["scalars"] for r in rows if "scalars" in r and goodput.GOODPUT_FRACTION in r["scalars"]][-1]
    assert final[goodput.GOODPUT_FRACTION] == pytest.approx(summary.fraction, rel=0.05)
    assert "goodput " in log0 and "lost to startup" in log0


def test_goodput_accounts_restarts():
    """Two incarnations: the gap and the steps past the last checkpoint are lost to the restart."""
    a = goodput.Incarnation(
        start=0.0,
        last_update=100.0,
        first_step=0,
        last_step=50,
        last_checkpoint=40,
        startup_s=10.0,
        compile_s=20.0,
        checkpoint_s=5.0,
        productive_s=50.0,  # 1 s per step
    )
    b = goodput.Incarnation(
        start=130.0,
        last_update=230.0,
        first_step=40,
        last_step=100,
        last_checkpoint=100,
        startup_s=5.0,
        restore_s=5.0,
        compile_s=20.0,
        productive_s=60.0,
        finished=True,
    )
    s = goodput.summarize([a, b])
    assert s.wall_s == 230.0  # 100 + 30 gap + 100
    assert s.lost_s["restart"] == 30.0 + 10.0  # the gap, and steps 41..50 run twice
    assert s.productive_s == 50.0 - 10.0 + 60.0
    assert s.lost_s["startup"] == 15.0 and s.lost_s["compile"] == 40.0 and s.lost_s["restore"] == 5.0
    assert s.fraction == pytest.approx(100.0 / 230.0)
    assert "43.5%" in s.line() and "2 incarnation(s)" in s.line()


def test_goodput_file_survives_damage(tmp_path):
    (tmp_path / goodput.FILENAME).write_text("{not json")
    assert goodput.load(str(tmp_path)) == []
    rec = goodput.GoodputRecorder(str(tmp_path), process_start=time.time() - 3, first_step=0)
    rec.loop_started()
    rec.add("compile", 1.0)
    s = rec.update(3, last_checkpoint=3, finished=True)
    assert s.restarts == 0 and s.lost_s["startup"] >= 2.5
    assert goodput.load(str(tmp_path))[0].last_step == 3
