"""Continuous-time v-prediction with the cosine schedule: the training objective.

With data ``x``, noise ``eps ~ N(0, I)`` and time ``t`` in [0, 1]::

    alpha = cos(t pi/2),  sigma = sin(t pi/2)
    z = alpha x + sigma eps            (the noisy latent the model sees)
    v = alpha eps - sigma x            (the model's target)

and the model recovers ``x = alpha z - sigma v`` and ``eps = sigma z + alpha v``.

A schedule shift ``s`` (for long sequences, which need more noise to destroy the
same structure) scales the noise-to-signal ratio: ``tan(t' pi/2) = s tan(t pi/2)``,
i.e. the log-SNR moves down by ``2 log s``; ``s = 1`` is the plain cosine schedule.

All functions take arrays and plain numbers, never config objects, so tests call
them directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def alpha_sigma(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Signal and noise scales of the cosine schedule at time ``t`` in [0, 1].

    Clipped at 0: float32 cos(pi/2) is -4e-8, not 0, which would flip the sign of the
    signal at t = 1 in the samplers' x estimates.
    """
    angle = t * (math.pi / 2)
    return jnp.maximum(jnp.cos(angle), 0.0), jnp.maximum(jnp.sin(angle), 0.0)


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """Maps ``t`` to ``t'`` with ``tan(t' pi/2) = shift * tan(t pi/2)``.

    Written with atan2 (no tan overflow at t = 1). t = 0 and t = 1 map exactly to
    themselves for any shift: the endpoints are pinned, because float32 pi/2 exceeds
    pi/2, so cos(1 * pi/2) is -4.4e-8 and atan2 alone maps 1 to 0.99999994 (a sampler's
    grid would then not start at pure noise).
    """
    if shift == 1.0:
        return t
    angle = t * (math.pi / 2)
    shifted = jnp.arctan2(shift * jnp.sin(angle), jnp.cos(angle)) * (2 / math.pi)
    return jnp.where((t == 0.0) | (t == 1.0), t, shifted)


def log_snr(t: jax.Array) -> jax.Array:
    """log(alpha^2 / sigma^2) of the cosine schedule."""
    alpha, sigma = alpha_sigma(t)
    return 2.0 * (jnp.log(alpha) - jnp.log(sigma))


def sample_time(
    rng: jax.Array,
    batch: int,
    *,
    method: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Draws training times in [0, 1].

    Args:
      rng: a PRNG key.
      batch: number of times.
      method: ``uniform`` (t ~ U[0, 1)) or ``logit_normal`` (t = sigmoid(N(mean, std))).
      mean, std: parameters of the logit-normal.
      shift: schedule shift applied after sampling (see :func:`shift_time`).
    """
    if method == "uniform":
        t = jax.random.uniform(rng, (batch,), dtype=jnp.float32)
    elif method == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), dtype=jnp.float32))
    else:
        raise ValueError(f"unknown timestep sampling method {method!r}")
    return shift_time(t, shift)


def add_noise(x: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the noisy latent ``z`` and the v target for data ``x [B, ...]`` at ``t [B]``."""
    alpha, sigma = alpha_sigma(t)
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
    z = alpha * x + sigma * noise
    v = alpha * noise - sigma * x
    return z, v


def v_to_x_eps(z: jax.Array, v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Recovers (x, eps) from the noisy latent and a v prediction."""
    alpha, sigma = alpha_sigma(t)
    shape = (-1,) + (1,) * (z.ndim - 1)
    alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
    return alpha * z - sigma * v, sigma * z + alpha * v


def masked_mse(pred: jax.Array, target: jax.Array, mask_bt: jax.Array, *, per_row: bool = False) -> jax.Array:
    """Mean squared error over valid frames: ``pred, target [B, T, C]``, ``mask_bt [B, T]``.

    Padded frames (mask 0) contribute nothing, and the mean is over valid elements
    only, so a batch with padding weighs each valid frame like a batch without.
    ``per_row``: each row's own mean ``[B]`` (validation scores examples one by one).
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    err = jnp.sum(err, axis=-1) * mask_bt
    if per_row:
        return jnp.sum(err, axis=-1) / jnp.maximum(jnp.sum(mask_bt, axis=-1) * pred.shape[-1], 1.0)
    denom = jnp.maximum(jnp.sum(mask_bt) * pred.shape[-1], 1.0)
    return jnp.sum(err) / denom


CONTEXT_MODES = ("none", "prefix", "suffix", "span")


def context_mask(rng: jax.Array, num_frames: jax.Array, frames: int, *, none_prob: float) -> jax.Array:
    """Random known-frame masks ``[B, frames]`` (float32, 1 = known) for masked-context training.

    Each row draws a mode: with probability ``none_prob`` nothing is known (plain
    generation); otherwise, with equal odds, a known prefix (window overlaps,
    continuation), a known suffix, or everything known but one unknown span (inpainting).
    The known part covers a uniform 5-90% of the row's ``num_frames`` real frames, so
    some frames are always left to generate; padding frames are never known.
    """
    batch = num_frames.shape[0]
    k_mode, k_len, k_pos = jax.random.split(rng, 3)
    u = jax.random.uniform(k_mode, (batch,))
    rest = (u - none_prob) / max(1.0 - none_prob, 1e-9)
    mode = jnp.where(u < none_prob, 0, 1 + jnp.minimum(jnp.floor(rest * 3), 2)).astype(jnp.int32)
    n = num_frames.astype(jnp.float32)
    frac = jax.random.uniform(k_len, (batch,), minval=0.05, maxval=0.9)
    known = jnp.maximum(jnp.round(frac * n), 1.0)
    unknown = n - known
    start = jnp.floor(jax.random.uniform(k_pos, (batch,)) * (known + 1.0))  # span start in [0, known]
    i = jnp.arange(frames, dtype=jnp.float32)[None, :]
    real = i < n[:, None]
    prefix = i < known[:, None]
    suffix = i >= (n - known)[:, None]
    span = (i < start[:, None]) | (i >= (start + unknown)[:, None])
    m = mode[:, None]
    out = jnp.where(m == 1, prefix, jnp.where(m == 2, suffix, jnp.where(m == 3, span, False)))
    return (out & real).astype(jnp.float32)
