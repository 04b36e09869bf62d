"""Any folder of audio files as a corpus: files, captions, and the checks that keep bad input out.

A folder holds ``.wav .flac .ogg .mp3 .opus .aif .aiff`` files (any depth; folder
symlinks are followed, each real folder once) and, optionally, a caption file at its top:

- ``manifest.jsonl`` (what the corpus builders write, ``data_pipeline/manifest.py``),
- ``captions.jsonl`` / ``metadata.jsonl``: one object per line with the file under
  ``audio``, ``file``, ``path``, ``file_name`` or ``filename``, the text under
  ``caption``, ``text`` or ``description``, and optionally ``id``, ``labels`` (an
  object), ``seconds_start``, ``seconds_total``; any other key becomes a label,
- ``captions.csv`` / ``metadata.csv``: the same as columns (numbers become numbers).

Without a caption file, captions come from the path: ``jazz/slow_piano_trio.flac``
-> ``"jazz, slow piano trio"``. A file's id is its path relative to the folder, with
its extension (``jazz/slow_piano_trio.flac``), unless its caption row gives one; an id
that two files would share is kept by the first (in path order) and the others take
their path instead (``#2``, ``#3``... if even that is taken), with a warning. So no
file is ever left out for its name.

Every problem becomes a :class:`Problem` (path or ``caption_file:line`` + reason)
instead of an exception. ``skipped`` ones keep a file or a caption row out: a caption
line that is not UTF-8, not JSON, not an object, names no file or a missing one; a
file that is unreadable, not audio, truncated, empty, has NaN samples, a sample rate
below :data:`MIN_RATE`, a format libsndfile cannot decode (``.m4a``...), a broken
symlink or a symlink loop, or is not a regular file. ``warning`` ones keep it with a
note: no caption row, several caption rows, a field of the wrong type, an unknown
field that looks like a misspelt known one, an id given twice, an unusual sample rate
or channel count that was converted, a folder symlink that leads to a folder already
scanned. Precompute prints them all in its summary; ``audiodiff-corpus --kind=check``
prints the same verdicts before any encoding (:func:`check_entries`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import difflib
import errno
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
import soxr

from audiodiff_jax.codec import inputs
from audiodiff_jax.core.errors import UserError
from data_pipeline.manifest import MANIFEST_FILE, Entry

AUDIO_EXTENSIONS = inputs.AUDIO_EXTENSIONS
# Audio that libsndfile cannot decode: named in the report instead of silently ignored.
UNSUPPORTED_EXTENSIONS = (".m4a", ".mp4", ".aac", ".wma", ".ape", ".webm", ".amr", ".mka", ".alac")
CAPTION_FILES = (MANIFEST_FILE, "captions.jsonl", "metadata.jsonl", "captions.csv", "metadata.csv")
_FILE_KEYS = ("audio", "file", "path", "file_name", "filename")
_CAPTION_KEYS = ("caption", "text", "description")
_RESERVED = ("id", "labels", "seconds_start", "seconds_total", *_FILE_KEYS, *_CAPTION_KEYS)
COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
MIN_RATE = 4000  # below this a file is no music recording (and resampling it is meaningless)

T = TypeVar("T")
R = TypeVar("R")


def printable(text: str) -> str:
    """``text`` as valid Unicode: the undecodable bytes of a file name (which Python keeps as
    surrogate escapes) become ``\\xNN``, so the text can go into JSON, records and logs."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape, not from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A bad input, as the summary reports it."""

    path: str  # a file, or "caption_file:line"
    reason: str
    severity: str  # "skipped" (kept out) or "warning" (kept, with a note)

    def __post_init__(self):
        object.__setattr__(self, "path", printable(self.path))
        object.__setattr__(self, "reason", printable(self.reason))

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class AudioError(ValueError):
    """A file that cannot be used; the message is the reason shown in the summary."""


class FolderError(UserError, FileNotFoundError):
    """The audio folder itself is missing (a user error: one line, exit status 2)."""


# ---------------------------------------------------------------------------
# Audio


def _wav_truncation(path: str, size: int) -> str | None:
    """For RIFF WAV files: a reason if the file is shorter than its header says.

    libsndfile silently reads what is there (it sizes the data from the file, not
    the header), so a cut-off download would otherwise pass as a shorter song.
    """
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    declared = struct.unpack("<I", head[4:8])[0] + 8
    if declared != 0xFFFFFFFF + 8 and size < declared:  # 0xFFFFFFFF: streaming writers' "unknown"
        return f"truncated: WAV header says {declared} bytes, file has {size}"
    return None


def _regular_file(path: str) -> os.stat_result:
    """The file's stat, or an AudioError saying why it cannot be opened as a file.

    Checked before anything opens the file: opening a named pipe would block forever,
    and libsndfile calls a symlink loop "System error".
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AudioError("symlink loop (too many levels of symbolic links)") from e
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise AudioError(f"broken symlink (points to {printable(target)!r}, which does not exist)") from e
        raise AudioError(f"cannot read: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a named pipe"
            if stat.S_ISFIFO(st.st_mode)
            else "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "a device or socket"
        )
        raise AudioError(f"not a regular file ({kind})")
    return st


def _not_audio(head: bytes, error: Exception) -> str:
    """The reason for a file libsndfile cannot open, from its first bytes.

    libsndfile's own message can mislead: for a file with an ``.mp3`` name that holds
    no MPEG frames it says "File does not exist or is not a regular file", though the
    file exists (:func:`_regular_file` checked that first).
    """
    try:
        text: str | None = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut off at the end of the head is still text
        text = head[: e.start].decode("utf-8") if e.reason == "unexpected end of data" else None
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"unreadable: a text file, not audio (starts with {' '.join(text.split())[:40]!r})"
    message = _first_line(error).split("': ", 1)[-1].rstrip(".")
    if "does not exist or is not a regular file" in message or message == "System error":
        return "unreadable: not a recognised audio format"
    return f"unreadable: not a recognised audio format ({message})"


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Reads an audio file as float32 ``[channels, samples]`` and its sample rate.

    Raises:
      AudioError: not a readable regular file, not audio, truncated, zero-length,
        or with NaN/Inf samples. The message is the reason the summary shows.
    """
    st = _regular_file(path)
    if st.st_size == 0:
        raise AudioError("zero-length file (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except PermissionError as e:
        raise AudioError("permission denied (the file cannot be opened for reading)") from e
    except OSError as e:
        raise AudioError(f"cannot read: {e.strerror}") from e
    try:
        # Bytes: soundfile encodes a str path as strict UTF-8, which fails for a file name that is not.
        info = sf.info(os.fsencode(path))
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for junk input
        raise AudioError(_not_audio(head, e)) from e
    if info.frames == 0:
        raise AudioError("zero-length audio (0 samples)")
    if info.channels < 1:
        raise AudioError(f"{info.channels} channels")
    truncated = _wav_truncation(path, st.st_size)
    if truncated:
        raise AudioError(truncated)
    try:
        data, sr = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
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


def conversion_notes(sample_rate: int, channels: int, target_rate: int, target_channels: int) -> list[str]:
    """What :func:`conform` will say about audio of this rate and channel count.

    Common rates and mono/stereo are converted silently; other rates and more than two
    channels are named.

    Raises:
      AudioError: a rate below :data:`MIN_RATE`.
    """
    if sample_rate < MIN_RATE:
        raise AudioError(f"sample rate {sample_rate} Hz is below {MIN_RATE} Hz")
    notes = []
    if channels != target_channels and channels > 2:
        notes.append(f"{channels} channels mixed down to {target_channels}")
    if sample_rate != target_rate and sample_rate not in COMMON_RATES:
        notes.append(f"unusual sample rate {sample_rate} Hz resampled to {target_rate} Hz")
    return notes


def conform(
    audio: np.ndarray, sample_rate: int, target_rate: int, target_channels: int
) -> tuple[np.ndarray, list[str]]:
    """Converts ``[channels, samples]`` audio to the codec's rate and channel count.

    Channels are mixed down by their mean (and mono is repeated for a stereo codec);
    the rate is converted with soxr at very high quality, the resampler the codec
    itself uses (``audiodiff_jax/codec/inputs.py``), for any ratio.

    Returns:
      The audio and the notes of :func:`conversion_notes`.

    Raises:
      AudioError: a rate below :data:`MIN_RATE`.
    """
    channels = audio.shape[0]
    notes = conversion_notes(sample_rate, channels, target_rate, target_channels)
    if channels != target_channels:
        audio = audio.mean(axis=0, keepdims=True) if channels != 1 else audio
        if target_channels > 1:
            audio = np.repeat(audio, target_channels, axis=0)
    if sample_rate != target_rate:
        out = soxr.resample(np.ascontiguousarray(audio.T), sample_rate, target_rate, quality="VHQ")
        audio = np.asarray(out, np.float32).reshape(-1, audio.shape[0]).T
    return np.ascontiguousarray(audio, dtype=np.float32), notes


def check_file(path: str, target_rate: int, target_channels: int) -> list[str]:
    """Decodes a whole file as precompute will; returns the notes conversion will add.

    Raises:
      AudioError: the reason precompute would skip the file for.
    """
    audio, sr = read_audio(path)
    return conversion_notes(sr, audio.shape[0], target_rate, target_channels)


def audio_seconds(path: str) -> float:
    """Length from the header (cheap; 0.0 if unreadable: read_audio reports why later)."""
    try:
        _regular_file(path)  # never let libsndfile open a named pipe: it would wait for a writer
        info = sf.info(os.fsencode(path))
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:  # noqa: BLE001 - any unreadable file is reported when it is read
        return 0.0


def map_ahead(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed by ``workers`` threads a few items ahead.

    libsndfile and soxr release the GIL, so threads decode in parallel; the window
    (two items per thread) bounds the memory that decoded audio can take.
    """
    workers = max(1, int(workers))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        it = iter(items)
        window: collections.deque = collections.deque()
        for item in it:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                break
        while window:
            result = window.popleft().result()
            nxt = next(it, _END)
            if nxt is not _END:
                window.append(pool.submit(fn, nxt))
            yield result


_END = object()


def check_entries(
    folder: str, entries: Sequence[Entry], target_rate: int, target_channels: int, workers: int = 0
) -> list[Problem]:
    """Decodes every entry's file (``workers`` threads; 0 = one per CPU) and returns the
    problems precompute will report for them: ``skipped`` with its reason, or the
    conversion notes as ``warning``."""
    workers = workers or os.cpu_count() or 1

    def one(entry: Entry) -> list[Problem]:
        path = os.path.join(folder, entry.audio)
        try:
            notes = check_file(path, target_rate, target_channels)
        except AudioError as e:
            return [Problem(path, str(e), "skipped")]
        except Exception as e:  # noqa: BLE001 - as precompute: an unexpected failure is one bad file
            return [Problem(path, f"unreadable: {type(e).__name__}: {e}", "skipped")]
        return [Problem(path, n, "warning") for n in notes]

    return [p for problems in map_ahead(one, entries, workers) for p in problems]


# ---------------------------------------------------------------------------
# Folder scanning


def caption_from_path(relpath: str) -> str:
    """``"jazz/slow_piano-trio 01.flac"`` -> ``"jazz, slow piano trio 01"``.

    Bytes of a name that are not UTF-8 become U+FFFD (the id keeps them as ``\\xNN``).
    """
    name = printable(relpath)
    if name != relpath:
        name = relpath.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    parts = os.path.splitext(name)[0].replace("\\", "/").split("/")
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
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}
    return {**names, str: "a string", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _utf8_error(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); line skipped"


def _read_rows(path: str) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """(line number, row) pairs of a JSONL or CSV caption file, and its bad lines.

    A line that is not UTF-8, not JSON (or a CSV row with a bad byte) is a ``skipped``
    problem naming ``path:line``; the rest of the file is still read.
    """
    rows: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    try:
        if path.endswith(".csv"):
            # surrogateescape: one bad byte spoils its row, not the file.
            with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
                reader = csv.DictReader(f)
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as e:
                        problems.append(
                            Problem(f"{path}:{reader.line_num}", f"bad CSV: {e}; row skipped", "skipped")
                        )
                        continue
                    values = [k for k in row if k] + [v for v in row.values() if isinstance(v, str)]
                    if any(printable(v) != v for v in values):
                        problems.append(
                            Problem(f"{path}:{reader.line_num}", "not UTF-8; row skipped", "skipped")
                        )
                        continue
                    rows.append(
                        (reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k})
                    )
            return rows, problems
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.append(Problem(f"{path}:{n}", _utf8_error(raw, e), "skipped"))
                    continue
                try:
                    rows.append((n, json.loads(line.rstrip("\r\n"))))
                except json.JSONDecodeError as e:
                    problems.append(
                        Problem(
                            f"{path}:{n}", f"not JSON ({e.msg} at column {e.colno}); line skipped", "skipped"
                        )
                    )
    except OSError as e:
        problems.append(
            Problem(path, f"caption file unreadable ({e.strerror}); captions from file names", "skipped")
        )
    return rows, problems


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


def list_audio_files(folder: str) -> tuple[list[str], list[Problem]]:
    """Audio files under ``folder`` (relative paths, sorted) and the problems of the walk.

    Hidden files and folders (``.name``) are not read. Folder symlinks are followed,
    but a real folder is scanned once: a link back to a folder already scanned (a
    loop, or a second view of the same files) is named as a warning and not followed.
    A folder that cannot be listed, and files of formats libsndfile cannot decode, are
    named as skipped.
    """
    files: list[str] = []
    problems: list[Problem] = []

    def on_error(e: OSError) -> None:
        problems.append(
            Problem(
                e.filename or folder, f"folder unreadable ({e.strerror}); its files are left out", "skipped"
            )
        )

    visited = {os.path.realpath(folder)}
    for root, dirs, names in os.walk(folder, followlinks=True, onerror=on_error):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            full = os.path.join(root, d)
            real = os.path.realpath(full)
            if real in visited:
                why = f"symlink to a folder already scanned ({real}): a loop or a second view; not followed"
                problems.append(Problem(full, why, "warning"))
                continue
            visited.add(real)
            keep.append(d)
        dirs[:] = keep
        for name in sorted(names):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            ext = os.path.splitext(name)[1].lower()
            if ext in AUDIO_EXTENSIONS:
                files.append(rel)
            elif ext in UNSUPPORTED_EXTENSIONS:
                problems.append(
                    Problem(
                        os.path.join(root, name),
                        f"{ext} is not a format libsndfile decodes; convert it (e.g. to .flac) to include it",
                        "skipped",
                    )
                )
    files.sort()
    return files, problems


def _missing_reason(folder: str, rel: str, caption_name: str, lines: str) -> str:
    path = os.path.join(folder, rel)
    where = f"listed in {caption_name} (line {lines})"
    if rel == ".." or rel.startswith("../"):
        return f"{where} but outside the audio folder"
    if any(part.startswith(".") for part in rel.split("/")):
        return f"{where} but hidden (names starting with '.' are not read)"
    if os.path.isdir(path):
        return f"{where} but a folder"
    if os.path.lexists(path):
        return f"{where} but not an audio file ({' '.join(AUDIO_EXTENSIONS)})"
    return f"{where} but not found"


def scan_folder(folder: str, captions: str | None = None) -> tuple[list[Entry], list[Problem]]:
    """The corpus of an audio folder: entries sorted by id, and the problems found.

    Reads names and captions only; :func:`check_entries` decodes the files.

    Args:
      folder: the audio folder.
      captions: a caption file (JSONL or CSV); None = the first of
        :data:`CAPTION_FILES` in ``folder``, else captions from file names.

    Returns:
      (entries, problems); entries have ``audio`` relative to ``folder``.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise FolderError(f"{folder}: no such audio folder")
    files, problems = list_audio_files(folder)
    caption_file = captions if captions is not None else find_caption_file(folder)
    caption_name = os.path.basename(caption_file) if caption_file else ""
    rows_by_file: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    if caption_file:
        rows, row_problems = _read_rows(caption_file)
        problems.extend(row_problems)
        for n, row in rows:
            where = f"{caption_file}:{n}"
            if not isinstance(row, dict):
                problems.append(Problem(where, f"caption row is {_type_name(row)}, not an object", "skipped"))
                continue
            rel = _pick(row, _FILE_KEYS)
            if rel is None:
                problems.append(
                    Problem(where, f"caption row names no file (keys {list(_FILE_KEYS)})", "skipped")
                )
                continue
            if not isinstance(rel, str):
                problems.append(
                    Problem(where, f"file {rel!r} is {_type_name(rel)}, not a path; line skipped", "skipped")
                )
                continue
            if os.path.isabs(rel):
                rel = os.path.relpath(rel, folder)
            rel = os.path.normpath(rel).replace(os.sep, "/")
            rows_by_file.setdefault(rel, []).append((n, row))
        for rel in sorted(set(rows_by_file) - set(files)):
            lines = ", ".join(str(n) for n, _ in rows_by_file[rel])
            problems.append(
                Problem(
                    os.path.join(folder, rel), _missing_reason(folder, rel, caption_name, lines), "skipped"
                )
            )
    entries = []
    seen: dict[str, str] = {}
    for rel in files:
        path = os.path.join(folder, rel)
        notes: list[str] = []
        if printable(rel) != rel:
            notes.append(
                f"file name is not UTF-8; its id and caption write the bad bytes as {printable(rel)!r}"
            )
        rows = rows_by_file.get(rel, [])
        if caption_file and not rows:
            notes.append(f"no caption in {caption_name}; caption from the file name")
        if len(rows) > 1:
            distinct = {json.dumps(r, sort_keys=True, default=str) for _, r in rows}
            lines = ", ".join(str(n) for n, _ in rows)
            what = "identical" if len(distinct) == 1 else "different"
            notes.append(f"{len(rows)} {what} caption rows (lines {lines}); kept the first")
        row: dict[str, Any] = rows[0][1] if rows else {}
        line = f"{caption_name}:{rows[0][0]}" if rows else ""
        caption = _row_caption(row, line, notes) if rows else None
        caption = caption if caption is not None else caption_from_path(rel)
        clip_id = _row_id(row, line, notes) or printable(rel)
        if clip_id in seen:
            taken = clip_id
            base = printable(rel)
            clip_id, k = base, 2
            while clip_id in seen:
                clip_id, k = f"{base}#{k}", k + 1
            notes.append(f"id {taken!r} is also the id of {seen[taken]}; this file's id is {clip_id!r}")
        seen[clip_id] = printable(path)
        labels = _row_labels(row, line, notes)
        start, total = _row_seconds(row, line, notes)
        problems.extend(Problem(path, note, "warning") for note in notes)
        entries.append(Entry(clip_id, rel, printable(caption), labels, start, total))
    entries.sort(key=lambda e: e.id)
    return entries, problems


def _row_caption(row: dict[str, Any], line: str, notes: list[str]) -> str | None:
    caption = _pick(row, _CAPTION_KEYS)
    if caption is None:
        if any(k in row for k in _CAPTION_KEYS):
            notes.append(f"caption row ({line}) has an empty caption; caption from the file name")
        else:
            fields = ", ".join(repr(k) for k in row if k not in _RESERVED) or "none"
            notes.append(
                f"caption row ({line}) has no caption field ({'/'.join(_CAPTION_KEYS)}; other fields: "
                f"{fields}); caption from the file name"
            )
        return None
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (int, float)) and not isinstance(caption, bool):
        notes.append(f"caption ({line}) is a number ({caption!r}); used as text")
        return str(caption)
    notes.append(f"caption ({line}) is {_type_name(caption)}, not text; caption from the file name")
    return None


def _row_id(row: dict[str, Any], line: str, notes: list[str]) -> str | None:
    value = row.get("id")
    if value in (None, ""):
        return None
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    notes.append(f"id ({line}) is {_type_name(value)}, not text; the file's path is its id")
    return None


def _row_labels(row: dict[str, Any], line: str, notes: list[str]) -> dict[str, Any]:
    labels: dict[str, Any] = {}
    given = row.get("labels")
    if isinstance(given, dict):
        labels = {printable(str(k)): _label_value(v) for k, v in given.items()}
    elif given not in (None, ""):
        notes.append(f"labels ({line}) is {_type_name(given)}, not an object; ignored")
    for key, value in row.items():
        if key in _RESERVED or value in (None, ""):
            continue
        near = difflib.get_close_matches(key.lower(), _RESERVED, n=1, cutoff=0.75)
        if near:
            notes.append(f"unknown field {key!r} ({line}; did you mean {near[0]!r}?); kept as a label")
        labels[printable(str(key))] = _number(value) if isinstance(value, str) else _label_value(value)
    return labels


def _row_seconds(row: dict[str, Any], line: str, notes: list[str]) -> tuple[float, float | None]:
    def number(key: str) -> float | None:
        value = row.get(key)
        if value in (None, ""):
            return None
        if isinstance(value, bool):
            raise ValueError(key)
        out = float(value)
        if not math.isfinite(out) or out < 0:
            raise ValueError(key)
        return out

    try:
        return number("seconds_start") or 0.0, number("seconds_total")
    except (TypeError, ValueError):
        notes.append(
            f"seconds_start/seconds_total ({line}) are not numbers >= 0 "
            f"({row.get('seconds_start')!r}, {row.get('seconds_total')!r}); ignored"
        )
        return 0.0, None
