"""The optimizer: AdamW with linear warmup and cosine decay, and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from audiodiff_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``end_lr_ratio``."""
    decay_steps = cfg.decay_steps or num_steps
    decay_steps = max(decay_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps,
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def _decay_mask(params):
    # Weight decay on matrices only: biases, norm scales and embeddings' 1-D leaves are left alone.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, num_steps)
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay warmed up over the first steps, so early averages are not dominated by init.

    ``min(decay, (1 + step) / (10 + step))``.
    """
    step = step.astype("float32")
    return jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
