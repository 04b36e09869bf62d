"""``audiodiff-train``: the training program. The same command runs on every host.

    audiodiff-train --config=configs/tiny.py --workdir=/tmp/run \
        --config.train.num_steps=100 --config.data.shards_dir=/tmp/shards

Run it again with the same workdir and it resumes from the latest checkpoint (see
``audiodiff_jax/train.py`` for the resume order). SIGTERM saves a checkpoint and exits
with status 0. Several processes (hosts) join through ``jax.distributed``: on TPU VMs
and SLURM the coordinator is found automatically (``--distributed=auto``); on one
machine pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(``launch/local.py`` does).

Failures: when a process dies, the coordination service notices its missing
heartbeats within ``--heartbeat_timeout_s`` and ends every other process with an
error naming the dead task; a process whose steps stop (a hung peer) exits after
``--step_timeout_s`` (status 4). Run the same command again and the job resumes from
the last complete checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

# Start of this process (the imports above are light), for the goodput account of start-up.
_PROCESS_START = time.time()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py or configs/dit.py:1B"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, metrics).")
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
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout_s",
    1800.0,
    "Exit (status 4) when no training step finishes for this long after the first one "
    "(a hung peer); 0 = never.",
)

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


def init_distributed() -> None:
    """Joins the other processes of the job, if there are any."""
    import jax

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


def config_or_exit(program: str, example: str, parse, validate):
    """The checked config of ``--config`` (``parse`` then ``validate``), after checking
    that ``--workdir`` and ``--config`` are given; a config error is printed, naming the
    field, and the process exits with EXIT_CONFIG_ERROR. Shared by the DiT and codec
    training programs."""
    from audiodiff_jax.config import ConfigError

    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _CONFIG.value is None:
        raise app.UsageError(f"--config is required, e.g. --config={example}")
    try:
        cfg = parse(_CONFIG.value)
        validate(cfg)
    except ConfigError as e:
        logging.error("config error: %s", e)
        print(f"{program}: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    return cfg


def main(argv):
    del argv
    from audiodiff_jax import config as config_lib
    from audiodiff_jax import train

    cfg = config_or_exit(
        "audiodiff-train", "configs/tiny.py", config_lib.from_configdict, config_lib.validate
    )
    init_distributed()
    try:
        result = train.train(
            cfg, _WORKDIR.value, process_start=_PROCESS_START, step_timeout_s=_STEP_TIMEOUT.value
        )
    except config_lib.ConfigError as e:
        print(f"audiodiff-train: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except train.TrainingDiverged as e:
        logging.error("%s", e)
        print(f"audiodiff-train: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    if result.preempted:
        logging.info("stopped for preemption at step %d; run the same command to resume", result.final_step)
    else:
        logging.info("done: step %d", result.final_step)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
