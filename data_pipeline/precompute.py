r"""Latent precompute: a corpus of audio -> codec latents in ArrayRecord shards + dataset card.

The same command on every host (or process)::

    audiodiff-precompute --corpus=/data/scores --out_dir=/data/latents/scores \
        [--codec=default] [--files_per_shard=64]

For data that trains on top of an existing model (adapters, ``train.init_from``),
``--like=BASE`` (a run, checkpoint step or export) encodes with the codec the base's
data was encoded with and gives the dataset the base's latent statistics and tokenizer
(:func:`adopt_base_card`), so the base sees the new latents and captions as it saw its
own. A folder with no usable audio stops with one line and nothing written.

Each process takes its index and count from its launcher (``launch.local``, SLURM, a
TPU VM's worker id; ``--distributed=on`` asks jax.distributed) unless
``--process_index``/``--process_count`` are given.

The corpus is an audio folder (``data_pipeline/audio_folder.py``: a corpus
builder's ``manifest.jsonl``, caption JSONL/CSV, or captions from file names) or a
TFDS audio dataset (``--tfds=NAME``).

How the work is cut, so that it is resumable and splits across processes:

1. **Plan.** Every process lists the corpus the same way (entries sorted by id) and
   cuts it into *units* of ``files_per_shard`` consecutive entries; unit ``u`` belongs
   to process ``u % process_count``. The plan depends on the corpus, the codec card
   and the settings, never on the process count, so any split yields the same
   shards. Its fingerprint (codec card, settings, every entry, and each file's size
   and mtime) is stored in ``OUT/.work/plan.json``; resuming interrupted work against
   a changed corpus is refused.
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
4. **Reruns.** The summary keeps the plan's fingerprint and each file's. A rerun
   over an unchanged corpus says "already complete"; over a changed one (files or
   caption rows added, changed or removed; another ``files_per_shard``) it updates
   the dataset: records of unchanged files are copied from the old shards, new and
   changed files are encoded, and the summary lists what was new, changed and
   removed. The result is byte for byte the dataset a run from scratch would make.
   A dataset made with another codec, ``latent_dtype`` or corpus is not updated:
   the run stops and names the difference (``--overwrite`` replaces it).

The folder must be shared by all processes: a local disk, NFS, or a ``gs://`` path.
In a bucket, where a rename is a copy, the JSON files are written in one upload each
(an object appears whole or not at all), and a unit's shard is written on local disk
(ArrayRecord writes local files) and uploaded before its report. Bad input never
stops the run: each bad file is reported with its path and reason in the summary
(see ``audio_folder.Problem``).

A codec is anything with the ``audiodiff_jax.codec.interface.Codec`` methods; if it
also has ``encode_batch(list_of_audio, sample_rate) -> list_of_latents``, files are
given to it ``batch_size`` at a time (one per local device, for example).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from audiodiff_jax.checkpoints import source
from audiodiff_jax.codec import lookup
from audiodiff_jax.core import distributed, music, paths
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.data.cards import CARD_FILE, CodecCard, DatasetCard, ShardError, ShardInfo
from audiodiff_jax.data.records import SHARD_PREFIX, SHARD_SUFFIX, ShardSource, read_captions, shard_file_name
from audiodiff_jax.programs import cli
from data_pipeline import audio_folder, tokenizer
from data_pipeline.audio_folder import AudioError, Problem
from data_pipeline.manifest import Entry
from data_pipeline.shards import ShardWriter

WORK_DIR = ".work"
SUMMARY_FILE = "precompute_summary.json"
_PLAN_FILE = "plan.json"
_UNIT_SHARD = shard_file_name(0, 1)


class PrecomputeError(UserError, RuntimeError):
    """The run cannot go on (changed corpus, missing unit, timeout); the message says what to do."""


def _digest(data: Any) -> str:
    # ensure_ascii: a file name that is not UTF-8 (surrogate escapes) still hashes.
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:24]


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

    def fingerprint(self, entry: Entry) -> str:
        """What the entry's record depends on: its caption row and its file's size and mtime.

        Size and mtime (as make and rsync do) rather than a content hash: a rerun must
        not read every file of a large corpus to find the few that changed.
        """
        try:
            st = os.stat(self.where(entry))
            state: list[Any] = [st.st_size, st.st_mtime_ns]
        except OSError as e:
            state = [type(e).__name__, e.errno]
        return _digest({"entry": entry.to_json(), "file": state})


class TfdsCorpus:
    """A TFDS dataset with an Audio feature, read by random access (ArrayRecord, no TensorFlow).

    Captions come from ``caption_key`` (a Text feature, or a ClassLabel whose name
    is used); every other scalar feature becomes a label. Ids are ``NAME/SPLIT/INDEX``.
    Datasets built by ``data_pipeline/tfds_audio_folder.py`` also bring the problems
    of their build (files left out, caption rows), which precompute reports as its
    own, and the path of each example's file, which names it in the summary.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        audio_key: str | None = None,
        caption_key: str | None = None,
    ):
        # Here, not at the top: tensorflow_datasets is a heavy import that folder corpora never need.
        import tensorflow_datasets as tfds

        self._tfds = tfds
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
        texts = [k for k in texts if k not in ("id", "file", "labels_json")] or texts
        self.caption_key = caption_key or ("caption" if "caption" in texts else (texts[0] if texts else None))
        self._features = features
        self._source = self.builder.as_data_source(split=split)
        self.name, self.split = name, split
        self.description = {"kind": "tfds", "name": name, "split": split, "data_dir": data_dir or ""}
        metadata = self.builder.info.metadata or {}
        self.problems: list[Problem] = [Problem(**p) for p in metadata.get("problems", [])]
        self.entries = []
        for i in range(len(self._source)):
            self.entries.append(Entry(f"{name}/{split}/{i:09d}", str(i), "", {}))
        self._meta: dict[int, tuple[str, dict[str, Any]]] = {}
        self._files: dict[int, str] = {}
        self._identity = self._dataset_identity()

    def _dataset_identity(self) -> str:
        """The dataset's name, version and files (names, sizes, mtimes): a rebuilt dataset differs."""
        files: list[Any] = []
        try:
            data_dir = os.fspath(self.builder.data_dir)
            for name in sorted(os.listdir(data_dir)):
                st = os.stat(os.path.join(data_dir, name))
                files.append([name, st.st_size, st.st_mtime_ns])
        except (OSError, TypeError):  # a remote data_dir: the name, version and size stand for it
            files = []
        return _digest(
            {"name": self.builder.info.full_name, "split": self.split, "n": len(self.entries), "files": files}
        )

    def where(self, entry: Entry) -> str:
        index = int(entry.audio)
        return self._files.get(index) or f"tfds:{self.name}/{self.split}[{entry.audio}]"

    def seconds(self, entry: Entry) -> float:
        return 0.0  # unknown until decoded; progress then counts files only

    def fingerprint(self, entry: Entry) -> str:
        """Examples have no files of their own: the dataset's identity stands for each of them."""
        return _digest({"entry": entry.to_json(), "dataset": self._identity})

    def _describe(self, example: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        labels: dict[str, Any] = {}
        caption = ""
        for key, feature in self._features.items():
            if key in (self.audio_key, "sample_rate", "file"):
                continue
            value = example[key]
            if isinstance(feature, self._tfds.features.ClassLabel):
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
        index = int(entry.audio)
        example = self._source[index]
        if "file" in example:
            file = example["file"]
            self._files[index] = file.decode("utf-8", "replace") if isinstance(file, bytes) else str(file)
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
        self._meta[index] = self._describe(example)
        return audio, sample_rate

    def describe(self, entry: Entry) -> tuple[str, dict[str, Any], str]:
        """(caption, labels, source id) of an example read by :meth:`load`."""
        caption, labels = self._meta.pop(int(entry.audio), ("", {}))
        return caption, labels, str(labels.pop("id", "") or entry.id)


# ---------------------------------------------------------------------------
# Codec


def load_codec(spec: str = "default"):
    """A codec from the ``--codec`` flag (:func:`audiodiff_jax.codec.lookup.codec_by_name`): a
    shipped name (``"default"``), a codec folder or workdir, or ``"module:attribute"`` naming
    a codec object or a function returning one (the user typed it, so it may name code)."""
    return lookup.codec_by_name(spec, allow_code=True)


def codec_card(codec) -> CodecCard:
    """The codec's card as a CodecCard (codecs may give a dict)."""
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


def make_plan(
    entries: Sequence[Entry],
    codec_card: CodecCard,
    files_per_shard: int,
    settings: dict,
    fingerprints: Mapping[str, str] | None = None,
) -> Plan:
    """Cuts entries (sorted by id) into units; the fingerprint covers everything a shard depends on:
    the codec, the settings, every entry and (``fingerprints``, by id) the state of its file."""
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard={files_per_shard} must be >= 1")
    entries = sorted(entries, key=lambda e: e.id)
    units = tuple(tuple(entries[i : i + files_per_shard]) for i in range(0, len(entries), files_per_shard))
    h = hashlib.sha256()
    h.update(json.dumps({"codec": codec_card.to_dict(), "settings": settings}, sort_keys=True).encode())
    for entry in entries:
        h.update(json.dumps(entry.to_json(), sort_keys=True).encode())
        h.update((fingerprints or {}).get(entry.id, "").encode())
    return Plan(units, h.hexdigest())


def _exists(path: str) -> bool:
    return epath.Path(path).exists()  # local or gs://


def _write_json(path: str, data: Any) -> None:
    text = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    paths.atomic_write(path, text.encode("utf-8"))  # readers see the whole file or none of it


def _read_json(path: str) -> Any:
    with epath.Path(path).open(encoding="utf-8") as f:
        return json.load(f)


def _check_plan(work: str, plan: Plan, num_units: int, incremental: dict[str, Any] | None) -> None:
    """Records the plan (and what an incremental run found changed), or refuses another plan's work."""
    path = os.path.join(work, _PLAN_FILE)
    if _exists(path):
        old = _read_json(path)
        if old.get("fingerprint") != plan.fingerprint:
            raise PrecomputeError(
                f"{path}: an interrupted run with a different corpus, codec or settings left work here; "
                f"rerun with the same inputs, or delete {work} to start this run over (a finished dataset "
                "beside it is kept), or pass --overwrite to replace everything"
            )
        return
    _write_json(path, {"fingerprint": plan.fingerprint, "num_units": num_units, "incremental": incremental})


# ---------------------------------------------------------------------------
# A finished dataset already in the output folder


@dataclasses.dataclass
class Previous:
    """A finished dataset in ``out_dir``: its card, summary, and the records a rerun can reuse."""

    card: DatasetCard
    summary: dict[str, Any]
    records: dict[str, tuple[int, float]]  # id -> (record index, seconds of audio)
    fingerprints: dict[str, str]  # id -> fingerprint of every file it was made from (bad ones too)


def previous_dataset(out_dir: str) -> Previous | None:
    """The finished dataset in ``out_dir`` (card and summary both there), or None."""
    card_path, summary_path = os.path.join(out_dir, CARD_FILE), os.path.join(out_dir, SUMMARY_FILE)
    if not (_exists(card_path) and _exists(summary_path)):
        return None
    card = DatasetCard.load(out_dir)
    summary = _read_json(summary_path)
    offsets, start = {}, 0
    for shard in card.shards:
        offsets[shard.file] = start
        start += shard.num_records
    records = {}
    for unit in summary.get("units", []):
        if unit.get("shard") in offsets and len(unit.get("seconds", ())) == len(unit["ids"]):
            for j, (clip_id, seconds) in enumerate(zip(unit["ids"], unit["seconds"], strict=True)):
                records[clip_id] = (offsets[unit["shard"]] + j, float(seconds))
    return Previous(card, summary, records, dict(summary.get("fingerprints", {})))


def _incompatible(previous: Previous, card: CodecCard, corpus, latent_dtype: str) -> str | None:
    """Why the dataset in the folder cannot be updated in place (its records are not reusable), or None."""
    meta = previous.card.metadata
    if previous.card.codec.to_dict() != card.to_dict():
        return f"codec {previous.card.codec.name!r} ({previous.card.codec.to_dict()}), not {card.to_dict()}"
    if meta.get("corpus") != corpus.description:
        return f"corpus {meta.get('corpus')}, not {corpus.description}"
    if meta.get("latent_dtype") != latent_dtype:
        return f"latent_dtype {meta.get('latent_dtype')!r}, not {latent_dtype!r}"
    return None


def _changes(
    previous: Previous, fingerprints: Mapping[str, str], settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[int, float]]]:
    """What differs from the previous dataset, and the records of unchanged files (id -> index, seconds)."""
    old = previous.fingerprints
    unchanged = [i for i, fp in fingerprints.items() if old.get(i) == fp]
    reuse = {i: previous.records[i] for i in unchanged if i in previous.records}
    info: dict[str, Any] = {
        "new": sorted(i for i in fingerprints if i not in old),
        "changed": sorted(i for i, fp in fingerprints.items() if i in old and old[i] != fp),
        "removed": sorted(i for i in old if i not in fingerprints),
        "unchanged": len(unchanged),
        "previous_records": previous.card.num_records,
    }
    meta = previous.card.metadata
    changed_settings = {k: [meta.get(k), v] for k, v in settings.items() if meta.get(k) != v}
    if changed_settings:
        info["settings"] = changed_settings
    if not old:
        info["note"] = "the dataset here records no file fingerprints (an older precompute): all re-encoded"
    return info, reuse


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


@dataclasses.dataclass(frozen=True)
class _Reused:
    """A record of an unchanged file, read back from the dataset being updated."""

    record: dict[str, Any]
    seconds: float


def _read_previous(previous: ShardSource | None, reuse: Mapping[str, tuple[int, float]], entry: Entry):
    """The entry's record in the previous dataset, or None (then the file is encoded again)."""
    if previous is None or entry.id not in reuse:
        return None
    index, seconds = reuse[entry.id]
    try:
        record = previous[index]
    except (ShardError, IndexError):  # a damaged old shard: encode the file again instead
        return None
    record.pop("record_index", None)
    return _Reused(record, seconds)


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
    reuse: Mapping[str, tuple[int, float]] | None = None,
    previous: ShardSource | None = None,
) -> dict[str, Any]:
    """Encodes one unit into ``work/unit-UUUUU/`` and writes its report (the done mark); returns it.

    Entries in ``reuse`` (id -> record index in ``previous``, seconds) are unchanged
    files of the dataset being updated: their records are copied, not encoded again.
    Records are written in entry order either way, so the unit is the same bytes as
    in a run from scratch.
    """
    card = codec_card(codec)
    reuse = reuse or {}
    unit_dir = _unit_dir(work, unit)
    # The unit belongs to this process alone; whatever a killed attempt left is stale.
    epath.Path(unit_dir).rmtree(missing_ok=True)
    # ArrayRecord writes local files: a unit in a bucket is made here and uploaded.
    local_dir = tempfile.mkdtemp(prefix="audiodiff-unit-") if paths.is_remote(unit_dir) else unit_dir
    os.makedirs(local_dir, exist_ok=True)
    report: dict[str, Any] = {
        "unit": unit,
        "process_index": process_index,
        "ids": [],
        "seconds": [],
        "skipped": [],
        "warnings": [],
        "audio_seconds": 0.0,
        "frames": 0,
        "reused": 0,
        "labels": music.new_tally(),  # the musical labels kept (core/music.py), for the card
    }
    start = time.time()
    writer = ShardWriter(local_dir, card, num_shards=1, overwrite=True)

    def kept(entry: Entry, seconds: float, frames: int) -> None:
        report["ids"].append(entry.id)
        report["seconds"].append(seconds)
        report["audio_seconds"] += seconds
        report["frames"] += frames
        if on_file:
            on_file(seconds)

    def skipped(entry: Entry, reason: str, seconds: float = 0.0) -> None:
        report["skipped"].append(Problem(corpus.where(entry), reason, "skipped").to_json())
        if on_file:
            on_file(seconds)

    with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:
        # Reading and decoding (libsndfile releases the GIL) runs ahead of the codec.
        pending = [None if e.id in reuse else pool.submit(_load, corpus, e, card) for e in entries]
        for b in range(0, len(entries), batch_size):
            loaded = []
            for entry, future in zip(entries[b : b + batch_size], pending[b : b + batch_size], strict=True):
                result = future.result() if future is not None else _read_previous(previous, reuse, entry)
                loaded.append((entry, _load(corpus, entry, card) if result is None else result))
            todo = [(entry, r) for entry, r in loaded if isinstance(r, tuple)]
            latents_list = _encode(codec, [r[0] for _, r in todo], card.sample_rate) if todo else []
            encoded = iter(latents_list)  # in the order of `todo`, which is the order of `loaded`
            for entry, result in loaded:
                if isinstance(result, AudioError):
                    skipped(entry, str(result))
                    continue
                if isinstance(result, _Reused):
                    writer.add(result.record)
                    music.add_to_tally(report["labels"], result.record.get("labels"))
                    report["reused"] += 1
                    kept(entry, result.seconds, int(result.record["latents"].shape[0]))
                    continue
                _, seconds, notes = result
                latents = next(encoded)
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
                    music.add_to_tally(report["labels"], labels)
                except (AudioError, ValueError) as e:  # ShardError is a ValueError
                    skipped(entry, str(e), seconds)
                    continue
                kept(entry, seconds, int(latents.shape[0]))
    if report["ids"]:
        writer.close()
    else:
        writer.abort()
    if local_dir != unit_dir:
        for name in sorted(os.listdir(local_dir)):  # before the report, the unit's done mark
            epath.Path(local_dir, name).copy(epath.Path(unit_dir, name), overwrite=True)
        shutil.rmtree(local_dir)
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
    fingerprints: Mapping[str, str] | None = None,
) -> tuple[DatasetCard, dict[str, Any]]:
    """Waits for every unit report, moves the shards into place, writes summary and card.

    A dataset already in ``out_dir`` (one this run updates) stops being complete first:
    its card goes before any shard is touched, so a crash in between leaves a folder a
    rerun finishes, never an old card over new shards.
    """
    work = os.path.join(out_dir, WORK_DIR)
    deadline = time.time() + wait_timeout_s
    reports = []
    for unit in range(len(plan.units)):
        path = _unit_report_path(work, unit)
        while not _exists(path):
            if time.time() > deadline:
                raise PrecomputeError(
                    f"waited {wait_timeout_s:.0f} s for {path} (unit {unit} is not done); rerun the "
                    "process that owns it (unit % process_count), then process 0 again"
                )
            time.sleep(0.2)
        reports.append(_read_json(path))
    full = [r for r in reports if r["ids"]]
    if not full:
        # Nothing usable: the work folder goes, and the dataset folder if this run made it.
        problems = [Problem(**p) for r in reports for p in r["skipped"]] + list(scan_problems)
        epath.Path(work).rmtree(missing_ok=True)
        if epath.Path(out_dir).is_dir() and not any(epath.Path(out_dir).iterdir()):
            epath.Path(out_dir).rmdir()
        raise PrecomputeError(
            f"{out_dir}: no usable audio, no file could be encoded: {_problems_line(problems)}"
        )
    names = [shard_file_name(i, len(full)) for i in range(len(full))]
    unit_cards = []
    for report in full:
        unit_cards.append(DatasetCard.load(_unit_dir(work, report["unit"])))
    for name in (CARD_FILE, SUMMARY_FILE):
        epath.Path(out_dir, name).unlink(missing_ok=True)
    # Leftovers of another dataset (or of an older plan) must not sit beside ours.
    for path in epath.Path(out_dir).iterdir():
        if path.name.startswith(SHARD_PREFIX) and path.name.endswith(SHARD_SUFFIX) and path.name not in names:
            path.unlink()
    shards = []
    shard_of = {}
    for report, name, ucard in zip(full, names, unit_cards, strict=True):
        shard_of[report["unit"]] = name
        src = os.path.join(_unit_dir(work, report["unit"]), _UNIT_SHARD)
        dst = os.path.join(out_dir, name)
        if _exists(src):
            epath.Path(src).replace(dst)  # in a bucket: a copy, then the source goes
        elif not _exists(dst):
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
    incremental = _read_json(os.path.join(work, _PLAN_FILE)).get("incremental")
    if incremental is not None:
        incremental = {**incremental, "reused": sum(r.get("reused", 0) for r in reports)}
    summary = {
        "out_dir": out_dir if paths.is_remote(out_dir) else os.path.abspath(out_dir),
        "num_files": sum(len(u) for u in plan.units),
        "num_records": num_records,
        "num_shards": len(shards),
        "audio_hours": sum(r["audio_seconds"] for r in reports) / 3600.0,
        "total_frames": frames,
        "num_skipped": len(skipped),
        "num_warnings": len(warnings),
        "skipped": skipped,
        "warnings": warnings,
        "incremental": incremental,
        "units": [
            {
                **{
                    k: r.get(k)
                    for k in ("unit", "process_index", "ids", "seconds", "audio_seconds", "wall_seconds")
                },
                "shard": shard_of.get(r["unit"]),
            }
            for r in reports
        ],
        # What the next run compares against: it encodes only what differs.
        "plan_fingerprint": plan.fingerprint,
        "fingerprints": dict(sorted((fingerprints or {}).items())),
    }
    _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    dataset_card = DatasetCard(
        codec=card,
        latent_mean=tuple(float(v) for v in mean),
        latent_std=tuple(float(v) for v in std),
        shards=tuple(shards),
        num_records=num_records,
        total_frames=int(frames),
        metadata={
            **metadata,
            "num_files": summary["num_files"],
            "num_skipped": len(skipped),
            # What the records' labels hold (musical controls, model.controls): sampling
            # warns of a tempo, key or meter the model never saw.
            "labels": music.merge_tallies(r.get("labels", music.new_tally()) for r in reports),
        },
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
    if not corpus.entries:  # before anything is written
        raise PrecomputeError(
            f"{_corpus_name(corpus)}: no usable audio, nothing written: {_problems_line(corpus.problems)}"
        )
    card = codec_card(codec)
    work = os.path.join(out_dir, WORK_DIR)
    if overwrite:
        if process_count > 1:
            raise ValueError("overwrite=True with several processes would race; clear the folder first")
        for path in epath.Path(out_dir).iterdir() if epath.Path(out_dir).is_dir() else []:
            name = path.name
            if name == WORK_DIR or name in (CARD_FILE, SUMMARY_FILE) or name.startswith(SHARD_PREFIX):
                path.rmtree() if path.is_dir() else path.unlink()
    settings = {"files_per_shard": files_per_shard, "latent_dtype": latent_dtype}
    fingerprints = {e.id: corpus.fingerprint(e) for e in corpus.entries}
    plan = make_plan(corpus.entries, card, files_per_shard, settings, fingerprints)
    previous = previous_dataset(out_dir)
    incremental, reuse, previous_source = None, {}, None
    if previous is not None:
        if previous.summary.get("plan_fingerprint") == plan.fingerprint:
            summary = previous.summary
            if process_index == 0:
                _finish(out_dir, tokenizer_vocab_size)
            summary["already_complete"] = True
            return summary
        why = _incompatible(previous, card, corpus, latent_dtype)
        if why:
            raise PrecomputeError(
                f"{out_dir} holds a dataset made with {why}; pass --overwrite to replace it, "
                "or choose another --out_dir"
            )
        incremental, reuse = _changes(previous, fingerprints, settings)
        previous_source = ShardSource(out_dir, previous.card)
    epath.Path(work).mkdir(parents=True, exist_ok=True)
    _check_plan(work, plan, len(plan.units), incremental)
    mine = [u for u in range(len(plan.units)) if plan.owner(u, process_count) == process_index]
    todo = [u for u in mine if not _exists(_unit_report_path(work, u))]
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
                    reuse=reuse,
                    previous=previous_source,
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
        out_dir,
        plan,
        card,
        scan_problems=corpus.problems,
        metadata=metadata,
        wait_timeout_s=wait_timeout_s,
        fingerprints=fingerprints,
    )
    summary["this_process"] = mine_summary
    _finish(out_dir, tokenizer_vocab_size)
    return summary


def _corpus_name(corpus) -> str:
    return str(corpus.description.get("path") or corpus.description.get("name") or corpus.description)


def _problems_line(problems: Sequence[Problem]) -> str:
    """One line about why nothing could be used: the count and the first reason."""
    skipped = [p for p in problems if p.severity == "skipped"]
    if not skipped:
        return f"no audio files ({', '.join(audio_folder.AUDIO_EXTENSIONS)})"
    return (
        f"{len(skipped)} file(s) or caption row(s) skipped, the first {skipped[0].path}: {skipped[0].reason}"
    )


# Dataset card metadata: the base model whose latent statistics and tokenizer the
# dataset took (adopt_base_card).
ADOPTED = "latent_stats_and_tokenizer_from"


def adopt_base_card(shards_dir: str, base: str) -> DatasetCard:
    """Gives a finished dataset the latent statistics and the tokenizer of the base model
    ``base`` (a run, a checkpoint step or an export), so that a model trained from that
    base (an adapter run, ``train.init_from``, ``make demo``) sees the new data as it saw
    its own: latents normalized alike, captions in the same tokens. Returns the new card.

    Raises:
      PrecomputeError: the dataset was encoded with another codec than the base's data.
    """
    card = DatasetCard.load(shards_dir)
    try:
        src = source.WeightsSource(base)
        theirs, tok = src.card, src.tokenizer()
    except UserError as e:
        raise PrecomputeError(f"--like={base}: {e}") from e
    if theirs.codec != card.codec:
        raise PrecomputeError(
            f"{shards_dir}: encoded with codec {card.codec.name!r}, but {base} was trained on codec "
            f"{theirs.codec.name!r} latents; encode with its codec (--like picks it)"
        )
    paths.atomic_write(os.path.join(shards_dir, tokenizer.DEFAULT_FILE), tok.model_bytes)
    stats = tokenizer.caption_token_stats(read_captions(shards_dir), tok)
    card = dataclasses.replace(
        card,
        latent_mean=theirs.latent_mean,
        latent_std=theirs.latent_std,
        tokenizer=tokenizer.DEFAULT_FILE,
        tokenizer_vocab_size=tok.vocab_size,
        metadata={**card.metadata, **stats, ADOPTED: base},
    )
    card.save(shards_dir)
    return card


def _finish(out_dir: str, tokenizer_vocab_size: int) -> None:
    """After the card: the tokenizer (if asked and missing), then the work folder goes."""
    if tokenizer_vocab_size > 0 and not DatasetCard.load(out_dir).tokenizer:
        tokenizer.train_for_dataset(out_dir, tokenizer_vocab_size)
    epath.Path(out_dir, WORK_DIR).rmtree(missing_ok=True)


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
        head = ""
        if summary.get("already_complete"):
            head = "already complete (no file, caption, codec or setting changed since it was made): "
        lines = [
            f"{head}{summary['num_records']} records from {summary['num_files']} files "
            f"({summary['audio_hours']:.3f} h audio, {summary['total_frames']} latent frames) in "
            f"{summary['num_shards']} shards -> {summary['out_dir']}",
            f"skipped {summary['num_skipped']}, warnings {summary['num_warnings']} (all in {SUMMARY_FILE})",
        ]
        if summary.get("incremental") and not summary.get("already_complete"):
            lines.extend(_incremental_lines(summary["incremental"], max_lines))
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


def _incremental_lines(inc: dict[str, Any], max_lines: int) -> list[str]:
    new, changed, removed = inc["new"], inc["changed"], inc["removed"]
    lines = [
        f"updated the dataset that was here ({inc['previous_records']} records): {len(new)} new, "
        f"{len(changed)} changed, {len(removed)} removed files; {inc.get('reused', 0)} records of "
        f"unchanged files reused, the rest encoded"
    ]
    if inc.get("settings"):
        lines.append(
            "  settings changed: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(inc["settings"].items()))
        )
    if inc.get("note"):
        lines.append(f"  note: {inc['note']}")
    for what, ids in (("new", new), ("changed", changed), ("removed", removed)):
        for clip_id in ids[:max_lines]:
            lines.append(f"  {what:8s} {clip_id}")
        if len(ids) > max_lines:
            lines.append(f"  ... {len(ids) - max_lines} more {what}")
    return lines


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
    flags.DEFINE_string(
        "like",
        "",
        "a base model (run, checkpoint step or export): encode with the codec its data was encoded "
        "with, and give the dataset its latent statistics and tokenizer (for adapters on that base)",
    )
    flags.DEFINE_integer("files_per_shard", 64, "files per work unit and shard")
    flags.DEFINE_integer(
        "process_index", -1, "this process (0 merges); -1: from launch.local, SLURM or the TPU VM, else 0"
    )
    flags.DEFINE_integer("process_count", 0, "processes sharing the work; 0: as --process_index")
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
        if index < 0 or count < 1:  # the same command on every host: ask the launcher
            index, count = distributed.work_share()
        codec_name, vocab = f.codec, f.tokenizer_vocab_size
        if f.like:
            try:
                base_codec = source.WeightsSource(f.like).card.codec.name
            except UserError as e:
                raise PrecomputeError(f"--like={f.like}: {e}") from e
            if f["codec"].present and f.codec != base_codec:
                raise PrecomputeError(
                    f"--codec={f.codec} but --like={f.like} was trained on codec {base_codec!r} latents"
                )
            codec_name, vocab = base_codec, 0  # the base's tokenizer is adopted below
        codec = load_codec(codec_name)
        batch = f.batch_size
        if batch <= 0:
            batch = 1
            if hasattr(codec, "encode_batch"):
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
            tokenizer_vocab_size=vocab,
            overwrite=f.overwrite,
            wait_timeout_s=f.wait_timeout_s,
            progress=f.progress,
        )
        if f.like and index == 0:
            adopt_base_card(f.out_dir, f.like)
        print(format_summary(summary))

    cli.run(main, module=(__name__, distributed.__name__))


if __name__ == "__main__":
    run()
