r"""Local multi-process launcher: N processes on this machine, joined by jax.distributed.

For development and tests of multi-host behaviour without a pod:

    python -m launch.local --num_processes=2 --devices_per_process=4 -- \
        audiodiff-train --config=configs/tiny.py --workdir=/tmp/run2 \
        --config.data.shards_dir=/tmp/shards

Any job of the package runs the same way: ``-- audiodiff-sample ...`` (each process
makes its share of the sweep, process 0 merges) or ``-- audiodiff-precompute ...``
(each process encodes its units, process 0 merges); those take only their index and
count from the variables below and do not join jax.distributed.

Each child gets the coordinator address, process count and its process id through
environment variables that ``audiodiff-train`` reads (``AUDIODIFF_COORDINATOR``,
``AUDIODIFF_NUM_PROCESSES``, ``AUDIODIFF_PROCESS_ID``), and ``devices_per_process``
fake CPU devices. The launcher forwards SIGTERM/SIGINT to every child, and when one
child fails it gives the others ``--grace_s`` seconds to exit before killing them,
so a dead peer can never leave the job hanging. It exits with the first non-zero
child status (or 124 on timeout). Each child's output lines appear prefixed with its
process (``[p0] ...``); with ``--logs_to`` they go to ``DIR/process_K.log`` instead, and
each child's pid to ``DIR/process_K.pid`` (tests use it to kill one process of a job).

Unattended restarts: with ``--restarts=N`` a job that fails is started again, whole,
up to N times, after a back-off (``--restart_backoff_s``, doubled at each restart, at
most ``--restart_backoff_max_s``); a training job resumes from its last complete
checkpoint. Not restarted: success, a user error (status 2: the same input fails the
same way), a diverged run (status 3: it would diverge again at the same step), the
launcher's own ``--timeout_s`` (status 124) and a job stopped by SIGTERM/SIGINT sent to
the launcher. Each restart is logged in one line, and the children of a restarted job
get ``AUDIODIFF_RESTART`` ("restart K of N after <what happened>"), which the training
loop's goodput record keeps; the time between the jobs counts there as lost to
``restart`` (``audiodiff_jax/training/goodput.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from absl import app, flags, logging

from audiodiff_jax.core.errors import EXIT_USER_ERROR
from audiodiff_jax.programs import cli
from audiodiff_jax.training import goodput

# Flag holders, set by define_flags() (this module's __main__ only: importing the launcher
# as a library must not add flags that collide with a program's, e.g. --num_processes).
_NUM = _DEVICES = _TIMEOUT = _GRACE = _LOG_DIR = _RESTARTS = _BACKOFF = _BACKOFF_MAX = None

EXIT_TIMEOUT = 124
EXIT_DIVERGED = 3  # audiodiff-train: the loss became NaN/Inf (train_main.EXIT_DIVERGED)
# Statuses after which a restart would fail the same way.
NOT_RESTARTED = (0, EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_TIMEOUT)


def define_flags() -> None:
    global _NUM, _DEVICES, _TIMEOUT, _GRACE, _LOG_DIR, _RESTARTS, _BACKOFF, _BACKOFF_MAX
    _NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
    _DEVICES = flags.DEFINE_integer(
        "devices_per_process", 4, "Fake CPU devices per process (0 = leave XLA_FLAGS)."
    )
    _TIMEOUT = flags.DEFINE_integer("timeout_s", 0, "Kill everything after this many seconds (0 = no limit).")
    _GRACE = flags.DEFINE_integer("grace_s", 30, "Seconds the others get to exit after one child fails.")
    _LOG_DIR = flags.DEFINE_string("logs_to", "", "Write each child's output to DIR/process_K.log.")
    _RESTARTS = flags.DEFINE_integer(
        "restarts", 0, "Start a failed job again up to this many times (not after status 0, 2, 3 or 124)."
    )
    _BACKOFF = flags.DEFINE_float("restart_backoff_s", 10.0, "Wait before the first restart; doubles after.")
    _BACKOFF_MAX = flags.DEFINE_float("restart_backoff_max_s", 300.0, "The longest wait before a restart.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, *, coordinator: str, num: int, pid: int, devices: int) -> dict:
    """The environment of child ``pid`` of ``num``. A job of one process gets no
    coordinator: it joins no jax.distributed group and runs exactly as the program run
    directly (in a group of one, a tiny run's weights came out different in the last
    bits after 8 steps on CPU: measured, cause not traced)."""
    env = dict(base)
    if num > 1:
        env["AUDIODIFF_COORDINATOR"] = coordinator
    else:
        env.pop("AUDIODIFF_COORDINATOR", None)
    env["AUDIODIFF_NUM_PROCESSES"] = str(num)
    env["AUDIODIFF_PROCESS_ID"] = str(pid)
    if devices:
        flags_ = [
            f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
        ]
        flags_.append(f"--xla_force_host_platform_device_count={devices}")
        env["XLA_FLAGS"] = " ".join(flags_)
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


_PRINT_LOCK = threading.Lock()
_INTERRUPTED = threading.Event()  # the launcher got SIGTERM/SIGINT and passed it on


def _pump(stream, prefix: str) -> None:
    """Copies a child's output to ours line by line, each line prefixed with its process."""
    for line in stream:
        with _PRINT_LOCK:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    stream.close()


def describe_exit(code: int) -> str:
    """'exited with status 3' or 'was killed by SIGKILL' (Popen reports signals as -N)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch(
    command: list[str],
    *,
    num_processes: int,
    devices_per_process: int,
    timeout_s: float = 0,
    grace_s: float = 30,
    log_dir: str = "",
    env: dict | None = None,
) -> int:
    """Runs ``command`` as ``num_processes`` cooperating processes; returns the exit status."""
    coordinator = f"127.0.0.1:{free_port()}"
    base = dict(os.environ if env is None else env)
    procs: list[subprocess.Popen] = []
    logs = []
    pumps: list[threading.Thread] = []
    for pid in range(num_processes):
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            out = open(os.path.join(log_dir, f"process_{pid}.log"), "a")  # a restarted job appends
            logs.append(out)
        else:
            out = subprocess.PIPE  # lines go to our stdout with a "[pK] " prefix
        procs.append(
            subprocess.Popen(
                command,
                env=child_env(
                    base, coordinator=coordinator, num=num_processes, pid=pid, devices=devices_per_process
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=not log_dir,
                errors="replace" if not log_dir else None,
            )
        )
        if not log_dir:
            pumps.append(threading.Thread(target=_pump, args=(procs[-1].stdout, f"[p{pid}] "), daemon=True))
            pumps[-1].start()
    if log_dir:
        for pid, p in enumerate(procs):
            with open(os.path.join(log_dir, f"process_{pid}.pid"), "w") as f:
                f.write(str(p.pid))
    logging.info("launched %d processes (coordinator %s): %s", num_processes, coordinator, " ".join(command))

    def forward(signum, frame):
        _INTERRUPTED.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    start = time.monotonic()
    failed_at = None
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                status = bad[0]
                first = next(i for i, c in enumerate(codes) if c not in (None, 0))
                logging.error(
                    "process %d %s; the others get %ds to exit", first, describe_exit(bad[0]), grace_s
                )
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                logging.error("killing the remaining processes")
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            if timeout_s and time.monotonic() - start > timeout_s:
                logging.error("timeout after %ss: killing all processes", timeout_s)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                status = 124
                for p in procs:
                    p.wait()
                break
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for f in logs:
            f.close()
        for t in pumps:
            t.join(timeout=5)
    if status != 124:
        # A child's own exit code says why (e.g. 5: its peer was lost) better than the
        # signal that killed another one: prefer the first positive status.
        codes = [p.returncode for p in procs]
        positive = [c for c in codes if c and c > 0]
        status = positive[0] if positive else next((c for c in codes if c), 0)
    return status


def launch_with_restarts(
    command: list[str],
    *,
    restarts: int,
    backoff_s: float = 10.0,
    backoff_max_s: float = 300.0,
    env: dict | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs,
) -> int:
    """:func:`launch`, started again after a failure up to ``restarts`` times (module
    docstring); returns the last job's status."""
    base = dict(os.environ if env is None else env)
    base.pop(goodput.RESTART_ENV, None)
    _INTERRUPTED.clear()
    status = launch(command, env=base, **kwargs)
    for k in range(1, restarts + 1):
        if status in NOT_RESTARTED or _INTERRUPTED.is_set():
            break
        wait = min(backoff_s * 2 ** (k - 1), backoff_max_s)
        why = f"the job {describe_exit(status)}"
        logging.warning("launch.local: %s; restart %d of %d in %.0fs", why, k, restarts, wait)
        print(f"launch.local: {why}; restart {k} of {restarts} in {wait:.0f}s", file=sys.stderr, flush=True)
        sleep(wait)
        if _INTERRUPTED.is_set():
            break
        status = launch(
            command, env={**base, goodput.RESTART_ENV: f"restart {k} of {restarts} after {why}"}, **kwargs
        )
    else:
        if restarts and status not in NOT_RESTARTED and not _INTERRUPTED.is_set():
            logging.error(
                "launch.local: the job %s and no restart is left (--restarts=%d)",
                describe_exit(status),
                restarts,
            )
    return status


def main(argv):
    command = argv[1:]
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise app.UsageError("give the command after --")
    sys.exit(
        launch_with_restarts(
            command,
            restarts=_RESTARTS.value,
            backoff_s=_BACKOFF.value,
            backoff_max_s=_BACKOFF_MAX.value,
            num_processes=_NUM.value,
            devices_per_process=_DEVICES.value,
            timeout_s=_TIMEOUT.value,
            grace_s=_GRACE.value,
            log_dir=_LOG_DIR.value,
        )
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main, module=__name__, usage="[flags] -- COMMAND [ARGS...]")
