"""Flax NNX modules as pure functions over a nested dict of parameters (string keys).

The trainers, the checkpointer and the samplers see parameters as a plain nested
``dict`` of arrays, which optax, Orbax and ``jax.jit`` treat as an ordinary pytree;
the NNX module is rebuilt from it (:attr:`ModuleFns.merge`) inside jitted code. One
adapter serves the DiT (``audiodiff_jax.model.make_model``) and the codec's VAE and
discriminator (``audiodiff_jax.codec.model``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx
from flax.nnx import traversals

from audiodiff_jax.model.layers import ParamKeys


class ModuleFns(NamedTuple):
    """A module as pure functions over a nested dict of parameters (string keys)."""

    init: Callable[[jax.Array], dict]  # rng key -> params (unsharded; jit with out_shardings)
    merge: Callable[[dict], nnx.Module]  # params -> a module to call (inside jit / grad)
    abstract_params: Callable[[], dict]  # ShapeDtypeStructs; allocates nothing
    logical_axes: Callable[[], Any]  # same structure, leaves = logical axis tuples


def str_keys(tree):
    """Dict keys as strings: nnx.List children have int keys; Orbax and npz give them back as strings."""
    if isinstance(tree, dict):
        return {str(k): str_keys(v) for k, v in tree.items()}
    return tree


def module_fns(build: Callable[[ParamKeys], nnx.Module], name: str = "model") -> ModuleFns:
    """Wraps ``build(keys) -> module`` into :class:`ModuleFns`; ``name`` is for errors."""

    def make(rng):
        # Unsharded construction; placement is the caller's jit out_shardings.
        with nnx.use_eager_sharding(False):
            return build(ParamKeys(rng))

    abstract = nnx.eval_shape(lambda: make(jax.random.key(0)))
    graphdef, abstract_state = nnx.split(abstract)
    variables = {tuple(str(k) for k in path): (path, var) for path, var in nnx.to_flat_state(abstract_state)}
    axes = str_keys(nnx.to_pure_dict(abstract_state, lambda v: tuple(v.get_metadata("out_sharding"))))
    shapes = str_keys(nnx.to_pure_dict(abstract_state))

    def init(rng):
        return str_keys(nnx.to_pure_dict(nnx.state(make(rng))))

    def merge(params):
        flat = traversals.flatten_mapping(params)
        if flat.keys() != variables.keys():
            missing = sorted("/".join(p) for p in variables.keys() - flat.keys())
            unknown = sorted("/".join(p) for p in flat.keys() - variables.keys())
            raise ValueError(f"params do not match the {name}: missing {missing[:5]}, unknown {unknown[:5]}")
        state = nnx.from_flat_state([(variables[p][0], variables[p][1].replace(v)) for p, v in flat.items()])
        return nnx.merge(graphdef, state)

    return ModuleFns(
        init=init,
        merge=merge,
        abstract_params=lambda: str_keys(shapes),
        logical_axes=lambda: str_keys(axes),
    )
