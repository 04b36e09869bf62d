"""The model as pure functions over a plain nested dict of parameters.

The trainer, the checkpointer and the sampler see only :class:`ModelFns`: parameters
are a nested ``dict`` of arrays (string keys only, so Orbax restores the same
structure), which optax, Orbax and ``jax.jit`` treat as an ordinary pytree. The Flax
NNX modules (:mod:`audiodiff_jax.model.dit`) are built and merged inside these
functions.

Example::

    fns = make_model(cfg.model)
    shardings = sharding.named_shardings(fns.logical_axes(), mesh)
    params = jax.jit(fns.init, out_shardings=shardings)(jax.random.key(0))
    with jax.set_mesh(mesh):
        v = jax.jit(fns.apply)(params, x_btc, t_b, tokens_bl, start_b, total_b, num_frames_b)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals

from audiodiff_jax.config import ModelConfig
from audiodiff_jax.model.dit import DiT
from audiodiff_jax.model.layers import ParamKeys

Params = dict[str, Any]


class ModelFns(NamedTuple):
    """The model's contract with the trainer and the sampler."""

    # rng key -> params, a pure nested dict of arrays (unsharded; the caller jits it
    # with out_shardings=sharding.named_shardings(logical_axes(), mesh))
    init: Callable[[jax.Array], Params]
    # apply(params, x_btc, t_b, tokens_bl, seconds_start_b, seconds_total_b, num_frames_b)
    #   -> v_btc float32; pure, usable under jax.jit and jax.grad w.r.t. params
    apply: Callable[..., jax.Array]
    # pytree of jax.ShapeDtypeStruct with the structure of params; allocates nothing
    abstract_params: Callable[[], Params]
    # same structure as params, leaves = tuple of logical axis names (one per dim)
    logical_axes: Callable[[], Any]


def _str_keys(tree):
    # nnx.List children have int keys; checkpoints (Orbax) give them back as strings.
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _build(cfg: ModelConfig, rng: jax.Array) -> DiT:
    # Unsharded construction (see layers.py): placement is the caller's jit out_shardings.
    with nnx.use_eager_sharding(False):
        return DiT(cfg, keys=ParamKeys(rng))


def make_model(cfg: ModelConfig) -> ModelFns:
    """Builds the pure-function interface of the DiT described by ``cfg``."""
    abstract_model = nnx.eval_shape(lambda: _build(cfg, jax.random.key(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    # path (as strings) -> (path as nnx keeps it, abstract Variable)
    variables = {tuple(str(k) for k in path): (path, var) for path, var in nnx.to_flat_state(abstract_state)}
    axes = _str_keys(nnx.to_pure_dict(abstract_state, lambda v: tuple(v.get_metadata("out_sharding"))))
    shapes = _str_keys(nnx.to_pure_dict(abstract_state))  # ShapeDtypeStruct leaves

    def init(rng: jax.Array) -> Params:
        return _str_keys(nnx.to_pure_dict(nnx.state(_build(cfg, rng))))

    def merge(params: Params) -> DiT:
        flat = traversals.flatten_mapping(params)
        if flat.keys() != variables.keys():
            missing = sorted("/".join(p) for p in variables.keys() - flat.keys())
            unknown = sorted("/".join(p) for p in flat.keys() - variables.keys())
            raise ValueError(f"params do not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
        state = nnx.from_flat_state([(variables[p][0], variables[p][1].replace(v)) for p, v in flat.items()])
        return nnx.merge(graphdef, state)

    def apply(params, x_btc, t_b, tokens_bl, seconds_start_b, seconds_total_b, num_frames_b) -> jax.Array:
        return merge(params)(x_btc, t_b, tokens_bl, seconds_start_b, seconds_total_b, num_frames_b)

    def abstract_params() -> Params:
        return _str_keys(shapes)  # a fresh dict: callers may edit theirs

    def logical_axes() -> Any:
        return _str_keys(axes)

    return ModelFns(init=init, apply=apply, abstract_params=abstract_params, logical_axes=logical_axes)


def count_params(params_or_abstract: Any) -> int:
    """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_or_abstract)))


__all__ = ["ModelFns", "Params", "make_model", "count_params"]
