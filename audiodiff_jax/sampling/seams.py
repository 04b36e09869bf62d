"""How audible the joins of a windowed song are: the seam ratio.

A song longer than the model's window is generated window by window, each window
sharing ``overlap`` frames with what came before (``generation.Generator``). Where a
window's new frames start (``generation.window_seams``), a sampler that does not
condition properly on the known frames leaves a jump. The seam ratio is the mean squared
frame-to-frame jump at the seams over the mean elsewhere::

    ratio = mean_{s in seams} |x[s] - x[s-1]|^2  /  mean_{i not a seam} |x[i] - x[i-1]|^2

1.0 is a song whose seams cannot be told from any other frame; exact conditional
sampling of a stationary prior gives 1.0 up to sampling noise. :func:`latent_seam_ratio`
measures latents (one song ``[F, C]`` or a batch ``[B, F, C]``, normalized per channel
as the model sees them); :func:`audio_seam_ratio` measures the decoded audio by the
same rule on its log-magnitude spectrogram, one STFT frame per latent frame (spectral
flux at the seams over the flux elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.signal import ShortTimeFFT
from scipy.signal.windows import hann


def _ratio(jumps: np.ndarray, seams: Sequence[int]) -> float:
    """``jumps [..., F - 1]``: jump ``i`` is between frames ``i`` and ``i + 1``."""
    n = jumps.shape[-1]
    at = np.zeros(n, bool)
    idx = np.asarray([s - 1 for s in seams if 1 <= s <= n], np.int64)
    if idx.size == 0:
        raise ValueError(f"no seam inside the {n + 1} frames: {list(seams)[:5]}...")
    at[idx] = True
    if at.all():
        raise ValueError("every frame is a seam: nothing to compare with")
    return float(np.nanmean(jumps[..., at]) / np.nanmean(jumps[..., ~at]))


def latent_seam_ratio(latents: np.ndarray, seams: Sequence[int]) -> float:
    """Seam ratio of latents ``[F, C]`` or ``[B, F, C]`` at the frames ``seams``."""
    x = np.asarray(latents, np.float64)
    if x.ndim == 2:
        x = x[None]
    jumps = np.sum(np.square(np.diff(x, axis=1)), axis=-1)  # [B, F - 1]
    return _ratio(jumps, seams)


def audio_seam_ratio(audio: np.ndarray, hop: int, seams: Sequence[int]) -> float:
    """Seam ratio of decoded audio ``[channels, samples]`` (mixed to mono), on its log-magnitude
    STFT with one frame per latent frame (window ``2 * hop`` centred on the latent frame's
    centre): the spectral change from latent frame ``s - 1`` to ``s`` at the seams over the
    change elsewhere (the first and last frames, next to the zero padding, left out)."""
    mono = np.mean(np.atleast_2d(np.asarray(audio, np.float64)), axis=0)
    frames = len(mono) // hop
    stft = ShortTimeFFT(hann(2 * hop, sym=False), hop=hop, fs=1.0)
    # Dropping hop / 2 samples puts STFT frame p0 + f on the centre of latent frame f.
    mag = np.log(np.abs(stft.stft(mono[hop // 2 :])) + 1e-5)
    p0 = -stft.p_min
    f = np.arange(1, frames)
    jumps = np.sum(np.square(mag[:, p0 + f] - mag[:, p0 + f - 1]), axis=0)  # [frames - 1]
    jumps[[0, -1]] = np.nan
    return _ratio(jumps, seams)
