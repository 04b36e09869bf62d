"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and
the weight EMAs (their decays and names)."""

from __future__ import annotations

import jax
import optax

from audiodiff_jax.core.config import OptimConfig


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


# Names of the weight sets a run keeps: the raw weights, and one EMA per decay.
RAW = "raw"
EMA = "ema"  # the EMA of optim.ema_decay: what sampling uses unless told otherwise


def ema_name(decay: float) -> str:
    """The name of the EMA of ``decay``: ``ema0.9999`` (the shortest repr of the float)."""
    return f"{EMA}{float(decay)!r}"


def ema_decays(cfg: OptimConfig) -> dict[str, float]:
    """Every EMA a run keeps, by name, ``optim.ema_decay``'s first."""
    return {ema_name(d): float(d) for d in (cfg.ema_decay, *cfg.extra_ema_decays)}


def canonical_weights(name: str) -> str:
    """``ema0.99990`` -> ``ema0.9999``; other names unchanged."""
    if name.startswith(EMA) and name != EMA:
        try:
            return ema_name(float(name[len(EMA) :]))
        except ValueError:
            return name
    return name


def update_ema(ema, params, step: jax.Array, decay: float):
    """One EMA step toward ``params`` with the warmed-up decay (:func:`ema_decay_at`)."""
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: e * d + (1.0 - d) * p, ema, params)
