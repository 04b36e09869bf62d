"""Sampler math against closed forms: an exact denoiser for Gaussian data.

For data ``x ~ N(MU, S^2)`` (every element independent) the posterior mean is known in
closed form, so the exact v-prediction is too. The probability-flow ODE then maps the
starting noise ``n`` to exactly ``MU + S n``: a deterministic sampler's error against
that transport has no Monte Carlo part and must shrink as steps grow.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.diffusion import objective, samplers

MU, S = 0.7, 0.4
B, T, C = 2, 256, 4


def exact_v(z, t):
    """E[v | z_t] for x ~ N(MU, S^2), z = alpha x + sigma eps."""
    a, s = objective.alpha_sigma(t)
    a, s = a[:, None, None], s[:, None, None]
    var = a * a * S * S + s * s
    x = MU + a * S * S / var * (z - a * MU)
    eps = s * (z - a * MU) / var
    return a * eps - s * x


def row_keys(seeds):
    return jax.vmap(jax.random.key)(jnp.asarray(seeds))


def run(
    method, steps, *, schedule="uniform", shift=1.0, eta=0.0, seeds=(0, 1), denoise=exact_v, inpaint=None
):
    keys = row_keys(seeds)
    grid = samplers.time_grid(steps, schedule=schedule, shift=shift)
    ts = jnp.asarray(np.tile(grid, (len(seeds), 1)))
    eta_b = jnp.full((len(seeds),), eta)
    f = jax.jit(
        lambda z0, ts, eta_b: samplers.sample(
            denoise, z0, ts, keys, method=method, eta_b=eta_b, inpaint=inpaint
        )
    )
    return f(jnp.zeros((len(seeds), T, C)), ts, eta_b), keys


def transport(keys):
    return MU + S * samplers.row_noise(keys, samplers.STREAM_INIT, 0, (T, C), T)


# Max per-element error vs the exact transport at 32 steps, and the factor by which it
# must at least shrink from 8 to 32 steps (first order: ~4x, second order: ~16x).
ORDER = {"ddim": (0.1, 3.0), "euler": (0.06, 3.0), "heun": (0.01, 8.0), "dpmpp_2m": (0.03, 3.0)}


@pytest.mark.parametrize("method", samplers.SAMPLERS)
def test_deterministic_samplers_converge_to_the_exact_transport(method):
    tol32, shrink = ORDER[method]
    errs = {}
    for steps in (8, 32):
        out, keys = run(method, steps)
        exact = transport(keys)
        errs[steps] = float(jnp.max(jnp.abs(out - exact)))
        # Mean and std of the samples match the data's, within the sampler error plus
        # the Monte Carlo error of B*T*C draws.
        mc = 4 * S / math.sqrt(out.size)
        assert abs(float(out.mean()) - MU) < errs[steps] + mc, (steps, float(out.mean()))
        assert abs(float(out.std()) - S) < errs[steps] + mc, (steps, float(out.std()))
    assert errs[32] < tol32, errs
    assert errs[32] * shrink < errs[8], errs


@pytest.mark.parametrize(
    ("method", "schedule"), [("dpmpp_2m", "logsnr"), ("heun", "karras"), ("ddim", "uniform")]
)
def test_shifted_schedules_converge(method, schedule):
    errs = []
    for steps in (8, 64):
        out, keys = run(method, steps, schedule=schedule, shift=3.0)
        errs.append(float(jnp.max(jnp.abs(out - transport(keys)))))
    assert errs[1] < 0.15 and errs[1] < errs[0] / 2, errs


def test_ancestral_ddim_matches_mean_and_variance():
    # eta = 1 is stochastic: only the distribution can match, and ancestral sampling
    # converges slowly (first order, about twice the error of eta = 0).
    errs = {}
    for steps in (16, 128):
        out, _ = run("ddim", steps, eta=1.0, seeds=tuple(range(8)))
        errs[steps] = (abs(float(out.mean()) - MU), abs(float(out.std()) - S))
    mc = 4 * S / math.sqrt(out.size)
    assert errs[128][0] < 0.01 + mc and errs[128][1] < 0.02 + mc, errs
    assert errs[128][1] < errs[16][1] / 3, errs
    det, _ = run("ddim", 128, eta=0.0, seeds=tuple(range(8)))
    assert float(jnp.max(jnp.abs(out - det))) > 0.05  # eta really adds noise


def test_time_grid_shapes_and_ends():
    for schedule in samplers.SCHEDULES:
        for shift in (1.0, 3.0):
            g = samplers.time_grid(10, schedule=schedule, shift=shift)
            assert g.shape == (11,) and g[0] == pytest.approx(1.0) and g[-1] == 0.0
            assert np.all(np.diff(g) < 0), (schedule, g)
        g = samplers.time_grid(5, schedule=schedule, shift=2.0, t_start=0.5)
        assert g[0] == pytest.approx(float(objective.shift_time(jnp.float32(0.5), 2.0)), abs=1e-6)
    with pytest.raises(ValueError, match="schedule='cubic'"):
        samplers.time_grid(4, schedule="cubic")


@pytest.mark.parametrize("schedule", samplers.SCHEDULES)
@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 4.5])
def test_time_grid_starts_at_exactly_pure_noise(schedule, shift):
    """The first time is exactly 1 (pure noise) for any shift, not float32's 0.99999994,
    and the last exactly 0."""
    for steps in (1, 8, 50):
        g = samplers.time_grid(steps, schedule=schedule, shift=shift)
        assert g.dtype == np.float32
        assert g[0] == 1.0 and g[-1] == 0.0, (steps, g[0], g[-1])
        assert np.all(np.diff(g) < 0), (steps, g)


def test_cfg_combine_math():
    k1, k2 = jax.random.split(jax.random.key(0))
    vc = 2.0 * jax.random.normal(k1, (3, 16, 4))
    vu = jax.random.normal(k2, (3, 16, 4)) + 0.5
    one, zero = jnp.ones(3), jnp.zeros(3)
    np.testing.assert_allclose(samplers.cfg_combine(vc, vu, one, zero), vc, atol=1e-6)
    np.testing.assert_array_equal(samplers.cfg_combine(vc, vu, zero, zero), vu)
    w = jnp.asarray([0.0, 3.0, 7.0])
    np.testing.assert_allclose(
        samplers.cfg_combine(vc, vu, w, zero), vu + w[:, None, None] * (vc - vu), rtol=1e-6, atol=1e-6
    )
    # Full rescale: each row's guided v gets the std of its conditional v.
    v = samplers.cfg_combine(vc, vu, w, one)
    np.testing.assert_allclose(jnp.std(v, axis=(1, 2)), jnp.std(vc, axis=(1, 2)), rtol=1e-5)
    # Half rescale: the average of the rescaled and the plain guided v.
    plain = vu + w[:, None, None] * (vc - vu)
    half = samplers.cfg_combine(vc, vu, w, jnp.full(3, 0.5))
    np.testing.assert_allclose(half, 0.5 * v + 0.5 * plain, rtol=1e-5, atol=1e-5)
    # Padding frames (mask 0) do not enter the std, whatever they hold.
    mask = jnp.arange(16)[None, :] < 10
    garbage = vc.at[:, 10:].set(1e3)
    a = samplers.cfg_combine(garbage, vu, w, one, jnp.broadcast_to(mask, (3, 16)))
    b = samplers.cfg_combine(vc[:, :10], vu[:, :10], w, one)
    np.testing.assert_allclose(a[:, :10], b, rtol=1e-5, atol=1e-5)


def test_guided_denoiser_uses_the_negative_prompt():
    # A fake model whose output is its first token id: shows which caption each branch got.
    def apply(params, x, t, cond):
        return jnp.broadcast_to(cond.tokens[:, :1, None].astype(jnp.float32), x.shape)

    z = jnp.zeros((2, 8, 3))
    kw = dict(scale_b=jnp.asarray([2.0, 4.0]), rescale_b=jnp.zeros(2))
    cond = Conditioning(jnp.asarray([[10], [20]]), jnp.zeros(2), jnp.ones(2), jnp.full(2, 8))
    neg = jnp.asarray([[4], [5]])
    v = samplers.guided_denoiser(apply, None, cond, uncond_tokens=neg, **kw)(z, jnp.ones(2))
    # v_u + w (v_c - v_u) = 4 + 2*6 = 16 and 5 + 4*15 = 65
    np.testing.assert_allclose(v[:, 0, 0], [16.0, 65.0])
    no_cfg = samplers.guided_denoiser(apply, None, cond, uncond_tokens=None, **kw)
    np.testing.assert_allclose(no_cfg(z, jnp.ones(2))[:, 0, 0], [10.0, 20.0])


def test_inpainting_keeps_the_known_frames_and_rows_are_independent():
    known = jnp.broadcast_to(jnp.sin(jnp.arange(T))[None, :, None], (3, T, C)) * 0.3
    mask = jnp.broadcast_to((jnp.arange(T) < 64)[None, :], (3, T)).astype(jnp.float32)
    inpaint = samplers.Inpaint(known, mask)
    out, _ = run("dpmpp_2m", 6, seeds=(5, 6, 7), inpaint=inpaint)
    np.testing.assert_array_equal(out[:, :64], known[:, :64])  # exact at t = 0
    assert float(jnp.max(jnp.abs(out[:, 64:] - known[:, 64:]))) > 0.1
    # The row with seed 5 is the same whatever shares its batch.
    other, _ = run("dpmpp_2m", 6, seeds=(9, 5, 8), inpaint=inpaint)
    np.testing.assert_array_equal(out[0], other[1])
    again, _ = run("dpmpp_2m", 6, seeds=(5, 6, 7), inpaint=inpaint)
    np.testing.assert_array_equal(out, again)
