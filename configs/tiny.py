"""Tiny config for tests and CPU smoke runs (seconds per step on 8 fake devices).

    audiodiff-train --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.data.shards_dir=/tmp/shards
"""

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.model import presets


def get_config(arg=None):
    del arg
    config = config_lib.default_configdict()
    presets.apply_preset(config.model, "tiny")
    config.model.latent_channels = 8
    config.model.text.vocab_size = 256
    config.model.text.max_len = 16
    config.data.window_frames = 32
    config.data.global_batch_size = 8
    config.data.cfg_dropout = 0.1
    config.mesh.data = -1
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 5
    config.train.num_steps = 20
    config.train.log_every = 5
    config.checkpoint.every_steps = 10
    config.checkpoint.keep_last = 2
    # Sampling a tiny run (saved with its checkpoints): one-second songs, two steps.
    config.sample.seconds = (1.0,)
    config.sample.steps = (2,)
    config.sample.min_seconds = 0.5
    return config
