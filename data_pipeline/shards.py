"""The latent shard format (DESIGN.md contract 2): ArrayRecord files plus a dataset card.

A dataset is one folder::

    dataset_card.json                      codec card, latent statistics, record counts
    latents-00000-of-00004.array_record    one record per clip or song
    ...
    tokenizer.model                        (optional) sentencepiece model named by the card

A record is self-describing bytes (see :func:`encode_record`)::

    b"ADLR" | u16 version | u32 header length | header (UTF-8 JSON) | latents (raw, little endian)

The JSON header holds the caption, timing, source id, labels, and the dtype, shape and
CRC-32 of the latents. Raw array bytes keep decoding a zero-copy ``np.frombuffer``; the
JSON keeps a record readable by any language and lets fields be added without a new
format. ArrayRecord's own chunk hashes catch most corruption; the CRC-32 of our
payload catches what a buggy writer could put inside a valid chunk.

Writing (:class:`ShardWriter`) streams records into hidden temporary files, computes
per-channel latent mean and std on the way, and only at :meth:`ShardWriter.close`
renames the shards into place and then writes the card, so a reader never sees a
half-written shard, and a folder with a card is complete. Reading
(:class:`ShardSource`) checks that every shard named by the card is there and holds
the number of records the card says, and reports any bad record by file and index.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module

RECORD_MAGIC = b"ADLR"  # audiodiff latent record
RECORD_VERSION = 1
CARD_VERSION = 1
CARD_FILE = "dataset_card.json"
SHARD_PREFIX = "latents-"
SHARD_SUFFIX = ".array_record"

_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_LATENT_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_LABEL_TYPES = (str, int, float, bool)
# Writer options: one record per chunk (group_size:1) so random access reads exactly
# one record; no compression because latents are noise-like floats that barely
# compress and decompression would cost loader CPU.
_WRITER_OPTIONS = "group_size:1,uncompressed"
# Reader options for random access (no read-ahead of neighbouring records).
_READER_OPTIONS = "readahead_buffer_size:0"


class ShardError(ValueError):
    """A shard, record or dataset card is missing or malformed; the message says where."""


def shard_file_name(index: int, count: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


# ---------------------------------------------------------------------------
# Records


def _check_float(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ShardError(f"record field {key}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ShardError(f"record field {key}={value!r} must be finite and >= 0")
    return value


def _check_labels(labels: Any) -> dict[str, Any]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ShardError(f"record field labels={labels!r} must be a dict of str -> str/number")
    out = {}
    for key, value in labels.items():
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        if not isinstance(key, str) or not isinstance(value, _LABEL_TYPES):
            raise ShardError(f"record label {key!r}={value!r}: labels map str -> str/int/float/bool")
        out[key] = value
    return out


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serializes one clip or song.

    Args:
      record: ``latents`` (float32 or float16 array ``[frames, channels]``, finite,
        frames >= 1), ``caption`` (str), ``seconds_start`` and ``seconds_total``
        (seconds; start of this clip in its song, and the song's length),
        ``source_id`` (str), and optionally ``labels`` (dict str -> str/number).

    Returns:
      The record bytes (format in the module docstring).
    """
    latents = record.get("latents")
    if not isinstance(latents, np.ndarray) or latents.ndim != 2:
        raise ShardError(f"record field latents must be a 2-D array [frames, channels], got {latents!r:.80}")
    if latents.dtype.name not in _LATENT_DTYPES:
        raise ShardError(
            f"record field latents has dtype {latents.dtype}; use one of {sorted(_LATENT_DTYPES)}"
        )
    if latents.shape[0] < 1 or latents.shape[1] < 1:
        raise ShardError(f"record field latents has shape {latents.shape}; need >= 1 frame and channel")
    if not np.isfinite(latents).all():
        raise ShardError("record field latents contains NaN or inf")
    for key in ("caption", "source_id"):
        if not isinstance(record.get(key), str):
            raise ShardError(f"record field {key}={record.get(key)!r} must be a str")
    unknown = sorted(
        set(record) - {"latents", "caption", "seconds_start", "seconds_total", "source_id", "labels"}
    )
    if unknown:
        raise ShardError(f"unknown record field(s): {', '.join(unknown)}")
    payload = np.ascontiguousarray(latents, dtype=_LATENT_DTYPES[latents.dtype.name]).tobytes()
    header = {
        "caption": record["caption"],
        "seconds_start": _check_float(record, "seconds_start"),
        "seconds_total": _check_float(record, "seconds_total"),
        "source_id": record["source_id"],
        "labels": _check_labels(record.get("labels")),
        "dtype": latents.dtype.name,
        "shape": [int(latents.shape[0]), int(latents.shape[1])],
        "crc32": zlib.crc32(payload),
    }
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(RECORD_MAGIC, RECORD_VERSION, len(header_bytes)) + header_bytes + payload


def decode_record(data: bytes, *, where: str) -> dict[str, Any]:
    """Parses bytes written by :func:`encode_record`.

    Args:
      data: the record bytes.
      where: names the record in errors, e.g. ``"/data/latents-00001-of-00004.array_record, record 7"``.

    Returns:
      dict with ``latents`` (a read-only view on ``data``, float32 or float16
      ``[frames, channels]``), ``caption``, ``seconds_start``, ``seconds_total``,
      ``source_id``, ``labels``.

    Raises:
      ShardError: the bytes are truncated, corrupt, or of an unknown version.
    """
    if len(data) < _PREFIX.size:
        raise ShardError(f"{where}: truncated record ({len(data)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise ShardError(f"{where}: not a latent record (magic {magic!r}, expected {RECORD_MAGIC!r})")
    if version != RECORD_VERSION:
        raise ShardError(
            f"{where}: record version {version} is not supported (this reader: {RECORD_VERSION})"
        )
    start = _PREFIX.size + header_len
    if start > len(data):
        raise ShardError(f"{where}: truncated record header ({len(data)} bytes, header needs {start})")
    try:
        header = json.loads(bytes(data[_PREFIX.size : start]).decode("utf-8"))
        dtype = _LATENT_DTYPES[header["dtype"]]
        frames, channels = (int(v) for v in header["shape"])
        crc = int(header["crc32"])
        out = {
            "caption": str(header["caption"]),
            "seconds_start": float(header["seconds_start"]),
            "seconds_total": float(header["seconds_total"]),
            "source_id": str(header["source_id"]),
            "labels": dict(header["labels"]),
        }
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        raise ShardError(f"{where}: corrupt record header ({type(e).__name__}: {e})") from e
    payload = memoryview(data)[start:]
    if len(payload) != frames * channels * dtype.itemsize:
        raise ShardError(
            f"{where}: latents payload has {len(payload)} bytes, header says [{frames}, {channels}] "
            f"{header['dtype']} ({frames * channels * dtype.itemsize} bytes)"
        )
    if zlib.crc32(payload) != crc:
        raise ShardError(f"{where}: latents checksum mismatch (corrupt record)")
    out["latents"] = np.frombuffer(payload, dtype=dtype).reshape(frames, channels)
    return out


# ---------------------------------------------------------------------------
# Dataset card


@dataclasses.dataclass(frozen=True)
class CodecCard:
    """What produced the latents: enough to decode them and to convert frames to seconds."""

    name: str
    sample_rate: int
    audio_channels: int
    hop: int  # audio samples per latent frame
    latent_rate: float  # latent frames per second
    latent_channels: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "codec card") -> CodecCard:
        types = {"name": str, "sample_rate": int, "audio_channels": int, "hop": int, "latent_rate": float}
        types["latent_channels"] = int
        _check_keys(data, types, where)
        kwargs = {k: _typed(data[k], tp, f"{where}: field {k}") for k, tp in types.items()}
        for k in ("sample_rate", "audio_channels", "hop", "latent_rate", "latent_channels"):
            if not kwargs[k] > 0:
                raise ShardError(f"{where}: field {k}={kwargs[k]!r} must be > 0")
        if not kwargs["name"]:
            raise ShardError(f"{where}: field name must not be empty")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the dataset folder
    num_records: int


@dataclasses.dataclass(frozen=True)
class DatasetCard:
    """``dataset_card.json``: describes a folder of latent shards.

    ``latent_mean`` / ``latent_std`` are per channel over every frame of every record
    (population std); the loader normalizes with them. ``tokenizer`` is a file name
    relative to the folder ("" = none yet).
    """

    codec: CodecCard
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    shards: tuple[ShardInfo, ...]
    num_records: int
    total_frames: int
    tokenizer: str = ""
    tokenizer_vocab_size: int = 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # free-form provenance
    version: int = CARD_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latent_mean"] = list(self.latent_mean)
        d["latent_std"] = list(self.latent_std)
        d["shards"] = [dataclasses.asdict(s) for s in self.shards]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = CARD_FILE) -> DatasetCard:
        """Builds and validates a card; errors name the bad field."""
        types = {f.name: None for f in dataclasses.fields(cls)}
        _check_keys(data, types, where)
        version = _typed(data["version"], int, f"{where}: field version")
        if version != CARD_VERSION:
            raise ShardError(
                f"{where}: field version={version} is not supported (this reader: {CARD_VERSION})"
            )
        codec = CodecCard.from_dict(_typed(data["codec"], dict, f"{where}: field codec"), f"{where}: codec")
        stats = {}
        for key in ("latent_mean", "latent_std"):
            values = _typed(data[key], list, f"{where}: field {key}")
            if len(values) != codec.latent_channels:
                raise ShardError(
                    f"{where}: field {key} has {len(values)} entries, "
                    f"codec.latent_channels={codec.latent_channels}"
                )
            stats[key] = tuple(_typed(v, float, f"{where}: field {key}[{i}]") for i, v in enumerate(values))
            if not all(math.isfinite(v) for v in stats[key]):
                raise ShardError(f"{where}: field {key} has a non-finite entry")
        if any(v < 0 for v in stats["latent_std"]):
            raise ShardError(f"{where}: field latent_std has a negative entry")
        shards = []
        for i, s in enumerate(_typed(data["shards"], list, f"{where}: field shards")):
            sw = f"{where}: shards[{i}]"
            _check_keys(_typed(s, dict, sw), {"file": str, "num_records": int}, sw)
            file = _typed(s["file"], str, f"{sw}.file")
            if not file or os.path.basename(file) != file:
                raise ShardError(f"{sw}.file={file!r} must be a plain file name inside the dataset folder")
            shards.append(ShardInfo(file, _typed(s["num_records"], int, f"{sw}.num_records")))
        if not shards:
            raise ShardError(f"{where}: field shards is empty")
        num_records = _typed(data["num_records"], int, f"{where}: field num_records")
        if num_records != sum(s.num_records for s in shards):
            raise ShardError(
                f"{where}: field num_records={num_records} differs from the sum over shards "
                f"({sum(s.num_records for s in shards)})"
            )
        tokenizer = _typed(data["tokenizer"], str, f"{where}: field tokenizer")
        if tokenizer and os.path.basename(tokenizer) != tokenizer:
            raise ShardError(
                f"{where}: field tokenizer={tokenizer!r} must be a file name inside the dataset folder"
            )
        return cls(
            codec=codec,
            latent_mean=stats["latent_mean"],
            latent_std=stats["latent_std"],
            shards=tuple(shards),
            num_records=num_records,
            total_frames=_typed(data["total_frames"], int, f"{where}: field total_frames"),
            tokenizer=tokenizer,
            tokenizer_vocab_size=_typed(
                data["tokenizer_vocab_size"], int, f"{where}: field tokenizer_vocab_size"
            ),
            metadata=_typed(data["metadata"], dict, f"{where}: field metadata"),
            version=version,
        )

    @classmethod
    def load(cls, shards_dir: str) -> DatasetCard:
        path = os.path.join(shards_dir, CARD_FILE)
        if not os.path.exists(path):
            raise ShardError(f"{path}: no dataset card (is {shards_dir!r} a latent shard folder?)")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:
            raise ShardError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(_typed(data, dict, path), where=path)

    def save(self, shards_dir: str) -> str:
        """Writes the card atomically (temporary file + rename); returns its path."""
        path = os.path.join(shards_dir, CARD_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
        return path


def _check_keys(data: Mapping[str, Any], keys: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(data) - set(keys))
    missing = sorted(set(keys) - set(data))
    if unknown:
        raise ShardError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if missing:
        raise ShardError(f"{where}: missing field(s) {', '.join(missing)}")


def _typed(value: Any, tp: type, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or isinstance(value, bool):
        raise ShardError(f"{where}={value!r:.80} must be of type {tp.__name__}")
    return value


# ---------------------------------------------------------------------------
# Writing


class _ChannelStats:
    """Streaming per-channel mean and variance (Chan et al. pairwise update, float64).

    Summing x and x^2 would lose the variance to cancellation for latents with a
    large mean; the pairwise update stays accurate over billions of frames.
    """

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        n_b = x.shape[0]
        mean_b = x.mean(axis=0)
        m2_b = np.square(x - mean_b).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.count * n_b / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


class ShardWriter:
    """Writes records into ``latents-*.array_record`` shards and the dataset card.

    Give either ``num_shards`` (records go round-robin, so shards stay balanced
    without knowing the total in advance) or ``records_per_shard`` (a new shard
    starts when one is full). Use as a context manager: an exception inside the
    ``with`` block removes the temporary files and leaves the folder as it was.

    Args:
      out_dir: dataset folder (created if missing).
      codec_card: dict or :class:`CodecCard` of the codec that made the latents.
      num_shards / records_per_shard: exactly one of them.
      tokenizer: tokenizer file name inside ``out_dir`` to record in the card.
      tokenizer_vocab_size: its vocabulary size (recorded for config checks).
      metadata: free-form JSON-able provenance stored in the card.
      overwrite: replace an existing dataset in ``out_dir`` (its old shards and card
        are removed at :meth:`close`, just before the new ones are renamed in).
    """

    def __init__(
        self,
        out_dir: str,
        codec_card: Mapping[str, Any] | CodecCard,
        *,
        num_shards: int | None = None,
        records_per_shard: int | None = None,
        tokenizer: str = "",
        tokenizer_vocab_size: int = 0,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ):
        if (num_shards is None) == (records_per_shard is None):
            raise ValueError("give exactly one of num_shards and records_per_shard")
        if (num_shards is not None and num_shards < 1) or (
            records_per_shard is not None and records_per_shard < 1
        ):
            raise ValueError(f"num_shards={num_shards}, records_per_shard={records_per_shard} must be >= 1")
        self.codec = codec_card if isinstance(codec_card, CodecCard) else CodecCard.from_dict(codec_card)
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        existing = _existing_dataset_files(out_dir)
        if existing and not overwrite:
            raise ShardError(
                f"{out_dir} already holds a dataset ({os.path.basename(existing[0])}, ...); "
                "pass overwrite=True to replace it"
            )
        self._num_shards = num_shards
        self._records_per_shard = records_per_shard
        self._tokenizer = tokenizer
        self._tokenizer_vocab_size = tokenizer_vocab_size
        self._metadata = dict(metadata or {})
        self._tmp_paths: list[str] = []
        self._writers: list[Any] = []
        self._counts: list[int] = []
        self._stats = _ChannelStats(self.codec.latent_channels)
        self._num_records = 0
        self._closed = False
        self.card: DatasetCard | None = None
        if num_shards is not None:
            for _ in range(num_shards):
                self._open_shard()

    def _open_shard(self) -> None:
        # Hidden, and not matching latents-*.array_record: invisible to readers and globs.
        path = os.path.join(self.out_dir, f".{SHARD_PREFIX}{len(self._tmp_paths):05d}.tmp-{os.getpid()}")
        self._tmp_paths.append(path)
        self._writers.append(array_record_module.ArrayRecordWriter(path, _WRITER_OPTIONS))
        self._counts.append(0)

    def add(self, record: Mapping[str, Any]) -> None:
        """Appends one record (fields as in :func:`encode_record`)."""
        if self._closed:
            raise ShardError("ShardWriter.add after close")
        latents = record.get("latents")
        channels = getattr(latents, "shape", (0, 0))[-1]
        if channels != self.codec.latent_channels:
            raise ShardError(
                f"record {record.get('source_id')!r}: latents have {channels} channels, "
                f"codec card latent_channels={self.codec.latent_channels}"
            )
        data = encode_record(record)
        if self._num_shards is not None:
            shard = self._num_records % self._num_shards
        else:
            if not self._counts or self._counts[-1] >= self._records_per_shard:
                self._open_shard()
            shard = len(self._writers) - 1
        self._writers[shard].write(data)
        self._counts[shard] += 1
        self._num_records += 1
        self._stats.add(latents)

    def close(self) -> DatasetCard:
        """Finishes the shards, renames them into place, writes the card last; returns it."""
        if self._closed:
            if self.card is None:
                raise ShardError("ShardWriter was aborted")
            return self.card
        if self._num_records == 0:
            self.abort()
            raise ShardError(f"{self.out_dir}: no records were added; refusing to write an empty dataset")
        for path, writer in zip(self._tmp_paths, self._writers, strict=True):
            # ok() is only meaningful while open (a closed writer reports False).
            if not writer.ok():
                self.abort()
                raise ShardError(f"{path}: ArrayRecord writer failed")
            writer.close()
        self._closed = True
        # Round-robin with fewer records than shards leaves trailing empty shards: drop them.
        keep = [i for i, c in enumerate(self._counts) if c > 0]
        for i in range(len(self._tmp_paths)):
            if i not in keep:
                os.remove(self._tmp_paths[i])
        # Remove the old card first, so a folder never pairs a card with other shards.
        old_card = os.path.join(self.out_dir, CARD_FILE)
        if os.path.exists(old_card):
            os.remove(old_card)
        for path in _existing_dataset_files(self.out_dir):
            os.remove(path)
        shards = []
        for new_index, i in enumerate(keep):
            name = shard_file_name(new_index, len(keep))
            os.replace(self._tmp_paths[i], os.path.join(self.out_dir, name))
            shards.append(ShardInfo(name, self._counts[i]))
        card = DatasetCard(
            codec=self.codec,
            latent_mean=tuple(float(v) for v in self._stats.mean),
            latent_std=tuple(float(v) for v in self._stats.std),
            shards=tuple(shards),
            num_records=self._num_records,
            total_frames=int(self._stats.count),
            tokenizer=self._tokenizer,
            tokenizer_vocab_size=self._tokenizer_vocab_size,
            metadata=self._metadata,
        )
        card.save(self.out_dir)
        self.card = card
        return card

    def abort(self) -> None:
        """Closes and deletes the temporary shards; the folder keeps what it had before."""
        self._closed = True
        for path, writer in zip(self._tmp_paths, self._writers, strict=True):
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - cleanup must go on whatever the writer says
                pass
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _existing_dataset_files(out_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{SHARD_PREFIX}*{SHARD_SUFFIX}")))
    card = os.path.join(out_dir, CARD_FILE)
    return ([card] if os.path.exists(card) else []) + files


# ---------------------------------------------------------------------------
# Reading


class ShardSource:
    """Random access to every record of a dataset folder (a Grain ``RandomAccessDataSource``).

    Opening checks that each shard named by the card exists, is a readable
    ArrayRecord file, and holds the card's number of records. ``source[i]`` returns
    the decoded record (see :func:`decode_record`) plus ``record_index`` (= i);
    records are numbered shard by shard, in the card's order.

    Readers are opened lazily per process and dropped when pickled, so a source can
    be sent to Grain worker processes.
    """

    def __init__(self, shards_dir: str, card: DatasetCard | None = None):
        self.shards_dir = shards_dir
        self.card = card if card is not None else DatasetCard.load(shards_dir)
        self.paths = [os.path.join(shards_dir, s.file) for s in self.card.shards]
        self._ends = np.cumsum([s.num_records for s in self.card.shards])
        self._lock = threading.Lock()
        self._readers: list[Any] = [None] * len(self.paths)
        for i, (path, info) in enumerate(zip(self.paths, self.card.shards, strict=True)):
            if not os.path.exists(path):
                raise ShardError(f"{path}: shard listed in {CARD_FILE} is missing")
            reader = self._reader(i)
            count = reader.num_records()
            if count != info.num_records:
                raise ShardError(f"{path}: holds {count} records, {CARD_FILE} says {info.num_records}")

    def __len__(self) -> int:
        return int(self._ends[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Maps a dataset-wide record index to (shard number, index inside the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[shard - 1]) if shard else 0
        return shard, index - start

    def _reader(self, shard: int):
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                reader = self._readers[shard]
                if reader is None:
                    path = self.paths[shard]
                    reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
                    # A truncated file opens without an exception but not ok (its footer is gone).
                    if not reader.ok():
                        raise ShardError(f"{path}: not a readable ArrayRecord file (truncated or corrupt)")
                    self._readers[shard] = reader
        return reader

    def read_raw(self, index: int) -> bytes:
        shard, pos = self.locate(int(index))
        try:
            return self._reader(shard).read([pos])[0]
        except RuntimeError as e:  # riegeli reports corrupt chunks as RuntimeError
            raise ShardError(f"{self.paths[shard]}, record {pos}: unreadable ({e})") from e

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        shard, pos = self.locate(index)
        record = decode_record(self.read_raw(index), where=f"{self.paths[shard]}, record {pos}")
        record["record_index"] = index
        return record

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        state["_readers"] = [None] * len(self.paths)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ShardSource({self.shards_dir!r}, {len(self)} records in {len(self.paths)} shards)"


def read_captions(shards_dir: str) -> list[str]:
    """All captions of a dataset, in record order (for tokenizer training)."""
    source = ShardSource(shards_dir)
    return [source[i]["caption"] for i in range(len(source))]


def load_records(shards_dir: str, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Decoded records (all, or the given indices); for tests and inspection tools."""
    source = ShardSource(shards_dir)
    return [source[i] for i in (range(len(source)) if indices is None else indices)]
