"""A small real codec for the corpus and precompute tests (tests only; production uses the JAX codec).

``PoolingCodec`` is a genuine deterministic transform, not a mock: 8 kHz mono audio is
cut into frames of ``hop`` samples and each frame becomes 4 numbers (mean, RMS, mean
absolute first difference, peak). ``decode`` repeats each frame's mean, so
``decode(encode(x))`` is the frame-averaged signal. It follows the Codec protocol of
``audiodiff_jax/codec/interface.py`` and also offers ``encode_batch``.

Two environment variables help the multi-process tests see what happened:
``AUDIODIFF_TEST_CODEC_LOG`` (a file: one line per encoded file, "pid crc32-of-audio")
and ``AUDIODIFF_TEST_CODEC_DELAY`` (seconds to sleep per file, so a kill lands mid-run).
"""

from __future__ import annotations

import os
import time
import zlib

import numpy as np

from audiodiff_jax.data.cards import CodecCard


class PoolingCodec:
    def __init__(self, sample_rate: int = 8000, hop: int = 160):
        self._card = CodecCard(
            name="test-pooling",
            sample_rate=sample_rate,
            audio_channels=1,
            hop=hop,
            latent_rate=sample_rate / hop,
            latent_channels=4,
        )

    @property
    def card(self) -> CodecCard:
        return self._card

    def encode(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if sample_rate != self._card.sample_rate or audio.shape[0] != 1:
            raise ValueError(
                f"PoolingCodec takes mono {self._card.sample_rate} Hz, got {audio.shape} at {sample_rate}"
            )
        log = os.environ.get("AUDIODIFF_TEST_CODEC_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {zlib.crc32(np.ascontiguousarray(audio).tobytes())}\n")
        delay = float(os.environ.get("AUDIODIFF_TEST_CODEC_DELAY", "0"))
        if delay:
            time.sleep(delay)
        hop = self._card.hop
        frames = max(1, -(-audio.shape[1] // hop))
        x = np.zeros(frames * hop, np.float32)
        x[: audio.shape[1]] = audio[0]
        x = x.reshape(frames, hop)
        diff = np.abs(np.diff(x, axis=1)).mean(axis=1)
        feats = [x.mean(axis=1), np.sqrt((x**2).mean(axis=1)), diff, np.abs(x).max(axis=1)]
        return np.stack(feats, axis=1).astype(np.float32)

    def encode_batch(self, audios, sample_rate):
        return [self.encode(a, sample_rate) for a in audios]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return np.repeat(latents[:, 0], self._card.hop)[None, :].astype(np.float32)


def make_codec() -> PoolingCodec:
    return PoolingCodec()
