"""``audiodiff-train``: the training program. The same command runs on every host.

    audiodiff-train --config=configs/tiny.py --workdir=/tmp/run \
        --config.train.num_steps=100 --config.data.shards_dir=/tmp/shards

Run it again with the same workdir and it resumes from the latest checkpoint (see
``audiodiff_jax/train.py`` for the resume order). SIGTERM saves a checkpoint and exits
with status 0. Several processes (hosts) join through ``jax.distributed``: on TPU VMs
and SLURM the coordinator is found automatically (``--distributed=auto``); on one
machine pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(``launch/local.py`` does).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


def init_distributed() -> None:
    """Joins the other processes of the job, if there are any."""
    import jax

    mode = _DISTRIBUTED.value
    if mode == "off":
        return
    if _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            initialization_timeout=_INIT_TIMEOUT.value,
        )
    elif mode == "on" or _on_cluster():
        jax.distributed.initialize(initialization_timeout=_INIT_TIMEOUT.value)
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


def main(argv):
    del argv
    from audiodiff_jax import config as config_lib
    from audiodiff_jax import train

    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
    try:
        cfg = config_lib.from_configdict(_CONFIG.value)
        config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        logging.error("config error: %s", e)
        print(f"audiodiff-train: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    init_distributed()
    try:
        result = train.train(cfg, _WORKDIR.value)
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
