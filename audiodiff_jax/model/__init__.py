"""The model as pure functions over a plain nested dict of parameters.

The trainer, the checkpointer and the sampler see only :class:`ModelFns`: parameters
are a nested ``dict`` of arrays (string keys only, so Orbax restores the same
structure), which optax, Orbax and ``jax.jit`` treat as an ordinary pytree. The Flax
NNX modules (:mod:`audiodiff_jax.model.dit`) are built and merged inside these
functions by the shared adapter (:mod:`audiodiff_jax.model.module_fns`).

Example::

    fns = make_model(cfg.model)
    shardings = sharding.named_shardings(fns.logical_axes(), mesh)
    params = jax.jit(fns.init, out_shardings=shardings)(jax.random.key(0))
    with jax.set_mesh(mesh):
        v = jax.jit(fns.apply)(params, x_btc, t_b, batch.cond)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from audiodiff_jax.core.config import ModelConfig
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.model.dit import DiT
from audiodiff_jax.model.module_fns import module_fns

Params = dict[str, Any]


class ModelFns(NamedTuple):
    """The model's contract with the trainer and the sampler."""

    # rng key -> params, a pure nested dict of arrays (unsharded; the caller jits it
    # with out_shardings=sharding.named_shardings(logical_axes(), mesh))
    init: Callable[[jax.Array], Params]
    # apply(params, x_btc, t_b, cond: Conditioning) -> v_btc float32; pure, usable
    #   under jax.jit and jax.grad w.r.t. params
    apply: Callable[..., jax.Array]
    # pytree of jax.ShapeDtypeStruct with the structure of params; allocates nothing
    abstract_params: Callable[[], Params]
    # same structure as params, leaves = tuple of logical axis names (one per dim)
    logical_axes: Callable[[], Any]


def make_model(cfg: ModelConfig) -> ModelFns:
    """Builds the pure-function interface of the DiT described by ``cfg``."""
    fns = module_fns(lambda keys: DiT(cfg, keys=keys), "model")

    def apply(params: Params, x_btc: jax.Array, t_b: jax.Array, cond: Conditioning) -> jax.Array:
        return fns.merge(params)(x_btc, t_b, cond)

    return ModelFns(
        init=fns.init, apply=apply, abstract_params=fns.abstract_params, logical_axes=fns.logical_axes
    )


def count_params(params_or_abstract: Any) -> int:
    """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_or_abstract)))


__all__ = ["ModelFns", "Params", "make_model", "count_params"]
