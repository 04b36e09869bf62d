"""Latent records and shards (docs/DESIGN.md, contract 2): encoding and random-access reading.

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

Reading (:class:`ShardSource`) checks that every shard named by the card is there and
holds the number of records the card says, and reports any bad record by file and
index. Writing lives in the pipeline (``data_pipeline/shards.py``).

A dataset folder may be a ``gs://`` path: ArrayRecord reads ``gs://`` shards itself
(through google-cloud-cpp, with the host's default credentials, one ranged read per
record), so nothing is copied to local disk; the card and the tokenizer are read
through ``etils.epath``. An emulator is reached by setting
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (ArrayRecord) and ``STORAGE_EMULATOR_HOST``
(epath/gcsfs), as ``tests/test_gcs.py`` does.
"""

from __future__ import annotations

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
from etils import epath

from audiodiff_jax.data.cards import CARD_FILE, DatasetCard, ShardError

RECORD_MAGIC = b"ADLR"  # audiodiff latent record
RECORD_VERSION = 1
SHARD_PREFIX = "latents-"
SHARD_SUFFIX = ".array_record"

_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
LATENT_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_LABEL_TYPES = (str, int, float, bool)
# Reader options for random access (no read-ahead of neighbouring records).
_READER_OPTIONS = "readahead_buffer_size:0"


def shard_file_name(index: int, count: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


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
    if latents.dtype.name not in LATENT_DTYPES:
        raise ShardError(
            f"record field latents has dtype {latents.dtype}; use one of {sorted(LATENT_DTYPES)}"
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
    payload = np.ascontiguousarray(latents, dtype=LATENT_DTYPES[latents.dtype.name]).tobytes()
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
        dtype = LATENT_DTYPES[header["dtype"]]
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
            if not epath.Path(path).exists():
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
