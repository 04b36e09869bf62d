"""``JaxCodec``: the trained VAE behind the codec interface, and ``load_codec``.

    from audiodiff_jax.codec import load_codec
    codec = load_codec()                      # the default shipped in the package
    z = codec.encode(audio, 44100)            # [channels, samples] at any rate -> [frames, 32]
    audio = codec.decode(z)                   # -> [1, frames * 1024] at 22050 Hz
    codec.card                                # audiodiff_jax.data.cards.CodecCard

A saved codec is a folder with ``weights.npz`` (parameters, flattened ``a/b/c`` keys)
and ``codec_card.json`` (:func:`audiodiff_jax.training.codec_trainer.card_dict`: the CodecCard
fields, per-channel latent mean and std, and the model config), so it describes
itself. ``load_codec`` also opens a codec training workdir (latest checkpoint, EMA
weights).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging
from flax.nnx import traversals

from audiodiff_jax.checkpoints import checkpointing
from audiodiff_jax.codec import chunked, inputs
from audiodiff_jax.codec import config as config_lib
from audiodiff_jax.codec import model as model_lib
from audiodiff_jax.codec.config import CodecModelConfig, hop_of
from audiodiff_jax.codec.data import audio_files, load_wav
from audiodiff_jax.data.cards import CodecCard

WEIGHTS_FILE = "weights.npz"
CARD_FILE = "codec_card.json"
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# The codecs shipped in the package, by the name load_codec takes: "default" (trained on
# renders; the demo's and the tests'), "music" (fine-tuned on real produced songs too;
# its own latents). Each folder's RECIPE.md says how it was made.
SHIPPED = {"default": DEFAULT_DIR, "music": DEFAULT_DIR + "_music"}

# Chunking defaults, in latent frames (~21.5 per second for the shipped presets):
# 256-frame chunks (~12 s) with 64 frames of overlap. See chunked.py for why 64.
CHUNK_FRAMES = 256
OVERLAP_FRAMES = 64


class JaxCodec:
    """A convolutional VAE codec (``audiodiff_jax.codec.interface.Codec``).

    Args:
      model: the model config (architecture, sample rate, channels).
      params: its parameters (nested dict of arrays).
      latent_mean / latent_std: per-channel statistics of its latents on the training
        audio (for the dataset card); None if unmeasured.
      chunk_frames / overlap_frames: chunking of long inputs (latent frames).
      batch_size: chunks per device call (bounds memory: ~batch_size chunks in flight).
      resample: resample other rates (else :class:`~audiodiff_jax.codec.inputs.CodecInputError`).
      nonfinite: ``"error"`` or ``"zero"``: what NaN/Inf input samples get.
    """

    def __init__(
        self,
        model: CodecModelConfig,
        params,
        *,
        latent_mean=None,
        latent_std=None,
        chunk_frames: int = CHUNK_FRAMES,
        overlap_frames: int = OVERLAP_FRAMES,
        batch_size: int = 4,
        resample: bool = True,
        nonfinite: str = "error",
    ):
        config_lib.validate_model(model)
        if not 0 <= overlap_frames < chunk_frames:
            raise ValueError(f"overlap_frames={overlap_frames} must be in [0, chunk_frames={chunk_frames})")
        self.model = model
        self.hop = hop_of(model)
        self.fns = model_lib.make_vae(model)
        self.params = jax.tree.map(jax.numpy.asarray, params)
        self.fns.merge(self.params)  # fails here, naming the keys, if params do not fit the model
        self.latent_mean = None if latent_mean is None else np.asarray(latent_mean, np.float32)
        self.latent_std = None if latent_std is None else np.asarray(latent_std, np.float32)
        self.chunk_frames, self.overlap_frames, self.batch_size = chunk_frames, overlap_frames, batch_size
        self.resample, self.nonfinite = resample, nonfinite
        fns = self.fns
        self._encode = jax.jit(lambda p, x: model_lib.posterior(fns.merge(p).encode(x))[0])
        self._decode = jax.jit(lambda p, z: fns.merge(p).decode(z))

    # -- the interface ---------------------------------------------------------------

    @property
    def card(self) -> CodecCard:
        m = self.model
        return CodecCard(
            name=m.name,
            sample_rate=m.sample_rate,
            audio_channels=m.audio_channels,
            hop=self.hop,
            latent_rate=m.sample_rate / self.hop,
            latent_channels=m.latent_channels,
        )

    def encode(self, audio: np.ndarray, sample_rate: int, *, single_pass: bool = False) -> np.ndarray:
        """``audio [channels, samples]`` -> latents ``[ceil(samples / hop), latent_channels]``.

        The latents are the posterior means (deterministic). Input is checked and
        conformed by :func:`audiodiff_jax.codec.inputs.prepare_audio` (rate, channels,
        clipping, NaN/Inf, empty). ``single_pass=True`` runs the whole input at once
        (memory grows with length; for tests and short clips).
        """
        x = inputs.prepare_audio(
            audio,
            sample_rate,
            sample_rate=self.model.sample_rate,
            channels=self.model.audio_channels,
            resample_input=self.resample,
            nonfinite=self.nonfinite,
        )
        frames = -(-x.shape[1] // self.hop)
        x_tc = np.zeros((frames * self.hop, x.shape[0]), np.float32)
        x_tc[: x.shape[1]] = x.T
        if single_pass:
            return np.asarray(self._encode(self.params, x_tc[None]))[0]
        return chunked.chunked_apply(
            lambda b: self._encode(self.params, b),
            x_tc,
            in_per_frame=self.hop,
            out_per_frame=1,
            chunk_frames=self.chunk_frames,
            overlap_frames=self.overlap_frames,
            batch_size=self.batch_size,
            bucket=True,
        )

    def decode(self, latents: np.ndarray, *, single_pass: bool = False) -> np.ndarray:
        """``latents [frames, latent_channels]`` -> ``audio [audio_channels, frames * hop]`` float32."""
        z = np.asarray(latents)
        if z.ndim != 2 or z.shape[1] != self.model.latent_channels:
            raise inputs.CodecInputError(
                f"latents of shape {z.shape}; expected [frames, {self.model.latent_channels}] "
                f"(raw latents of {self.model.name}, not normalized ones)"
            )
        if z.shape[0] == 0:
            raise inputs.CodecInputError("latents are empty (0 frames); nothing to decode")
        if not np.isfinite(z).all():
            raise inputs.CodecInputError(f"latents hold {int((~np.isfinite(z)).sum())} NaN/Inf values")
        z = z.astype(np.float32)
        if single_pass:
            y = np.asarray(self._decode(self.params, z[None]))[0]
        else:
            y = chunked.chunked_apply(
                lambda b: self._decode(self.params, b),
                z,
                in_per_frame=1,
                out_per_frame=self.hop,
                chunk_frames=self.chunk_frames,
                overlap_frames=self.overlap_frames,
                batch_size=self.batch_size,
                bucket=True,
            )
        return np.ascontiguousarray(y.T)

    # -- beyond the interface --------------------------------------------------------

    def reconstruct(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """decode(encode(audio)) cut to the input length (at the codec's rate)."""
        n = audio.shape[-1] if sample_rate == self.model.sample_rate else None
        y = self.decode(self.encode(audio, sample_rate))
        return y[:, :n] if n else y

    def card_dict(self) -> dict:
        """The full codec card: CodecCard fields, latent statistics, model config."""
        return config_lib.card_dict(
            config_lib.CodecConfig(model=self.model), self.latent_mean, self.latent_std
        )

    def save(self, out_dir: str) -> str:
        """Writes ``weights.npz`` + ``codec_card.json``; returns ``out_dir``."""
        os.makedirs(out_dir, exist_ok=True)
        flat = traversals.flatten_mapping(jax.device_get(self.params))
        np.savez(os.path.join(out_dir, WEIGHTS_FILE), **{"/".join(k): np.asarray(v) for k, v in flat.items()})
        with open(os.path.join(out_dir, CARD_FILE), "w") as f:
            json.dump(self.card_dict(), f, indent=2)
        return out_dir


def _load_folder(path: str, **kwargs) -> JaxCodec:
    with open(os.path.join(path, CARD_FILE)) as f:
        card = json.load(f)
    model = config_lib.model_from_dict(card["model"])
    with np.load(os.path.join(path, WEIGHTS_FILE)) as npz:
        params = traversals.unflatten_mapping({tuple(k.split("/")): npz[k] for k in npz.files})
    return JaxCodec(
        model, params, latent_mean=card.get("latent_mean"), latent_std=card.get("latent_std"), **kwargs
    )


def _load_run(path: str, **kwargs) -> JaxCodec:
    step_dir, _ = checkpointing.find_step(path, required_items=("state", "config"))
    cfg = config_lib.from_configdict(checkpointing.read_json_item(step_dir / "config"))
    abstract = model_lib.make_vae(cfg.model).abstract_params()
    params, step = checkpointing.restore_params(str(step_dir), abstract, use_ema=True)
    logging.info("codec: EMA weights of step %d from %s", step, path)
    return JaxCodec(cfg.model, params, **kwargs)


def shipped_folder(name: str) -> str | None:
    """The folder of the shipped codec called ``name``, by its :data:`SHIPPED` key or by its
    card name (``"audiodiff-vae-small"``: what a dataset card records, so a checkpoint's
    card finds the codec its latents came from); None when none is."""
    if name in SHIPPED:
        return SHIPPED[name]
    for folder in SHIPPED.values():
        card = os.path.join(folder, CARD_FILE)
        if os.path.exists(card):
            with open(card) as f:
                if json.load(f).get("name") == name:
                    return folder
    return None


def load_codec(name_or_path: str = "default", **kwargs) -> JaxCodec:
    """Opens a codec.

    Args:
      name_or_path: a codec shipped in the package (:data:`SHIPPED`: ``"default"``, the
        small preset trained on renders; ``"music"``, fine-tuned on real songs too), a
        folder with ``weights.npz`` + ``codec_card.json``, or a codec training workdir.
        A shipped codec's card name (``"audiodiff-vae-small"``) opens it too.
      **kwargs: :class:`JaxCodec` options (chunk_frames, overlap_frames, batch_size,
        resample, nonfinite).
    """
    path = shipped_folder(name_or_path) or name_or_path
    if os.path.exists(os.path.join(path, WEIGHTS_FILE)):
        return _load_folder(path, **kwargs)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _load_run(path, **kwargs)
    raise FileNotFoundError(
        f"load_codec({name_or_path!r}): {path} holds neither {WEIGHTS_FILE} + {CARD_FILE} nor a codec run's "
        f"checkpoints/; pass one of {sorted(SHIPPED)}, an exported codec folder, or an audiodiff-codec-train "
        "workdir"
    )


def latent_statistics(codec: JaxCodec, audio_dir: str, max_files: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of the latents of every audio file in ``audio_dir``."""
    files = audio_files(audio_dir)
    if max_files:
        files = files[:max_files]
    if not files:
        raise FileNotFoundError(f"{audio_dir!r} holds no audio files for the latent statistics")
    total, total_sq, count = 0.0, 0.0, 0
    for f in files:
        z = codec.encode(
            load_wav(f, codec.model.sample_rate, codec.model.audio_channels), codec.model.sample_rate
        )
        total = total + z.sum(0, dtype=np.float64)
        total_sq = total_sq + np.square(z, dtype=np.float64).sum(0)
        count += z.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def is_codec_folder(name_or_path: str) -> bool:
    """A shipped codec's name or a folder with an exported codec's weights (not a training workdir)."""
    folder = shipped_folder(name_or_path) or name_or_path
    return os.path.exists(os.path.join(folder, WEIGHTS_FILE))


def export_run(workdir: str, out_dir: str, *, stats_dir: str = "", max_stats_files: int = 0) -> str:
    """EMA weights of a codec run -> a loadable folder (with latent statistics from ``stats_dir``).

    A run that froze its encoder (``train.trainable="decoder"``) from an exported codec
    keeps that codec's latent statistics, after checking that its encoder weights are
    still bit for bit those of the codec it started from: its latents are the same, so
    shards and diffusion models made with the old codec stay valid.
    """
    step_dir, _ = checkpointing.find_step(workdir, required_items=("state", "config"))
    cfg = config_lib.from_configdict(checkpointing.read_json_item(step_dir / "config"))
    codec = _load_run(workdir)
    if cfg.train.trainable == "decoder" and is_codec_folder(cfg.train.init_from):
        base = load_codec(cfg.train.init_from)
        changed = [
            jax.tree_util.keystr(p)
            for (p, a), b in zip(
                jax.tree_util.tree_flatten_with_path(base.params["encoder"])[0],
                jax.tree.leaves(codec.params["encoder"]),
                strict=True,
            )
            if not np.array_equal(np.asarray(a), np.asarray(b))
        ]
        if changed:
            raise ValueError(
                f"{workdir}: train.trainable='decoder' but encoder weights {changed[:3]} differ from "
                f"{cfg.train.init_from}'s; its latent statistics would not apply"
            )
        codec.latent_mean, codec.latent_std = base.latent_mean, base.latent_std
    elif stats_dir:
        codec.latent_mean, codec.latent_std = latent_statistics(codec, stats_dir, max_stats_files)
    return codec.save(out_dir)
