r"""Latent precompute: a corpus of audio -> codec latents in ArrayRecord shards + dataset card.

The same command on every host (or process)::

    audiodiff-precompute --corpus=/data/scores --out_dir=/data/latents/scores \
        --process_index=$I --process_count=$N [--codec=default] [--files_per_shard=64]

The corpus is an audio folder (``data_pipeline/audio_folder.py``: a corpus
builder's ``manifest.jsonl``, caption JSONL/CSV, or captions from file names) or a
TFDS audio dataset (``--tfds=NAME``).

How the work is cut, so that it is resumable and splits across processes:

1. **Plan.** Every process lists the corpus the same way (entries sorted by id) and
   cuts it into *units* of ``files_per_shard`` consecutive entries; unit ``u`` belongs
   to process ``u % process_count``. The plan depends on the corpus, the codec card
   and the settings, never on the process count, so any split yields the same
   shards. Its fingerprint is stored in ``OUT/.work/plan.json``; resuming against a
   changed corpus is refused.
2. **Units.** A unit is encoded into ``OUT/.work/unit-UUUUU/`` by a
   ``ShardWriter`` (hidden temporary file, renamed when complete), then its report
   (records, bad files, audio seconds) is written atomically as
   ``unit-UUUUU.json``: that file is the unit's "done" mark. A run that is killed
   loses at most the units in flight; a rerun skips every unit with a report.
3. **Merge.** Process 0, after its own units, waits for every report, renames the
   unit shards to ``latents-IIIII-of-NNNNN.array_record``, combines the per-unit
   latent statistics, writes ``precompute_summary.json``, then the dataset card
   last (a folder with a card is complete), trains the caption tokenizer if asked,
   and removes ``.work``. Every step can be repeated after a crash.

The folder must be shared by all processes (a local disk, NFS or a FUSE-mounted
bucket with atomic rename). Bad input never stops the run: each bad file is
reported with its path and reason in the summary (see ``audio_folder.Problem``).

A codec is anything with the ``audiodiff_jax.codec.interface.Codec`` methods; if it
also has ``encode_batch(list_of_audio, sample_rate) -> list_of_latents``, files are
given to it ``batch_size`` at a time (one per local device, for example).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from audiodiff_jax import cli
from audiodiff_jax import codec as codec_lib
from audiodiff_jax.data.cards import CARD_FILE, CodecCard, DatasetCard, ShardInfo
from audiodiff_jax.data.records import SHARD_PREFIX, SHARD_SUFFIX, shard_file_name
from data_pipeline import audio_folder, tokenizer
from data_pipeline.audio_folder import AudioError, Problem
from data_pipeline.manifest import Entry
from data_pipeline.shards import ShardWriter

WORK_DIR = ".work"
SUMMARY_FILE = "precompute_summary.json"
_PLAN_FILE = "plan.json"
_UNIT_SHARD = shard_file_name(0, 1)


class PrecomputeError(RuntimeError):
    """The run cannot go on (changed corpus, missing unit, timeout); the message says what to do."""


# ---------------------------------------------------------------------------
# Corpora


class FolderCorpus:
    """An audio folder (see ``audio_folder.scan_folder``)."""

    def __init__(self, folder: str, captions: str | None = None):
        self.folder = os.path.abspath(folder)
        self.entries, self.problems = audio_folder.scan_folder(self.folder, captions)
        self.description = {"kind": "audio_folder", "path": self.folder}

    def where(self, entry: Entry) -> str:
        return os.path.join(self.folder, entry.audio)

    def seconds(self, entry: Entry) -> float:
        return audio_folder.audio_seconds(self.where(entry))

    def load(self, entry: Entry) -> tuple[np.ndarray, int]:
        return audio_folder.read_audio(self.where(entry))


class TfdsCorpus:
    """A TFDS dataset with an Audio feature, read by random access (ArrayRecord, no TensorFlow).

    Captions come from ``caption_key`` (a Text feature, or a ClassLabel whose name
    is used); every other scalar feature becomes a label. Ids are ``NAME/SPLIT/INDEX``.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        audio_key: str | None = None,
        caption_key: str | None = None,
    ):
        import tensorflow_datasets as tfds

        self.builder = tfds.builder(name, data_dir=data_dir)
        features = self.builder.info.features
        # tfds.features.Audio, or (as data_pipeline/tfds_audio_folder.py writes, since
        # Audio needs TensorFlow) a float Tensor "audio" beside a "sample_rate" scalar.
        audio_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Audio)]
        audio_keys += ["audio"] if "audio" in features else []
        self.audio_key = audio_key or (audio_keys[0] if audio_keys else None)
        if self.audio_key not in features:
            raise PrecomputeError(f"tfds {name}: no Audio feature (features: {sorted(features)})")
        self.sample_rate = int(getattr(features[self.audio_key], "sample_rate", 0) or 0)
        texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
        self.caption_key = caption_key or ("caption" if "caption" in texts else (texts[0] if texts else None))
        self._features = features
        self._source = self.builder.as_data_source(split=split)
        self.name, self.split = name, split
        self.description = {"kind": "tfds", "name": name, "split": split, "data_dir": data_dir or ""}
        self.problems: list[Problem] = []
        self.entries = []
        for i in range(len(self._source)):
            self.entries.append(Entry(f"{name}/{split}/{i:09d}", str(i), "", {}))
        self._meta: dict[int, tuple[str, dict[str, Any]]] = {}

    def where(self, entry: Entry) -> str:
        return f"tfds:{self.name}/{self.split}[{entry.audio}]"

    def seconds(self, entry: Entry) -> float:
        return 0.0  # unknown until decoded; progress then counts files only

    def _describe(self, example: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        import tensorflow_datasets as tfds

        labels: dict[str, Any] = {}
        caption = ""
        for key, feature in self._features.items():
            if key in (self.audio_key, "sample_rate"):
                continue
            value = example[key]
            if isinstance(feature, tfds.features.ClassLabel):
                value = feature.int2str(int(value))
            elif isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
                value = value.item()
            if not isinstance(value, (str, int, float, bool)):
                continue
            if key == self.caption_key:
                caption = str(value)
            elif key == "labels_json":  # tfds_audio_folder keeps the folder's labels as JSON
                labels.update(json.loads(value))
            else:
                labels[key] = value
        return caption, labels

    def load(self, entry: Entry) -> tuple[np.ndarray, int]:
        example = self._source[int(entry.audio)]
        sample_rate = int(example.get("sample_rate", 0) or self.sample_rate)
        audio = np.asarray(example[self.audio_key])
        if audio.dtype.kind in "iu":
            audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
        audio = audio.astype(np.float32)
        audio = audio[None, :] if audio.ndim == 1 else audio.T  # TFDS Audio is [samples(, channels)]
        if audio.shape[1] == 0:
            raise AudioError("zero-length audio (0 samples)")
        if not np.isfinite(audio).all():
            raise AudioError(f"{int(np.size(audio) - np.count_nonzero(np.isfinite(audio)))} NaN/Inf samples")
        if not sample_rate:
            raise AudioError("no sample rate (neither the Audio feature nor a sample_rate feature has one)")
        self._meta[int(entry.audio)] = self._describe(example)
        return audio, sample_rate

    def describe(self, entry: Entry) -> tuple[str, dict[str, Any], str]:
        """(caption, labels, source id) of an example read by :meth:`load`."""
        caption, labels = self._meta.pop(int(entry.audio), ("", {}))
        return caption, labels, str(labels.pop("id", "") or entry.id)


# ---------------------------------------------------------------------------
# Codec


def load_codec(spec: str = "default"):
    """A codec from a flag value: a name for ``audiodiff_jax.codec.load_codec`` (``"default"``), or
    ``"module:attribute"`` naming a codec object or a function returning one."""
    if ":" in spec:
        module, attr = spec.split(":", 1)
        obj = getattr(importlib.import_module(module), attr)
        codec = obj if _is_codec(obj) else obj()
    else:
        codec = codec_lib.load_codec(spec)
    if not _is_codec(codec):
        raise PrecomputeError(
            f"--codec={spec!r} gave {type(codec).__name__}, which has no card/encode/decode"
        )
    return codec


def _is_codec(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("card", "encode", "decode")) and not isinstance(obj, type)


def _codec_card(codec) -> CodecCard:
    card = codec.card
    return card if isinstance(card, CodecCard) else CodecCard.from_dict(card)


# ---------------------------------------------------------------------------
# Plan


@dataclasses.dataclass(frozen=True)
class Plan:
    units: tuple[tuple[Entry, ...], ...]
    fingerprint: str

    def owner(self, unit: int, process_count: int) -> int:
        return unit % process_count


def make_plan(entries: Sequence[Entry], codec_card: CodecCard, files_per_shard: int, settings: dict) -> Plan:
    """Cuts entries (sorted by id) into units; the fingerprint covers everything a shard depends on."""
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard={files_per_shard} must be >= 1")
    entries = sorted(entries, key=lambda e: e.id)
    units = tuple(tuple(entries[i : i + files_per_shard]) for i in range(0, len(entries), files_per_shard))
    h = hashlib.sha256()
    h.update(json.dumps({"codec": codec_card.to_dict(), "settings": settings}, sort_keys=True).encode())
    for entry in entries:
        h.update(json.dumps(entry.to_json(), sort_keys=True, ensure_ascii=False).encode())
    return Plan(units, h.hexdigest())


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)  # readers see the whole file or none of it


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_plan(work: str, plan: Plan, num_units: int) -> None:
    path = os.path.join(work, _PLAN_FILE)
    if os.path.exists(path):
        old = _read_json(path)
        if old.get("fingerprint") != plan.fingerprint:
            raise PrecomputeError(
                f"{path}: an interrupted run with a different corpus, codec or settings left work here; "
                "rerun with the same inputs, or delete the output folder (or pass --overwrite)"
            )
        return
    _write_json(path, {"fingerprint": plan.fingerprint, "num_units": num_units})


# ---------------------------------------------------------------------------
# Encoding one unit


def _unit_dir(work: str, unit: int) -> str:
    return os.path.join(work, f"unit-{unit:05d}")


def _unit_report_path(work: str, unit: int) -> str:
    return os.path.join(work, f"unit-{unit:05d}.json")


def _encode(codec, audios: list[np.ndarray], sample_rate: int) -> list[Any]:
    """Latents (or the exception) per audio; a batch that fails is retried file by file."""
    batch_fn = getattr(codec, "encode_batch", None)
    if batch_fn is not None and len(audios) > 1:
        try:
            return list(batch_fn(audios, sample_rate))
        except Exception:  # noqa: BLE001 - find the file that broke the batch, one by one
            pass
    out = []
    for audio in audios:
        try:
            out.append(codec.encode(audio, sample_rate))
        except Exception as e:  # noqa: BLE001 - a codec failure on one file must not stop the run
            out.append(e)
    return out


def _load(corpus, entry: Entry, card: CodecCard):
    """(audio at the codec's rate and channels, original seconds, notes) or an AudioError."""
    try:
        audio, sr = corpus.load(entry)
        seconds = audio.shape[1] / sr
        audio, notes = audio_folder.conform(audio, sr, card.sample_rate, card.audio_channels)
        return audio, seconds, notes
    except AudioError as e:
        return e
    except Exception as e:  # noqa: BLE001 - an unexpected reader failure is still one bad file
        return AudioError(f"unreadable: {type(e).__name__}: {e}")


def encode_unit(
    corpus,
    unit: int,
    entries: Sequence[Entry],
    codec,
    work: str,
    *,
    process_index: int,
    batch_size: int,
    read_threads: int,
    latent_dtype: str,
    on_file=None,
) -> dict[str, Any]:
    """Encodes one unit into ``work/unit-UUUUU/`` and writes its report (the done mark); returns it."""
    card = _codec_card(codec)
    unit_dir = _unit_dir(work, unit)
    # The unit belongs to this process alone; whatever a killed attempt left is stale.
    shutil.rmtree(unit_dir, ignore_errors=True)
    os.makedirs(unit_dir)
    report: dict[str, Any] = {
        "unit": unit,
        "process_index": process_index,
        "ids": [],
        "skipped": [],
        "warnings": [],
        "audio_seconds": 0.0,
        "frames": 0,
    }
    start = time.time()
    writer = ShardWriter(unit_dir, card, num_shards=1, overwrite=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:
        # Reading and decoding (libsndfile releases the GIL) runs ahead of the codec.
        pending = [pool.submit(_load, corpus, e, card) for e in entries]
        for b in range(0, len(entries), batch_size):
            batch = list(zip(entries[b : b + batch_size], pending[b : b + batch_size], strict=True))
            loaded = [(entry, future.result()) for entry, future in batch]
            good = []
            for entry, result in loaded:
                if isinstance(result, AudioError):
                    report["skipped"].append(Problem(corpus.where(entry), str(result), "skipped").to_json())
                    if on_file:
                        on_file(0.0)
                else:
                    good.append((entry, result))
            latents_list = _encode(codec, [r[0] for _, r in good], card.sample_rate) if good else []
            for (entry, (_, seconds, notes)), latents in zip(good, latents_list, strict=True):
                where = corpus.where(entry)
                report["warnings"].extend(Problem(where, n, "warning").to_json() for n in notes)
                try:
                    if isinstance(latents, Exception):
                        raise AudioError(f"codec failed: {type(latents).__name__}: {latents}")
                    latents = np.asarray(latents)
                    if latents.ndim != 2 or latents.shape[1] != card.latent_channels or latents.shape[0] < 1:
                        raise AudioError(
                            f"codec returned latents of shape {latents.shape}, "
                            f"expected [frames >= 1, {card.latent_channels}]"
                        )
                    if not np.isfinite(latents).all():
                        raise AudioError("codec returned NaN/Inf latents")
                    caption, labels, source_id = entry.caption, dict(entry.labels), entry.id
                    if hasattr(corpus, "describe"):  # TFDS: known once the example is read
                        caption, labels, source_id = corpus.describe(entry)
                    total = entry.seconds_total if entry.seconds_total is not None else seconds
                    writer.add(
                        {
                            "latents": latents.astype(latent_dtype),
                            "caption": caption,
                            "seconds_start": float(entry.seconds_start),
                            "seconds_total": float(max(total, entry.seconds_start)),
                            "source_id": source_id,
                            "labels": labels,
                        }
                    )
                except (AudioError, ValueError) as e:  # ShardError is a ValueError
                    report["skipped"].append(Problem(where, str(e), "skipped").to_json())
                    if on_file:
                        on_file(seconds)
                    continue
                report["ids"].append(entry.id)
                report["audio_seconds"] += seconds
                report["frames"] += int(latents.shape[0])
                if on_file:
                    on_file(seconds)
    if report["ids"]:
        writer.close()
    else:
        writer.abort()
    report["wall_seconds"] = round(time.time() - start, 3)
    _write_json(_unit_report_path(work, unit), report)
    return report


# ---------------------------------------------------------------------------
# Merge


def _combine_stats(cards: Sequence[DatasetCard]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and population std over several cards (Chan et al. pairwise, float64)."""
    count, mean, m2 = 0, None, None
    for card in cards:
        n_b = card.total_frames
        mean_b = np.asarray(card.latent_mean, np.float64)
        m2_b = np.square(np.asarray(card.latent_std, np.float64)) * n_b
        if mean is None:
            count, mean, m2 = n_b, mean_b, m2_b
            continue
        n = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / n)
        m2 = m2 + m2_b + np.square(delta) * (count * n_b / n)
        count = n
    return mean, np.sqrt(m2 / max(count, 1)), count


def merge(
    out_dir: str,
    plan: Plan,
    card: CodecCard,
    *,
    scan_problems: Sequence[Problem],
    metadata: dict[str, Any],
    wait_timeout_s: float,
) -> tuple[DatasetCard, dict[str, Any]]:
    """Waits for every unit report, moves the shards into place, writes summary and card."""
    work = os.path.join(out_dir, WORK_DIR)
    deadline = time.time() + wait_timeout_s
    reports = []
    for unit in range(len(plan.units)):
        path = _unit_report_path(work, unit)
        while not os.path.exists(path):
            if time.time() > deadline:
                raise PrecomputeError(
                    f"waited {wait_timeout_s:.0f} s for {path} (unit {unit} is not done); rerun the "
                    "process that owns it (unit % process_count), then process 0 again"
                )
            time.sleep(0.2)
        reports.append(_read_json(path))
    full = [r for r in reports if r["ids"]]
    if not full:
        raise PrecomputeError(f"{out_dir}: no file of the corpus could be encoded; see {SUMMARY_FILE}")
    names = [shard_file_name(i, len(full)) for i in range(len(full))]
    unit_cards = []
    for report in full:
        unit_cards.append(DatasetCard.load(_unit_dir(work, report["unit"])))
    # Leftovers of another dataset (or of an older plan) must not sit beside ours.
    for name in os.listdir(out_dir):
        if name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX) and name not in names:
            os.remove(os.path.join(out_dir, name))
    shards = []
    for report, name, ucard in zip(full, names, unit_cards, strict=True):
        src = os.path.join(_unit_dir(work, report["unit"]), _UNIT_SHARD)
        dst = os.path.join(out_dir, name)
        if os.path.exists(src):
            os.replace(src, dst)
        elif not os.path.exists(dst):
            raise PrecomputeError(
                f"{src}: shard of a finished unit is missing; delete "
                f"{_unit_report_path(work, report['unit'])} and rerun"
            )
        shards.append(ShardInfo(name, ucard.num_records))
    mean, std, frames = _combine_stats(unit_cards)
    skipped = [p.to_json() for p in scan_problems if p.severity == "skipped"]
    warnings = [p.to_json() for p in scan_problems if p.severity == "warning"]
    for report in reports:
        skipped.extend(report["skipped"])
        warnings.extend(report["warnings"])
    num_records = sum(s.num_records for s in shards)
    summary = {
        "out_dir": os.path.abspath(out_dir),
        "num_files": sum(len(u) for u in plan.units),
        "num_records": num_records,
        "num_shards": len(shards),
        "audio_hours": sum(r["audio_seconds"] for r in reports) / 3600.0,
        "total_frames": frames,
        "num_skipped": len(skipped),
        "num_warnings": len(warnings),
        "skipped": skipped,
        "warnings": warnings,
        "units": [
            {k: r[k] for k in ("unit", "process_index", "ids", "audio_seconds", "wall_seconds")}
            for r in reports
        ],
    }
    _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    dataset_card = DatasetCard(
        codec=card,
        latent_mean=tuple(float(v) for v in mean),
        latent_std=tuple(float(v) for v in std),
        shards=tuple(shards),
        num_records=num_records,
        total_frames=int(frames),
        metadata={**metadata, "num_files": summary["num_files"], "num_skipped": len(skipped)},
    )
    dataset_card.save(out_dir)  # last: a folder with a card is complete
    return dataset_card, summary


# ---------------------------------------------------------------------------
# The program


def precompute(
    corpus,
    out_dir: str,
    codec,
    *,
    files_per_shard: int = 64,
    process_index: int = 0,
    process_count: int = 1,
    batch_size: int = 1,
    read_threads: int = 4,
    latent_dtype: str = "float32",
    tokenizer_vocab_size: int = 0,
    overwrite: bool = False,
    wait_timeout_s: float = 24 * 3600.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Encodes this process's share of a corpus; process 0 also merges. Returns a summary dict.

    Args:
      corpus: a :class:`FolderCorpus` or :class:`TfdsCorpus` (anything with ``entries``,
        ``problems``, ``where``, ``seconds``, ``load``, ``description``).
      out_dir: the dataset folder (shared by all processes).
      codec: a Codec (``audiodiff_jax.codec.interface``).
      files_per_shard: files per unit (= per shard).
      process_index / process_count: this process's place; unit u is done by u % count.
      batch_size: files per codec call (used when the codec has ``encode_batch``).
      read_threads: audio files read and decoded ahead of the codec.
      latent_dtype: ``float32`` or ``float16`` in the records.
      tokenizer_vocab_size: > 0: train a caption tokenizer and record it in the card.
      overwrite: replace a finished or half-done dataset in ``out_dir`` (one process only).
      wait_timeout_s: how long process 0 waits for other processes' units.
      progress: show a tqdm bar.

    Returns:
      The summary (``precompute_summary.json`` for process 0 once complete; for
      other processes, their own units' counts).
    """
    from tqdm import tqdm

    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if latent_dtype not in ("float32", "float16"):
        raise ValueError(f"latent_dtype={latent_dtype!r}: use float32 or float16")
    batch_size = max(1, int(batch_size))
    card = _codec_card(codec)
    work = os.path.join(out_dir, WORK_DIR)
    if overwrite:
        if process_count > 1:
            raise ValueError("overwrite=True with several processes would race; clear the folder first")
        for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
            if name == WORK_DIR or name in (CARD_FILE, SUMMARY_FILE) or name.startswith(SHARD_PREFIX):
                path = os.path.join(out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    card_path = os.path.join(out_dir, CARD_FILE)
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    if os.path.exists(card_path) and os.path.exists(summary_path):
        summary = _read_json(summary_path)
        if process_index == 0:
            _finish(out_dir, tokenizer_vocab_size)
        summary["already_complete"] = True
        return summary
    settings = {"files_per_shard": files_per_shard, "latent_dtype": latent_dtype}
    plan = make_plan(corpus.entries, card, files_per_shard, settings)
    os.makedirs(work, exist_ok=True)
    _check_plan(work, plan, len(plan.units))
    mine = [u for u in range(len(plan.units)) if plan.owner(u, process_count) == process_index]
    todo = [u for u in mine if not os.path.exists(_unit_report_path(work, u))]
    files = sum(len(plan.units[u]) for u in todo)
    seconds = [corpus.seconds(e) for u in todo for e in plan.units[u]]
    total_seconds = sum(seconds)
    start = time.time()
    done = {"files": 0, "seconds": 0.0}
    by_seconds = total_seconds > 0
    bar = tqdm(
        total=total_seconds if by_seconds else files,
        disable=not progress,
        desc=f"precompute p{process_index}/{process_count}",
        unit="s audio" if by_seconds else "file",
        bar_format="{desc}: {percentage:3.0f}%|{bar}|{postfix} [{elapsed}<{remaining}]",
        file=sys.stderr,
    )

    def on_file(file_seconds: float) -> None:
        done["files"] += 1
        done["seconds"] += file_seconds
        bar.set_postfix_str(
            f"{done['files']}/{files} files, {done['seconds'] / 3600:.2f}/{total_seconds / 3600:.2f} h audio",
            refresh=False,
        )
        bar.update(file_seconds if by_seconds else 1)

    reports = []
    try:
        for unit in todo:
            reports.append(
                encode_unit(
                    corpus,
                    unit,
                    plan.units[unit],
                    codec,
                    work,
                    process_index=process_index,
                    batch_size=batch_size,
                    read_threads=read_threads,
                    latent_dtype=latent_dtype,
                    on_file=on_file,
                )
            )
    finally:
        bar.close()
    elapsed = time.time() - start
    mine_summary = {
        "process_index": process_index,
        "units_done_now": [r["unit"] for r in reports],
        "units_skipped_as_done": [u for u in mine if u not in todo],
        "files": sum(len(r["ids"]) for r in reports),
        "audio_seconds": sum(r["audio_seconds"] for r in reports),
        "elapsed_s": elapsed,
        "audio_seconds_per_second": sum(r["audio_seconds"] for r in reports) / max(elapsed, 1e-9),
        "skipped": [p for r in reports for p in r["skipped"]],
    }
    if process_index != 0:
        return mine_summary
    metadata = {
        "generator": "data_pipeline.precompute",
        "corpus": corpus.description,
        "files_per_shard": files_per_shard,
        "latent_dtype": latent_dtype,
    }
    _, summary = merge(
        out_dir, plan, card, scan_problems=corpus.problems, metadata=metadata, wait_timeout_s=wait_timeout_s
    )
    summary["this_process"] = mine_summary
    _finish(out_dir, tokenizer_vocab_size)
    return summary


def _finish(out_dir: str, tokenizer_vocab_size: int) -> None:
    """After the card: the tokenizer (if asked and missing), then the work folder goes."""
    if tokenizer_vocab_size > 0 and not DatasetCard.load(out_dir).tokenizer:
        tokenizer.train_for_dataset(out_dir, tokenizer_vocab_size)
    shutil.rmtree(os.path.join(out_dir, WORK_DIR), ignore_errors=True)


def format_summary(summary: dict[str, Any], max_lines: int = 50) -> str:
    """The end-of-run report: counts, then every skipped file and warning with its reason."""
    if "num_records" not in summary:  # a non-zero process: its own share only
        lines = [
            f"process {summary['process_index']}: encoded {summary['files']} files "
            f"({summary['audio_seconds'] / 3600:.3f} h audio) in {summary['elapsed_s']:.1f} s "
            f"({summary['audio_seconds_per_second']:.1f} audio s/s); units {summary['units_done_now']}, "
            f"already done {summary['units_skipped_as_done']}; process 0 merges"
        ]
        problems = summary["skipped"]
    else:
        head = "already complete: " if summary.get("already_complete") else ""
        lines = [
            f"{head}{summary['num_records']} records from {summary['num_files']} files "
            f"({summary['audio_hours']:.3f} h audio, {summary['total_frames']} latent frames) in "
            f"{summary['num_shards']} shards -> {summary['out_dir']}",
            f"skipped {summary['num_skipped']}, warnings {summary['num_warnings']} (all in {SUMMARY_FILE})",
        ]
        this = summary.get("this_process")
        if this:
            lines.append(
                f"this process: {this['files']} files in {this['elapsed_s']:.1f} s "
                f"({this['audio_seconds_per_second']:.1f} audio s/s)"
            )
        problems = summary["skipped"] + summary["warnings"]
    for p in problems[:max_lines]:
        lines.append(f"  {p['severity']:8s} {p['path']}: {p['reason']}")
    if len(problems) > max_lines:
        lines.append(f"  ... {len(problems) - max_lines} more")
    return "\n".join(lines)


def run() -> None:
    """Console entry point ``audiodiff-precompute``."""
    from absl import app, flags

    flags.DEFINE_string("corpus", None, "audio folder (manifest.jsonl, captions.jsonl/.csv, or file names)")
    flags.DEFINE_string("captions", None, "caption file (JSONL/CSV) if not in the folder")
    flags.DEFINE_string("tfds", None, "TFDS dataset name (instead of --corpus), e.g. my_audio/1.0.0")
    flags.DEFINE_string("tfds_split", "train", "TFDS split")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir")
    flags.DEFINE_string("tfds_audio_key", None, "Audio feature (default: the first one)")
    flags.DEFINE_string("tfds_caption_key", None, "Text feature holding the caption (default: the first)")
    flags.DEFINE_string("out_dir", None, "latent dataset folder (shared by all processes)", required=True)
    flags.DEFINE_string(
        "codec", "default", "codec name for audiodiff_jax.codec.load_codec, or module:factory"
    )
    flags.DEFINE_integer("files_per_shard", 64, "files per work unit and shard")
    flags.DEFINE_integer("process_index", 0, "this process (0 merges)")
    flags.DEFINE_integer("process_count", 1, "processes sharing the work")
    flags.DEFINE_bool("distributed", False, "take process index/count from jax.distributed.initialize()")
    flags.DEFINE_integer(
        "batch_size", 0, "files per codec call; 0 = jax.local_device_count() if the codec batches"
    )
    flags.DEFINE_integer("read_threads", 4, "audio files decoded ahead of the codec")
    flags.DEFINE_enum("latent_dtype", "float32", ["float32", "float16"], "latent dtype in the records")
    flags.DEFINE_integer(
        "tokenizer_vocab_size", 512, "train a caption tokenizer of at most this size (0: no)"
    )
    flags.DEFINE_bool("overwrite", False, "replace what is in --out_dir (single process only)")
    flags.DEFINE_float("wait_timeout_s", 24 * 3600.0, "how long process 0 waits for the other processes")
    flags.DEFINE_bool("progress", True, "show a progress bar")

    def main(argv):
        del argv
        f = flags.FLAGS
        if (f.corpus is None) == (f.tfds is None):
            raise app.UsageError("give exactly one of --corpus and --tfds")
        index, count = f.process_index, f.process_count
        if f.distributed:
            import jax

            jax.distributed.initialize()
            index, count = jax.process_index(), jax.process_count()
        codec = load_codec(f.codec)
        batch = f.batch_size
        if batch <= 0:
            batch = 1
            if hasattr(codec, "encode_batch"):
                import jax

                batch = jax.local_device_count()
        if f.corpus is not None:
            corpus = FolderCorpus(f.corpus, f.captions)
        else:
            corpus = TfdsCorpus(f.tfds, f.tfds_split, f.tfds_data_dir, f.tfds_audio_key, f.tfds_caption_key)
        summary = precompute(
            corpus,
            f.out_dir,
            codec,
            files_per_shard=f.files_per_shard,
            process_index=index,
            process_count=count,
            batch_size=batch,
            read_threads=f.read_threads,
            latent_dtype=f.latent_dtype,
            tokenizer_vocab_size=f.tokenizer_vocab_size,
            overwrite=f.overwrite,
            wait_timeout_s=f.wait_timeout_s,
            progress=f.progress,
        )
        print(format_summary(summary))

    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
