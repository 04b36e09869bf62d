"""The codec's networks in Flax NNX: a convolutional waveform VAE and an STFT discriminator.

Arrays are channels-last: audio ``x_btc`` is ``[batch, samples, audio_channels]``,
latents ``z_btc`` are ``[batch, frames, latent_channels]``.

Encoder (``VAE.encode``): ``conv_in`` (kernel 7) -> per stride ``s``: ``EncoderBlock``
(residual units with dilations 1, 3, 9 and Snake activations, then Snake and a conv of
kernel ``2s``, stride ``s``) -> Snake -> ``conv_out`` to ``2 * latent_channels``
(mean and a pre-softplus scale). The decoder mirrors it: ``conv_in`` from latents,
``DecoderBlock`` (Snake, transposed conv of kernel ``3s`` and stride ``s``, residual
units) per stride in reverse order, Snake, ``conv_out`` to audio channels. Every conv
is centred ("same" zero padding), so the receptive field is symmetric: chunked
processing (:mod:`audiodiff_jax.codec.chunked`) needs context on both sides.

Snake (Ziyin et al. 2020; used by BigVGAN, DAC, Stable Audio's VAE):
``x + sin^2(alpha x) / alpha`` with a learned per-channel ``alpha`` (stored as log).
Periodic activations suit audio, where a ReLU net needs many units to draw an
oscillation.

Parameters carry logical axis names (:mod:`audiodiff_jax.core.names`): conv kernels
``[kernel, in, out]`` shard their output channels over ``embed`` (-> fsdp) when those
are model widths; latent and audio channels stay replicated. Attribute names are
checkpoint keys; do not rename them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from audiodiff_jax.codec.config import CodecModelConfig, DiscriminatorConfig
from audiodiff_jax.core import names
from audiodiff_jax.core.sharding import constrain
from audiodiff_jax.model.layers import ParamKeys, dtype_of, make_param
from audiodiff_jax.model.module_fns import ModuleFns, module_fns

ACT_AXES = (names.BATCH, names.LENGTH, names.ACT_EMBED)


def _conv_init(scale: float = 1.0):
    # He-style scaling over kernel taps x input channels (kernel layout [K, in, out]).
    return jax.nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )


class Conv1d(nnx.Module):
    """1-D convolution, channels last, centred zero padding (length / stride out)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        out_axis: str | None = names.EMBED,
        init_scale: float = 1.0,
        dtype,
        param_dtype,
        keys: ParamKeys,
    ):
        self.stride, self.dilation, self.dtype = stride, dilation, dtype
        span = dilation * (kernel - 1) + 1
        # Total padding span - stride keeps out = in / stride exactly (in divisible by stride).
        total = span - stride
        self.padding = ((total + 1) // 2, total // 2)
        axis = out_axis if out_axis is not None else names.LATENT
        self.kernel = make_param(
            keys, _conv_init(init_scale), (kernel, in_ch, out_ch), (None, None, axis), param_dtype
        )
        self.bias = make_param(keys, jax.nn.initializers.zeros, (out_ch,), (axis,), param_dtype)

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_btc.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,),
            padding=(self.padding,),
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class ConvTranspose1d(nnx.Module):
    """Transposed 1-D convolution with kernel ``3 * stride``: length x stride out.

    Written in its sub-pixel form: a centred kernel-3 convolution at the input rate
    producing ``stride * out`` channels, then each frame's channels are laid out as
    ``stride`` consecutive output samples. This is exactly a transposed convolution
    (each output phase is a 3-tap filter of the input) but, unlike the dilated-input
    form (``lhs_dilation``), it does not multiply ``stride - 1`` inserted zeros,
    which made the decoder several times slower on CPU.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype, param_dtype, keys: ParamKeys):
        self.stride, self.out_ch, self.dtype = stride, out_ch, dtype
        init = _conv_init()
        self.kernel = make_param(
            keys, init, (3, in_ch, stride * out_ch), (None, None, names.EMBED), param_dtype
        )
        self.bias = make_param(keys, jax.nn.initializers.zeros, (out_ch,), (names.EMBED,), param_dtype)

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_btc.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(1,),
            padding=((1, 1),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        b, t, _ = y.shape
        y = y.reshape(b, t * self.stride, self.out_ch)
        return y + self.bias[...].astype(self.dtype)


class Snake(nnx.Module):
    """``x + sin^2(alpha x) / alpha`` per channel; ``alpha = exp(log_alpha)`` starts at 1."""

    def __init__(self, channels: int, *, param_dtype, keys: ParamKeys):
        self.log_alpha = make_param(keys, jax.nn.initializers.zeros, (channels,), (names.NORM,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = jnp.exp(self.log_alpha[...].astype(jnp.float32)).astype(x.dtype)
        return x + jnp.square(jnp.sin(alpha * x)) / (alpha + 1e-9)


class ResidualUnit(nnx.Module):
    """Snake -> dilated conv (kernel 7) -> Snake -> 1x1 conv, added to the input."""

    def __init__(self, ch: int, dilation: int, kernel: int, *, dtype, param_dtype, keys: ParamKeys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.act1 = Snake(ch, param_dtype=param_dtype, keys=keys)
        self.conv1 = Conv1d(ch, ch, kernel, dilation=dilation, **kw)
        self.act2 = Snake(ch, param_dtype=param_dtype, keys=keys)
        # Small residual branches at init: the stack of units then starts near the
        # identity instead of growing the signal by ~sqrt(2) per unit.
        self.conv2 = Conv1d(ch, ch, 1, init_scale=0.1, **kw)

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        return x_btc + self.conv2(self.act2(self.conv1(self.act1(x_btc))))


class EncoderBlock(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, m: CodecModelConfig, *, dtype, param_dtype, keys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.res = nnx.List([ResidualUnit(in_ch, d, m.kernel_size, **kw) for d in m.dilations])
        self.act = Snake(in_ch, param_dtype=param_dtype, keys=keys)
        self.down = Conv1d(in_ch, out_ch, 2 * stride, stride=stride, **kw)

    def __call__(self, x_btc):
        for unit in self.res:
            x_btc = unit(x_btc)
        return constrain(self.down(self.act(x_btc)), ACT_AXES)


class DecoderBlock(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, m: CodecModelConfig, *, dtype, param_dtype, keys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        self.act = Snake(in_ch, param_dtype=param_dtype, keys=keys)
        self.up = ConvTranspose1d(in_ch, out_ch, stride, **kw)
        self.res = nnx.List([ResidualUnit(out_ch, d, m.kernel_size, **kw) for d in m.dilations])

    def __call__(self, x_btc):
        x_btc = self.up(self.act(x_btc))
        for unit in self.res:
            x_btc = unit(x_btc)
        return constrain(x_btc, ACT_AXES)


class Encoder(nnx.Module):
    def __init__(self, m: CodecModelConfig, *, dtype, param_dtype, keys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        w = m.widths
        self.conv_in = Conv1d(m.audio_channels, w[0], m.kernel_size, **kw)
        self.blocks = nnx.List([EncoderBlock(w[i], w[i + 1], s, m, **kw) for i, s in enumerate(m.strides)])
        self.act = Snake(w[-1], param_dtype=param_dtype, keys=keys)
        self.conv_out = Conv1d(w[-1], 2 * m.latent_channels, 3, out_axis=None, init_scale=0.1, **kw)

    def __call__(self, x_btc):
        h = self.conv_in(x_btc)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(self.act(h)).astype(jnp.float32)


class Decoder(nnx.Module):
    def __init__(self, m: CodecModelConfig, *, dtype, param_dtype, keys):
        kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
        w = [c * m.decoder_width_mult for c in m.widths]
        self.conv_in = Conv1d(m.latent_channels, w[-1], m.kernel_size, **kw)
        n = len(m.strides)
        self.blocks = nnx.List(
            [DecoderBlock(w[i + 1], w[i], m.strides[i], m, **kw) for i in reversed(range(n))]
        )
        self.act = Snake(w[0], param_dtype=param_dtype, keys=keys)
        # Quiet at init (output ~0.1 of unit variance), so the first steps fit levels, not blasts.
        self.conv_out = Conv1d(w[0], m.audio_channels, m.kernel_size, out_axis=None, init_scale=0.01, **kw)

    def __call__(self, z_btc):
        h = self.conv_in(z_btc)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(self.act(h)).astype(jnp.float32)


def posterior(moments_btc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encoder output -> (mean, scale) of the diagonal Gaussian posterior.

    The scale goes through a softplus (positive, smooth) with a small floor, as Stable
    Audio's VAE bottleneck does; a bare exp would let early training blow it up.
    """
    mean, raw = jnp.split(moments_btc, 2, axis=-1)
    scale = jax.nn.softplus(raw) + 1e-4
    return mean, scale


def kl_divergence(mean: jax.Array, scale: jax.Array) -> jax.Array:
    """KL(N(mean, scale^2) || N(0, 1)), summed over channels, averaged over batch and frames."""
    var = jnp.square(scale)
    kl = 0.5 * (jnp.square(mean) + var - jnp.log(var) - 1.0)
    return jnp.mean(jnp.sum(kl, axis=-1))


class VAE(nnx.Module):
    """The codec: ``encode`` (audio -> posterior moments) and ``decode`` (latents -> audio)."""

    def __init__(self, m: CodecModelConfig, *, keys: ParamKeys):
        kw = dict(dtype=dtype_of(m.dtype), param_dtype=dtype_of(m.param_dtype), keys=keys)
        self.encoder = Encoder(m, **kw)
        self.decoder = Decoder(m, **kw)

    def encode(self, x_btc: jax.Array) -> jax.Array:
        return self.encoder(x_btc)

    def decode(self, z_btc: jax.Array) -> jax.Array:
        return self.decoder(z_btc)


# ---------------------------------------------------------------------------
# Discriminator


class Conv2d(nnx.Module):
    """2-D convolution over (time, frequency), channels last, centred zero padding."""

    def __init__(self, in_ch, out_ch, kernel, *, stride=(1, 1), dilation=(1, 1), param_dtype, keys):
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        pads = []
        for k, s, d in zip(kernel, stride, dilation, strict=True):
            total = max(d * (k - 1) + 1 - s, 0)
            pads.append(((total + 1) // 2, total // 2))
        self.padding = tuple(pads)
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=3
        )
        self.kernel = make_param(
            keys, init, (*kernel, in_ch, out_ch), (None, None, None, names.EMBED), param_dtype
        )
        self.bias = make_param(keys, jax.nn.initializers.zeros, (out_ch,), (names.EMBED,), param_dtype)

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=self.stride,
            padding=self.padding,
            rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...]


def complex_stft(x_bt: jax.Array, n_fft: int) -> jax.Array:
    """Hann-windowed STFT ``[batch, frames, n_fft // 2 + 1]`` (complex), hop ``n_fft // 4``.

    Frames are gathered with a reshape-free index table so it runs on any backend; the
    signal is reflect-padded by ``n_fft // 2`` on each side (centred frames).
    """
    hop = n_fft // 4
    pad = n_fft // 2
    x = jnp.pad(x_bt, ((0, 0), (pad, pad)), mode="reflect")
    num_frames = 1 + (x.shape[-1] - n_fft) // hop
    idx = jnp.arange(num_frames)[:, None] * hop + jnp.arange(n_fft)[None, :]
    frames = x[:, idx]  # [B, F, n_fft]
    window = jnp.hanning(n_fft + 1)[:-1].astype(x.dtype)  # periodic Hann
    return jnp.fft.rfft(frames * window, axis=-1)


class STFTDiscriminator(nnx.Module):
    """One scale: complex STFT (real, imag as 2 channels) -> 2-D convs -> a logit map.

    Returns the logits and every intermediate feature map (for feature matching).
    """

    def __init__(self, n_fft: int, audio_channels: int, cfg: DiscriminatorConfig, *, param_dtype, keys):
        self.n_fft = n_fft
        w = cfg.width
        kw = dict(param_dtype=param_dtype, keys=keys)
        layers = [Conv2d(2 * audio_channels, w, (3, 9), **kw)]
        for i in range(cfg.num_layers):
            # Stride 2 over frequency only; dilation grows over time (EnCodec's MS-STFT-D).
            layers.append(Conv2d(w, w, (3, 9), stride=(1, 2), dilation=(2**i, 1), **kw))
        layers.append(Conv2d(w, w, (3, 3), **kw))
        self.layers = nnx.List(layers)
        self.out = Conv2d(w, 1, (3, 3), **kw)

    def __call__(self, x_btc):
        b, t, c = x_btc.shape
        spec = complex_stft(jnp.transpose(x_btc, (0, 2, 1)).reshape(b * c, t), self.n_fft)
        spec = spec.reshape(b, c, *spec.shape[1:])  # [B, C, frames, bins]
        h = jnp.concatenate([spec.real, spec.imag], axis=1).transpose(0, 2, 3, 1)  # [B, F, bins, 2C]
        feats = []
        for layer in self.layers:
            h = jax.nn.leaky_relu(layer(h), 0.2)
            feats.append(h)
        return self.out(h), feats


class MultiScaleSTFTDiscriminator(nnx.Module):
    def __init__(self, audio_channels: int, cfg: DiscriminatorConfig, *, keys: ParamKeys):
        self.discs = nnx.List(
            [
                STFTDiscriminator(n, audio_channels, cfg, param_dtype=jnp.float32, keys=keys)
                for n in cfg.fft_sizes
            ]
        )

    def __call__(self, x_btc):
        return [d(x_btc) for d in self.discs]


# ---------------------------------------------------------------------------
# Pure-function interface (audiodiff_jax/model/module_fns.py): params are nested dicts


def make_vae(m: CodecModelConfig) -> ModuleFns:
    return module_fns(lambda keys: VAE(m, keys=keys), "codec model")


def make_discriminator(audio_channels: int, cfg: DiscriminatorConfig) -> ModuleFns:
    return module_fns(
        lambda keys: MultiScaleSTFTDiscriminator(audio_channels, cfg, keys=keys), "discriminator"
    )


def param_mismatch(params, abstract) -> str:
    """ "" when ``params`` has the paths and shapes of ``abstract``; else the first differences, named."""
    have = {
        jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    want = {
        jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [
        f"{k}: {have[k]} vs {want[k]}" for k in sorted(have.keys() & want.keys()) if have[k] != want[k]
    ]
    return "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")


def count_params(tree) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))
