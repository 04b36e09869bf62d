r"""``audiodiff-train`` and ``audiodiff-codec-train``: the training programs of the DiT and of
the codec, which differ only by their trainer. The same command runs on every host.

    audiodiff-train --config=configs/tiny.py --workdir=/tmp/run \
        --config.train.num_steps=100 --config.data.shards_dir=/tmp/shards

    audiodiff-codec-train --config=configs/codec.py:small --workdir=/tmp/codec \
        --config.data.audio_dir=/tmp/codec_audio/train --export_dir=/tmp/codec_export

Run it again with the same workdir and it resumes from the latest checkpoint (see
``audiodiff_jax/training/loop.py`` for the resume order). SIGTERM saves a checkpoint and exits
with status 0. Several processes (hosts) join through ``jax.distributed``: on TPU VMs
and SLURM the coordinator is found automatically (``--distributed=auto``); on one
machine pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(``launch/local.py`` does).

With ``adapters.base`` set (``--config=configs/adapter.py:BASE``) the DiT program trains
low-rank adapters on that frozen base instead (``audiodiff_jax/training/adapter_trainer.py``);
with ``distill.teacher`` set (``--config=configs/distill.py:TEACHER``) it distills a few-step
student from that teacher (``audiodiff_jax/training/distill_trainer.py``).

The DiT evaluates during training when its config's ``eval.every_steps`` is above 0
(``audiodiff_jax/evaluators/train_eval.py``). The codec, with ``--export_dir``, writes the
EMA weights of the last step there as a loadable codec (``weights.npz`` +
``codec_card.json``, with the latent statistics measured on ``--stats_dir`` audio, default
the training audio); ``load_codec(export_dir)`` reads it.

Failures: when a process dies, every other one exits within ``--peer_timeout_s``
(status 5, one line naming the lost process; ``audiodiff_jax/core/distributed.py``); a
process whose steps stop (a hung peer) exits after ``--step_timeout_s`` (status 4); a
run whose loss diverges exits with status 3. Mistakes in flags, configs and files end in
one line and status 2. Run the same command again and the job resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import audiodiff_jax
from audiodiff_jax.codec import codec as codec_lib
from audiodiff_jax.codec import config as codec_config
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import distributed
from audiodiff_jax.core.config import ConfigError
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.programs import cli
from audiodiff_jax.training import adapter_trainer, codec_trainer, distill_trainer, dit_trainer, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py, configs/dit.py:1B or configs/codec.py:small"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, metrics).")
_STEP_TIMEOUT = flags.DEFINE_float(
    "step_timeout_s",
    1800.0,
    "Exit (status 4) when no training step finishes for this long after the first one "
    "(a hung peer); 0 = never.",
)
_EXPORT = flags.DEFINE_string(
    "export_dir", "", "audiodiff-codec-train: write the trained codec (npz + card) here at the end."
)
_STATS_DIR = flags.DEFINE_string(
    "stats_dir", "", "audiodiff-codec-train: audio for the latent statistics (default: training audio)."
)

DIT_PROGRAM = "audiodiff-train"
CODEC_PROGRAM = "audiodiff-codec-train"
EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


def config_or_exit(program: str, example: str, parse, validate):
    """The checked config of ``--config`` (``parse`` then ``validate``), after checking
    that ``--workdir`` and ``--config`` are given; a config error is printed, naming the
    field, and the process exits with EXIT_CONFIG_ERROR."""
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


def train_or_exit(program: str, train: Callable[..., loop.TrainResult], cfg, **kwargs) -> loop.TrainResult:
    """``train(cfg, --workdir, ...)`` in the job's ``jax.distributed`` group; a config
    error, a lost peer and a diverged run end the process with one line and their status
    (the module docstring lists them). Logs how the run ended."""
    distributed.init_distributed()
    try:
        result = train(
            cfg,
            _WORKDIR.value,
            process_start=audiodiff_jax.IMPORT_TIME,
            step_timeout_s=_STEP_TIMEOUT.value,
            **kwargs,
        )
    except ConfigError as e:
        print(f"{program}: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except loop.PeerLost as e:
        distributed.exit_peer_lost(program, e, loop.PeerLost.EXIT_CODE)
    except loop.TrainingDiverged as e:
        logging.error("%s", e)
        print(f"{program}: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    if result.preempted:
        logging.info("stopped for preemption at step %d; run the same command to resume", result.final_step)
    else:
        logging.info("done: step %d", result.final_step)
    return result


def main(argv):
    """``audiodiff-train``: the DiT."""
    del argv
    cfg = config_or_exit(DIT_PROGRAM, "configs/tiny.py", config_lib.from_configdict, config_lib.validate)
    if _EXPORT.value or _STATS_DIR.value:
        raise UserError(
            f"--export_dir and --stats_dir are {CODEC_PROGRAM}'s; a DiT run is exported with audiodiff-export"
        )
    make_evaluator = None
    if cfg.eval.every_steps > 0:
        # Imported here: only a DiT run with evaluation on loads sampling and evaluation.
        from audiodiff_jax.evaluators import train_eval

        make_evaluator = train_eval.from_config
    # An adapter run (adapters.base set) trains low-rank adapters on its frozen base.
    # A distillation (distill.teacher set) trains a few-step student of the teacher.
    train = (
        adapter_trainer.train
        if cfg.adapters.base
        else distill_trainer.train
        if cfg.distill.teacher
        else dit_trainer.train
    )
    train_or_exit(DIT_PROGRAM, train, cfg, make_evaluator=make_evaluator)


def main_codec(argv):
    """``audiodiff-codec-train``: the codec, exported at the end with ``--export_dir``."""
    del argv
    cfg = config_or_exit(
        CODEC_PROGRAM, "configs/codec.py:small", codec_config.from_configdict, codec_config.validate
    )
    result = train_or_exit(CODEC_PROGRAM, codec_trainer.train, cfg)
    if result.preempted or not _EXPORT.value or jax.process_index() != 0:
        return
    stats_dir = _STATS_DIR.value or cfg.data.audio_dir
    path = codec_lib.export_run(_WORKDIR.value, _EXPORT.value, stats_dir=stats_dir)
    logging.info("exported the codec to %s", path)


def run():
    cli.run(main, module=(__name__, distributed.__name__))


def run_codec():
    cli.run(main_codec, module=(__name__, distributed.__name__))


if __name__ == "__main__":
    run()
