"""Building blocks shared by the DiT and the text encoder: dense layers, norms, MLPs.

Every parameter is an ``nnx.Param`` stored in ``param_dtype`` whose ``out_sharding``
metadata holds its logical axis names (mapped to mesh axes by
:data:`audiodiff_jax.core.sharding.LOGICAL_RULES`). Parameters are created with
``eager_sharding=False``: the model is initialized unsharded inside a ``jax.jit`` whose
``out_shardings`` place it on the mesh, so no mesh needs to be in context at
construction. Layers compute in ``dtype`` (bf16 in training) and keep norms and other
reductions in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from audiodiff_jax.core import names
from audiodiff_jax.core.sharding import constrain

Initializer = Callable[..., jax.Array]

xavier_uniform = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def dtype_of(name: str) -> jnp.dtype:
    """ "float32" / "bfloat16" (config strings) -> jnp dtype."""
    return jnp.dtype(name)


class ParamKeys:
    """Initialization keys: the n-th parameter created gets ``fold_in(key, n)``.

    Used instead of ``nnx.Rngs``: each draw from an ``nnx.Rngs`` stream updates a
    counter Variable, and under tracing (the jitted init, ``nnx.eval_shape``) jax 0.10.2
    spends time linear in the trace on each update (``getattr(tracer, "sharding")``
    formats an error message that walks the jaxpr), so building the 3B model took 17 s.
    A Python counter costs nothing and gives the same determinism.
    """

    def __init__(self, key: jax.Array):
        self.key = key
        self.count = 0

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def make_param(
    keys: ParamKeys, init: Initializer, shape: Sequence[int], axes: tuple[str, ...], param_dtype
) -> nnx.Param:
    """An ``nnx.Param`` carrying its logical axis names, one per dim."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the parameter shape {tuple(shape)}")
    value = init(keys(), tuple(shape), param_dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]`` named ``axes``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        use_bias: bool = True,
        kernel_init: Initializer = xavier_uniform,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        keys: ParamKeys,
    ):
        self.dtype = dtype
        self.kernel = make_param(keys, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = make_param(keys, zeros, (out_features,), (axes[1],), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32; optional learned scale and bias (axis "norm").

    The DiT's modulated norms have no affine parameters (AdaLN supplies them).
    """

    def __init__(
        self,
        dim: int,
        *,
        use_affine: bool = True,
        eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        keys: ParamKeys,
    ):
        self.eps = eps
        self.dtype = dtype
        if use_affine:
            self.scale = make_param(keys, ones, (dim,), (names.NORM,), param_dtype)
            self.bias = make_param(keys, zeros, (dim,), (names.NORM,), param_dtype)
        else:
            self.scale = None
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in float32 with a learned scale; used on queries and keys (QK-norm).

    QK-norm bounds attention logits, which keeps bf16 training of the large presets
    stable without a lower learning rate.
    """

    def __init__(
        self, dim: int, axis_name: str, *, eps: float = 1e-6, param_dtype=jnp.float32, keys: ParamKeys
    ):
        self.eps = eps
        self.scale = make_param(keys, ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Mlp(nnx.Module):
    """Two dense layers with a tanh-GELU between; hidden units sharded over "mlp"."""

    def __init__(self, width: int, hidden: int, *, dtype, param_dtype, keys: ParamKeys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc1 = Dense(width, hidden, (names.EMBED, names.MLP), **kw)
        self.fc2 = Dense(hidden, width, (names.MLP, names.EMBED), **kw)

    def __call__(self, x: jax.Array, length_axis: str = names.LENGTH) -> jax.Array:
        h = self.fc1(x)
        h = constrain(h, (names.BATCH, length_axis, names.ACT_MLP))
        h = jax.nn.gelu(h, approximate=True)
        return self.fc2(h)


def sinusoidal_embedding(x_b: jax.Array, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0):
    """Sinusoidal features ``[B, dim]`` of a scalar per example (float32).

    Inputs in [0, 1] are multiplied by ``scale`` first: with the usual ``max_period``
    the fastest frequency then turns ~1000 radians over the unit interval, so nearby
    timesteps get distinct features (as DiT's t in [0, 1000]).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (x_b.astype(jnp.float32) * scale)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ScalarEmbedder(nnx.Module):
    """Scalar in [0, 1] -> sinusoidal features -> MLP -> model width (timestep, timing)."""

    def __init__(self, freq_dim: int, width: int, *, dtype, param_dtype, keys: ParamKeys):
        self.freq_dim = freq_dim
        # DiT initializes the embedding MLPs with std 0.02
        init = jax.nn.initializers.normal(0.02)
        kw = dict(kernel_init=init, dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc1 = Dense(freq_dim, width, (names.COND, names.EMBED), **kw)
        self.fc2 = Dense(width, width, (names.EMBED, names.EMBED), **kw)

    def __call__(self, s_b: jax.Array) -> jax.Array:
        h = self.fc1(sinusoidal_embedding(s_b, self.freq_dim))
        return self.fc2(jax.nn.silu(h))
