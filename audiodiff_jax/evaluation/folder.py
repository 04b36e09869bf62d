"""Evaluation of a folder of audio: a sweep's output, a corpus, a reference set.

:func:`evaluate_folder` measures every audio file under a folder (``song.py``),
compares each with the labels its prompt asks for (``adherence.py``), and, given a
reference folder, the Fréchet distance of the two sets (``embeddings.py``). It
writes beside the audio:

- ``metrics.jsonl``: one row per song, keyed by the manifest's item ``id`` when the
  folder has a ``manifest.jsonl`` (a sweep's rows name their ``file``, a corpus's
  rows their ``audio``), else by the file's path relative to the folder. A row
  carries the song's metrics and the manifest columns a sweep grid varies (prompt,
  guidance, steps, sampler, checkpoint step, ...), so it can be plotted alone.
- ``metrics_summary.json``: means over the songs, adherence accuracies with their
  tolerance and the estimators' ceilings, the set distance, the files that could not
  be read.

A file that cannot be read is reported (``issues``) and the rest goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import soundfile as sf
from absl import logging
from tqdm import tqdm

from audiodiff_jax.codec import inputs
from audiodiff_jax.core import paths
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.evaluation import adherence, embeddings, song
from audiodiff_jax.evaluation import notes as notes_lib

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "metrics_summary.json"
MANIFEST_FILE = "manifest.jsonl"  # what sweeps (sweep.py) and corpus builders write
AUDIO_EXTENSIONS = inputs.AUDIO_EXTENSIONS
# Manifest columns copied into metrics rows: what a sweep grid varies, and what names a song.
CARRIED = (
    "prompt",
    "caption",
    "labels",
    "guidance",
    "guidance_rescale",
    "steps",
    "sampler",
    "schedule",
    "seed",
    "seconds",
    "checkpoint_step",
    "weights",
    "bpm",  # musical controls asked (the asked key is the manifest's; "key" here is heard)
    "time_signature",
)
# Numeric metric columns (means in the summary, plots against grid axes).
NUMERIC = (
    "tempo_bpm",
    "key_confidence",
    "lufs",
    "true_peak_dbtp",
    "clipped_share",
    "silence_share",
    "onset_rate",
    "note_density",
    "pitch_class_entropy",
    "chroma_stability",
    "key_stability",
    "tempo_stability",
)


class EvalError(UserError):
    """A folder, reference or labels file the evaluation cannot use (names it)."""


@dataclasses.dataclass
class EvalResult:
    rows: list[dict]  # one per song, in file order
    summary: dict
    issues: list[dict]  # {"where": file, "message": ...} for files that could not be read
    metrics_path: str = ""
    summary_path: str = ""


def find_audio(folder: str) -> list[str]:
    """Audio files under ``folder`` (recursive), as sorted paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.lower().endswith(AUDIO_EXTENSIONS) and ".tmp-" not in name:
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def read_manifest(folder: str) -> dict[str, dict]:
    """File (relative to ``folder``) -> manifest row, from ``folder/manifest.jsonl`` if
    there is one; rows that do not parse are skipped with a warning."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        return {}
    out, bad = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row.get("file") or row.get("audio")
                out[os.path.normpath(name)] = row
            except (ValueError, TypeError, AttributeError):
                bad += 1
    if bad:
        logging.warning("%s: skipped %d unreadable line(s)", path, bad)
    return out


def read_labels(path: str) -> dict[str, dict]:
    """A labels file (JSONL: ``{"id" or "file": ..., "tempo": 120, "key": "A minor", ...}``
    or a corpus manifest) -> id/file -> row; raises EvalError naming the line."""
    out = {}
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise EvalError(f"labels file {path}: {e.strerror or e}") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path}:{n}: not valid JSON ({e})") from e
        keys = [row.get(k) for k in ("id", "file", "audio") if isinstance(row, dict) and row.get(k)]
        if not keys:
            raise EvalError(f"{path}:{n}: a labels row needs an 'id', 'file' or 'audio' field")
        for k in keys:
            out[os.path.normpath(k) if k != row.get("id") else k] = row
    return out


def load_audio(path: str) -> tuple[np.ndarray, int]:
    """``[channels, samples]`` float32 and the rate; raises ValueError for unreadable files."""
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise ValueError(f"cannot read audio ({e})") from e
    if data.shape[0] == 0:
        raise ValueError("no samples")
    if not np.all(np.isfinite(data)):
        raise ValueError("NaN or Inf samples")
    return np.ascontiguousarray(data.T), int(rate)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of the numeric metrics over the rows that have them, counts of drones,
    silent and clipped songs, and the adherence accuracies."""
    means = {}
    for col in NUMERIC:
        vals = [
            r[col] for r in rows if isinstance(r.get(col), int | float) and not isinstance(r.get(col), bool)
        ]
        if vals:
            means[col] = round(float(np.mean(vals)), 4)
    return {
        "songs": len(rows),
        "means": means,
        "drones": sum(bool(r.get("drone")) for r in rows),
        "mostly_silent": sum((r.get("silence_share") or 0) >= 0.9 for r in rows),
        "clipped": sum((r.get("clipped_share") or 0) > 0 for r in rows),
        "adherence": adherence.summarize(list(rows)),
    }


def embed_folder(
    folder: str,
    embedder: Callable[[np.ndarray, int], np.ndarray],
    files: Sequence[str] | None = None,
    *,
    progress: bool = False,
    desc: str = "embed",
) -> np.ndarray:
    """Window embeddings of every audio file of ``folder`` (or ``files`` in it),
    stacked ``[windows, dim]``; unreadable files are skipped with a warning."""
    files = find_audio(folder) if files is None else files
    out = []
    for rel in tqdm(files, desc=desc, disable=not progress):
        try:
            audio, rate = load_audio(os.path.join(folder, rel))
        except ValueError as e:
            logging.warning("%s: %s (left out of the embedding)", os.path.join(folder, rel), e)
            continue
        out.append(embedder(audio, rate))
    if not out:
        raise EvalError(f"{folder}: no readable audio files to embed")
    return np.concatenate(out)


def set_distance(
    folder: str,
    reference: str,
    embedding: str = embeddings.DEFAULT_EMBEDDING,
    *,
    files: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fréchet distance between the songs of ``folder`` and those of ``reference``."""
    if not os.path.isdir(reference):
        raise EvalError(f"reference folder {reference} does not exist")
    embedder = embeddings.get_embedder(embedding)
    gen = embeddings.Gaussian.of(embed_folder(folder, embedder, files, progress=progress, desc="embed songs"))
    ref = embeddings.Gaussian.of(embed_folder(reference, embedder, progress=progress, desc="embed reference"))
    return {
        "embedding": embedding,
        "reference": os.path.abspath(reference),
        "frechet_distance": round(embeddings.frechet_distance(gen, ref), 6),
        "windows": gen.count,
        "reference_windows": ref.count,
        "window_seconds": embeddings.WINDOW_SECONDS,
    }


def evaluate_folder(
    folder: str,
    reference: str | None = None,
    labels: str | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    embedding: str = embeddings.DEFAULT_EMBEDDING,
    window_seconds: float = song.WINDOW_SECONDS,
    transcribe: bool = True,
    write: bool = True,
    progress: bool = True,
    reuse: bool = True,
) -> EvalResult:
    """Measures every song of ``folder``; writes ``metrics.jsonl`` and
    ``metrics_summary.json`` beside them (when ``write``).

    Args:
      folder: folder of audio files (searched recursively), with or without a
        ``manifest.jsonl``.
      reference: a folder of reference audio for the Fréchet distance (held-out
        renders, any folder); None: no set distance.
      labels: the labels songs should have (tempo, key...): a JSONL path or a dict
        keyed by manifest id or relative file; by default each song's manifest row
        (its ``labels``, or what its prompt or caption says).
      embedding: embedding of the set distance (``embeddings.get_embedder``).
      window_seconds: window of the per-window tempo and key.
      transcribe: run the note transcriber (basic-pitch) when it is installed.
      write: write the two files.
      progress: a progress bar over the songs.
      reuse: keep the rows of an earlier ``metrics.jsonl`` whose file is unchanged
        (size, modification time) and was measured with the same settings, unless
        ``labels`` are given (a sweep that resumes re-measures only its new songs).

    Raises:
      EvalError: the folder does not exist or holds no audio, a bad labels file.
    """
    song.require_extra()
    if not os.path.isdir(folder):
        raise EvalError(f"folder {folder} does not exist")
    files = find_audio(folder)
    if not files:
        raise EvalError(f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    if reference is not None:  # check before the long part
        if not os.path.isdir(reference):
            raise EvalError(f"reference folder {reference} does not exist")
        embeddings.get_embedder(embedding)
    manifest = read_manifest(folder)
    given = read_labels(labels) if isinstance(labels, str) else dict(labels or {})
    transcriber = notes_lib.load_transcriber() if transcribe else None
    if transcribe and transcriber is None:
        logging.warning(
            "basic-pitch is not installed: note density is left out, pitch classes come from chroma"
        )
    settings = {"window_seconds": window_seconds, "pitch_source": getattr(transcriber, "name", "chroma")}
    before = {r.get("file"): r for r in read_metrics(folder)} if reuse else {}
    rows, issues, reused = [], [], 0
    for rel in tqdm(files, desc="evaluate", disable=not progress):
        path = os.path.join(folder, rel)
        m = manifest.get(os.path.normpath(rel), {})
        stat = os.stat(path)
        carried = json.dumps({k: m.get(k) for k in ("id", *CARRIED)}, sort_keys=True, default=str)
        stamp = {
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "manifest_row": hashlib.sha1(carried.encode()).hexdigest()[:12],
            **settings,
        }
        old = before.get(rel)
        if old is not None and old.get("measured") == stamp and not labels:
            rows.append(old)  # the same file measured the same way (a rerun of a sweep)
            reused += 1
            continue
        try:
            audio, rate = load_audio(path)
        except ValueError as e:
            issues.append({"where": path, "message": str(e)})
            logging.warning("%s: %s", path, e)
            continue
        row: dict[str, Any] = {"id": m.get("id", rel), "file": rel, "measured": stamp}
        row.update({k: m[k] for k in CARRIED if k in m})
        row.update(song.song_metrics(audio, rate, transcriber=transcriber, window_seconds=window_seconds))
        wanted = given.get(row["id"]) or given.get(os.path.normpath(rel)) or m
        row.update(adherence.adherence(row, adherence.labels_from(wanted)))
        rows.append({k: _json_value(v) for k, v in row.items()})
    if reused:
        logging.info("evaluate: %d song(s) unchanged since %s, kept", reused, METRICS_FILE)
    summary = summarize(rows)
    summary["folder"] = os.path.abspath(folder)
    summary["pitch_source"] = transcriber.name if transcriber is not None else "chroma"
    if issues:
        summary["unreadable"] = issues
    if reference is not None and rows:
        summary["set_distance"] = set_distance(
            folder, reference, embedding, files=[r["file"] for r in rows], progress=progress
        )
    result = EvalResult(rows, summary, issues)
    if write:
        result.metrics_path = os.path.join(folder, METRICS_FILE)
        result.summary_path = os.path.join(folder, SUMMARY_FILE)
        metrics_text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        summary_text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        paths.atomic_write(result.metrics_path, metrics_text.encode("utf-8"))
        paths.atomic_write(result.summary_path, summary_text.encode("utf-8"))
    return result


def read_metrics(folder: str) -> list[dict]:
    """The rows of ``folder/metrics.jsonl`` (empty when there is none)."""
    path = os.path.join(folder, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a torn line of an interrupted write: measured again
                continue
    return rows
