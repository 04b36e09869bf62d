"""Profiles of a training job: chosen steps, and a profile asked for while it runs.

One run of the real program (``audiodiff-train`` in a subprocess, tiny config): the
config asks for steps 3-4; once that trace exists the test drops ``WORKDIR/PROFILE``
(2 steps) into the running job, waits for the second trace, then stops the job with
SIGTERM (it saves and exits 0). The run is as long as the test needs, never a race
against its end. Each trace must be where TensorBoard's profile plugin looks
(``tensorboard/plugins/profile/RUN/HOST.xplane.pb``), parse as the XSpace protobuf the
plugin reads (``jax.profiler.ProfileData``), and hold exactly the asked steps. The
same run checks the memory figures of a CPU backend (none reported: none written) and
the profile time in goodput.
"""

import json
import os
import signal
import subprocess
import time

import jax
import pytest
from etils import epath

from audiodiff_jax.core import names, profiler
from audiodiff_jax.core.config import ProfileConfig
from audiodiff_jax.training import goodput, profiling
from tests.helpers import REPO, bin_path, last_logged_step, write_shards

TIMEOUT_S = 300


def _wait_for(what, check, proc, timeout=TIMEOUT_S):
    start = time.monotonic()
    while not (found := check()):
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() - start < timeout, f"no {what} after {timeout}s"
        time.sleep(0.05)
    return found


def _runs(workdir):
    return {f.parent.name: f for f in profiler.xplane_files(os.path.join(workdir, "tensorboard"))}


def _traced_steps(path) -> list[int]:
    """The step numbers of the ``train`` step marks in a trace."""
    data = profiler.load(path)
    steps = []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "train":
                    steps.append(dict(event.stats)["step_num"])
    return sorted(steps)


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """The run described in the module docstring: (workdir, step the file was dropped at, stderr)."""
    root = tmp_path_factory.mktemp("profiled")
    shards = write_shards(str(root / "shards"))
    workdir = str(root / "run")
    log = root / "train.log"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                bin_path("audiodiff-train"),
                "--config=configs/tiny.py",
                f"--workdir={workdir}",
                f"--config.data.shards_dir={shards}",
                "--config.train.num_steps=100000",  # stopped by the test
                "--config.train.log_every=1",
                "--config.checkpoint.every_steps=100000",
                "--config.profile.start_step=3",
                "--config.profile.num_steps=2",
            ],
            cwd=REPO,
            env=env,
            stderr=err,
        )
        try:
            _wait_for("trace of steps 3-4", lambda: "train_steps_3-4" in _runs(workdir), proc)
            dropped_at = last_logged_step(workdir)
            request = os.path.join(workdir, profiling.REQUEST_FILE)
            with open(request + ".tmp", "w") as f:
                f.write("2\n")
            os.replace(request + ".tmp", request)  # the job never sees half a file
            _wait_for("requested trace", lambda: len(_runs(workdir)) == 2, proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    return workdir, dropped_at, log.read_text()


def test_chosen_steps_and_a_requested_profile_are_traced_for_the_profile_plugin(profiled_run):
    workdir, dropped_at, log = profiled_run
    runs = _runs(workdir)
    (asked,) = [name for name in runs if name != "train_steps_3-4"]
    first, last = (int(s) for s in asked.removeprefix("train_steps_").split("-"))
    assert last == first + 1 and first > dropped_at  # 2 steps, after the file appeared
    assert not os.path.exists(os.path.join(workdir, profiling.REQUEST_FILE))  # taken
    for name, path in runs.items():
        # LOGDIR/plugins/profile/RUN/HOST.xplane.pb under the run's TensorBoard folder.
        assert path.parent.parent.parent.parent == epath.Path(workdir, "tensorboard")
        assert path.name.endswith(".xplane.pb")
        want = [3, 4] if name == "train_steps_3-4" else [first, last]
        assert _traced_steps(path) == want, name
    assert f"tracing steps {first}-{last}" in log


def test_run_writes_memory_as_the_backend_reports_it_and_counts_profile_time(profiled_run):
    workdir, _, log = profiled_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    scalars = [r["scalars"] for r in rows if "scalars" in r]
    logged = [s for s in scalars if names.TRAIN_LOSS in s]
    per_device = names.MEMORY_IN_USE.format(jax.local_devices()[0].id)
    if jax.local_devices()[0].memory_stats() is None:  # the CPU backend reports nothing
        assert not any(k.startswith("memory/") for s in logged for k in s)
    else:
        assert all(per_device in s and s[per_device] > 0 for s in logged)
    (compiled,) = [s for s in scalars if names.COMPILED_TOTAL in s]
    assert compiled[names.COMPILED_ARGUMENTS] > 0 and compiled[names.COMPILED_TOTAL] > 0
    assert "compiled train step: " in log and " per device: arguments " in log
    (incarnation,) = goodput.load(workdir)
    assert incarnation.profile_s > 0
    assert logged[-1][goodput.GOODPUT_LOST["profile"]] > 0


def test_every_process_traces_the_same_steps_of_a_request():
    """hosts=all: only process 0 reads the file; the collective gives its answer to all."""
    seen = {}

    def agree(value, board=seen):  # stands in for process_allgather(...).max()
        board.setdefault("values", []).append(value)
        return max(board["values"])

    cfg = ProfileConfig(num_steps=4, hosts="all")
    procs = []
    for index in (0, 1):
        p = profiling.StepProfiler(cfg, "/nonexistent", first_step=0, process_index=index, process_count=2)
        p._agree = agree
        procs.append(p)
    procs[0]._read_request = lambda: 3  # process 0 found the file asking for 3 steps
    for p in procs:
        p.poll(10)
    assert [p.window for p in procs] == [profiling.Window(11, 13, "/nonexistent/PROFILE")] * 2
    assert all(p.traces_here for p in procs)
    # hosts=first: process 1 traces nothing and takes no part in a collective.
    first_only = profiling.StepProfiler(
        ProfileConfig(start_step=1), "/x", first_step=0, process_index=1, process_count=2
    )
    assert not first_only.traces_here and first_only.window == profiling.Window(2, 4, "profile.start_step")
