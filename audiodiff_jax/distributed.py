"""Joining the other processes of a job (``jax.distributed``), for every program.

The flags here are shared by ``audiodiff-train``, ``audiodiff-codec-train`` and
``audiodiff-sample``: on TPU VMs and SLURM the coordinator is found automatically
(``--distributed=auto``); on one machine pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (``launch/local.py`` does, through the
``AUDIODIFF_*`` environment variables).
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

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


def _on_cluster() -> bool:
    # Environments where jax.distributed.initialize() finds the coordinator by itself.
    return bool(
        os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    )
