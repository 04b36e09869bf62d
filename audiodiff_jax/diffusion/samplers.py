"""Samplers for the v-parameterized cosine-schedule diffusion of ``objective.py``.

Everything here is math on arrays: time grids, one update per sampler, classifier-free
guidance, and :func:`sample`, which runs a whole sampler as ONE ``lax.fori_loop`` (no
host round trip per step; the caller jits it). The denoiser is any function
``denoise(z_btc, t_b) -> v_btc``; :func:`guided_denoiser` builds it from a model.

Which ODE each sampler integrates (``phi = t pi/2``, ``alpha = cos phi``,
``sigma = sin phi``, ``lambda = log(alpha / sigma)``):

- ``euler`` and ``heun``: the probability-flow ODE in the angle, ``dz/dphi = v(z)``.
  With a v-model this is the native form (``v = dz/dphi`` for fixed x and eps), and
  it stays finite at both ends of the schedule (t = 0 and t = 1).
- ``ddim``: the exact solution of the same ODE with x and eps frozen over a step
  (Song et al. 2021), i.e. Euler in ``z / alpha`` against ``sigma / alpha``; ``eta``
  adds fresh noise (eta = 1 is ancestral DDPM sampling).
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022): data prediction, exponential
  integrator in lambda, second order from the previous step's x estimate. The first
  step and any step ending at t = 0 are first order (lambda is infinite there).

Time grids are per row (``ts_bn [B, steps + 1]``, decreasing, ending at 0) so rows of
one batch may differ in strength (audio-to-audio variation starts below t = 1).

Inpainting (and continuation, its special case) replaces the known frames after every
step with the known latents noised to the new time, ``alpha x_known + sigma n``, with
fresh noise each step; at t = 0 they are the known latents exactly.

Determinism: every random draw comes from the row's own key (``fold_in`` of its seed),
and no operation mixes rows, so a row's result does not depend on its batch mates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from audiodiff_jax.core.config import SAMPLERS, SCHEDULES  # the names the config accepts
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.diffusion import objective

# Model evaluations per step (for cost accounting in benchmarks and manifests).
EVALS_PER_STEP = {"ddim": 1, "dpmpp_2m": 1, "euler": 1, "heun": 2}
# Range of the noise-to-signal ratio sigma/alpha covered by the logsnr and karras grids
# (EDM's sigma_min / sigma_max). The grid still starts at t_start and ends at t = 0.
NSR_MIN, NSR_MAX = 0.002, 80.0
KARRAS_RHO = 7.0

# Noise streams of a row key: one per purpose, so draws never collide.
STREAM_INIT, STREAM_STEP, STREAM_INPAINT = 0, 1, 2

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Schedule helpers


def time_grid(num_steps: int, *, schedule: str = "uniform", shift: float = 1.0, t_start: float = 1.0):
    """Decreasing times ``[num_steps + 1]`` (float32 numpy) from ``t_start`` to exactly 0.

    Args:
      num_steps: number of sampler steps (>= 1).
      schedule: ``uniform`` (uniform in t), ``logsnr`` (uniform in log-SNR over
        ``[NSR_MIN, NSR_MAX]``), ``karras`` (EDM's rho = 7 spacing of sigma/alpha).
      shift: the training schedule shift (``objective.shift_time``), applied to the
        grid so sampling spends its steps where training put its noise levels.
      t_start: first time before the shift (1 = pure noise; < 1 for variations).

    Returns:
      Times in [0, 1]; ``[0]`` is ``shift_time(t_start)`` and ``[-1]`` is 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start={t_start} must be in (0, 1]")
    if schedule == "uniform":
        base = np.linspace(t_start, 0.0, num_steps + 1)
    elif schedule in ("logsnr", "karras"):
        nsr_start = math.tan(t_start * math.pi / 2) if t_start < 1.0 else math.inf
        hi, lo = min(nsr_start, NSR_MAX), min(NSR_MIN, nsr_start)
        i = np.arange(num_steps) / max(num_steps - 1, 1)
        if schedule == "logsnr":
            nsr = np.exp(np.log(hi) + i * (np.log(lo) - np.log(hi)))
        else:
            inv = 1.0 / KARRAS_RHO
            nsr = (hi**inv + i * (lo**inv - hi**inv)) ** KARRAS_RHO
        base = np.concatenate([np.arctan(nsr) * (2 / math.pi), [0.0]])
        base[0] = t_start  # start where asked (pure noise at 1), even beyond NSR_MAX
    else:
        raise ValueError(f"schedule={schedule!r}; one of {SCHEDULES}")
    ts = np.array(objective.shift_time(jnp.asarray(base, jnp.float32), float(shift)), np.float32)
    ts[-1] = 0.0
    return ts


def _bc(a: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, ...] to broadcast against ``like``."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


# ---------------------------------------------------------------------------
# One step of each sampler (pure; t, s are per-row times [B], s < t)


def euler_step(z: jax.Array, v: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """``dz/dphi = v``: one explicit Euler step in the angle phi = t pi/2."""
    return z + _bc((s - t) * (math.pi / 2), z) * v


def heun_update(z: jax.Array, v_t: jax.Array, v_s: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """Heun's (trapezoidal) correction, given v at z (time t) and at the Euler estimate (time s)."""
    return z + _bc((s - t) * (math.pi / 2), z) * 0.5 * (v_t + v_s)


def ddim_step(
    z: jax.Array, v: jax.Array, t: jax.Array, s: jax.Array, eta: jax.Array, noise: jax.Array
) -> jax.Array:
    """DDIM from t to s; ``eta [B]`` scales the fresh noise (0 = deterministic)."""
    x, eps = objective.v_to_x_eps(z, v, t)
    a_t, s_t = objective.alpha_sigma(t)
    a_s, s_s = objective.alpha_sigma(s)
    # c = eta * sigma_s / sigma_t * sqrt(1 - alpha_t^2 / alpha_s^2); alpha_s > 0 since s < 1.
    ratio = jnp.where(a_s > 0, a_t / jnp.where(a_s > 0, a_s, 1.0), 0.0)
    c = eta * s_s / jnp.maximum(s_t, 1e-20) * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
    dir_scale = jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0))
    return _bc(a_s, z) * x + _bc(dir_scale, z) * eps + _bc(c, z) * noise


def dpmpp_2m_step(
    z: jax.Array,
    x: jax.Array,
    x_prev: jax.Array,
    t_prev: jax.Array,
    t: jax.Array,
    s: jax.Array,
    second_order: jax.Array,
) -> jax.Array:
    """DPM-Solver++(2M) from t to s with data predictions x (at t) and x_prev (at t_prev).

    ``second_order [B]`` bool: use the multistep correction (False on the first step).
    Steps that end at s = 0, or whose previous time was t = 1, fall back to first
    order because lambda is infinite there.
    """
    a_t, s_t = objective.alpha_sigma(t)
    a_s, s_s = objective.alpha_sigma(s)
    a_p, s_p = objective.alpha_sigma(t_prev)
    safe = lambda a: jnp.where(a > 0, a, 1.0)
    # e^{-h} = (alpha_t sigma_s) / (sigma_t alpha_s), finite also where h is infinite.
    exp_neg_h = jnp.where((a_s > 0) & (s_t > 0), a_t * s_s / (safe(s_t) * safe(a_s)), 0.0)
    lam_t = jnp.log(safe(a_t)) - jnp.log(safe(s_t))
    lam_s = jnp.log(safe(a_s)) - jnp.log(safe(s_s))
    lam_p = jnp.log(safe(a_p)) - jnp.log(safe(s_p))
    finite = (a_t > 0) & (s_t > 0) & (a_s > 0) & (s_s > 0) & (a_p > 0) & (s_p > 0)
    use2 = second_order & finite
    h, h_prev = lam_s - lam_t, lam_t - lam_p
    coef = jnp.where(use2, h / (2.0 * jnp.where(use2, h_prev, 1.0)), 0.0)  # 1 / (2r), r = h_prev / h
    d = x + _bc(coef, x) * (x - x_prev)
    ratio = jnp.where(s_t > 0, s_s / safe(s_t), 0.0)
    return _bc(ratio, z) * z + _bc(a_s * (1.0 - exp_neg_h), z) * d


# ---------------------------------------------------------------------------
# Classifier-free guidance


def cfg_combine(
    v_cond: jax.Array,
    v_uncond: jax.Array,
    scale_b: jax.Array,
    rescale_b: jax.Array,
    frame_mask_bt: jax.Array | None = None,
) -> jax.Array:
    """Classifier-free guidance with guidance rescale.

    ``v = v_u + w (v_c - v_u)``; then, with rescale ``phi`` (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16), the guided v is
    scaled to the per-row std of ``v_c`` and mixed: ``phi v std(v_c)/std(v) + (1-phi) v``.
    The std of a row is over its valid frames (``frame_mask_bt``) and channels, so a
    row's result does not depend on padding or on other rows.

    Args:
      v_cond, v_uncond: ``[B, T, C]`` predictions with the prompt and with the
        negative prompt (or the empty caption).
      scale_b: guidance scale per row (1 = no guidance).
      rescale_b: rescale factor phi per row in [0, 1] (0 = off).
      frame_mask_bt: valid frames (1) of each row; None = all.
    """
    v = v_uncond + _bc(scale_b, v_cond) * (v_cond - v_uncond)
    if frame_mask_bt is None:
        frame_mask_bt = jnp.ones(v.shape[:2], v.dtype)
    m = frame_mask_bt.astype(v.dtype)[..., None]
    count = jnp.maximum(jnp.sum(m, axis=(1, 2)) * v.shape[-1], 1.0)

    def row_std(a):
        mean = jnp.sum(a * m, axis=(1, 2)) / count
        var = jnp.sum(jnp.square(a - _bc(mean, a)) * m, axis=(1, 2)) / count
        return jnp.sqrt(var)

    factor = row_std(v_cond) / jnp.maximum(row_std(v), 1e-12)
    mixed = _bc(rescale_b, v) * (v * _bc(factor, v)) + _bc(1.0 - rescale_b, v) * v
    # phi = 0 must give v itself, bit for bit (and no NaN from a zero std).
    return jnp.where(_bc(rescale_b > 0, v), mixed, v)


def guided_denoiser(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    cond: Conditioning,
    *,
    uncond_tokens: jax.Array | None,
    scale_b: jax.Array,
    rescale_b: jax.Array,
) -> Denoiser:
    """``denoise(z, t) -> v`` of a model ``apply_fn(params, z, t, cond)`` with classifier-free guidance.

    With ``uncond_tokens`` None the model runs once (no guidance); otherwise the prompt
    and the negative prompt (the empty caption when none) run as one batch of 2B rows
    (the rest of ``cond`` shared, but the musical controls, which the unconditional
    rows do without, as in training) and are combined by :func:`cfg_combine`.
    """

    def denoise(z_btc: jax.Array, t_b: jax.Array) -> jax.Array:
        if uncond_tokens is None:
            return apply_fn(params, z_btc, t_b, cond)
        both = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), cond)
        both = both._replace(tokens=jnp.concatenate([cond.tokens, uncond_tokens], axis=0))
        missing = {"bpm": 0, "key": -1, "meter": -1}  # core/music.py: none asked
        both = both._replace(
            **{
                name: jnp.concatenate([value, jnp.full_like(value, missing[name])], axis=0)
                for name, value in (("bpm", cond.bpm), ("key", cond.key), ("meter", cond.meter))
                if value is not None
            }
        )
        v = apply_fn(params, jnp.concatenate([z_btc, z_btc], axis=0), jnp.concatenate([t_b, t_b]), both)
        v_cond, v_uncond = jnp.split(v, 2, axis=0)
        mask = jnp.arange(z_btc.shape[1])[None, :] < cond.num_frames[:, None]
        return cfg_combine(v_cond, v_uncond, scale_b, rescale_b, mask)

    return denoise


# ---------------------------------------------------------------------------
# The sampling loop


class Inpaint(NamedTuple):
    """Known latents and where they are known (1) for inpainting / continuation."""

    known_btc: jax.Array
    mask_bt: jax.Array


def row_noise(keys_b: jax.Array, stream: int, index: jax.Array, shape_tc: tuple[int, int], valid: int):
    """Standard normal noise ``[B, T, C]`` from each row's own key.

    Only the first ``valid`` frames are drawn (the rest are zero padding), so a row's
    noise depends on its key and its length, never on the padding or the batch.
    """
    frames, channels = shape_tc

    def one(key):
        key = jax.random.fold_in(jax.random.fold_in(key, stream), index)
        n = jax.random.normal(key, (valid, channels), jnp.float32)
        return jnp.pad(n, ((0, frames - valid), (0, 0)))

    return jax.vmap(one)(keys_b)


def sample(
    denoise: Denoiser,
    init_btc: jax.Array,
    ts_bn: jax.Array,
    keys_b: jax.Array,
    *,
    method: str,
    eta_b: jax.Array | None = None,
    inpaint: Inpaint | None = None,
    valid_frames: int | None = None,
    constrain: Callable[[jax.Array], jax.Array] = lambda x: x,
) -> jax.Array:
    """Runs one sampler from ``ts_bn[:, 0]`` down to ``ts_bn[:, -1]`` (= 0) in one fori_loop.

    Args:
      denoise: ``(z_btc, t_b) -> v_btc``.
      init_btc: clean latents the start is noised from (zeros for generation from
        pure noise at t = 1; the encoded audio for variations).
      ts_bn: per-row decreasing time grids ``[B, steps + 1]`` (see :func:`time_grid`).
      keys_b: per-row PRNG keys (typed key array ``[B]``).
      method: one of :data:`SAMPLERS`.
      eta_b: DDIM noise scale per row (default 0).
      inpaint: known latents and mask, replaced (noised to the current time) after
        every step.
      valid_frames: frames of each row that are real (the rest is sequence padding);
        default all.
      constrain: applied to the latents each step (pins their sharding).

    Returns:
      Latents ``[B, T, C]`` at t = 0 (padding frames zero).
    """
    if method not in SAMPLERS:
        raise ValueError(f"sampler={method!r}; one of {SAMPLERS}")
    batch, frames, channels = init_btc.shape
    valid = frames if valid_frames is None else valid_frames
    num_steps = ts_bn.shape[1] - 1
    eta_b = jnp.zeros((batch,), jnp.float32) if eta_b is None else eta_b.astype(jnp.float32)
    frame_mask = (jnp.arange(frames) < valid)[None, :, None]
    noise = lambda stream, i: row_noise(keys_b, stream, i, (frames, channels), valid)

    def replace_known(z, s, i):
        if inpaint is None:
            return z
        a, sg = objective.alpha_sigma(s)
        noised = _bc(a, z) * inpaint.known_btc + _bc(sg, z) * noise(STREAM_INPAINT, i)
        return jnp.where(inpaint.mask_bt[..., None] > 0, noised, z)

    t0 = ts_bn[:, 0]
    x0 = (
        init_btc
        if inpaint is None
        else jnp.where(inpaint.mask_bt[..., None] > 0, inpaint.known_btc, init_btc)
    )
    a0, s0 = objective.alpha_sigma(t0)
    z = _bc(a0, x0) * x0 + _bc(s0, x0) * noise(STREAM_INIT, 0)
    z = constrain(jnp.where(frame_mask, z, 0.0))

    def body(i, carry):
        z, x_prev = carry
        t, s = ts_bn[:, i], ts_bn[:, i + 1]
        v = denoise(z, t)
        if method == "euler":
            z_new = euler_step(z, v, t, s)
        elif method == "heun":
            z_e = constrain(euler_step(z, v, t, s))
            z_new = heun_update(z, v, denoise(z_e, s), t, s)
        elif method == "ddim":
            z_new = ddim_step(z, v, t, s, eta_b, noise(STREAM_STEP, i))
        else:  # dpmpp_2m
            x, _ = objective.v_to_x_eps(z, v, t)
            t_prev = ts_bn[:, jnp.maximum(i - 1, 0)]
            z_new = dpmpp_2m_step(z, x, x_prev, t_prev, t, s, jnp.full((batch,), i > 0))
            x_prev = x
        z_new = replace_known(z_new, s, i)
        return constrain(jnp.where(frame_mask, z_new, 0.0)), x_prev

    z, _ = jax.lax.fori_loop(0, num_steps, body, (z, jnp.zeros_like(z)))
    return z


__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "EVALS_PER_STEP",
    "Inpaint",
    "cfg_combine",
    "ddim_step",
    "dpmpp_2m_step",
    "euler_step",
    "guided_denoiser",
    "heun_update",
    "row_noise",
    "sample",
    "time_grid",
]
