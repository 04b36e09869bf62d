"""Codec losses and quality metrics as small pure functions over arrays.

Training (jax): multi-resolution STFT loss (spectral convergence + log-magnitude L1,
as Parallel WaveGAN / DAC / Stable Audio), waveform L1, and for the optional
discriminator the hinge losses and feature matching. Evaluation (numpy, used by the
benchmark and the tests): SI-SDR and the same STFT distance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from audiodiff_jax.codec.model import complex_stft

_EPS = 1e-5


def _flat_bt(x_btc: jax.Array) -> jax.Array:
    b, t, c = x_btc.shape
    return jnp.transpose(x_btc, (0, 2, 1)).reshape(b * c, t)


def stft_loss(pred_btc: jax.Array, target_btc: jax.Array, n_fft: int) -> jax.Array:
    """Spectral convergence + mean |log magnitude difference| at one resolution."""
    p = jnp.abs(complex_stft(_flat_bt(pred_btc), n_fft))
    t = jnp.abs(complex_stft(_flat_bt(target_btc), n_fft))
    sc = jnp.sqrt(jnp.sum(jnp.square(t - p))) / (jnp.sqrt(jnp.sum(jnp.square(t))) + _EPS)
    log_mag = jnp.mean(jnp.abs(jnp.log(t + _EPS) - jnp.log(p + _EPS)))
    return sc + log_mag


def multi_resolution_stft_loss(pred_btc, target_btc, fft_sizes) -> jax.Array:
    """Mean of :func:`stft_loss` over ``fft_sizes`` (hop = size / 4 each)."""
    return sum(stft_loss(pred_btc, target_btc, n) for n in fft_sizes) / len(fft_sizes)


def waveform_l1(pred_btc, target_btc) -> jax.Array:
    return jnp.mean(jnp.abs(pred_btc - target_btc))


def hinge_discriminator_loss(real_logits, fake_logits) -> jax.Array:
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_generator_loss(fake_logits) -> jax.Array:
    return jnp.mean(jax.nn.relu(1.0 - fake_logits))


def feature_matching_loss(real_feats, fake_feats) -> jax.Array:
    """Mean over layers of L1(real, fake) / mean |real| (scale-free per layer, as EnCodec)."""
    terms = [
        jnp.mean(jnp.abs(r - f)) / (jnp.mean(jnp.abs(r)) + _EPS)
        for r, f in zip(real_feats, fake_feats, strict=True)
    ]
    return sum(terms) / len(terms)


# ---------------------------------------------------------------------------
# Evaluation metrics (numpy)


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019), all channels pooled."""
    ref = np.asarray(reference, np.float64).ravel()
    est = np.asarray(estimate, np.float64).ravel()
    ref = ref - ref.mean()
    est = est - est.mean()
    alpha = np.dot(est, ref) / (np.dot(ref, ref) + 1e-12)
    target = alpha * ref
    noise = est - target
    return float(10.0 * np.log10((np.dot(target, target) + 1e-12) / (np.dot(noise, noise) + 1e-12)))


def stft_distance(reference_cn: np.ndarray, estimate_cn: np.ndarray, fft_sizes=(2048, 1024, 512, 256, 128)):
    """The training loss's multi-resolution STFT distance, on ``[channels, samples]`` numpy audio."""
    r = jnp.asarray(reference_cn.T[None], jnp.float32)
    e = jnp.asarray(estimate_cn.T[None], jnp.float32)
    return float(multi_resolution_stft_loss(e, r, tuple(n for n in fft_sizes if n <= r.shape[1])))
