"""Writing latent shards (docs/DESIGN.md, contract 2); the format and the reader are in
``audiodiff_jax/data/records.py``, the card in ``audiodiff_jax/data/cards.py``.

Writing (:class:`ShardWriter`) streams records into hidden temporary files, computes
per-channel latent mean and std on the way, and only at :meth:`ShardWriter.close`
renames the shards into place and then writes the card, so a reader never sees a
half-written shard, and a folder with a card is complete.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_record.python import array_record_module

from audiodiff_jax.data.cards import CARD_FILE, CodecCard, DatasetCard, ShardError, ShardInfo
from audiodiff_jax.data.records import SHARD_PREFIX, SHARD_SUFFIX, encode_record, shard_file_name

# Writer options: one record per chunk (group_size:1) so random access reads exactly
# one record; no compression because latents are noise-like floats that barely
# compress and decompression would cost loader CPU.
_WRITER_OPTIONS = "group_size:1,uncompressed"


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


def _existing_dataset_files(out_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{SHARD_PREFIX}*{SHARD_SUFFIX}")))
    card = os.path.join(out_dir, CARD_FILE)
    return ([card] if os.path.exists(card) else []) + files
