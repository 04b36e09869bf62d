"""The dataset card and codec card (docs/DESIGN.md, contract 2), and latent normalization.

A latent shard folder holds ``dataset_card.json``: the codec card (what produced the
latents), per-channel latent statistics, the shard list and the tokenizer's file.
These types are the contract between the data pipeline (which writes them), the
loader and trainer (which read them) and the sampler (which denormalizes with them),
so they live in the library; ``data_pipeline`` imports them, never the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from audiodiff_jax.core import paths
from audiodiff_jax.core.errors import UserError

CARD_VERSION = 1
CARD_FILE = "dataset_card.json"
# Channels whose std is below this are treated as constant: normalizing divides by
# MIN_STD instead of (nearly) zero.
MIN_STD = 1e-6


class ShardError(UserError, ValueError):
    """A shard, record or dataset card is missing or malformed; the message says where."""


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
        if not epath.Path(path).exists():  # local or gs://
            raise ShardError(f"{path}: no dataset card (is {shards_dir!r} a latent shard folder?)")
        try:
            with epath.Path(path).open(encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:
            raise ShardError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(_typed(data, dict, path), where=path)

    def normalize(self, latents: np.ndarray) -> np.ndarray:
        """Codec latents -> unit-scale model latents (see :func:`normalize_latents`)."""
        return normalize_latents(latents, self)

    def denormalize(self, latents):
        """Model latents -> codec latents (see :func:`denormalize_latents`)."""
        return denormalize_latents(latents, self)

    def save(self, shards_dir: str) -> str:
        """Writes the card atomically (temporary file + rename; a bucket's object is
        replaced whole by one upload); returns its path."""
        path = os.path.join(shards_dir, CARD_FILE)
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        paths.atomic_write(path, text.encode("utf-8"))
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


def latent_scale(card: DatasetCard) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, 1 / max(std, MIN_STD))`` in float32 (the reciprocal taken in float64)."""
    mean = np.asarray(card.latent_mean, np.float32)
    inv_std = (1.0 / np.maximum(np.asarray(card.latent_std, np.float64), MIN_STD)).astype(np.float32)
    return mean, inv_std


def normalize_latents(latents: np.ndarray, card: DatasetCard) -> np.ndarray:
    """Codec latents ``[..., C]`` -> the model's unit-scale latents (float32)."""
    mean, inv_std = latent_scale(card)
    return (np.asarray(latents).astype(np.float32) - mean) * inv_std


def denormalize_latents(latents, card: DatasetCard):
    """The model's latents ``[..., C]`` (numpy or jax) -> codec latents: ``x * std + mean``."""
    mean = np.asarray(card.latent_mean, np.float32)
    std = np.maximum(np.asarray(card.latent_std, np.float32), np.float32(MIN_STD))
    return latents * std + mean
