"""The Grain loader: latent shards -> per-host numpy batches -> global jax.Arrays.

One batch, from shard to step::

    ShardSource[i]             decoded record (latents [frames, C], caption, timing)
    shuffle + repeat           a global stream of records, reshuffled every epoch
    random_map(_CropAndTokenize)   crop/pad to the window, normalize, CFG dropout, tokens,
                               musical labels (and their dropout)
    batch(b, drop_remainder)   b = data.global_batch_size // process_count
    [process_index::process_count] this host's blocks of the stream
    to_iter_dataset / mp_prefetch  threads and (optionally) worker processes
    batch.make_global_batch    jax.make_array_from_process_local_data (data/batch.py)

Per-process sharding slices the *stream* (after shuffle and repeat), not the record
set: the stream is cut into blocks of b elements and process p takes blocks p, p + P,
p + 2P, ..., so at step s it holds stream elements s*G + p*b ... s*G + p*b + b - 1
(G = global batch). Each process therefore sees a disjoint part of every epoch, all
processes advance at the same rate, and no record is ever dropped, also when the
record count is not divisible by the process count. Assembled in process order
(``batch.make_global_batch``), the global batch at step s is the same rows *in the
same order* for any process count, so the train step's per-row noise and times (drawn
by row position) and hence the whole trajectory do not depend on how many processes
load the data.

Randomness (crop offset, caption dropout) comes from Grain's ``random_map``, whose
generator is seeded by (seed, index of the element in the global stream), and the
shuffle is a seeded index permutation per epoch. A batch is thus a pure function of
(shuffle_seed, step, process_index, process_count): iterator state is just a
position, and a restored iterator continues bit for bit. Batching happens before the
worker processes split the stream, so each worker builds whole batches and the
output (and its order) does not depend on ``worker_count``; the saved state does,
so restore with the same ``worker_count``.

Every process saves and restores its own iterator through Orbax with Grain's
handler (``process_{i}-of-{n}.json`` inside the item directory)::

    ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointSave(iterator))
    ocp.args.Composite(..., data_iter=grain.checkpoint.CheckpointRestore(iterator))
"""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np
from absl import flags
from etils import epath

from audiodiff_jax.core import music
from audiodiff_jax.core.config import ConfigError, DataConfig, validate_data
from audiodiff_jax.data.batch import Batch, Conditioning
from audiodiff_jax.data.cards import DatasetCard, latent_scale
from audiodiff_jax.data.records import ShardSource
from audiodiff_jax.data.tokenizer import Tokenizer


class _CropAndTokenize(grain.transforms.RandomMap):
    """Record -> training example: random window, normalization, CFG dropout, tokens.

    Both random draws are made for every element, in a fixed order, so the stream of
    draws never depends on the data (e.g. on whether a clip is long enough to crop).
    """

    def __init__(
        self,
        *,
        window_frames: int,
        card: DatasetCard,
        tokenizer: Tokenizer,
        text_max_len: int,
        cfg_dropout: float,
        controls: tuple[str, ...] = (),
        control_dropout: float = 0.0,
    ):
        self.window_frames = window_frames
        self.latent_rate = card.codec.latent_rate
        self.mean, self.inv_std = latent_scale(card)
        self.tokenizer = tokenizer
        self.text_max_len = text_max_len
        self.cfg_dropout = cfg_dropout
        self.null_tokens = tokenizer.encode("", text_max_len)
        self.controls = tuple(controls)
        self.control_dropout = control_dropout

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> Batch:
        latents = record["latents"]
        frames, channels = latents.shape
        window = self.window_frames
        offset = int(rng.integers(0, max(frames - window, 0) + 1))
        drop_caption = bool(rng.random() < self.cfg_dropout)
        n = min(frames, window)
        out = np.zeros((window, channels), np.float32)
        out[:n] = (latents[offset : offset + n].astype(np.float32) - self.mean) * self.inv_std
        mask = np.zeros(window, np.float32)
        mask[:n] = 1.0
        tokens = (
            self.null_tokens if drop_caption else self.tokenizer.encode(record["caption"], self.text_max_len)
        )
        bpm, key, meter = music.controls_from_labels(record.get("labels"))
        if self.controls:
            # Drawn after the draws above and only for models with controls, so the
            # stream of a model without them is what it always was.
            drop = rng.random(3) < self.control_dropout
            drop |= drop_caption  # the unconditional branch has no controls either
            bpm = 0.0 if drop[0] else bpm
            key = music.MISSING if drop[1] else key
            meter = music.MISSING if drop[2] else meter
        return Batch(
            latents=out,
            loss_mask=mask,
            cond=Conditioning(
                tokens=tokens,
                seconds_start=np.float32(record["seconds_start"] + offset / self.latent_rate),
                seconds_total=np.float32(record["seconds_total"]),
                num_frames=np.int32(n),
                bpm=np.float32(bpm),
                key=np.int32(key),
                meter=np.int32(meter),
            ),
            record_index=np.int32(record["record_index"]),
        )


def resolve_tokenizer_path(data_cfg: DataConfig, card: DatasetCard) -> str:
    """``data.tokenizer`` if set, else the tokenizer file named by the dataset card."""
    if data_cfg.tokenizer:
        path = data_cfg.tokenizer
    elif card.tokenizer:
        path = os.path.join(data_cfg.shards_dir, card.tokenizer)
    else:
        raise ConfigError(
            f"data.tokenizer is empty and the dataset card in {data_cfg.shards_dir} names no tokenizer; "
            "train one with audiodiff-tokenizer --shards_dir=... or set data.tokenizer"
        )
    if not epath.Path(path).exists():  # local or gs://
        raise ConfigError(f"tokenizer file {path} does not exist (from data.tokenizer or the dataset card)")
    return path


def make_dataset(
    data_cfg: DataConfig,
    *,
    text_max_len: int,
    process_index: int,
    process_count: int,
    controls: tuple[str, ...] = (),
) -> grain.IterDataset:
    """Builds this process's Grain pipeline of training batches.

    Args:
      data_cfg: the ``data`` section of the config.
      text_max_len: caption tokens per example (``model.text.max_len``).
      controls: the model's musical controls (``model.controls``): their labels are
        dropped with ``data.control_dropout`` (the labels are in every batch anyway).
      process_index / process_count: this host's place among the data-loading hosts
        (``jax.process_index()`` / ``jax.process_count()``).

    Returns:
      An IterDataset; ``iter()`` of it gives a checkpointable iterator
      (``get_state``/``set_state``) of :class:`~audiodiff_jax.data.batch.Batch` of numpy
      arrays (fields and shapes in ``audiodiff_jax/data/batch.py``), with
      ``b = data.global_batch_size // process_count`` rows, ``T = data.window_frames``,
      ``L = text_max_len``; latents are normalized with the dataset card.
    """
    d = data_cfg
    if not d.shards_dir:
        raise ConfigError("data.shards_dir is empty; point it at a folder with dataset_card.json")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if d.global_batch_size % process_count:
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by "
            f"the process count {process_count}"
        )
    validate_data(d)  # the section's own checks (config.py), for callers that skipped validate()
    local_batch = d.global_batch_size // process_count

    source = ShardSource(d.shards_dir)
    card = source.card
    transform = _CropAndTokenize(
        window_frames=d.window_frames,
        card=card,
        tokenizer=Tokenizer(resolve_tokenizer_path(d, card)),
        text_max_len=text_max_len,
        cfg_dropout=d.cfg_dropout,
        controls=controls,
        control_dropout=d.control_dropout,
    )
    # ds.seed derives the shuffle's and the random_map's seeds from one number.
    ds = grain.MapDataset.source(source).seed(d.shuffle_seed)
    ds = ds.shuffle()  # the permutation is reseeded with the epoch (index // len)
    ds = ds.repeat(None if d.num_epochs == 0 else d.num_epochs)
    ds = ds.random_map(transform)  # seeded by the element's index in the global stream
    if d.num_epochs:
        # Every process must yield the same number of batches, or the last step of a
        # multi-host run would wait forever for the processes that ran out.
        usable = len(ds) // d.global_batch_size * d.global_batch_size
        if usable == 0:
            raise ConfigError(
                f"data.num_epochs={d.num_epochs} x {len(source)} records is less than one global batch "
                f"(data.global_batch_size={d.global_batch_size})"
            )
        ds = ds[:usable]
    # Batch, then deal out whole blocks: process p's rows are one contiguous slice of
    # the global batch, whatever the process count (see the module docstring).
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds[process_index::process_count]
    # One thread per prefetched batch: a thread builds a whole batch.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.prefetch, prefetch_buffer_size=d.prefetch))
    if d.worker_count > 0:
        # Grain's multiprocess prefetch reads its own absl flags (in the parent too);
        # outside an absl app (tests, notebooks) they were never parsed and reading
        # them raises UnparsedFlagAccessError, so take the defaults then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=d.worker_count, per_worker_buffer_size=max(d.prefetch, 1)
            )
        )
    return ds
