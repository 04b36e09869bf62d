"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter of the model carries a tuple of logical axis names
(:mod:`audiodiff_jax.core.names`); :data:`LOGICAL_RULES` maps each name to mesh axes of the
mesh built by :func:`make_mesh` (``data``, ``fsdp``, ``sequence``, ``tensor``, all of
type ``AxisType.Auto``, so XLA's GSPMD partitioner propagates shardings between the
annotated points). Parameters get their shardings from :func:`named_shardings` (used as
``out_shardings`` of the jitted init, so initialization happens directly sharded);
activations are pinned at block boundaries with :func:`constrain`.

Mesh context. :func:`constrain` reads the mesh that is current *while tracing*
(``jax.sharding.get_abstract_mesh()``); with none set it does nothing, so the model
also runs plainly in unit tests. The train step therefore has to be traced (its first
call, or ``.lower()``) and called inside ``with jax.set_mesh(mesh):``. Entering it
once around the whole training loop is the simple way; a jitted function traced
outside the context would silently lose the activation constraints (jit's cache is
keyed on the context mesh, so calling it inside later re-traces rather than reusing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from audiodiff_jax.core import names
from audiodiff_jax.core.config import ConfigError, MeshConfig, resolve_mesh_shape

MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axes. Parameters are sharded FSDP-style over their model width
# ("embed" -> fsdp) and Megatron-style over heads / MLP hidden units (-> tensor);
# activations are split over the batch (data x fsdp) and the frames (sequence).
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    (names.BATCH, ("data", "fsdp")),
    (names.LENGTH, "sequence"),
    (names.TEXT_LENGTH, None),  # captions are short; sharding them buys nothing
    (names.ACT_EMBED, None),
    (names.ACT_HEADS, "tensor"),
    (names.ACT_MLP, "tensor"),
    # parameters
    (names.EMBED, "fsdp"),
    (names.MLP, "tensor"),
    (names.HEADS, "tensor"),
    (names.HEAD_DIM, None),
    (names.LATENT, None),
    (names.VOCAB, None),
    (names.COND, None),
    (names.MODULATION, None),
    (names.NORM, None),
    # Adapters shard like the kernel they adapt on its other axes; the rank is small.
    (names.ADAPTER_RANK, None),
)
_RULES = dict(LOGICAL_RULES)


def _ici_dcn_shapes(mesh_cfg: MeshConfig, num_devices: int) -> tuple[list[int], list[int]]:
    total = resolve_mesh_shape(mesh_cfg, num_devices)
    dcn = [getattr(mesh_cfg, "dcn_" + a) for a in names.MESH_AXES]
    ici = [total[a] // d for a, d in zip(names.MESH_AXES, dcn, strict=True)]
    return ici, dcn


def _hybrid_from_groups(groups: Sequence[Sequence[Any]], ici: list[int], dcn: list[int]) -> np.ndarray:
    """Lays out slices (device groups) as ``create_hybrid_device_mesh`` does.

    Each mesh axis of size ``dcn[i] * ici[i]`` is slice-major: the DCN index varies
    slowest, so collectives along an axis stay inside a slice as long as possible.
    """
    per_slice = [mesh_utils.create_device_mesh(ici, list(g), allow_split_physical_axes=True) for g in groups]
    arr = np.stack(per_slice).reshape(*dcn, *ici)
    n = len(ici)
    # (d0, .., dn, i0, .., in) -> (d0, i0, d1, i1, ..) -> (d0*i0, d1*i1, ..)
    order = [k for pair in zip(range(n), range(n, 2 * n), strict=True) for k in pair]
    return arr.transpose(order).reshape([d * i for d, i in zip(dcn, ici, strict=True)])


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None, *, granule: str = "auto") -> Mesh:
    """Builds the ``(data, fsdp, sequence, tensor)`` mesh, every axis ``AxisType.Auto``.

    Args:
      mesh_cfg: ICI sizes (one may be -1) and DCN sizes of the four axes.
      devices: devices to use; all of ``jax.devices()`` by default.
      granule: what a "slice" is when any ``mesh.dcn_*`` > 1. ``"slice"``: TPU slices
        (``device.slice_index``); ``"process"``: one host each (GPU clusters);
        ``"consecutive"``: consecutive equal groups of ``devices`` (fake CPU devices in
        tests); ``"auto"``: slices if the devices span several, else processes if they
        span several, else consecutive groups.

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``names.MESH_AXES``.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = _ici_dcn_shapes(mesh_cfg, len(devices))
    num_slices = int(np.prod(dcn))
    if num_slices == 1:
        arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        if granule == "auto":
            if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
                granule = "slice"
            elif len({d.process_index for d in devices}) > 1:
                granule = "process"
            else:
                granule = "consecutive"
        if granule in ("slice", "process"):
            attr = "slice_index" if granule == "slice" else "process_index"
            found = len({getattr(d, attr, 0) for d in devices})
            if found != num_slices:
                raise ConfigError(
                    f"mesh.dcn_* multiply to {num_slices} slices but the devices span {found} "
                    f"(by {attr}); set mesh.dcn_data etc. to match"
                )
            arr = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=granule == "process", allow_split_physical_axes=True
            )
        elif granule == "consecutive":
            size = len(devices) // num_slices
            groups = [devices[i * size : (i + 1) * size] for i in range(num_slices)]
            arr = _hybrid_from_groups(groups, ici, dcn)
        else:
            raise ValueError(f"granule={granule!r}; one of auto, slice, process, consecutive")
    return Mesh(arr, names.MESH_AXES, axis_types=(AxisType.Auto,) * len(names.MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> PartitionSpec:
    """Maps a tuple of logical axis names (one per array dim) to a PartitionSpec.

    A mesh axis may shard only one dim of an array: when a later dim maps to a mesh
    axis already used (e.g. a width x width kernel, both dims "embed"), it is left
    replicated.
    """
    table = _RULES if rules is LOGICAL_RULES else dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in sharding.LOGICAL_RULES")
        axes = table[name]
        if axes is None:
            out.append(None)
            continue
        tup = (axes,) if isinstance(axes, str) else tuple(axes)
        if used.intersection(tup):
            out.append(None)
            continue
        used.update(tup)
        out.append(axes)
    return PartitionSpec(*out)


def _is_axes_leaf(x) -> bool:
    # Tuples are pytree nodes; a tuple of names (or the empty tuple of a scalar) is a leaf here.
    return isinstance(x, tuple) and all(isinstance(e, str | None) for e in x)


def _fit_spec(spec: PartitionSpec, axis_names: Sequence[str]) -> PartitionSpec:
    """Drops mesh axes that this mesh does not have (e.g. a sampling mesh without "sequence")."""
    have = set(axis_names)

    def fit(entry):
        if entry is None:
            return None
        tup = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(a for a in tup if a in have)
        if not kept:
            return None
        return kept[0] if len(kept) == 1 else kept

    return PartitionSpec(*(fit(e) for e in spec))


def named_shardings(logical_axes_tree: Any, mesh: Mesh) -> Any:
    """Pytree of logical-axes tuples -> pytree of ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(
        lambda ax: NamedSharding(mesh, _fit_spec(logical_to_spec(ax), mesh.axis_names)),
        logical_axes_tree,
        is_leaf=_is_axes_leaf,
    )


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """Pytree of ShapeDtypeStructs (or arrays) + matching pytree of shardings -> sharded
    ``ShapeDtypeStruct``s: the stand-ins for restores and ahead-of-time compiles."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pins the sharding of an activation, if a mesh is set (``jax.set_mesh``).

    Without a mesh in context this returns ``x`` unchanged, so modules run unsharded
    in tests and in eager code. See the module docstring for the context to enter.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.are_all_axes_manual:
        return x
    spec = _fit_spec(logical_to_spec(logical_axes), mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of input batches: the leading (batch) dim as the rules place it, the rest replicated."""
    return named_shardings((names.BATCH,), mesh)


def _shards(mesh: Mesh, logical: str) -> int:
    spec = _fit_spec(logical_to_spec((logical,)), mesh.axis_names)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split on ``mesh`` (batch sizes must divide by it)."""
    return _shards(mesh, names.BATCH)


def length_shards(mesh: Mesh) -> int:
    """How many ways the frame (length) dimension is split on ``mesh``."""
    return _shards(mesh, names.LENGTH)
