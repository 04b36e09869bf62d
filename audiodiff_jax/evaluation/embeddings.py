"""Set-level distance: the Fréchet distance between two sets of songs in an embedding.

Each song becomes a set of window embeddings (one per :data:`WINDOW_SECONDS` of
audio); the windows of all songs of a set give a Gaussian (mean, covariance), and
two Gaussians are compared with the Fréchet distance (FID, FAD)::

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

with the matrix square root from ``scipy.linalg.sqrtm``.

Embeddings (``--embedding``), all offline:

- ``codec``: the latents of the project's shipped codec (``audiodiff_jax/codec``),
  mean and std per window: a "Fréchet codec distance".
- ``spectral``: librosa MFCC, chroma and spectral contrast, mean and std per window.
- ``mel``: librosa log-mel (64 bands), mean and std per window.
- ``basic-pitch``: basic-pitch's note, onset and pitch-contour posteriorgrams (its
  ONNX model), mean per window.
- ``onnx:PATH`` (optionally ``onnx:PATH@RATE``): your own ONNX model (a CLAP or
  OpenL3 audio tower exported to ONNX, say), read from a local path. Its first input
  takes mono audio at RATE Hz (default 48000) as ``[batch, samples]``,
  ``[batch, 1, samples]`` or ``[batch, samples, 1]`` (a fixed sample count in the
  model sets the window); its first output's last axis is the embedding (other axes
  are averaged).
- ``npz:PATH``: a linear projection of the ``mel`` window features: an ``.npz`` with
  ``matrix`` ``[128, dim]`` and optionally ``bias`` ``[dim]``.

Which is the default was chosen by measurement (BENCHMARKS.md "Evaluation"): the
one that orders real renders, the same scores with other instruments, and drones or
noise the most clearly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import numpy as np
import scipy.linalg

from audiodiff_jax.core.errors import UserError
from audiodiff_jax.evaluation import notes as notes_lib
from audiodiff_jax.evaluation import song

WINDOW_SECONDS = 1.0
DEFAULT_EMBEDDING = "spectral"
BUILTIN = ("codec", "spectral", "mel", "basic-pitch")


class EmbeddingError(UserError):
    """An embedding that cannot be loaded or does not fit (names the path or field)."""


# ---------------------------------------------------------------------------
# Fréchet distance


@dataclasses.dataclass(frozen=True)
class Gaussian:
    mean: np.ndarray  # [dim]
    cov: np.ndarray  # [dim, dim]
    count: int  # windows it was estimated from

    @classmethod
    def of(cls, x: np.ndarray) -> Gaussian:
        """Mean and (unbiased) covariance of the rows of ``x [n, dim]``."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 embeddings of shape [n, dim], got {x.shape}")
        return cls(x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False)), x.shape[0])


def frechet_distance(a: Gaussian, b: Gaussian, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between two Gaussians (the FID/FAD number).

    When ``S1 S2`` is singular (fewer windows than dimensions) its square root may
    come back with non-finite entries; then ``eps`` is added to both diagonals, as
    the FID reference code does.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"embedding sizes differ: {a.mean.shape} vs {b.mean.shape}")
    diff = a.mean - b.mean
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(a.cov.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


# ---------------------------------------------------------------------------
# Embedders: audio [channels, samples] at a rate -> [windows, dim]


def _blocks(frames_td: np.ndarray, per_window: int, stats: tuple[str, ...] = ("mean", "std")) -> np.ndarray:
    """Frame features ``[frames, dim]`` -> ``[windows, dim * len(stats)]`` per window of
    ``per_window`` frames (a last partial window of at least half a window counts)."""
    n = frames_td.shape[0] // per_window
    if frames_td.shape[0] - n * per_window >= per_window // 2:
        n += 1
    out = []
    for i in range(n):
        block = frames_td[i * per_window : (i + 1) * per_window]
        parts = [block.mean(axis=0) if s == "mean" else block.std(axis=0) for s in stats]
        out.append(np.concatenate(parts))
    return np.asarray(out, np.float32).reshape(len(out), -1)


def _frames_per_window() -> int:
    return int(round(WINDOW_SECONDS * song.ANALYSIS_RATE / song.HOP))


def spectral_embed(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """MFCC (20), chroma (12) and spectral contrast (7), mean and std per window: 78 dims."""
    librosa = song.librosa
    y = song.analysis_mono(audio, sample_rate)
    sr, hop = song.ANALYSIS_RATE, song.HOP
    feats = np.concatenate(
        [
            librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20, hop_length=hop),
            librosa.feature.chroma_stft(y=y, sr=sr, hop_length=hop),
            librosa.feature.spectral_contrast(y=y, sr=sr, hop_length=hop),
        ]
    )
    return _blocks(feats.T, _frames_per_window())


def mel_embed(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-mel power (64 bands, dB), mean and std per window: 128 dims."""
    librosa = song.librosa
    y = song.analysis_mono(audio, sample_rate)
    mel = librosa.feature.melspectrogram(y=y, sr=song.ANALYSIS_RATE, hop_length=song.HOP, n_mels=64)
    db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    return _blocks(db.T, _frames_per_window())


@functools.cache
def _codec():
    # The shipped codec pulls in JAX; only this embedding needs it.
    from audiodiff_jax.codec import load_codec

    return load_codec("default")


def codec_embed(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The shipped codec's latents (32 channels), mean and std per window: 64 dims."""
    codec = _codec()
    x = np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x
    latents = codec.encode(x.mean(axis=0, keepdims=True), sample_rate)
    return _blocks(latents, int(round(WINDOW_SECONDS * codec.card.latent_rate)))


def basic_pitch_embed(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """basic-pitch's posteriorgrams (note 88, onset 88, contour 264), mean per window: 440 dims."""
    tr = notes_lib.load_transcriber()
    if tr is None:
        raise EmbeddingError("embedding basic-pitch needs basic-pitch and onnxruntime (the eval extra)")
    grams = tr.posteriorgrams(song.analysis_mono(audio, sample_rate), song.ANALYSIS_RATE)
    frames = np.concatenate([grams["note"], grams["onset"], grams["contour"]], axis=1)
    return _blocks(frames, int(round(WINDOW_SECONDS * 86.13)), stats=("mean",))  # 86.13 frames/s


class OnnxEmbedder:
    """A user's ONNX audio model (see the module docstring for the shapes it takes)."""

    def __init__(self, path: str, rate: int):
        if not os.path.isfile(path):
            raise EmbeddingError(f"embedding onnx:{path}: no such file")
        try:
            import onnxruntime  # optional (the eval extra)
        except ImportError as e:
            raise EmbeddingError("onnx embeddings need onnxruntime (the eval extra)") from e
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise EmbeddingError(f"embedding onnx:{path}: cannot load ({type(e).__name__}: {e})") from e
        inp = self.session.get_inputs()[0]
        self.input_name, shape = inp.name, list(inp.shape)
        if len(shape) not in (2, 3):
            raise EmbeddingError(
                f"embedding onnx:{path}: input {inp.name} has shape {shape}; want 2 or 3 axes"
            )
        fixed = [d for d in shape[1:] if isinstance(d, int) and d > 1]
        self.window = fixed[0] if fixed else int(round(WINDOW_SECONDS * rate))
        self.layout = "bs" if len(shape) == 2 else ("b1s" if shape[1] == 1 else "bs1")
        self.rate, self.path = rate, path

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        x = np.asarray(audio, np.float32)
        x = x.mean(axis=0) if x.ndim == 2 else x
        if sample_rate != self.rate:
            x = song.librosa.resample(x, orig_sr=sample_rate, target_sr=self.rate)
        n = max(1, -(-x.shape[0] // self.window))
        x = np.pad(x, (0, n * self.window - x.shape[0])).reshape(n, self.window)
        x = {"bs": x, "b1s": x[:, None, :], "bs1": x[:, :, None]}[self.layout]
        outs = []
        for i in range(0, n, 8):
            out = np.asarray(self.session.run(None, {self.input_name: x[i : i + 8]})[0], np.float32)
            outs.append(out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1))
        return np.concatenate(outs)


class ProjectionEmbedder:
    """A linear projection (``.npz``: ``matrix`` [128, dim], optional ``bias``) of :func:`mel_embed`."""

    def __init__(self, path: str):
        try:
            with np.load(path) as z:
                self.matrix = np.asarray(z["matrix"], np.float32)
                self.bias = np.asarray(z["bias"], np.float32) if "bias" in z else 0.0
        except FileNotFoundError as e:
            raise EmbeddingError(f"embedding npz:{path}: no such file") from e
        except KeyError as e:
            raise EmbeddingError(f"embedding npz:{path}: no array 'matrix' in it") from e
        except (OSError, ValueError) as e:
            raise EmbeddingError(f"embedding npz:{path}: not a readable .npz ({e})") from e
        if self.matrix.ndim != 2 or self.matrix.shape[0] != 128:
            raise EmbeddingError(
                f"embedding npz:{path}: matrix has shape {self.matrix.shape}; want [128, dim] (mel features)"
            )

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        return mel_embed(audio, sample_rate) @ self.matrix + self.bias


_BUILTIN_FNS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "codec": codec_embed,
    "spectral": spectral_embed,
    "mel": mel_embed,
    "basic-pitch": basic_pitch_embed,
}


def get_embedder(spec: str) -> Callable[[np.ndarray, int], np.ndarray]:
    """The embedder named ``spec`` (see the module docstring); raises EmbeddingError."""
    if spec in _BUILTIN_FNS:
        return _BUILTIN_FNS[spec]
    kind, sep, rest = spec.partition(":")
    if sep and kind == "onnx" and rest:
        path, at, rate = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if at and not rate.isdigit():
            raise EmbeddingError(f"embedding {spec!r}: the rate after @ must be a whole number of Hz")
        return OnnxEmbedder(path, int(rate) if at else 48000)
    if sep and kind == "npz" and rest:
        return ProjectionEmbedder(rest)
    raise EmbeddingError(f"embedding {spec!r}: use one of {', '.join(BUILTIN)}, onnx:PATH[@RATE] or npz:PATH")
