"""The training batch (docs/DESIGN.md, contract 2): one typed structure from loader to loss.

The loader yields :class:`Batch` (numpy, one host's rows), :func:`make_global_batch`
turns it into global ``jax.Array``s placed by :func:`batch_shardings`, the train step
reads it, and the AOT compile and the benchmarks build it abstractly with
:func:`abstract_batch`. The model takes the noisy latents, the time and one
:class:`Conditioning`; the sampler builds a :class:`Conditioning` per prompt row.

Shapes, dtypes and logical axes are written once, in :func:`batch_spec`::

    latents        float32 [B, T, C]  normalized with the dataset card, zero padded
    loss_mask      float32 [B, T]     1 = real frame, 0 = padding
    cond.tokens    int32   [B, L]     caption ids (the null caption where dropped for CFG)
    cond.seconds_start  float32 [B]   start of the window in its song
    cond.seconds_total  float32 [B]   length of the whole song
    cond.num_frames     int32   [B]   real frames in the window (padding is at the end)
    record_index   int32   [B]        which record (host-side only; not sent to devices)

Only the batch dimension is sharded on input (over the mesh axes that
``sharding.LOGICAL_RULES`` gives :data:`names.BATCH`); the model constrains its
activations further inside.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from audiodiff_jax.core import names, sharding


class Conditioning(NamedTuple):
    """What the model is conditioned on, besides the noisy latents and the time."""

    tokens: Any  # int32 [B, L]
    seconds_start: Any  # float32 [B]
    seconds_total: Any  # float32 [B]
    num_frames: Any  # int32 [B]
    # Masked context (models with ``model.masked_context``): clean latents the song must
    # keep and where they hold; None = nothing known. Sampling fills them for window
    # overlaps, continuation and inpainting; training draws random spans.
    known: Any = None  # float32 [B, T, C]
    known_mask: Any = None  # float32 [B, T]
    # Musical controls (models with ``model.controls``; core/music.py): tempo in bpm
    # (0 = missing), key index in [0, 24) and time-signature index (-1 = missing).
    # The loader always fills them; None (a caller that has none) = all missing.
    bpm: Any = None  # float32 [B]
    key: Any = None  # int32 [B]
    meter: Any = None  # int32 [B]
    # The guidance scale, for models with ``model.guidance_input`` (distilled students);
    # None = 1 (no guidance). Not in training batches: the distillation step fills it.
    guidance: Any = None  # float32 [B]


class Batch(NamedTuple):
    latents: Any  # float32 [B, T, C]
    loss_mask: Any  # float32 [B, T]
    cond: Conditioning
    record_index: Any = None  # int32 [B] on the host; None in device batches


def batch_spec(batch_size: int, frames: int, latent_channels: int, text_len: int) -> tuple[Batch, Batch]:
    """``(shapes, logical_axes)``: a :class:`Batch` of ``jax.ShapeDtypeStruct`` and one of
    logical-axis tuples, for a device batch (``record_index`` is None in both)."""
    b, t = batch_size, frames
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    sds = jax.ShapeDtypeStruct
    shapes = Batch(
        latents=sds((b, t, latent_channels), f32),
        loss_mask=sds((b, t), f32),
        cond=Conditioning(
            tokens=sds((b, text_len), i32),
            seconds_start=sds((b,), f32),
            seconds_total=sds((b,), f32),
            num_frames=sds((b,), i32),
            bpm=sds((b,), f32),
            key=sds((b,), i32),
            meter=sds((b,), i32),
        ),
    )
    axes = Batch(
        latents=(names.BATCH, None, None),
        loss_mask=(names.BATCH, None),
        cond=Conditioning(
            tokens=(names.BATCH, None),
            seconds_start=(names.BATCH,),
            seconds_total=(names.BATCH,),
            num_frames=(names.BATCH,),
            bpm=(names.BATCH,),
            key=(names.BATCH,),
            meter=(names.BATCH,),
        ),
    )
    return shapes, axes


def config_batch_spec(cfg, *, batch_size: int | None = None, frames: int | None = None):
    """:func:`batch_spec` for a config (``data.global_batch_size``, ``data.window_frames``,
    ``model.latent_channels``, ``model.text.max_len`` unless overridden)."""
    return batch_spec(
        cfg.data.global_batch_size if batch_size is None else batch_size,
        cfg.data.window_frames if frames is None else frames,
        cfg.model.latent_channels,
        cfg.model.text.max_len,
    )


def batch_shardings(mesh: Mesh, axes: Batch | Conditioning | None = None) -> Any:
    """``NamedSharding``s of a device batch (or of a Conditioning) from the logical rules."""
    if axes is None:
        axes = batch_spec(1, 1, 1, 1)[1]
    return sharding.named_shardings(axes, mesh)


def abstract_batch(cfg, mesh: Mesh | None = None, **overrides) -> Batch:
    """The device batch as ``ShapeDtypeStruct``s (sharded on ``mesh`` if given), for AOT."""
    shapes, axes = config_batch_spec(cfg, **overrides)
    if mesh is None:
        return shapes
    return sharding.with_shardings(shapes, batch_shardings(mesh, axes))


def make_global_batch(local: Batch, mesh: Mesh) -> Batch:
    """Assembles global arrays from every process's local batch (``record_index`` dropped).

    Each process passes its own ``[b, ...]`` arrays; the result has global batch
    ``b * process_count``, sharded as :func:`batch_shardings`. This assumes the processes
    own distinct slices of that batch axis, i.e. the batch mesh axes span the hosts;
    hosts that differ only along ``sequence``/``tensor`` would need identical batches.
    """
    device = local._replace(record_index=None)
    return jax.tree.map(
        lambda sh, v: jax.make_array_from_process_local_data(sh, np.asarray(v)),
        batch_shardings(mesh),
        device,
    )
