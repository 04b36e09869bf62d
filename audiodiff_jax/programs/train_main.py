r"""``audiodiff-train``: the training program. The same command runs on every host.

    audiodiff-train --config=configs/tiny.py --workdir=/tmp/run \
        --config.train.num_steps=100 --config.data.shards_dir=/tmp/shards

Run it again with the same workdir and it resumes from the latest checkpoint (see
``audiodiff_jax/training/loop.py`` for the resume order). SIGTERM saves a checkpoint and exits
with status 0. Several processes (hosts) join through ``jax.distributed``: on TPU VMs
and SLURM the coordinator is found automatically (``--distributed=auto``); on one
machine pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(``launch/local.py`` does).

Failures: when a process dies, every other one exits within ``--peer_timeout_s``
(status 5, one line naming the lost process; ``audiodiff_jax/core/distributed.py``); a
process whose steps stop (a hung peer) exits after ``--step_timeout_s`` (status 4).
Mistakes in flags, configs and files end in one line and status 2. Run the same command
again and the job resumes from the last complete checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

import audiodiff_jax
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import distributed
from audiodiff_jax.core.config import ConfigError
from audiodiff_jax.programs import cli
from audiodiff_jax.training import dit_trainer, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py or configs/dit.py:1B"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, metrics).")
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout_s",
    1800.0,
    "Exit (status 4) when no training step finishes for this long after the first one "
    "(a hung peer); 0 = never.",
)

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


def config_or_exit(program: str, example: str, parse, validate):
    """The checked config of ``--config`` (``parse`` then ``validate``), after checking
    that ``--workdir`` and ``--config`` are given; a config error is printed, naming the
    field, and the process exits with EXIT_CONFIG_ERROR. Shared by the DiT and codec
    training programs."""
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
    cfg = config_or_exit(
        "audiodiff-train", "configs/tiny.py", config_lib.from_configdict, config_lib.validate
    )
    distributed.init_distributed()
    try:
        result = dit_trainer.train(
            cfg, _WORKDIR.value, process_start=audiodiff_jax.IMPORT_TIME, step_timeout_s=_STEP_TIMEOUT.value
        )
    except config_lib.ConfigError as e:
        print(f"audiodiff-train: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except loop.PeerLost as e:
        distributed.exit_peer_lost("audiodiff-train", e, loop.PeerLost.EXIT_CODE)
    except loop.TrainingDiverged as e:
        logging.error("%s", e)
        print(f"audiodiff-train: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    if result.preempted:
        logging.info("stopped for preemption at step %d; run the same command to resume", result.final_step)
    else:
        logging.info("done: step %d", result.final_step)


def run():
    cli.run(main, module=(__name__, distributed.__name__))


if __name__ == "__main__":
    run()
