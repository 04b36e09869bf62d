"""Attention: the one ``dot_product_attention`` function, rotary embeddings, and the module.

``dot_product_attention`` picks its implementation from ``model.attention``:

- ``"xla"``: plain einsums with a float32 softmax. Runs everywhere (CPU tests).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the cuDNN
  flash kernel on GPU (bf16/fp16 inputs only). Padding goes in as
  ``key_value_seq_lengths``, so it assumes padding sits at the end of each row (true for
  latent frames and for tokenized captions).
- ``"splash"``: Pallas splash attention on TPU. Padding goes in as segment ids (valid
  keys 1, padded keys 0, every query 1). Under a mesh it runs inside ``shard_map``
  (batch over data x fsdp, heads over tensor). The kernel tiles 128 x 128: other
  lengths (the 6,460-frame window, captions) are padded up to the next multiple, the
  padded keys masked out and the padded query rows cut off, so the kernel runs at every
  length (``audiodiff-compile`` reports the kernels it finds in each program).

Masking convention: ``kv_mask_bs`` is True where a key may be attended to. A query
whose row has no valid key (an all-pad caption) gets an output of exactly zero; the
softmax for such a row is computed over all keys instead (a finite, unused value), so
neither the output nor its gradient can turn into NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from audiodiff_jax.core import names
from audiodiff_jax.core.sharding import constrain, logical_to_spec
from audiodiff_jax.model.layers import ParamKeys, RMSNorm, make_param

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
_SPLASH_BLOCK = 128
# Run splash in Pallas interpret mode (CPU tests of the wrapper); never set in training.
_SPLASH_INTERPRET = False


# ---------------------------------------------------------------------------
# Rotary position embeddings


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables ``[length, head_dim // 2]`` (float32) for positions 0..length-1."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd: jax.Array, cos_td: jax.Array, sin_td: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + head_dim/2) of every head by position-dependent angles.

    Then q(m) . k(n) depends on positions only through m - n: attention over frames is
    relative, and a model trained on short crops applies unchanged to long songs.
    """
    x32 = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos = cos_td[None, :, None, :]
    sin = sin_td[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


# ---------------------------------------------------------------------------
# The attention function


def _xla_attention(q, k, v, kv_mask_bs):
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if kv_mask_bs is not None:
        # finfo.min rather than -inf: a row with no valid key stays finite (and is zeroed later).
        logits = jnp.where(kv_mask_bs[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


def _jax_nn_attention(q, k, v, kv_mask_bs, implementation="cudnn"):
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention='cudnn' needs model.dtype='bfloat16' (got {q.dtype} activations)")
    lengths = None
    if kv_mask_bs is not None:
        # cuDNN takes lengths, not masks: valid keys must be a prefix of each row.
        lengths = jnp.sum(kv_mask_bs, axis=-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


def _splash_attention(q, k, v, kv_mask_bs):
    """Pallas splash attention; lengths must be multiples of ``_SPLASH_BLOCK``."""
    # Here, not at the top: the TPU Pallas ops import only where splash is chosen.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, t, _, d = q.shape
    s = k.shape[1]
    if kv_mask_bs is None:
        kv_mask_bs = jnp.ones(k.shape[:2], jnp.bool_)
    # splash does not scale the logits; [B, T, H, D] -> [B, H, T, D] (head-major per example).
    q_bhtd = jnp.swapaxes(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), 1, 2)
    k_bhsd = jnp.swapaxes(k, 1, 2)
    v_bhsd = jnp.swapaxes(v, 1, 2)
    seg_q = jnp.ones(q.shape[:2], jnp.int32)
    seg_kv = kv_mask_bs.astype(jnp.int32)

    def per_shard(q_bhtd, k_bhsd, v_bhsd, seg_q, seg_kv):
        heads = q_bhtd.shape[1]
        kernel = sa.make_splash_mha(
            mask=sa.MultiHeadMask([sa.FullMask((t, s))] * heads),
            head_shards=1,
            q_seq_shards=1,
            interpret=_SPLASH_INTERPRET,
        )
        one = lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(sq, skv))
        return jax.vmap(one)(q_bhtd, k_bhsd, v_bhsd, seg_q, seg_kv)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = per_shard(q_bhtd, k_bhsd, v_bhsd, seg_q, seg_kv)
    else:
        # A Pallas kernel cannot be partitioned by GSPMD: run it per shard. Batch and heads
        # split as the surrounding activations are; the lengths are gathered (a key shard
        # needs every query of its row and vice versa).
        batch = logical_to_spec((names.BATCH,))[0]
        heads = logical_to_spec((names.ACT_HEADS,))[0]
        qkv_spec = P(batch, heads, None, None)
        seg_spec = P(batch, None)
        out = jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
            out_specs=qkv_spec,
            check_vma=False,
        )(q_bhtd, k_bhsd, v_bhsd, seg_q, seg_kv)
    return jnp.swapaxes(out, 1, 2)


def _padded_splash_attention(q, k, v, kv_mask_bs):
    """Splash at any length: queries and keys padded up to the kernel's block multiple,
    the padded keys masked out (segment 0) and the padded query rows cut off again, so
    the kernel runs at every window (e.g. 6,460 frames) instead of falling back to XLA."""
    t, s = q.shape[1], k.shape[1]
    tp, sp = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK, -(-s // _SPLASH_BLOCK) * _SPLASH_BLOCK
    if kv_mask_bs is None:
        kv_mask_bs = jnp.ones(k.shape[:2], jnp.bool_)
    if tp != t:
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    if sp != s:
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        kv_mask_bs = jnp.pad(kv_mask_bs, ((0, 0), (0, sp - s)))  # padded keys: never attended
    return _splash_attention(q, k, v, kv_mask_bs)[:, :t]


def dot_product_attention(
    q_bthd: jax.Array,
    k_bshd: jax.Array,
    v_bshd: jax.Array,
    *,
    impl: str,
    kv_mask_bs: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` over heads.

    Args:
      q_bthd: queries ``[batch, q_len, heads, head_dim]``.
      k_bshd, v_bshd: keys and values ``[batch, kv_len, heads, head_dim]``.
      impl: "xla", "cudnn" or "splash" (see the module docstring).
      kv_mask_bs: bool ``[batch, kv_len]``, True for keys that may be attended to;
        None = all. cudnn needs the valid keys to be a prefix of each row.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in the dtype of ``v``; zero for rows with no
      valid key.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={impl!r}; one of {IMPLEMENTATIONS}")
    any_valid_b = None
    if kv_mask_bs is not None:
        any_valid_b = jnp.any(kv_mask_bs, axis=-1)
        # A row without valid keys attends to all of them (finite), then is zeroed below.
        kv_mask_bs = kv_mask_bs | ~any_valid_b[:, None]
    fn = {"xla": _xla_attention, "cudnn": _jax_nn_attention, "splash": _padded_splash_attention}[impl]
    out = fn(q_bthd, k_bshd, v_bshd, kv_mask_bs)
    if any_valid_b is not None:
        out = jnp.where(any_valid_b[:, None, None, None], out, jnp.zeros((), out.dtype))
    return out.astype(v_bshd.dtype)


# ---------------------------------------------------------------------------
# The module


class Attention(nnx.Module):
    """Multi-head attention with QK-norm; self-attention (with RoPE) or cross-attention.

    Parameters: ``query``/``key``/``value`` ``[embed, heads, head_dim]``, ``out``
    ``[heads, head_dim, embed]`` (no biases), ``q_norm``/``k_norm`` ``[head_dim]``.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        kv_width: int | None = None,
        impl: str,
        zero_init_out: bool = False,
        dtype,
        param_dtype,
        keys: ParamKeys,
    ):
        head_dim = width // num_heads
        kv_width = width if kv_width is None else kv_width
        self.impl = impl
        self.dtype = dtype
        in_init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        out_init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
        if zero_init_out:
            out_init = jax.nn.initializers.zeros
        qkv_axes = (names.EMBED, names.HEADS, names.HEAD_DIM)
        self.query = make_param(keys, in_init, (width, num_heads, head_dim), qkv_axes, param_dtype)
        self.key = make_param(keys, in_init, (kv_width, num_heads, head_dim), qkv_axes, param_dtype)
        self.value = make_param(keys, in_init, (kv_width, num_heads, head_dim), qkv_axes, param_dtype)
        self.out = make_param(
            keys,
            out_init,
            (num_heads, head_dim, width),
            (names.HEADS, names.HEAD_DIM, names.EMBED),
            param_dtype,
        )
        self.q_norm = RMSNorm(head_dim, names.HEAD_DIM, param_dtype=param_dtype, keys=keys)
        self.k_norm = RMSNorm(head_dim, names.HEAD_DIM, param_dtype=param_dtype, keys=keys)

    def __call__(
        self,
        x_btd: jax.Array,
        context_bsd: jax.Array | None = None,
        *,
        kv_mask_bs: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        length_axis: str = names.LENGTH,
        kv_length_axis: str | None = None,
    ) -> jax.Array:
        """Self-attention when ``context_bsd`` is None, else cross-attention to it.

        ``rope`` = (cos, sin) tables from :func:`rope_tables`, applied to queries and
        keys (self-attention only: the two sequences of cross-attention have no common
        positions).
        """
        dt = self.dtype
        ctx = x_btd if context_bsd is None else context_bsd
        kv_length_axis = length_axis if kv_length_axis is None else kv_length_axis
        q = jnp.einsum("btd,dhk->bthk", x_btd.astype(dt), self.query[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", ctx.astype(dt), self.key[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", ctx.astype(dt), self.value[...].astype(dt))
        q = constrain(q, (names.BATCH, length_axis, names.ACT_HEADS, names.HEAD_DIM))
        k = constrain(k, (names.BATCH, kv_length_axis, names.ACT_HEADS, names.HEAD_DIM))
        v = constrain(v, (names.BATCH, kv_length_axis, names.ACT_HEADS, names.HEAD_DIM))
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        o = dot_product_attention(q, k, v, impl=self.impl, kv_mask_bs=kv_mask_bs)
        o = constrain(o, (names.BATCH, length_axis, names.ACT_HEADS, names.HEAD_DIM))
        return jnp.einsum("bthk,hkd->btd", o, self.out[...].astype(dt))
