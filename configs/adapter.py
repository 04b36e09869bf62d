"""Adapter runs: low-rank adapters trained on the frozen weights of a base model.

    audiodiff-train --config=configs/adapter.py:BASE --workdir=runs/my_adapter \
        --config.data.shards_dir=latents/mine

``BASE`` is a run's workdir (or one of its step folders) or an export
(``audiodiff-export``); ``demo`` names the DiT shipped in ``audiodiff_jax/demo_weights``
(as it does for every program that reads weights).
The model, the diffusion settings, the training window and the sampling defaults are
the base's, read from it (an adapter's model is its base's; ``adapter_trainer.py``
refuses one that differs). The shards must be encoded like the base's data:
``audiodiff-precompute --like=BASE`` (README, "Your own music: adapters").

The recipe was measured on the demo model (BENCHMARKS.md, "Adapters": 32 renders of an
instrument it never heard, 500 steps): rank 16 on the self-attention and MLP projections
of every block, learning rate 3e-3 without weight decay (the factors are few and start
at zero), no caption dropout, an EMA of 0.99 (a run is short). Two choices there were
measured against the alternatives: adapting the cross-attention too lets the adapter
change how every caption is read (the demo's held-out pairings then lost 17 to 29
points of key adherence, against 8 without it); training with caption dropout moves
the unconditional prediction as much as the conditional one, and classifier-free
guidance, which amplifies their difference, then hardly shows the adapter (no gain in
Fréchet distance at 0.1, 60% less at 0).
"""

import dataclasses

import ml_collections

from audiodiff_jax.checkpoints import source
from audiodiff_jax.core import config as config_lib


def get_config(arg=None):
    if not arg:
        raise ValueError(
            "configs/adapter.py needs its base: --config=configs/adapter.py:BASE "
            "(a run, a checkpoint step or an export; 'demo' is the shipped demo DiT)"
        )
    base = source.resolve(arg)
    saved = source.WeightsSource(base).cfg
    config = config_lib.default_configdict()
    for section in ("model", "diffusion", "sample"):
        config[section] = ml_collections.ConfigDict(dataclasses.asdict(getattr(saved, section)))
    config.data.window_frames = saved.data.window_frames
    config.data.global_batch_size = saved.data.global_batch_size
    config.data.cfg_dropout = 0.0
    config.adapters.base = base
    config.adapters.rank = 16
    config.adapters.alpha = 16.0
    config.adapters.targets = tuple(t for t in config_lib.ADAPTER_TARGETS if not t.startswith("cross_attn."))
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.0
    config.optim.ema_decay = 0.99
    config.train.num_steps = 500
    config.train.log_every = 25
    config.checkpoint.every_steps = 100
    return config
