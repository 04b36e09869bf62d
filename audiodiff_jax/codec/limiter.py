"""A look-ahead peak limiter for decoded audio: loud output is turned down smoothly, never clipped.

The codec's decoder is not bounded: a loud song can decode with peaks above full scale
(1.0), which a WAV writer would hard-clip. :func:`limit` multiplies the audio by a
smooth gain that is exactly 1 wherever the audio stays under ``ceiling`` (so quiet
audio comes back bit for bit) and dips just enough around each louder peak:

1. the gain each sample needs, ``min(1, ceiling / peak)`` (peak over channels);
2. a running minimum over ``2 L + 1`` samples (``L`` = ``lookahead_s``), so the gain is
   already down ``L`` samples before a peak and stays down ``L`` after it;
3. a moving average over ``L + 1`` samples, which smooths the corners. Every value it
   averages comes from a window that contains the centre sample, so the smoothed gain
   never exceeds what that sample needs: the output never exceeds ``ceiling``.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import minimum_filter1d, uniform_filter1d

CEILING = 0.98  # about -0.2 dBFS


def limit(audio: np.ndarray, sample_rate: int, *, ceiling: float = CEILING, lookahead_s: float = 0.005):
    """``audio [channels, samples]`` -> ``(limited audio, gain reduction in dB at the deepest point)``."""
    x = np.asarray(audio, np.float32)
    peak = np.max(np.abs(x), axis=0) if x.ndim == 2 else np.abs(x)
    if peak.size == 0 or float(peak.max()) <= ceiling:
        return x, 0.0
    need = np.minimum(1.0, ceiling / np.maximum(peak, 1e-12)).astype(np.float64)
    n = max(1, int(round(lookahead_s * sample_rate)))
    gain = minimum_filter1d(need, size=2 * n + 1, mode="nearest")
    gain = uniform_filter1d(gain, size=n + 1, mode="nearest")
    gain = np.minimum(gain, need)  # rounding of the average: never above what a sample needs
    return (x * gain.astype(np.float32)).astype(np.float32), float(-20 * np.log10(gain.min()))
