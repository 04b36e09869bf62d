"""Progressive distillation targets (Salimans & Ho 2022, "Progressive Distillation for Fast
Sampling of Diffusion Models"), for the v-parameterized cosine schedule of ``objective.py``.

A student on a grid of ``K`` steps learns to take, in one DDIM step from ``t`` to ``s``,
the teacher's ``m`` DDIM steps over the same interval (the teacher's grid is the
``K m``-step grid; the student's is every ``m``-th time of it). Given the teacher's end
point ``z_s`` from ``z_t``, the clean estimate that makes ONE DDIM step land exactly on
it is (Salimans & Ho, Algorithm 2)::

    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

and the v the student should predict is ``v~ = (alpha_t z_t - x~) / sigma_t``. The MSE in
v is the MSE in x weighted by ``SNR + 1`` (``|x - x^|^2 = sigma_t^2 |v - v^|^2``), the
"SNR+1" weighting of the paper. At ``s = 0`` the target is the teacher's end point
itself; ``sigma_t > 0`` for every grid time but the last (0), which starts no step.

Everything here is math on arrays; ``audiodiff_jax/training/distill_trainer.py`` runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from audiodiff_jax.diffusion import objective, samplers


def grids(steps: int, substeps: int, *, schedule: str, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """``(student [steps + 1], teacher [steps * substeps + 1])`` decreasing time grids; the
    student's is every ``substeps``-th time of the teacher's (for the uniform grid, which
    the shift maps point by point; other schedules are checked to nest)."""
    fine = samplers.time_grid(steps * substeps, schedule=schedule, shift=shift)
    coarse = samplers.time_grid(steps, schedule=schedule, shift=shift)
    if not np.allclose(fine[::substeps], coarse, atol=1e-6):
        raise ValueError(
            f"the {steps}-step {schedule} grid is not every {substeps}-th time of the "
            f"{steps * substeps}-step one; distill on the uniform schedule"
        )
    return fine[::substeps].copy(), fine


def ddim_target(z_t: jax.Array, z_s: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """The v a student must predict at ``(z_t, t)`` for one DDIM step to reach ``z_s`` at ``s``."""
    a_t, s_t = objective.alpha_sigma(t)
    a_s, s_s = objective.alpha_sigma(s)
    bc = lambda a: a.reshape(a.shape + (1,) * (z_t.ndim - a.ndim))
    ratio = s_s / s_t
    x = (z_s - bc(ratio) * z_t) / bc(a_s - ratio * a_t)
    return (bc(a_t) * z_t - x) / bc(s_t)


def teacher_steps(
    denoise: samplers.Denoiser,
    z_t: jax.Array,
    times_bm: jax.Array,
    *,
    known: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    method: str = "ddim",
) -> jax.Array:
    """Runs a deterministic sampler through the per-row times ``times_bm [B, m + 1]`` (decreasing).

    ``method``: ``ddim``, or ``dpmpp_2m`` (DPM-Solver++(2M), first order on the first of
    the ``m`` steps, second order after: the teacher's own sampler, so the student learns
    the trajectory the teacher samples, not DDIM's, which at guidance 4 ends elsewhere).

    ``known``: ``(x_known [B, T, C], noise [B, T, C], mask [B, T])``: after every step the
    known frames are set to ``alpha x_known + sigma noise`` at the new time, as the
    sampler's inpainting does (with the noise the row started from, so a known frame
    follows the path of a perfect prediction).
    """
    m = times_bm.shape[1] - 1
    zeros = jnp.zeros((z_t.shape[0],), jnp.float32)

    def body(j, carry):
        z, x_prev = carry
        t, s = times_bm[:, j], times_bm[:, j + 1]
        v = denoise(z, t)
        if method == "ddim":
            z = samplers.ddim_step(z, v, t, s, zeros, jnp.zeros_like(z))
        else:
            x, _ = objective.v_to_x_eps(z, v, t)
            t_prev = times_bm[:, jnp.maximum(j - 1, 0)]
            z = samplers.dpmpp_2m_step(z, x, x_prev, t_prev, t, s, jnp.full(zeros.shape, j > 0))
            x_prev = x
        if known is not None:
            x_known, noise, mask = known
            a, sg = objective.alpha_sigma(s)
            bc = lambda v: v.reshape(v.shape + (1,) * (z.ndim - 1))
            z = jnp.where(mask[..., None] > 0, bc(a) * x_known + bc(sg) * noise, z)
        return z, x_prev

    return jax.lax.fori_loop(0, m, body, (z_t, jnp.zeros_like(z_t)))[0]


__all__ = ["ddim_target", "grids", "teacher_steps"]
