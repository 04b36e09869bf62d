"""Windowed songs against exact conditional sampling: the seam ratio (audiodiff_jax/sampling/seams.py).

The latents of a song are a stationary Gaussian AR(1) process per channel
(``x[i] = RHO x[i-1] + sqrt(1 - RHO^2) e[i]``, covariance ``RHO^|i-j|``). Its exact
denoiser, given the noisy frames and the clean known frames, is a Gaussian posterior
mean in closed form; plugged into the CLI's own :class:`~audiodiff_jax.sampling.generation.Generator`
in place of the DiT, a model with masked context conditions each window on the overlap
it inherits. AR(1) is Markov, so that is exact conditional sampling of the whole song,
and its seams must be indistinguishable from any other frame (ratio <= 1.1). A model
without masked context (the re-noising rule alone) leaves visible seams.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.diffusion import objective
from audiodiff_jax.sampling import generation, seams
from audiodiff_jax.sampling.generation import SampleParams
from audiodiff_jax.training import dit_trainer
from tests.helpers import tiny_config, write_shards

RHO = 0.97
WINDOW, OVERLAP = 32, 8


def exact_apply(params, z_btc, t_b, cond):
    """E[v | z, known frames] for the AR(1) prior (the known frames exact, the others noisy)."""
    del params
    b, frames, _ = z_btc.shape
    i = jnp.arange(frames)
    cov = RHO ** jnp.abs(i[:, None] - i[None, :]).astype(jnp.float32)
    a, s = objective.alpha_sigma(t_b)
    known = jnp.zeros((b, frames)) if cond.known is None else cond.known_mask
    # Observation y = A x + n: the clean value where known (tiny noise), z where not.
    gain = jnp.where(known > 0, 1.0, a[:, None])  # [B, T]
    noise_var = jnp.where(known > 0, 1e-6, (s * s)[:, None])
    y = z_btc if cond.known is None else jnp.where(known[..., None] > 0, cond.known, z_btc)
    m = cov[None] * gain[:, :, None] * gain[:, None, :] + jax.vmap(jnp.diag)(noise_var)
    x_hat = jnp.einsum("ij,bj,bjc->bic", cov, gain, jnp.linalg.solve(m, y))
    return (a[:, None, None] * z_btc - x_hat) / s[:, None, None]


def ar1(rng, rows, frames, channels):
    x = np.zeros((rows, frames, channels))
    x[:, 0] = rng.standard_normal((rows, channels))
    for f in range(1, frames):
        x[:, f] = RHO * x[:, f - 1] + np.sqrt(1 - RHO**2) * rng.standard_normal((rows, channels))
    return x


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real (tiny, 2-step) run with masked context: the Generator reads its config and card."""
    root = tmp_path_factory.mktemp("seams")
    shards = write_shards(str(root / "shards"), num_clips=16)
    cfg = tiny_config(
        shards,
        **{
            "train.num_steps": 2,
            "checkpoint.every_steps": 2,
            "model.masked_context": True,
            "sample.max_seconds": 600.0,
        },
    )
    dit_trainer.train(cfg, str(root / "run"))
    return str(root / "run")


def _song(gen, context: bool, seconds: float, steps: int):
    gen.model = types.SimpleNamespace(apply=exact_apply)
    gen.cfg = config_lib.replace(gen.cfg, **{"model.masked_context": context})
    gen._fns.clear()
    rows = [SampleParams(prompt="x", seconds=seconds, seed=s, guidance=1.0, steps=steps) for s in range(8)]
    out = gen.generate_latents(rows)
    return np.stack([gen.card.normalize(r) for r in out.latents]), gen.frames_for(seconds)


def test_exact_conditional_windows_have_no_seams(checkpoint):
    gen = generation.open_generator(checkpoint, window_frames=WINDOW, overlap_frames=OVERLAP)[0]
    assert gen.cfg.model.masked_context
    lat, frames = _song(gen, True, 60.0, 30)
    cuts = generation.window_seams(frames, WINDOW, OVERLAP)
    assert len(cuts) > 40
    ratio = seams.latent_seam_ratio(lat, cuts)
    assert 0.9 <= ratio <= 1.1, ratio
    # The same sampler and noise without the context input (the re-noising rule of models
    # trained without it): seams stand out. The measure sees them.
    plain, _ = _song(gen, False, 60.0, 30)
    assert seams.latent_seam_ratio(plain, cuts) > 1.4
    # And the frames' statistics are the prior's: unit variance, lag-1 correlation RHO.
    assert abs(np.var(lat) - 1.0) < 0.1
    corr = np.mean(lat[:, 1:] * lat[:, :-1]) / np.mean(lat * lat)
    assert abs(corr - RHO) < 0.01


def test_seam_ratio_of_known_signals():
    rng = np.random.default_rng(0)
    x = ar1(rng, 32, 400, 8)
    cuts = list(range(40, 400, 40))
    assert abs(seams.latent_seam_ratio(x, cuts) - 1.0) < 0.15
    # Independent restarts at the cuts: the jump's variance is 2 instead of 2 (1 - RHO).
    y = x.copy()
    for c in cuts:
        y[:, c:] = ar1(rng, 32, 400 - c, 8)
    want = 2.0 / (2 * (1 - RHO))
    assert want / 1.5 < seams.latent_seam_ratio(y, cuts) < want * 1.5
    # Audio: steady noise has no seams; noise whose colour changes at every cut does.
    hop = 256
    steady = rng.standard_normal((1, 400 * hop))
    assert abs(seams.audio_seam_ratio(steady, hop, cuts) - 1.0) < 0.2
    coloured = steady.copy()
    for k, (a, b) in enumerate(zip([0, *cuts], [*cuts, 400], strict=True)):
        if k % 2:  # every other segment low-passed: a change of timbre at each cut
            seg = coloured[0, a * hop : b * hop]
            coloured[0, a * hop : b * hop] = np.convolve(seg, np.ones(8) / 8, mode="same")
    assert seams.audio_seam_ratio(coloured, hop, cuts) > 2.0
    with pytest.raises(ValueError, match="no seam"):
        seams.latent_seam_ratio(x, [1000])


def test_continuation_conditions_through_the_model(checkpoint):
    """Continuation and inpainting (an AudioEdit with known frames) reach a masked-context
    model as its context input; the known frames come back exactly."""
    gen = generation.open_generator(checkpoint, window_frames=WINDOW, overlap_frames=OVERLAP)[0]
    seen = []

    def spy(params, z, t, cond):
        seen.append(cond.known is not None)
        return exact_apply(params, z, t, cond)

    gen.model = types.SimpleNamespace(apply=spy)
    known = ar1(np.random.default_rng(1), 1, 12, gen.channels)[0].astype(np.float32)
    mask = np.zeros(24, bool)
    mask[:12] = True  # continuation of 12 frames; inpainting is the same input with a gap
    edit = generation.AudioEdit(np.pad(known, ((0, 12), (0, 0))), known=mask)
    seconds = 24 / gen.latent_rate
    out = gen.generate_latents([SampleParams(prompt="x", seconds=seconds, steps=4)], edit=edit)
    assert seen and all(seen)
    np.testing.assert_allclose(gen.card.normalize(out.latents[0])[:12], known, atol=1e-5)
