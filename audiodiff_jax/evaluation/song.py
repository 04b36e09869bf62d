"""Per-song metrics: tempo, key, loudness, peaks, silence, onsets, notes, pitch classes,
the drone indicator, and tempo and key per window with their stability.

Every estimator is a library's: beat tracking and onsets from librosa, chroma from
librosa (constant-Q), loudness from pyloudnorm (ITU-R BS.1770-4 gating), true peak
by 4x polyphase oversampling (scipy, the BS.1770 annex 2 method), notes from
basic-pitch's ONNX model (``notes.py``). Key is the key profile (Temperley's, 24
rotations) best correlated with the song's mean chroma (Krumhansl-Schmuckler's method).

:func:`song_metrics` takes ``[channels, samples]`` float audio and returns one flat
dict of JSON values (a row of ``metrics.jsonl``); a value that cannot be measured
(the loudness of silence) is None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.signal

from audiodiff_jax.evaluation import notes as notes_lib

# librosa and pyloudnorm come with the "eval" extra.
try:
    import librosa
    import pyloudnorm
except ImportError:  # the library imports without the extra; evaluation then says what to install
    librosa = None
    pyloudnorm = None

ANALYSIS_RATE = 22050  # mono analysis rate (librosa's default): tempo, key, onsets, chroma
HOP = 512  # analysis frames of 23 ms
WINDOW_SECONDS = 30.0  # tempo and key per window of this length
MIN_WINDOW_SECONDS = 10.0  # a shorter last window joins the one before
SILENCE_DBFS = -60.0  # RMS frames below this are silent
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped (16-bit full scale is 0.99997)
# Onset peaks must rise this far (spectral flux of the log-mel spectrum, dB per band)
# above their neighbourhood's mean. librosa's default normalizes the envelope by its
# maximum first, which turns the beating of a steady chord into a dozen onsets a second.
ONSET_DELTA = 1.0
DRONE_ONSET_RATE = 0.25  # onsets per second below which a song may be a drone
DRONE_STABILITY = 0.95  # ... and a pitch-class profile this stable over time
TEMPO_TOLERANCE = 0.04  # tempo estimates within 4% agree (octave errors do not)

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Key profiles (major, minor), tonic first. Krumhansl & Kessler (1982) probe-tone
# ratings, and Temperley's (1999, from the Kostka-Payne corpus). Temperley's is the
# default: on rendered scores and grooves with exact keys it was right 74.6% of the
# time against 62.7% for Krumhansl-Kessler (whose errors were mostly the key a fifth
# above), and 69.5% against 52.5% on a second draw of 60 (BENCHMARKS.md "Evaluation").
KEY_PROFILES = {
    "krumhansl": (
        np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88]),
        np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17]),
    ),
    "temperley": (
        np.array([5.0, 2.0, 3.5, 2.0, 4.5, 4.0, 2.0, 4.5, 2.0, 3.5, 1.5, 4.0]),
        np.array([5.0, 2.0, 3.5, 4.5, 2.0, 4.0, 2.0, 4.5, 3.5, 2.0, 1.5, 4.0]),
    ),
}
KEY_PROFILE = "temperley"


class MissingExtra(ImportError):
    """The evaluation extra is not installed."""


def require_extra() -> None:
    if librosa is None or pyloudnorm is None:
        raise MissingExtra("audio evaluation needs the eval extra: pip install 'audiodiff-jax[eval]'")


def analysis_mono(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """``[channels, samples]`` (or ``[samples]``) -> float32 mono at :data:`ANALYSIS_RATE`."""
    x = np.asarray(audio, np.float32)
    x = x.mean(axis=0) if x.ndim == 2 else x
    if sample_rate != ANALYSIS_RATE:
        x = librosa.resample(x, orig_sr=sample_rate, target_sr=ANALYSIS_RATE)
    return np.ascontiguousarray(x, np.float32)


# ---------------------------------------------------------------------------
# Key


def key_name(pitch_class: int, mode: str) -> str:
    return f"{PITCH_CLASSES[pitch_class % 12]} {mode}"


def estimate_key(chroma_mean: np.ndarray, profile: str = KEY_PROFILE) -> tuple[int, str, float]:
    """(tonic pitch class, ``"major"``/``"minor"``, correlation) of the key profile (24
    rotations of :data:`KEY_PROFILES` ``[profile]``) best correlated with the mean
    chroma; correlation 0 for a flat (or silent) chroma."""
    c = np.asarray(chroma_mean, np.float64)
    if not np.all(np.isfinite(c)) or np.ptp(c) < 1e-9:
        return 0, "major", 0.0
    best = (0, "major", -2.0)
    major, minor = KEY_PROFILES[profile]
    for mode, ratings in (("major", major), ("minor", minor)):
        for tonic in range(12):
            r = float(np.corrcoef(c, np.roll(ratings, tonic))[0, 1])
            if r > best[2]:
                best = (tonic, mode, r)
    return best


# ---------------------------------------------------------------------------
# Tempo


def estimate_tempo(onset_env: np.ndarray) -> float:
    """Beats per minute of an onset-strength envelope; 0 when it has no onset energy.

    librosa's tempogram estimate is quantized to whole autocorrelation lags (about 5%
    apart at 120 bpm with 23 ms frames), coarser than the 4% tolerance of tempo
    adherence; librosa's beat tracker, started at that estimate, places beats whose
    mean spacing over the song refines it (kept when it stays within 8% of it).
    """
    if onset_env.size < 8 or float(np.max(onset_env)) <= 1e-9:
        return 0.0
    rough = float(librosa.feature.tempo(onset_envelope=onset_env, sr=ANALYSIS_RATE, hop_length=HOP)[0])
    _, beats = librosa.beat.beat_track(
        onset_envelope=onset_env, sr=ANALYSIS_RATE, hop_length=HOP, bpm=rough, units="time", trim=True
    )
    if len(beats) >= 6:
        fine = 60.0 * (len(beats) - 1) / float(beats[-1] - beats[0])
        if abs(fine - rough) <= 0.08 * rough:
            return fine
    return rough


def tempo_agrees(estimate: float, truth: float, tolerance: float = TEMPO_TOLERANCE) -> bool:
    """Within ``tolerance`` of the truth (relative); twice or half the tempo is wrong."""
    return truth > 0 and abs(estimate - truth) <= tolerance * truth


# ---------------------------------------------------------------------------
# Loudness and peaks


def integrated_lufs(audio: np.ndarray, sample_rate: int) -> float | None:
    """BS.1770-4 integrated loudness (LUFS, gated) of ``[channels, samples]``; None for
    silence or audio shorter than one 400 ms gating block."""
    x = np.asarray(audio, np.float64)
    x = x[None] if x.ndim == 1 else x
    if x.shape[1] < int(0.4 * sample_rate) + 1:
        return None
    value = pyloudnorm.Meter(sample_rate).integrated_loudness(x.T)
    return float(value) if math.isfinite(value) else None


def true_peak_dbtp(audio: np.ndarray) -> float | None:
    """True peak (dBTP): the peak of the 4x oversampled signal (BS.1770-4 annex 2);
    None for silence."""
    x = np.asarray(audio, np.float64)
    x = x[None] if x.ndim == 1 else x
    if not np.any(x):
        return None
    up = scipy.signal.resample_poly(x, 4, 1, axis=-1)
    return float(20.0 * np.log10(max(float(np.max(np.abs(up))), float(np.max(np.abs(x))))))


# ---------------------------------------------------------------------------
# Pitch classes


def entropy_bits(weights: np.ndarray) -> float | None:
    """Shannon entropy (bits) of a non-negative histogram; None when it is empty."""
    w = np.asarray(weights, np.float64)
    total = float(w.sum())
    if total <= 0:
        return None
    p = w[w > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0


def chroma_stability(chroma: np.ndarray, frames_per_block: int) -> float | None:
    """Mean cosine similarity of each block's mean chroma to the whole song's: 1 for a
    pitch-class profile that never changes (a drone), lower for moving music."""
    n = chroma.shape[1] // frames_per_block
    if n < 2:
        return None
    blocks = chroma[:, : n * frames_per_block].reshape(12, n, frames_per_block).mean(axis=2).T
    whole = chroma.mean(axis=1)
    norms = np.linalg.norm(blocks, axis=1) * np.linalg.norm(whole)
    keep = norms > 1e-9
    if not np.any(keep):
        return None
    return float(np.mean(blocks[keep] @ whole / norms[keep]))


# ---------------------------------------------------------------------------
# Windows


def window_bounds(seconds: float, window: float = WINDOW_SECONDS) -> list[tuple[float, float]]:
    """Consecutive windows of ``window`` seconds covering the song; a last window shorter
    than :data:`MIN_WINDOW_SECONDS` joins the one before."""
    if seconds <= window:
        return [(0.0, seconds)]
    bounds = []
    start = 0.0
    while start < seconds:
        end = min(start + window, seconds)
        if end - start < MIN_WINDOW_SECONDS and bounds:
            bounds[-1] = (bounds[-1][0], end)
        else:
            bounds.append((start, end))
        start = end
    return bounds


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def song_metrics(
    audio: np.ndarray,
    sample_rate: int,
    *,
    transcriber: notes_lib.Transcriber | None = None,
    window_seconds: float = WINDOW_SECONDS,
) -> dict[str, Any]:
    """Every per-song metric of ``audio`` (``[channels, samples]`` or ``[samples]``, float).

    Args:
      audio: the song, floats in [-1, 1].
      sample_rate: its rate in Hz.
      transcriber: note transcriber for note density and the pitch-class histogram;
        None: note density is None and pitch classes come from the chroma.
      window_seconds: length of the windows of ``window_metrics``.

    Returns:
      A flat dict of JSON values (``window_metrics`` is a list of dicts).
    """
    require_extra()
    x = np.asarray(audio, np.float32)
    x = x[None] if x.ndim == 1 else x
    seconds = x.shape[1] / sample_rate
    mono = analysis_mono(x, sample_rate)
    row: dict[str, Any] = {
        "seconds": round(seconds, 4),
        "sample_rate": int(sample_rate),
        "channels": int(x.shape[0]),
    }

    # Level: loudness, peaks, silence.
    row["lufs"] = _round(integrated_lufs(x, sample_rate), 3)
    row["true_peak_dbtp"] = _round(true_peak_dbtp(x), 3)
    row["clipped_share"] = _round(float(np.mean(np.abs(x) >= CLIP_LEVEL)) if x.size else 0.0, 6)
    rms = librosa.feature.rms(y=mono, frame_length=2048, hop_length=HOP)[0] if mono.size else np.zeros(0)
    rms_db = 20.0 * np.log10(np.maximum(rms, 1e-10))
    silent = rms_db < SILENCE_DBFS
    row["silence_share"] = _round(float(np.mean(silent)) if silent.size else 1.0)

    # Rhythm: onsets, tempo.
    onset_env = librosa.onset.onset_strength(y=mono, sr=ANALYSIS_RATE, hop_length=HOP)
    active = not bool(np.all(silent))
    onsets = (
        librosa.onset.onset_detect(
            onset_envelope=onset_env,
            sr=ANALYSIS_RATE,
            hop_length=HOP,
            units="time",
            normalize=False,
            delta=ONSET_DELTA,
        )
        if active
        else np.zeros(0)
    )
    row["onset_rate"] = _round(len(onsets) / max(seconds, 1e-9), 4)
    row["tempo_bpm"] = _round(estimate_tempo(onset_env) if active else 0.0, 2)

    # Harmony: chroma, key, pitch classes.
    # Silence has no tuning to estimate (librosa warns): give it none.
    chroma = librosa.feature.chroma_cqt(
        y=mono, sr=ANALYSIS_RATE, hop_length=HOP, tuning=None if active else 0.0
    )
    voiced = ~silent[: chroma.shape[1]] if silent.size else np.ones(chroma.shape[1], bool)
    voiced = np.pad(voiced, (0, chroma.shape[1] - voiced.size), constant_values=False)
    chroma_mean = chroma[:, voiced].mean(axis=1) if np.any(voiced) else np.zeros(12)
    tonic, mode, corr = estimate_key(chroma_mean) if active else (0, "major", 0.0)
    row["key"] = key_name(tonic, mode) if corr > 0 else None
    row["key_confidence"] = _round(corr)
    notes = transcriber.transcribe(mono, ANALYSIS_RATE) if (transcriber is not None and active) else None
    if transcriber is None:
        row["note_density"] = None
        row["pitch_class_entropy"] = _round(entropy_bits(chroma_mean) if active else None)
        row["pitch_source"] = "chroma"
    else:
        notes = notes if notes is not None else []
        row["note_density"] = _round(len(notes) / max(seconds, 1e-9))
        row["pitch_class_entropy"] = _round(entropy_bits(notes_lib.pitch_class_histogram(notes)))
        row["pitch_source"] = transcriber.name
    frames_per_second = ANALYSIS_RATE / HOP
    row["chroma_stability"] = _round(
        chroma_stability(chroma, int(round(frames_per_second))) if active else None
    )
    stable = row["chroma_stability"] is not None and row["chroma_stability"] >= DRONE_STABILITY
    row["drone"] = bool(
        active and row["silence_share"] < 0.9 and row["onset_rate"] < DRONE_ONSET_RATE and stable
    )

    # Per window: tempo and key, and their agreement with the whole song.
    windows = []
    for start, end in window_bounds(seconds, window_seconds):
        a, b = int(start * frames_per_second), int(math.ceil(end * frames_per_second))
        w_chroma = chroma[:, a:b]
        w_voiced = voiced[a:b]
        w_active = bool(np.any(w_voiced))
        w_tonic, w_mode, w_corr = (
            estimate_key(w_chroma[:, w_voiced].mean(axis=1)) if w_active else (0, "major", 0.0)
        )
        windows.append(
            {
                "start": round(start, 3),
                "end": round(end, 3),
                "tempo_bpm": round(estimate_tempo(onset_env[a:b]) if w_active else 0.0, 2),
                "key": key_name(w_tonic, w_mode) if w_corr > 0 else None,
            }
        )
    row["window_metrics"] = windows
    row["key_stability"] = _round(
        np.mean([w["key"] == row["key"] for w in windows]) if row["key"] is not None else None
    )
    row["tempo_stability"] = _round(
        np.mean([tempo_agrees(w["tempo_bpm"], row["tempo_bpm"]) for w in windows])
        if row["tempo_bpm"]
        else None
    )
    return row
