"""Typed configuration of the audio codec: every default, once.

Follows :mod:`audiodiff_jax.core.config`: config files (``configs/codec.py:PRESET``) start
from :func:`default_configdict`, override fields, and programs convert the resulting
ConfigDict with :func:`from_configdict`, which refuses unknown and missing keys and
names them. :func:`validate` checks the shapes against the mesh before anything
compiles. The mesh, optimizer, checkpoint and profile sections reuse the DiT's dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections

from audiodiff_jax.core import config as base
from audiodiff_jax.core.config import CheckpointConfig, ConfigError, MeshConfig, OptimConfig, ProfileConfig


@dataclasses.dataclass(frozen=True)
class CodecModelConfig:
    """Convolutional VAE over waveforms ``[batch, samples, audio_channels]``.

    Encoder: ``conv_in`` to ``widths[0]``, then per stride ``s``: residual units
    (dilations ``dilations``) at the current width and a strided conv (kernel 2s)
    to the next width; a final conv to ``2 * latent_channels`` (mean, scale). The
    decoder mirrors it with transposed convs. ``len(widths) == len(strides) + 1``.
    """

    name: str = "audiodiff-vae"  # the codec card's name
    sample_rate: int = 22050
    audio_channels: int = 1
    latent_channels: int = 32
    strides: tuple[int, ...] = (4, 4, 8, 8)
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)  # encoder widths; the decoder mirrors them
    decoder_width_mult: int = 1  # the decoder is widened by this factor (it does more work)
    dilations: tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7  # kernel of the residual units and of conv_in / conv_out
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Multi-scale STFT discriminator (adversarial + feature matching); off when weight 0."""

    adversarial_weight: float = 0.0  # 0 = no discriminator
    feature_weight: float = 0.0
    start_step: int = 0  # adversarial losses start at this step (reconstruction first)
    fft_sizes: tuple[int, ...] = (1024, 512, 256)
    width: int = 16
    num_layers: int = 3


@dataclasses.dataclass(frozen=True)
class LossConfig:
    stft_fft_sizes: tuple[int, ...] = (2048, 1024, 512, 256, 128)  # hop = size // 4
    stft_weight: float = 1.0
    waveform_l1_weight: float = 0.1
    kl_weight: float = 1e-4
    # Scale of the reparameterization noise (1 = a true VAE sample). Short CPU runs use
    # 0: with sampled latents the decoder gets ~100 bits per frame early in training,
    # too little to learn the waveform's phase within an hour; the KL term still keeps
    # the latent means bounded. Long runs should keep 1.
    posterior_noise: float = 1.0


@dataclasses.dataclass(frozen=True)
class CodecDataConfig:
    """Training audio: a folder of WAV files, random crops chosen from (seed, step).

    Crops are a pure function of the seed and the step, so a resumed run sees exactly
    the batches an uninterrupted one would, without any iterator state.
    """

    audio_dir: str = ""  # folder of .wav files (searched recursively)
    crop_samples: int = 16384  # training crop length (a multiple of the hop)
    global_batch_size: int = 8
    seed: int = 0
    min_rms: float = 1e-3  # crops quieter than this are redrawn (mostly-silent starts of songs)
    # Each top-level subfolder of audio_dir gets an equal share of the crops (every
    # second equally likely within one): e.g. renders/ and songs/ half and half.
    balance_subfolders: bool = False


@dataclasses.dataclass(frozen=True)
class CodecTrainConfig:
    num_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    # Weights only: another codec run's workdir, an exported codec folder, or "default"
    # (the codec shipped in the package).
    init_from: str = ""
    # "all", or "decoder": the encoder is frozen (its updates are zero and no gradient
    # flows into it), so the latents, their statistics and every model trained on them
    # stay valid while the decoder learns new material. Needs init_from.
    trainable: str = "all"


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    model: CodecModelConfig = dataclasses.field(default_factory=CodecModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)
    data: CodecDataConfig = dataclasses.field(default_factory=CodecDataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: CodecTrainConfig = dataclasses.field(default_factory=CodecTrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)


TRAINABLE = ("all", "decoder")
# Sections added after codec runs were already being saved: a saved config without one
# (a codec run that train.init_from or the codec lookup reads) gets its defaults.
SECTIONS_ADDED_LATER = {"profile": ProfileConfig}
# The fields that change the codec step's device memory (see config.MEMORY_FIELDS).
MEMORY_FIELDS = {
    "data.global_batch_size": "fewer crops per step",
    "data.crop_samples": "shorter crops",
    "mesh.fsdp": "shard weights and optimizer state over more devices",
}


def hop_of(m: CodecModelConfig) -> int:
    """Audio samples per latent frame: the product of the strides."""
    return int(math.prod(m.strides))


def default_configdict() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(CodecConfig()))


def _tuplify(cls, data):
    """ConfigDicts and JSON give lists for tuple fields; the dataclasses want tuples."""
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name in out and isinstance(out[f.name], list):
            out[f.name] = tuple(out[f.name])
    return out


def from_configdict(cd: ml_collections.ConfigDict | dict) -> CodecConfig:
    """ConfigDict -> typed CodecConfig, refusing unknown and missing keys (named)."""
    data = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
    for name, cls in SECTIONS_ADDED_LATER.items():
        data.setdefault(name, dataclasses.asdict(cls()))
    for f in dataclasses.fields(CodecConfig):
        if isinstance(data.get(f.name), dict | ml_collections.ConfigDict):
            data[f.name] = _tuplify(f.default_factory, dict(data[f.name]))
    cfg = base._build(CodecConfig, data, "")
    for section in ("model", "loss", "discriminator"):
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(f.default, tuple) and not (
                isinstance(value, tuple)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            ):
                raise ConfigError(f"{section}.{f.name}={value!r} must be a tuple of ints")
    return cfg


def model_from_dict(data: dict) -> CodecModelConfig:
    """The model section alone (as saved in a codec card)."""
    return base._build(CodecModelConfig, _tuplify(CodecModelConfig, data), "model")


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate_model(m: CodecModelConfig) -> None:
    _check(m.sample_rate > 0, f"model.sample_rate={m.sample_rate} must be > 0")
    _check(m.audio_channels > 0, f"model.audio_channels={m.audio_channels} must be > 0")
    _check(m.latent_channels > 0, f"model.latent_channels={m.latent_channels} must be > 0")
    _check(len(m.strides) >= 1, "model.strides must name at least one stride")
    _check(all(s >= 1 for s in m.strides), f"model.strides={m.strides} must all be >= 1")
    _check(
        len(m.widths) == len(m.strides) + 1,
        f"model.widths has {len(m.widths)} entries but model.strides has {len(m.strides)}; "
        "widths needs one more (the width before the first stride and after each)",
    )
    _check(all(w > 0 for w in m.widths), f"model.widths={m.widths} must all be > 0")
    _check(m.decoder_width_mult >= 1, f"model.decoder_width_mult={m.decoder_width_mult} must be >= 1")
    _check(all(d >= 1 for d in m.dilations), f"model.dilations={m.dilations} must all be >= 1")
    _check(m.kernel_size % 2 == 1, f"model.kernel_size={m.kernel_size} must be odd (centred convs)")
    _check(m.dtype in base.DTYPES, f"model.dtype={m.dtype!r}; one of {base.DTYPES}")
    _check(m.param_dtype in base.DTYPES, f"model.param_dtype={m.param_dtype!r}; one of {base.DTYPES}")


def validate(cfg: CodecConfig, num_devices: int | None = None) -> None:
    """Checks that a codec config can work, naming the field that cannot."""
    validate_model(cfg.model)
    hop = hop_of(cfg.model)
    d = cfg.data
    _check(d.crop_samples > 0, f"data.crop_samples={d.crop_samples} must be > 0")
    _check(
        d.crop_samples % hop == 0,
        f"data.crop_samples={d.crop_samples} is not a multiple of the hop {hop} (product of model.strides); "
        f"try {max(1, round(d.crop_samples / hop)) * hop}",
    )
    _check(d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be > 0")
    lo = cfg.loss
    _check(len(lo.stft_fft_sizes) >= 1, "loss.stft_fft_sizes must name at least one FFT size")
    for n in lo.stft_fft_sizes:
        _check(n >= 8 and n % 4 == 0, f"loss.stft_fft_sizes has {n}; sizes must be >= 8 and multiples of 4")
        _check(
            n <= d.crop_samples,
            f"loss.stft_fft_sizes has {n} > data.crop_samples={d.crop_samples}",
        )
    _check(min(lo.stft_weight, lo.waveform_l1_weight, lo.kl_weight) >= 0, "loss weights must be >= 0")
    _check(lo.posterior_noise >= 0, f"loss.posterior_noise={lo.posterior_noise} must be >= 0")
    disc = cfg.discriminator
    _check(disc.adversarial_weight >= 0, f"discriminator.adversarial_weight={disc.adversarial_weight} < 0")
    _check(disc.feature_weight >= 0, f"discriminator.feature_weight={disc.feature_weight} < 0")
    if disc.adversarial_weight > 0 or disc.feature_weight > 0:
        _check(len(disc.fft_sizes) >= 1, "discriminator.fft_sizes must name at least one FFT size")
        _check(disc.width > 0 and disc.num_layers > 0, "discriminator.width and num_layers must be > 0")
        for n in disc.fft_sizes:
            _check(n <= d.crop_samples, f"discriminator.fft_sizes has {n} > data.crop_samples")
    o = cfg.optim
    _check(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be > 0")
    _check(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay} must be in [0, 1)")
    t, c = cfg.train, cfg.checkpoint
    _check(t.num_steps > 0, f"train.num_steps={t.num_steps} must be > 0")
    _check(t.log_every > 0, f"train.log_every={t.log_every} must be > 0")
    _check(t.trainable in TRAINABLE, f"train.trainable={t.trainable!r}; one of {TRAINABLE}")
    _check(
        t.trainable == "all" or bool(t.init_from),
        f"train.trainable={t.trainable!r} freezes the encoder, so it needs train.init_from (a trained codec)",
    )
    _check(c.every_steps > 0, f"checkpoint.every_steps={c.every_steps} must be > 0")
    _check(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1")
    base.validate_profile(cfg.profile)
    if num_devices is None:
        return
    sizes = base.resolve_mesh_shape(cfg.mesh, num_devices)
    shards = sizes["data"] * sizes["fsdp"]
    _check(
        d.global_batch_size % shards == 0,
        f"data.global_batch_size={d.global_batch_size} is not divisible by mesh.data*mesh.fsdp={shards}",
    )
    _check(
        sizes["sequence"] == 1 and sizes["tensor"] == 1,
        f"mesh.sequence={sizes['sequence']} and mesh.tensor={sizes['tensor']}: the codec shards over "
        "data and fsdp only (its convs are small); set both to 1",
    )
    widths = tuple(cfg.model.widths) + tuple(w * cfg.model.decoder_width_mult for w in cfg.model.widths)
    for w in widths:
        _check(
            w % sizes["fsdp"] == 0,
            f"model.widths (x decoder_width_mult) has {w}, not divisible by mesh.fsdp={sizes['fsdp']}",
        )


def card_dict(cfg: CodecConfig, latent_mean=None, latent_std=None) -> dict:
    """The codec card: the fields of ``audiodiff_jax.data.cards.CodecCard``, the latent
    statistics (per channel, over the encoded training audio) and the model config."""
    m = cfg.model
    hop = hop_of(m)
    return {
        "name": m.name,
        "sample_rate": m.sample_rate,
        "audio_channels": m.audio_channels,
        "hop": hop,
        "latent_rate": m.sample_rate / hop,
        "latent_channels": m.latent_channels,
        "latent_mean": None if latent_mean is None else [float(v) for v in latent_mean],
        "latent_std": None if latent_std is None else [float(v) for v in latent_std],
        "model": dataclasses.asdict(m),
    }
