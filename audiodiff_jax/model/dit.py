"""The Diffusion Transformer (DiT) over 1-D latent sequences ``[frames, channels]``.

One forward pass, in the order a batch goes through it:

1. ``x_embedder``: latent channels -> width, per frame. With ``model.masked_context`` the
   input is ``[noisy latents, known latents * mask, mask]`` (:func:`with_context`): the
   frames a song must keep (window overlaps, continuation, inpainting) given clean.
2. Conditioning vector ``c`` (one per example) = ``t_embedder(t)`` +
   ``start_embedder(seconds_start / max_seconds)`` +
   ``total_embedder(seconds_total / max_seconds)`` (+ ``control_embedder``: tempo, key
   and time signature, for models with ``model.controls``; :class:`ControlEmbedder`)
   (+ ``guidance_embedder``: the guidance scale of a distilled student; :class:`GuidanceEmbedder`).
3. ``text_encoder``: caption tokens -> context for cross-attention, and its pad mask.
4. ``blocks``: ``DiTBlock`` x depth (unrolled, or with ``model.scan_layers`` one
   ``lax.scan`` over the blocks' parameters stacked inside the step). Each: AdaLN-zero
   self-attention with RoPE over frames (keys beyond ``num_frames`` masked),
   cross-attention to the caption (pad tokens masked), AdaLN-zero MLP. The modulation
   and the cross-attention output start at zero, so every block starts as the identity.
5. ``final_layer``: AdaLN-modulated LayerNorm and a zero-initialized projection back to
   latent channels, in float32. The model output is exactly zero at initialization.

Attribute names are checkpoint keys; do not rename them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from audiodiff_jax.core import music, names
from audiodiff_jax.core.config import ModelConfig
from audiodiff_jax.core.sharding import constrain
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.model.attention import Attention, rope_tables
from audiodiff_jax.model.layers import (
    Dense,
    LayerNorm,
    Mlp,
    ParamKeys,
    ScalarEmbedder,
    dtype_of,
    make_param,
    sinusoidal_embedding,
)
from audiodiff_jax.model.text_encoder import TextEncoder

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def modulate(x_btd: jax.Array, shift_bd: jax.Array, scale_bd: jax.Array) -> jax.Array:
    return x_btd * (1 + scale_bd[:, None, :]) + shift_bd[:, None, :]


def with_context(x_btc: jax.Array, cond: Conditioning) -> jax.Array:
    """``[noisy, known * mask, mask]`` along channels: the masked-context input (zeros where
    ``cond`` carries no context, i.e. nothing known)."""
    if cond.known is None:
        known = jnp.zeros_like(x_btc)
        mask = jnp.zeros(x_btc.shape[:2] + (1,), x_btc.dtype)
    else:
        mask = cond.known_mask.astype(x_btc.dtype)[..., None]
        known = cond.known.astype(x_btc.dtype) * mask
    return jnp.concatenate([x_btc, known, mask], axis=-1)


class DiTBlock(nnx.Module):
    """AdaLN-zero transformer block with self-attention, cross-attention and an MLP."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, keys: ParamKeys):
        w = cfg.width
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        # shift, scale, gate for attention and for the MLP. Zero-init: gates are 0 at
        # start, so the block is the identity (DiT's adaLN-Zero).
        self.modulation = Dense(
            w, 6 * w, (names.EMBED, names.MODULATION), kernel_init=jax.nn.initializers.zeros, **kw
        )
        self.norm1 = LayerNorm(w, use_affine=False, **kw)
        self.self_attn = Attention(w, cfg.num_heads, impl=cfg.attention, **kw)
        self.cross_norm = LayerNorm(w, **kw)
        # Ungated (as PixArt-alpha); its zero-initialized output keeps the block an identity at start.
        self.cross_attn = Attention(w, cfg.num_heads, impl=cfg.attention, zero_init_out=True, **kw)
        self.norm2 = LayerNorm(w, use_affine=False, **kw)
        self.mlp = Mlp(w, int(w * cfg.mlp_ratio), **kw)

    def __call__(self, x_btd, silu_c_bd, ctx_bsd, text_mask_bs, frame_mask_bt, rope):
        mod = self.modulation(silu_c_bd)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = modulate(self.norm1(x_btd), shift1, scale1)
        x_btd = x_btd + gate1[:, None, :] * self.self_attn(h, kv_mask_bs=frame_mask_bt, rope=rope)
        x_btd = x_btd + self.cross_attn(
            self.cross_norm(x_btd), ctx_bsd, kv_mask_bs=text_mask_bs, kv_length_axis=names.TEXT_LENGTH
        )
        h = modulate(self.norm2(x_btd), shift2, scale2)
        x_btd = x_btd + gate2[:, None, :] * self.mlp(h)
        return constrain(x_btd, (names.BATCH, names.LENGTH, names.ACT_EMBED))


class FinalLayer(nnx.Module):
    """AdaLN-modulated LayerNorm, then a zero-initialized projection to latent channels."""

    def __init__(self, width: int, out_channels: int, *, dtype, param_dtype, keys: ParamKeys):
        zeros = jax.nn.initializers.zeros
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.modulation = Dense(width, 2 * width, (names.EMBED, names.MODULATION), kernel_init=zeros, **kw)
        self.norm = LayerNorm(width, use_affine=False, **kw)
        self.linear = Dense(width, out_channels, (names.EMBED, names.LATENT), kernel_init=zeros, **kw)

    def __call__(self, x_btd, silu_c_bd):
        shift, scale = jnp.split(self.modulation(silu_c_bd), 2, axis=-1)
        return self.linear(modulate(self.norm(x_btd), shift, scale))


BEAT_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)  # of the beat rate: the tempo control's beat grid


class ControlEmbedder(nnx.Module):
    """Musical controls (``model.controls``, ``core/music.py``) -> one vector added to ``c``.

    - ``tempo``: sinusoidal features of log-bpm in [0, 1] (:func:`music.tempo_unit`) ->
      MLP; a learned vector where the tempo is missing (0 bpm). And, per frame, a beat
      grid (:meth:`beat_grid`): the cosine and sine of the beat phase at the frame's time
      in the song (``seconds_start`` + frame / ``model.latent_rate``) at 1/4, 1/2, 1, 2
      and 4 times the beat rate (bar, half bar, beat, eighths, sixteenths in 4/4),
      projected to the width and added to the frame's input: a global vector cannot
      make a periodic pattern, a per-frame phase can.
    - ``key``: a table of the 24 keys and one row for "missing".
    - ``meter``: a table of :data:`music.METERS` and one row for "missing".

    Every output starts at zero (the MLP's last layer, the tables, the missing-tempo
    vector), so a model given controls computes exactly what it computed without them
    until they train: ``train.init_from`` of weights without controls starts from that
    model.
    """

    def __init__(self, controls, freq_dim: int, width: int, *, dtype, param_dtype, keys: ParamKeys):
        self.controls = tuple(controls)
        self.freq_dim = freq_dim
        zeros = jax.nn.initializers.zeros
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        if "tempo" in self.controls:
            self.tempo_fc1 = Dense(
                freq_dim, width, (names.COND, names.EMBED), kernel_init=jax.nn.initializers.normal(0.02), **kw
            )
            self.tempo_fc2 = Dense(width, width, (names.EMBED, names.EMBED), kernel_init=zeros, **kw)
            self.tempo_missing = make_param(keys, zeros, (width,), (names.EMBED,), param_dtype)
            self.beat_proj = Dense(
                2 * len(BEAT_MULTIPLES), width, (names.COND, names.EMBED), kernel_init=zeros, **kw
            )
        if "key" in self.controls:
            self.key_table = make_param(
                keys, zeros, (music.NUM_KEYS + 1, width), (names.COND, names.EMBED), param_dtype
            )
        if "meter" in self.controls:
            self.meter_table = make_param(
                keys, zeros, (len(music.METERS) + 1, width), (names.COND, names.EMBED), param_dtype
            )

    def beat_grid(self, cond: Conditioning, frames: int, latent_rate: float) -> jax.Array:
        """``[B, T, width]``: the beat phase features of every frame, zero where no tempo."""
        batch = cond.seconds_start.shape[0]
        bpm = jnp.zeros((batch,), jnp.float32) if cond.bpm is None else cond.bpm.astype(jnp.float32)
        seconds = (
            cond.seconds_start.astype(jnp.float32)[:, None]
            + jnp.arange(frames, dtype=jnp.float32) / latent_rate
        )
        beats = seconds * (bpm / 60.0)[:, None]
        angle = 2 * jnp.pi * beats[..., None] * jnp.asarray(BEAT_MULTIPLES, jnp.float32)
        feats = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1) * (bpm > 0)[:, None, None]
        return self.beat_proj(feats)

    def __call__(self, cond: Conditioning, batch: int) -> jax.Array:
        out = 0.0
        if "tempo" in self.controls:
            bpm = jnp.zeros((batch,), jnp.float32) if cond.bpm is None else cond.bpm.astype(jnp.float32)
            h = self.tempo_fc1(sinusoidal_embedding(music.tempo_unit(bpm, jnp), self.freq_dim))
            emb = self.tempo_fc2(jax.nn.silu(h))
            out = out + jnp.where((bpm > 0)[:, None], emb, self.tempo_missing[...].astype(emb.dtype))
        if "key" in self.controls:
            key = jnp.full((batch,), -1, jnp.int32) if cond.key is None else cond.key.astype(jnp.int32)
            index = jnp.where(key < 0, music.NUM_KEYS, key)
            out = out + jnp.take(self.key_table[...], index, axis=0)
        if "meter" in self.controls:
            meter = jnp.full((batch,), -1, jnp.int32) if cond.meter is None else cond.meter.astype(jnp.int32)
            index = jnp.where(meter < 0, len(music.METERS), meter)
            out = out + jnp.take(self.meter_table[...], index, axis=0)
        return out


GUIDANCE_SCALE = 10.0  # the guidance input w enters the embedder as (w - 1) / GUIDANCE_SCALE


class GuidanceEmbedder(nnx.Module):
    """The guidance scale of a distilled student (``model.guidance_input``) -> a vector
    added to ``c``: sinusoidal features of ``(w - 1) / GUIDANCE_SCALE`` -> MLP whose last
    layer starts at zero, so a student starts as its teacher's conditional prediction."""

    def __init__(self, freq_dim: int, width: int, *, dtype, param_dtype, keys: ParamKeys):
        self.freq_dim = freq_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.fc1 = Dense(
            freq_dim, width, (names.COND, names.EMBED), kernel_init=jax.nn.initializers.normal(0.02), **kw
        )
        self.fc2 = Dense(
            width, width, (names.EMBED, names.EMBED), kernel_init=jax.nn.initializers.zeros, **kw
        )

    def __call__(self, w_b: jax.Array) -> jax.Array:
        h = self.fc1(sinusoidal_embedding((w_b.astype(jnp.float32) - 1.0) / GUIDANCE_SCALE, self.freq_dim))
        return self.fc2(jax.nn.silu(h))


class DiT(nnx.Module):
    """Predicts v ``[B, T, latent_channels]`` (float32) from noisy latents and conditioning."""

    def __init__(self, cfg: ModelConfig, *, keys: ParamKeys):
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, keys=keys)
        w = cfg.width
        self.cfg = cfg
        # With masked context the input per frame is [noisy latents, known latents, mask].
        in_channels = 2 * cfg.latent_channels + 1 if cfg.masked_context else cfg.latent_channels
        self.x_embedder = Dense(in_channels, w, (names.LATENT, names.EMBED), **kw)
        self.t_embedder = ScalarEmbedder(cfg.freq_dim, w, **kw)
        self.start_embedder = ScalarEmbedder(cfg.freq_dim, w, **kw)
        self.total_embedder = ScalarEmbedder(cfg.freq_dim, w, **kw)
        self.text_encoder = TextEncoder(
            cfg.text, w, impl=cfg.attention, dtype=cfg.dtype, param_dtype=cfg.param_dtype, keys=keys
        )
        self.blocks = nnx.List([DiTBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(w, cfg.latent_channels, **kw)
        if cfg.controls:  # created last: the other parameters' init keys are unchanged
            self.control_embedder = ControlEmbedder(cfg.controls, cfg.freq_dim, w, **kw)
        if cfg.guidance_input:  # after the controls, for the same reason
            self.guidance_embedder = GuidanceEmbedder(cfg.freq_dim, w, **kw)

    def __call__(
        self,
        x_btc: jax.Array,
        t_b: jax.Array,
        cond: Conditioning,
    ) -> jax.Array:
        """``x_btc`` noisy latents, ``t_b`` diffusion time, ``cond`` caption tokens ``[B, L]``,
        window start and song length in seconds ``[B]``, real frames ``[B]``."""
        cfg = self.cfg
        frames = x_btc.shape[1]
        if cfg.masked_context:
            x_btc = with_context(x_btc, cond)
        x = self.x_embedder(x_btc)
        x = constrain(x, (names.BATCH, names.LENGTH, names.ACT_EMBED))
        c = (
            self.t_embedder(t_b)
            + self.start_embedder(cond.seconds_start / cfg.max_seconds)
            + self.total_embedder(cond.seconds_total / cfg.max_seconds)
        )
        if cfg.controls:
            c = c + self.control_embedder(cond, x_btc.shape[0]).astype(c.dtype)
            if "tempo" in cfg.controls and cfg.latent_rate > 0:
                beat = self.control_embedder.beat_grid(cond, frames, cfg.latent_rate)
                x = x + constrain(beat.astype(x.dtype), (names.BATCH, names.LENGTH, names.ACT_EMBED))
        if cfg.guidance_input:
            w_b = jnp.ones_like(t_b, jnp.float32) if cond.guidance is None else cond.guidance
            c = c + self.guidance_embedder(w_b).astype(c.dtype)
        silu_c = jax.nn.silu(c)
        ctx, text_mask = self.text_encoder(cond.tokens)
        # Padding is always at the end: frame i is real iff i < num_frames.
        frame_mask = jnp.arange(frames, dtype=jnp.int32)[None, :] < cond.num_frames.astype(jnp.int32)[:, None]
        rope = rope_tables(frames, cfg.width // cfg.num_heads, cfg.rope_theta)

        if cfg.scan_layers:
            x = self._scan_blocks(x, silu_c, ctx, text_mask, frame_mask, rope)
        else:

            def run_block(block, x, silu_c, ctx, text_mask, frame_mask, rope):
                return block(x, silu_c, ctx, text_mask, frame_mask, rope)

            if cfg.remat != "none":
                run_block = nnx.remat(run_block, policy=REMAT_POLICIES[cfg.remat])
            for block in self.blocks:
                x = run_block(block, x, silu_c, ctx, text_mask, frame_mask, rope)
        return self.final_layer(x, silu_c).astype(jnp.float32)

    def _scan_blocks(self, x, silu_c, ctx, text_mask, frame_mask, rope):
        """The blocks as one ``lax.scan``: their parameters are stacked on a leading
        layer axis here, inside the step, so the stored parameters (and checkpoints)
        keep one entry per block and both modes read the same checkpoints. The
        stacked copy costs one block-parameter copy per chip (FSDP-sharded)."""
        graphdef, first = nnx.split(self.blocks[0])
        states = [first] + [nnx.state(b) for b in self.blocks[1:]]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

        def body(x, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(x, silu_c, ctx, text_mask, frame_mask, rope)

        if self.cfg.remat != "none":
            # prevent_cse=False: scan already keeps the recomputation from being merged.
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        x, _ = jax.lax.scan(lambda carry, st: (body(carry, st), None), x, stacked)
        return x
