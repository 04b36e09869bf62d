r"""``audiodiff-codec-train``: trains the codec; the same command on every host.

    audiodiff-codec-train --config=configs/codec.py:small --workdir=/tmp/codec \
        --config.data.audio_dir=/tmp/codec_audio/train \
        --export_dir=/tmp/codec_export

Run it again with the same workdir and it resumes (``audiodiff_jax/training/loop.py``
has the resume order). With ``--export_dir`` the EMA weights of the last step are
written there as a loadable codec (``weights.npz`` + ``codec_card.json``, with the
latent statistics measured on ``--stats_dir`` audio, default the training audio);
``load_codec(export_dir)`` reads it. Multi-host flags are the DiT program's
(``audiodiff_jax/programs/train_main.py``), whose flag definitions this program reuses.
"""

from __future__ import annotations

import sys

import jax
from absl import flags, logging

import audiodiff_jax
from audiodiff_jax.codec import codec as codec_lib
from audiodiff_jax.codec import config as config_lib
from audiodiff_jax.core import distributed
from audiodiff_jax.core.config import ConfigError
from audiodiff_jax.programs import cli

# The DiT program's flags (--config, --workdir and the multi-host ones) are reused as
# they are: importing the module defines them, and absl refuses a second definition.
from audiodiff_jax.programs.train_main import (
    _STEP_TIMEOUT,
    _WORKDIR,
    EXIT_CONFIG_ERROR,
    EXIT_DIVERGED,
    config_or_exit,
)
from audiodiff_jax.training import codec_trainer, loop

_EXPORT = flags.DEFINE_string("export_dir", "", "Write the trained codec (npz + card) here at the end.")
_STATS_DIR = flags.DEFINE_string(
    "stats_dir", "", "Audio for the latent statistics (default: training audio)."
)


def main(argv):
    del argv
    cfg = config_or_exit(
        "audiodiff-codec-train", "configs/codec.py:small", config_lib.from_configdict, config_lib.validate
    )
    distributed.init_distributed()
    try:
        result = codec_trainer.train(
            cfg, _WORKDIR.value, process_start=audiodiff_jax.IMPORT_TIME, step_timeout_s=_STEP_TIMEOUT.value
        )
    except ConfigError as e:
        print(f"audiodiff-codec-train: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except loop.PeerLost as e:
        distributed.exit_peer_lost("audiodiff-codec-train", e, loop.PeerLost.EXIT_CODE)
    except loop.TrainingDiverged as e:
        print(f"audiodiff-codec-train: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    if result.preempted:
        logging.info("stopped for preemption at step %d; run the same command to resume", result.final_step)
        return
    logging.info("done: step %d", result.final_step)
    if _EXPORT.value:
        if jax.process_index() == 0:
            path = codec_lib.export_run(
                _WORKDIR.value, _EXPORT.value, stats_dir=_STATS_DIR.value or cfg.data.audio_dir
            )
            logging.info("exported the codec to %s", path)


def run():
    cli.run(main, module=(__name__, "audiodiff_jax.programs.train_main", distributed.__name__))


if __name__ == "__main__":
    run()
