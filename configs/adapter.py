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
instrument it never heard, 500 steps): rank 16 on the MLP projections (fc1, fc2) of
every block, learning rate 3e-3 without weight decay (the factors are few and start at
zero), no caption dropout, an EMA of 0.99 (a run is short); songs sampled with it at
guidance 3 (README). Measured against the alternatives on the shipped weights with
the musical controls: adding the self-attention projections moves the songs as far
toward the new material but costs more of the base's key adherence on its own
prompts (11 points against 10 over 72 songs, and twice the CPU time); adapting the
cross-attention too lets the adapter change how every caption is read (17 to 29 points
of key on the weights before the controls); training with caption dropout moves the
unconditional prediction as much as the conditional one, and classifier-free guidance,
which amplifies their difference, then hardly shows the adapter (at 0.1: 12% of the
distance, against 25% without); learning rates of 1.5e-3 and 6e-3, and 200 steps,
did no better.
"""

from audiodiff_jax.checkpoints import source
from audiodiff_jax.core import config as config_lib


def get_config(arg=None):
    if not arg:
        raise ValueError(
            "configs/adapter.py needs its base: --config=configs/adapter.py:BASE "
            "(a run, a checkpoint step or an export; 'demo' is the shipped demo DiT)"
        )
    base = source.resolve(arg)
    config, _ = source.configdict_like(base)
    config.data.cfg_dropout = 0.0
    config.adapters.base = base
    config.adapters.rank = 16
    config.adapters.alpha = 16.0
    config.adapters.targets = tuple(t for t in config_lib.ADAPTER_TARGETS if t.startswith("mlp."))
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 20
    config.optim.weight_decay = 0.0
    config.optim.ema_decay = 0.99
    config.train.num_steps = 500
    config.train.log_every = 25
    config.checkpoint.every_steps = 100
    return config
