"""Any folder of audio files as a corpus: files, captions, and the checks that keep bad input out.

A folder holds ``.wav .flac .ogg .mp3 .opus`` files (any depth) and, optionally, a
caption file at its top:

- ``manifest.jsonl`` (what the corpus builders write, ``data_pipeline/manifest.py``),
- ``captions.jsonl`` / ``metadata.jsonl``: one object per line with the file under
  ``audio``, ``file``, ``path`` or ``file_name``, the text under ``caption``, ``text``
  or ``description``, and optionally ``id``, ``labels`` (a dict), ``seconds_start``,
  ``seconds_total``; any other key becomes a label,
- ``captions.csv`` / ``metadata.csv``: the same as columns (numbers become numbers).

Without a caption file, captions come from the path: ``jazz/slow_piano_trio.flac``
-> ``"jazz, slow piano trio"``. Ids are the path without extension, unless given.

Every problem becomes a :class:`Problem` (path + reason) instead of an exception:
``skipped`` ones keep a file out of the corpus (caption row for a missing file,
duplicate id, unreadable / truncated / empty audio, NaN samples), ``warning`` ones
let it in with a note (no caption row, several caption rows, an unusual sample rate
or channel count that was converted). Precompute prints them all in its summary.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np

from data_pipeline.manifest import MANIFEST_FILE, Entry

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")
CAPTION_FILES = (MANIFEST_FILE, "captions.jsonl", "metadata.jsonl", "captions.csv", "metadata.csv")
_FILE_KEYS = ("audio", "file", "path", "file_name", "filename")
_CAPTION_KEYS = ("caption", "text", "description")
_RESERVED = {"id", "labels", "seconds_start", "seconds_total", *_FILE_KEYS, *_CAPTION_KEYS}
COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
MIN_RATE = 4000  # below this a file is no music recording (and resampling it is meaningless)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A bad input, as the summary reports it."""

    path: str
    reason: str
    severity: str  # "skipped" (kept out) or "warning" (kept, with a note)

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class AudioError(ValueError):
    """A file that cannot be used; the message is the reason shown in the summary."""


# ---------------------------------------------------------------------------
# Audio


def _wav_truncation(path: str) -> str | None:
    """For RIFF WAV files: a reason if the file is shorter than its header says.

    libsndfile silently reads what is there (it sizes the data from the file, not
    the header), so a cut-off download would otherwise pass as a shorter song.
    """
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    declared = struct.unpack("<I", head[4:8])[0] + 8
    actual = os.path.getsize(path)
    if declared != 0xFFFFFFFF + 8 and actual < declared:  # 0xFFFFFFFF: streaming writers' "unknown"
        return f"truncated: WAV header says {declared} bytes, file has {actual}"
    return None


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Reads an audio file as float32 ``[channels, samples]`` and its sample rate.

    Raises:
      AudioError: unreadable, truncated, zero-length, or with NaN/Inf samples.
    """
    import soundfile as sf

    if os.path.getsize(path) == 0:
        raise AudioError("zero-length file (0 bytes)")
    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for junk input
        raise AudioError(f"unreadable: {_first_line(e)}") from e
    if info.frames == 0:
        raise AudioError("zero-length audio (0 samples)")
    if info.channels < 1:
        raise AudioError(f"{info.channels} channels")
    truncated = _wav_truncation(path)
    if truncated:
        raise AudioError(truncated)
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - e.g. "flac decoder lost sync" for a cut-off FLAC
        raise AudioError(f"unreadable or truncated: {_first_line(e)}") from e
    if data.shape[0] == 0:
        raise AudioError("zero-length audio (0 samples decoded)")
    # MP3/FLAC headers state a length; decoding much less means the file was cut off.
    if info.frames > 0 and data.shape[0] < 0.99 * info.frames:
        raise AudioError(f"truncated: header says {info.frames} samples, decoded {data.shape[0]}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise AudioError(f"{bad} NaN/Inf samples")
    return np.ascontiguousarray(data.T), int(sr)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def conform(
    audio: np.ndarray, sample_rate: int, target_rate: int, target_channels: int
) -> tuple[np.ndarray, list[str]]:
    """Converts ``[channels, samples]`` audio to the codec's rate and channel count.

    Returns the audio and notes for the summary about anything unusual (common
    rates are converted silently; others are named). Resampling is polyphase
    (scipy) with the rate ratio reduced to a fraction with denominator <= 1000; for
    exotic rates the tiny ratio error is stated in the note.

    Raises:
      AudioError: a rate below MIN_RATE.
    """
    from scipy import signal

    notes = []
    channels = audio.shape[0]
    if sample_rate < MIN_RATE:
        raise AudioError(f"sample rate {sample_rate} Hz is below {MIN_RATE} Hz")
    if channels != target_channels:
        if channels > 2:
            notes.append(f"{channels} channels mixed down to {target_channels}")
        audio = audio.mean(axis=0, keepdims=True) if channels != 1 else audio
        if target_channels > 1:
            audio = np.repeat(audio, target_channels, axis=0)
    if sample_rate != target_rate:
        ratio = Fraction(target_rate, sample_rate).limit_denominator(1000)
        if sample_rate not in COMMON_RATES:
            exact = target_rate / sample_rate
            error = abs(float(ratio) / exact - 1.0)
            notes.append(
                f"unusual sample rate {sample_rate} Hz resampled to {target_rate} Hz"
                + (f" (rate error {error:.2e})" if error else "")
            )
        if ratio != 1:
            audio = signal.resample_poly(audio, ratio.numerator, ratio.denominator, axis=1)
    return np.ascontiguousarray(audio, dtype=np.float32), notes


def audio_seconds(path: str) -> float:
    """Length from the header (cheap; 0.0 if unreadable: read_audio reports why later)."""
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:  # noqa: BLE001 - any unreadable file is reported when it is read
        return 0.0


# ---------------------------------------------------------------------------
# Folder scanning


def caption_from_path(relpath: str) -> str:
    """``"jazz/slow_piano-trio 01.flac"`` -> ``"jazz, slow piano trio 01"``."""
    parts = os.path.splitext(relpath)[0].replace("\\", "/").split("/")
    words = [" ".join(re.sub(r"[_\-.]+", " ", p).split()) for p in parts]
    return ", ".join(w for w in words if w)


def _number(value: str) -> Any:
    for tp in (int, float):
        try:
            out = tp(value)
        except ValueError:
            continue
        return out if tp is int or math.isfinite(out) else value
    return value


def _label_value(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _read_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line or row number, row) pairs of a JSONL or CSV caption file."""
    rows = []
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                rows.append((n, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
        return rows
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                rows.append((n, json.loads(line)))
    return rows


def _pick(row: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def find_caption_file(folder: str) -> str | None:
    for name in CAPTION_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def scan_folder(folder: str, captions: str | None = None) -> tuple[list[Entry], list[Problem]]:
    """The corpus of an audio folder: entries sorted by id, and the problems found.

    Args:
      folder: the audio folder.
      captions: a caption file (JSONL or CSV); None = the first of
        :data:`CAPTION_FILES` in ``folder``, else captions from file names.

    Returns:
      (entries, problems); entries have ``audio`` relative to ``folder``.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such audio folder")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS):
                files.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    files.sort()
    problems: list[Problem] = []
    caption_file = captions if captions is not None else find_caption_file(folder)
    rows_by_file: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    if caption_file:
        for n, row in _read_rows(caption_file):
            where = f"{caption_file}:{n}"
            if not isinstance(row, dict):
                problems.append(Problem(where, "caption row is not an object", "skipped"))
                continue
            rel = _pick(row, _FILE_KEYS)
            if rel is None:
                problems.append(
                    Problem(where, f"caption row names no file (keys {list(_FILE_KEYS)})", "skipped")
                )
                continue
            rel = os.path.normpath(str(rel)).replace(os.sep, "/")
            if os.path.isabs(rel):
                rel = os.path.relpath(rel, folder).replace(os.sep, "/")
            rows_by_file.setdefault(rel, []).append((n, row))
        for rel in sorted(set(rows_by_file) - set(files)):
            problems.append(
                Problem(
                    os.path.join(folder, rel),
                    f"listed in {os.path.basename(caption_file)} but not found",
                    "skipped",
                )
            )
    entries = []
    seen: dict[str, str] = {}
    for rel in files:
        path = os.path.join(folder, rel)
        rows = rows_by_file.get(rel, [])
        row: dict[str, Any] = {}
        if caption_file and not rows:
            problems.append(
                Problem(
                    path,
                    f"no caption in {os.path.basename(caption_file)}; caption from the file name",
                    "warning",
                )
            )
        if len(rows) > 1:
            distinct = {json.dumps(r, sort_keys=True, default=str) for _, r in rows}
            lines = ", ".join(str(n) for n, _ in rows)
            what = "identical" if len(distinct) == 1 else "different"
            problems.append(
                Problem(path, f"{len(rows)} {what} caption rows (lines {lines}); kept the first", "warning")
            )
        if rows:
            row = rows[0][1]
        caption = _pick(row, _CAPTION_KEYS)
        if rows and caption is None:
            problems.append(
                Problem(path, "caption row has an empty caption; caption from the file name", "warning")
            )
        caption = str(caption) if caption is not None else caption_from_path(rel)
        clip_id = str(row.get("id") or os.path.splitext(rel)[0])
        if clip_id in seen:
            problems.append(
                Problem(path, f"duplicate id {clip_id!r} (also {seen[clip_id]}); skipped", "skipped")
            )
            continue
        seen[clip_id] = path
        labels = row.get("labels") if isinstance(row.get("labels"), dict) else {}
        labels = {str(k): _label_value(v) for k, v in labels.items()}
        for key, value in row.items():
            if key not in _RESERVED and value not in (None, ""):
                labels[str(key)] = _number(value) if isinstance(value, str) else _label_value(value)
        try:
            start = float(row.get("seconds_start") or 0.0)
            total = float(row["seconds_total"]) if row.get("seconds_total") not in (None, "") else None
        except (TypeError, ValueError):
            problems.append(Problem(path, "seconds_start/seconds_total are not numbers; ignored", "warning"))
            start, total = 0.0, None
        entries.append(Entry(clip_id, rel, caption, labels, start, total))
    entries.sort(key=lambda e: e.id)
    return entries, problems
