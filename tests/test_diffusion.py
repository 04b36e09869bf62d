"""The v-objective and the cosine schedule, checked against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiodiff_jax.diffusion import objective


def test_alpha_sigma_closed_form():
    t = jnp.linspace(0.0, 1.0, 101)
    alpha, sigma = objective.alpha_sigma(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(alpha, np.cos(np.asarray(t) * math.pi / 2), atol=1e-6)
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0
    assert abs(float(alpha[-1])) < 1e-6 and float(sigma[-1]) == 1.0


def test_v_round_trip_recovers_data_and_noise():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (4, 16, 3))
    eps = jax.random.normal(k2, (4, 16, 3))
    t = jax.random.uniform(k3, (4,))
    z, v = objective.add_noise(x, eps, t)
    x_hat, eps_hat = objective.v_to_x_eps(z, v, t)
    np.testing.assert_allclose(x_hat, x, atol=1e-5)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-5)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_schedule_shift_moves_log_snr_by_2_log_shift(shift):
    t = jnp.linspace(0.05, 0.95, 19)
    shifted = objective.shift_time(t, shift)
    np.testing.assert_allclose(
        objective.log_snr(shifted), objective.log_snr(t) - 2 * math.log(shift), rtol=1e-4, atol=1e-4
    )
    ends = objective.shift_time(jnp.array([0.0, 1.0]), shift)
    np.testing.assert_allclose(ends, [0.0, 1.0], atol=1e-7)
    assert bool(jnp.all(jnp.diff(shifted) > 0))  # still monotone


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0, 3.0, 4.5, 100.0])
def test_shift_keeps_the_ends_exactly_in_float32(shift):
    """0 -> 0.0 and 1 -> 1.0 exactly (float32 pi/2 > pi/2, so atan2 alone gives 0.99999994),
    and the time just below 1 stays below 1 (the map stays monotone at the end)."""
    t = jnp.array([0.0, np.nextafter(np.float32(1), np.float32(0)), 1.0], jnp.float32)
    out = np.asarray(objective.shift_time(t, shift))
    assert out.dtype == np.float32
    assert out[0] == 0.0 and out[2] == 1.0, out.tolist()
    assert out[1] <= out[2]
    assert float(jax.jit(objective.shift_time, static_argnums=1)(jnp.float32(1.0), shift)) == 1.0


def test_logit_normal_sampling_moments():
    n = 200_000
    t = objective.sample_time(jax.random.key(1), n, method="logit_normal", mean=0.3, std=0.8)
    logit = np.log(np.asarray(t)) - np.log1p(-np.asarray(t))
    # Standard errors: 0.8/sqrt(n) ~ 0.002 for the mean, ~0.0013 for the std.
    assert abs(logit.mean() - 0.3) < 0.01
    assert abs(logit.std() - 0.8) < 0.01


def test_uniform_sampling_range_and_mean():
    t = np.asarray(objective.sample_time(jax.random.key(2), 100_000))
    assert t.min() >= 0.0 and t.max() < 1.0
    assert abs(t.mean() - 0.5) < 0.005


def test_masked_mse_ignores_padding():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 8, 3)).astype(np.float32)
    target = rng.normal(size=(2, 8, 3)).astype(np.float32)
    mask = np.ones((2, 8), np.float32)
    mask[1, 5:] = 0
    got = float(objective.masked_mse(pred, target, mask))
    valid = np.concatenate([(pred[0] - target[0]) ** 2, (pred[1, :5] - target[1, :5]) ** 2])
    np.testing.assert_allclose(got, valid.mean(), rtol=1e-6)
    pred2 = pred.copy()
    pred2[1, 5:] = 1e6  # garbage in padding changes nothing
    assert float(objective.masked_mse(pred2, target, mask)) == got


def test_bayes_optimal_v_loss_matches_closed_form():
    """For x ~ N(0, s^2) the best v prediction is linear in z; its MSE has a closed form."""
    s = 0.7
    n = 400_000
    t = 0.4
    alpha, sigma = math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)
    k1, k2 = jax.random.split(jax.random.key(3))
    x = s * jax.random.normal(k1, (n, 1, 1))
    eps = jax.random.normal(k2, (n, 1, 1))
    z, v = objective.add_noise(x, eps, jnp.full((n,), t))
    var_z = alpha**2 * s**2 + sigma**2
    cov_vz = alpha * sigma * (1 - s**2)
    var_v = alpha**2 + sigma**2 * s**2
    v_best = (cov_vz / var_z) * z
    loss = float(objective.masked_mse(v_best, v, jnp.ones((n, 1))))
    expected = var_v - cov_vz**2 / var_z
    assert abs(loss - expected) / expected < 0.01
