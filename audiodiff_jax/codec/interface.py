"""The codec interface (docs/DESIGN.md, contract 3): what every codec offers the rest.

``encode(audio) -> latents`` and ``decode(latents) -> audio`` on numpy arrays, plus the
codec card (``audiodiff_jax.data.cards.CodecCard``: name, sample_rate, audio_channels,
hop, latent_rate, latent_channels). Latents here are the codec's raw latents; the
per-channel normalization used for training lives in the dataset card and is
applied by the loader (and undone by the sampler before decoding). Long audio goes
through in overlapping chunks with no audible seam.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Codec(Protocol):
    @property
    def card(self):
        """The codec card (``audiodiff_jax.data.cards.CodecCard``)."""

    def encode(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """``audio [audio_channels, samples]`` float32 in [-1, 1] -> ``latents [frames, latent_channels]``.

        Audio at another sample rate is resampled; other channel counts are mixed
        down / duplicated (with a log line). Any length works (chunked).
        """

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """``latents [frames, latent_channels]`` -> ``audio [audio_channels, frames * hop]`` float32."""
