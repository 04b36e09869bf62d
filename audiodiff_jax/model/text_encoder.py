"""Caption encoder: a small pre-LN transformer over sentencepiece ids, trained with the DiT.

Token id 0 is padding (the tokenizer pads at the end and always emits at least EOS).
Pad positions are masked as keys everywhere, so the outputs at real tokens, and the
DiT's cross-attention, do not depend on how much padding a batch carries. Positions
are rotary (RoPE), so there is no table tied to ``text.max_len``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from audiodiff_jax.core import names
from audiodiff_jax.core.config import TextEncoderConfig
from audiodiff_jax.core.sharding import constrain
from audiodiff_jax.model.attention import Attention, rope_tables
from audiodiff_jax.model.layers import Dense, LayerNorm, Mlp, ParamKeys, dtype_of, make_param

PAD_ID = 0
# Captions are short; the usual base suffices (model.rope_theta is for long latent sequences).
ROPE_THETA = 10000.0


class TextBlock(nnx.Module):
    """Pre-LN transformer layer: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, cfg: TextEncoderConfig, *, impl: str, dtype, param_dtype, keys: ParamKeys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.norm1 = LayerNorm(cfg.width, **kw)
        self.attn = Attention(cfg.width, cfg.num_heads, impl=impl, **kw)
        self.norm2 = LayerNorm(cfg.width, **kw)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), **kw)

    def __call__(self, x_bld, mask_bl, rope):
        x_bld = x_bld + self.attn(
            self.norm1(x_bld), kv_mask_bs=mask_bl, rope=rope, length_axis=names.TEXT_LENGTH
        )
        x_bld = x_bld + self.mlp(self.norm2(x_bld), length_axis=names.TEXT_LENGTH)
        return constrain(x_bld, (names.BATCH, names.TEXT_LENGTH, names.ACT_EMBED))


class TextEncoder(nnx.Module):
    """tokens ``[B, L]`` -> (context ``[B, L, out_width]``, mask ``[B, L]`` True at real tokens)."""

    def __init__(
        self,
        cfg: TextEncoderConfig,
        out_width: int,
        *,
        impl: str,
        dtype: str,
        param_dtype: str,
        keys: ParamKeys,
    ):
        dt, pdt = dtype_of(dtype), dtype_of(param_dtype)
        self.head_dim = cfg.width // cfg.num_heads
        self.dtype = dt
        self.token_embedding = make_param(
            keys,
            jax.nn.initializers.normal(0.02),
            (cfg.vocab_size, cfg.width),
            (names.VOCAB, names.EMBED),
            pdt,
        )
        self.layers = nnx.List(
            [TextBlock(cfg, impl=impl, dtype=dt, param_dtype=pdt, keys=keys) for _ in range(cfg.depth)]
        )
        self.final_norm = LayerNorm(cfg.width, dtype=dt, param_dtype=pdt, keys=keys)
        self.proj = Dense(
            cfg.width, out_width, (names.EMBED, names.EMBED), dtype=dt, param_dtype=pdt, keys=keys
        )

    def __call__(self, tokens_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
        mask_bl = tokens_bl != PAD_ID
        x = jnp.take(self.token_embedding[...], tokens_bl, axis=0).astype(self.dtype)
        x = constrain(x, (names.BATCH, names.TEXT_LENGTH, names.ACT_EMBED))
        rope = rope_tables(tokens_bl.shape[1], self.head_dim, ROPE_THETA)
        for layer in self.layers:
            x = layer(x, mask_bl, rope)
        ctx = self.proj(self.final_norm(x))
        return constrain(ctx, (names.BATCH, names.TEXT_LENGTH, names.ACT_EMBED)), mask_bl
