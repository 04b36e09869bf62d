"""Checking and conforming audio before it reaches the codec: every bad input has one behaviour.

=========================  =================================================================
input                      behaviour
=========================  =================================================================
not a numpy array / ndim   ``CodecInputError`` (wants ``[channels, samples]`` or ``[samples]``)
``[samples, channels]``    ``CodecInputError`` naming the shape and asking for a transpose
integer PCM (int16/int32)  scaled to [-1, 1] by the dtype's full scale
empty (0 samples)          ``CodecInputError("... is empty")``
NaN or Inf samples         ``CodecInputError`` with the count and the first position;
                           ``nonfinite="zero"`` replaces them by 0 (with a warning)
float peak > 1 (clipping)  hard-clipped to [-1, 1] with a warning saying how many samples
float peak > 64            ``CodecInputError``: looks like unscaled integer PCM
silence                    encoded as is (a log line); decodes to near silence
other sample rate          resampled (soxr, VHQ) with a log line; ``resample=False``: error
other channel count        to mono: the mean of the channels; from mono: duplicated;
                           anything else: ``CodecInputError``
=========================  =================================================================
"""

from __future__ import annotations

import numpy as np
from absl import logging

from audiodiff_jax.core.errors import UserError

# Audio files read through soundfile (libsndfile >= 1.1 reads MP3 and Opus); every
# folder reader of the project (codec training, latent statistics, precompute's
# audio folders, evaluation) takes these.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aif", ".aiff")

UNSCALED_PEAK = 64.0  # a float signal this loud is integer PCM that was never divided


class CodecInputError(UserError, ValueError):
    """Audio the codec cannot take; the message says what was wrong and what would work."""


def resample(audio_cn: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """``[channels, samples]`` from one rate to another (soxr, very high quality)."""
    import soxr

    out = soxr.resample(np.ascontiguousarray(audio_cn.T), from_rate, to_rate, quality="VHQ")
    return np.ascontiguousarray(np.asarray(out, np.float32).reshape(-1, audio_cn.shape[0]).T)


def prepare_audio(
    audio,
    sr: int,
    *,
    sample_rate: int,
    channels: int,
    resample_input: bool = True,
    nonfinite: str = "error",
    where: str = "audio",
) -> np.ndarray:
    """Checks ``audio`` and conforms it to the codec's rate and channels.

    Args:
      audio: ``[channels, samples]`` (or ``[samples]``) float or integer PCM.
      sr: its sample rate.
      sample_rate, channels: what the codec takes.
      resample_input: resample another rate (else raise).
      nonfinite: ``"error"`` or ``"zero"`` (replace NaN/Inf by 0).
      where: named in messages (a file path, "audio").

    Returns:
      float32 ``[channels, samples]`` in [-1, 1] at ``sample_rate``.
    """
    if not isinstance(audio, np.ndarray):
        raise CodecInputError(
            f"{where}: expected a numpy array [channels, samples], got {type(audio).__name__}"
        )
    if audio.ndim == 1:
        audio = audio[None, :]
    if audio.ndim != 2:
        raise CodecInputError(f"{where}: expected [channels, samples] or [samples], got shape {audio.shape}")
    if audio.shape[0] > 16 and audio.shape[1] <= 16:
        raise CodecInputError(
            f"{where}: shape {audio.shape} looks like [samples, channels]; pass audio.T ([channels, samples])"
        )
    if audio.shape[1] == 0 or audio.shape[0] == 0:
        raise CodecInputError(f"{where}: audio is empty (shape {audio.shape}); nothing to encode")
    if not isinstance(sr, int | np.integer) or sr <= 0:
        raise CodecInputError(f"{where}: sample rate {sr!r} must be a positive integer")
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max + 1)
    elif not np.issubdtype(audio.dtype, np.floating):
        raise CodecInputError(f"{where}: dtype {audio.dtype} is not audio (float or integer PCM)")
    audio = audio.astype(np.float32, copy=True)
    bad = ~np.isfinite(audio)
    if bad.any():
        ch, pos = np.argwhere(bad)[0]
        msg = f"{where}: {int(bad.sum())} NaN/Inf samples (first at channel {ch}, sample {pos})"
        if nonfinite != "zero":
            raise CodecInputError(msg + "; fix the source, or pass nonfinite='zero' to replace them by 0")
        logging.warning("%s; replaced by 0", msg)
        audio[bad] = 0.0
    peak = float(np.max(np.abs(audio)))
    if peak > UNSCALED_PEAK:
        raise CodecInputError(
            f"{where}: peak {peak:.1f} looks like integer PCM stored as float; divide by 32768 (16-bit)"
        )
    if peak > 1.0:
        n = int(np.sum(np.abs(audio) > 1.0))
        logging.warning("%s: %d samples beyond [-1, 1] (peak %.3f); hard-clipped", where, n, peak)
        np.clip(audio, -1.0, 1.0, out=audio)
    elif peak == 0.0:
        logging.info("%s: digital silence", where)
    c = audio.shape[0]
    if c != channels:
        if channels == 1:
            logging.info("%s: %d channels mixed down to mono", where, c)
            audio = audio.mean(axis=0, keepdims=True)
        elif c == 1:
            logging.info("%s: mono duplicated to %d channels", where, channels)
            audio = np.repeat(audio, channels, axis=0)
        else:
            raise CodecInputError(
                f"{where}: {c} channels, but the codec takes {channels}; "
                f"mix them to {channels} or to mono first"
            )
    if sr != sample_rate:
        if not resample_input:
            raise CodecInputError(
                f"{where}: sample rate {sr} Hz, but the codec runs at {sample_rate} Hz; resample it "
                "(or let the codec do it: resample=True)"
            )
        logging.info("%s: resampling %d Hz -> %d Hz", where, sr, sample_rate)
        audio = resample(audio, int(sr), sample_rate)
    return audio
