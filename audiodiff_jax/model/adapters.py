"""Low-rank adapters (LoRA) for the DiT: their parameters, logical axes, and the merge.

An adapter holds, for every targeted projection kernel ``W`` of every DiT block
(``adapters.targets``: the query, key, value and output kernels of the self- and
cross-attention, the MLP's ``fc1`` and ``fc2``), two factors ``a [in..., rank]`` and
``b [rank, out...]``, where ``in...`` are ``W``'s input dims and ``out...`` its output
dims (``self_attn.query [embed, heads, head_dim]``: one input dim; ``self_attn.out
[heads, head_dim, embed]``: two). The adapted kernel is::

    W' = W + scale * (alpha / rank) * tensordot(a, b, 1)

``a`` is drawn with the variance of a dense kernel of that fan-in, ``b`` starts at zero,
so an adapter run starts exactly at its base model. The factors take their logical axes
from ``W``'s: ``a`` the axes of ``W``'s input dims plus ``adapter_rank``, ``b``
``adapter_rank`` plus the axes of ``W``'s output dims, so they shard wherever ``W``
shards (``core/sharding.py``; the rank itself is replicated).

The adapter tree mirrors the paths of the kernels it adapts, with ``a`` and ``b`` below
each: ``blocks/3/self_attn/query/a``, ``blocks/3/mlp/fc1/kernel/b``.

Adapters are merged into the base's parameters (:func:`merge`) rather than run as a
second, low-rank path beside each projection: training merges inside the jitted step
(gradients reach ``a`` and ``b`` only; the base is an input of the step, never updated),
and sampling merges a stack of adapters once and samples the merged parameters with the
ordinary model, so every adapter and scale runs through one compiled sampling program
and a stack at scale 0 is the base itself, bit for bit. The costs of that choice are
measured in BENCHMARKS.md ("Adapters").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from audiodiff_jax.core import names
from audiodiff_jax.core.config import AdaptersConfig, ConfigError, ModelConfig
from audiodiff_jax.model import make_model

Params = dict[str, Any]

# Target -> (path of its kernel inside a block, number of input dims of the kernel).
KERNELS: dict[str, tuple[tuple[str, ...], int]] = {
    "self_attn.query": (("self_attn", "query"), 1),
    "self_attn.key": (("self_attn", "key"), 1),
    "self_attn.value": (("self_attn", "value"), 1),
    "self_attn.out": (("self_attn", "out"), 2),
    "cross_attn.query": (("cross_attn", "query"), 1),
    "cross_attn.key": (("cross_attn", "key"), 1),
    "cross_attn.value": (("cross_attn", "value"), 1),
    "cross_attn.out": (("cross_attn", "out"), 2),
    "mlp.fc1": (("mlp", "fc1", "kernel"), 1),
    "mlp.fc2": (("mlp", "fc2", "kernel"), 1),
}
FACTORS = ("a", "b")


class AdapterSpec(NamedTuple):
    """What an adapter's shapes and scale are made of (saved with every adapter)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @classmethod
    def from_config(cls, a: AdaptersConfig) -> AdapterSpec:
        return cls(int(a.rank), float(a.alpha), tuple(a.targets))

    @property
    def factor(self) -> float:
        """The update's scale at adapter scale 1: ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


class Adapter(NamedTuple):
    """An adapter in memory: its factors and the base model it was trained on."""

    params: Params
    spec: AdapterSpec
    base: dict[str, Any]  # the base's identity: {"name": ..., "hash": "sha256:..."}
    name: str = ""  # how manifests and errors name it (its folder, or run and step)


class _Kernel(NamedTuple):
    path: tuple[str, ...]  # in the model's params
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    inputs: int  # leading dims of the kernel that are its inputs


class AdapterFns(NamedTuple):
    """The adapter of one model and spec as pure functions (like ``model.ModelFns``)."""

    init: Callable[[jax.Array], Params]  # rng key -> adapter params (unsharded; jit with out_shardings)
    abstract_params: Callable[[], Params]  # ShapeDtypeStructs
    logical_axes: Callable[[], Any]  # same structure, leaves = logical axis tuples
    spec: AdapterSpec


def _kernels(model_cfg: ModelConfig, targets: Sequence[str]) -> list[_Kernel]:
    fns = make_model(model_cfg)
    shapes = traverse_util.flatten_dict(fns.abstract_params())
    axes = traverse_util.flatten_dict(fns.logical_axes())
    out = []
    for i in range(model_cfg.depth):
        for t in targets:
            rel, inputs = KERNELS[t]
            path = ("blocks", str(i), *rel)
            out.append(_Kernel(path, tuple(shapes[path].shape), tuple(axes[path]), inputs))
    return out


def check_rank(model_cfg: ModelConfig, spec: AdapterSpec) -> None:
    """Raises ConfigError when ``spec.rank`` exceeds what a targeted kernel can hold: a
    low-rank update of a kernel mapping ``n`` inputs to ``m`` outputs has rank at most
    ``min(n, m)``."""
    for k in _kernels(model_cfg, spec.targets)[: len(spec.targets)]:
        n, m = math.prod(k.shape[: k.inputs]), math.prod(k.shape[k.inputs :])
        if spec.rank > min(n, m):
            target = next(t for t, (rel, _) in KERNELS.items() if k.path[2:] == rel)
            raise ConfigError(
                f"adapters.rank={spec.rank} is larger than {target} can use: its kernel maps {n} inputs "
                f"to {m} outputs (model.width={model_cfg.width}), so its update has rank at most {min(n, m)}"
            )


def make_adapter(model_cfg: ModelConfig, spec: AdapterSpec) -> AdapterFns:
    """The adapter of ``spec`` on the DiT of ``model_cfg`` (rank checked: ConfigError)."""
    check_rank(model_cfg, spec)
    kernels = _kernels(model_cfg, spec.targets)
    r = spec.rank

    def shapes(k: _Kernel) -> dict[str, tuple[int, ...]]:
        return {"a": (*k.shape[: k.inputs], r), "b": (r, *k.shape[k.inputs :])}

    def init(rng: jax.Array) -> Params:
        flat = {}
        for n, k in enumerate(kernels):
            s = shapes(k)
            fan_in = math.prod(k.shape[: k.inputs])
            a = jax.random.normal(jax.random.fold_in(rng, n), s["a"], jnp.float32) / math.sqrt(fan_in)
            flat[(*k.path, "a")] = a
            flat[(*k.path, "b")] = jnp.zeros(s["b"], jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def abstract_params() -> Params:
        flat = {}
        for k in kernels:
            for f, shape in shapes(k).items():
                flat[(*k.path, f)] = jax.ShapeDtypeStruct(shape, jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def logical_axes() -> Any:
        flat = {}
        for k in kernels:
            flat[(*k.path, "a")] = (*k.axes[: k.inputs], names.ADAPTER_RANK)
            flat[(*k.path, "b")] = (names.ADAPTER_RANK, *k.axes[k.inputs :])
        return traverse_util.unflatten_dict(flat)

    return AdapterFns(init, abstract_params, logical_axes, spec)


def kernel_paths(adapter_params: Params) -> list[tuple[str, ...]]:
    """The paths (in the model's params) of the kernels an adapter adapts, sorted."""
    return sorted({p[:-1] for p in traverse_util.flatten_dict(adapter_params)})


def rank_keep(rng: jax.Array, adapter_params: Params, dropout: float) -> dict[tuple[str, ...], jax.Array]:
    """Rank dropout for one step: per adapted kernel, a mask ``[rank]`` of kept rank
    components scaled by ``1 / (1 - dropout)`` (the expected update is unchanged)."""
    flat = traverse_util.flatten_dict(adapter_params)
    out = {}
    for n, path in enumerate(kernel_paths(adapter_params)):
        rank = flat[(*path, "a")].shape[-1]
        kept = jax.random.bernoulli(jax.random.fold_in(rng, n), 1.0 - dropout, (rank,))
        out[path] = kept.astype(jnp.float32) / (1.0 - dropout)
    return out


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """The low-rank update ``tensordot(a, b, 1)`` in float32 (the kernel's shape)."""
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge(
    base: Params,
    stack: Sequence[tuple[Params, float]],
    *,
    keep: dict[tuple[str, ...], jax.Array] | None = None,
) -> Params:
    """The base's parameters with adapters added: ``W + factor * tensordot(a, b, 1)`` for
    each ``(adapter params, factor)`` of ``stack`` in turn (``factor`` = scale * alpha /
    rank), in float32, cast back to ``W``'s dtype. An adapter of factor 0 is skipped:
    with every factor 0 the result holds the base's own arrays. ``keep``: rank dropout
    masks (:func:`rank_keep`), for a one-adapter stack. Works under ``jax.jit`` and on
    host arrays."""
    live = [(params, factor) for params, factor in stack if factor != 0]
    if not live:
        return base
    out = traverse_util.flatten_dict(base)
    for params, factor in live:
        flat = traverse_util.flatten_dict(params)
        for path in kernel_paths(params):
            if path not in out:
                raise ValueError(f"the adapter adapts {'/'.join(path)}, which the model does not have")
            a = flat[(*path, "a")]
            if keep is not None:
                a = a * keep[path]
            w = out[path]
            d = delta(a, flat[(*path, "b")])
            if d.shape != w.shape:
                raise ValueError(
                    f"the adapter's update of {'/'.join(path)} has shape {d.shape}, the kernel {w.shape}"
                )
            out[path] = (w.astype(jnp.float32) + factor * d).astype(w.dtype)
    return traverse_util.unflatten_dict(out)


def merge_stack(base: Params, stack: Sequence[tuple[Adapter, float]]) -> Params:
    """:func:`merge` of loaded adapters at their scales."""
    return merge(base, [(a.params, scale * a.spec.factor) for a, scale in stack])


def count_params(adapter_params: Params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(adapter_params)))
