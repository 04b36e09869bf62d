"""Joining the other processes of a job (``jax.distributed``), for every program.

The flags here are shared by ``audiodiff-train`` and ``audiodiff-codec-train``: on
TPU VMs and SLURM the coordinator is found automatically (``--distributed=auto``); on
one machine pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(``launch/local.py`` does, through the ``AUDIODIFF_*`` environment variables).

Jobs whose processes split the work with no collective between them
(``audiodiff-precompute``, ``audiodiff-sample`` sweeps) take only their index and count,
from the same launcher or scheduler variables (:func:`work_share`): the same command
runs on every host either way.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax
from absl import flags, logging

from audiodiff_jax.core.errors import EXIT_PEER_LOST

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "auto: join jax.distributed when a coordinator is given or the cluster is detected.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("AUDIODIFF_COORDINATOR", ""), "host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("AUDIODIFF_NUM_PROCESSES", "0")), "Total processes."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("AUDIODIFF_PROCESS_ID", "-1")), "This process."
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 120, "Seconds to wait for all processes to join before failing."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "jax.distributed: a process that sent no heartbeat for this long is declared dead and "
    "every other process exits with an error.",
)
_PEER_TIMEOUT = flags.DEFINE_float(
    "peer_timeout_s",
    15.0,
    "Exit (status 5, one line) when another process of the job has not been seen alive for "
    "this long (a killed process or a lost host); 0 = leave it to --heartbeat_timeout_s.",
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s",
    300,
    "jax.distributed: how long a finished process waits at exit for the others.",
)


def init_distributed() -> None:
    """Joins the other processes of the job, if there are any."""
    mode = _DISTRIBUTED.value
    if mode == "off":
        return
    timeouts = dict(
        initialization_timeout=_INIT_TIMEOUT.value,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
        shutdown_timeout_seconds=_SHUTDOWN_TIMEOUT.value,
    )
    if _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            **timeouts,
        )
    elif mode == "on" or _on_cluster():
        jax.distributed.initialize(**timeouts)
    else:
        return
    logging.info("joined jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    if jax.process_count() > 1 and _PEER_TIMEOUT.value > 0:
        PeerMonitor(_PEER_TIMEOUT.value).start()


def process_from_environment() -> tuple[int, int] | None:
    """``(index, count)`` that a launcher or scheduler gave this process, without joining
    jax.distributed: ``launch/local.py``'s ``AUDIODIFF_*`` variables, SLURM's task
    variables, or a TPU VM's worker id and host list (numbered across slices when
    libtpu's ``MEGASCALE_*`` variables say there are several). None when there are none."""
    env = os.environ
    for index_var, count_var in (
        ("AUDIODIFF_PROCESS_ID", "AUDIODIFF_NUM_PROCESSES"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ):
        if env.get(index_var, "").isdigit() and env.get(count_var, "").isdigit() and int(env[count_var]) > 0:
            return int(env[index_var]), int(env[count_var])
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if env.get("TPU_WORKER_ID", "").isdigit() and hosts:
        slices, slice_id = int(env.get("MEGASCALE_NUM_SLICES") or 1), int(env.get("MEGASCALE_SLICE_ID") or 0)
        return slice_id * len(hosts) + int(env["TPU_WORKER_ID"]), slices * len(hosts)
    return None


def work_share(*, join: bool = True) -> tuple[int, int]:
    """``(index, count)`` of this process in a job whose processes work apart.

    From the launcher's or scheduler's variables (:func:`process_from_environment`);
    failing those, with ``--distributed=on`` and ``join``, from jax.distributed (joined
    here: a cluster only it can describe); else ``(0, 1)``, a job of one process.
    """
    found = process_from_environment()
    if found is None and join and _DISTRIBUTED.value == "on":
        init_distributed()
        found = jax.process_index(), jax.process_count()
    env = os.environ
    if found and env.get("SLURM_LOCALID", "").isdigit() and int(env.get("SLURM_NTASKS_PER_NODE") or 1) > 1:
        # SLURM with one task per GPU (launch/slurm.py): each task keeps to its own GPU, as
        # jax.distributed would arrange; set before any JAX backend starts.
        jax.config.update("jax_cuda_visible_devices", env["SLURM_LOCALID"])
    return found or (0, 1)


def _on_cluster() -> bool:
    # Environments where jax.distributed.initialize() finds the coordinator by itself.
    return bool(
        os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    )


def exit_peer_lost(program: str, e: BaseException, code: int) -> None:
    """Ends this process at once after a peer was lost: one line on stderr and in the log,
    then ``os._exit(code)``, skipping jax.distributed's shutdown, which would wait for the
    dead peer until the heartbeat timeout and then abort."""
    logging.error("%s", e)
    print(f"{program}: {e}", file=sys.stderr, flush=True)
    logging.flush()
    os._exit(code)


class PeerMonitor:
    """Ends this process soon after another process of the job dies, with one line.

    Without it a survivor learns of a dead peer only when the coordination service
    misses the peer's heartbeats (``--heartbeat_timeout_s``, 100 s) and then aborts
    with a native stack dump. Here every process bumps its own counter in the
    coordination service's key-value store each second and watches the others'; a
    peer whose counter stopped for ``timeout_s`` (and that did not finish cleanly), or a
    coordinator that no longer answers, ends this process with status
    :data:`EXIT_PEER_LOST` and a line naming the peer. The run resumes from its last
    complete checkpoint when the job is started again.
    """

    def __init__(self, timeout_s: float, interval_s: float = 1.0, program: str = ""):
        # jax has no public handle on its distributed client; the key-value store is the
        # one channel every process already shares.
        from jax._src import distributed as jax_distributed  # noqa: PLC0415 - private, see above

        self.client = jax_distributed.global_state.client
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.program = program or os.path.basename(sys.argv[0])
        self.me, self.count = jax.process_index(), jax.process_count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.close)  # after jax's own atexit shutdown: runs before it

    def close(self) -> None:
        """Tells the others this process finished on purpose, and stops watching."""
        self._stop.set()
        try:
            self.client.key_value_set(f"audiodiff/peer/done/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may be gone already at exit
            pass

    def _lost(self, what: str) -> None:
        exit_peer_lost(
            self.program,
            f"{what}; exiting so the job can be restarted (it resumes from the last complete checkpoint)",
            EXIT_PEER_LOST,
        )

    def _run(self) -> None:
        others = [p for p in range(self.count) if p != self.me]
        seen = {p: ("", time.monotonic()) for p in others}
        beat = 0
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self.client.key_value_set(f"audiodiff/peer/alive/{self.me}", str(beat), allow_overwrite=True)
                values = {}
                for p in others:
                    try:
                        if self.client.key_value_try_get(f"audiodiff/peer/done/{p}"):
                            values[p] = None  # finished cleanly: no longer watched
                            continue
                    except Exception:  # noqa: BLE001 - NotFound: not finished
                        pass
                    try:
                        values[p] = self.client.key_value_try_get(f"audiodiff/peer/alive/{p}")
                    except Exception:  # noqa: BLE001 - NotFound: not started yet
                        values[p] = ""
            except Exception as e:  # noqa: BLE001 - the coordination service itself is gone
                if self._stop.is_set():
                    return
                self._lost(f"lost the job's coordinator (process 0): {type(e).__name__}")
                return
            now = time.monotonic()
            for p, value in values.items():
                if value is None:
                    others.remove(p)
                    continue
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeout_s and not self._stop.is_set():
                    self._lost(
                        f"process {p} of {self.count} has not been seen alive for {now - seen[p][1]:.0f}s"
                    )
                    return
