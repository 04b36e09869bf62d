"""Generation from a checkpoint: songs, edits and sweeps (DESIGN.md contract 5).

Follow one song from the checkpoint to the WAV:

1. :func:`find_checkpoint` picks a complete step folder; :class:`Generator` reads the
   config and the dataset card saved in it, builds the model and restores only the
   EMA (or raw) weights onto its own mesh, any device count.
2. :meth:`Generator.generate_latents` tokenizes the prompts (and the negative prompts
   for classifier-free guidance), draws each row's noise from its own seed, and runs
   the jitted sampler of ``sampling.py`` once per window: one window for a song that
   fits the model's window (the whole song in one pass, sharded over the ``sequence``
   mesh axis when the mesh has one), else window by window, each window inpainting
   its overlap with the previous one. Timing conditioning (``seconds_start``,
   ``seconds_total``) places each window in the song.
3. The latents are denormalized with the dataset card's per-channel mean and std and
   decoded by the codec; :func:`run_sweep` writes WAVs, spectrograms, a manifest row
   per output and the report page (``report.py``).

A sweep (prompts x guidance x steps x sampler x seeds x durations) runs in batches of
equal shapes; each finished output is appended to ``manifest.jsonl`` so a rerun skips
it, and at the end the manifest is rewritten in grid order. Bad rows and failed
batches are reported (``sweep_issues.jsonl`` and the page) and the sweep goes on.

:func:`generate_songs` is the one-call entry point (used by ``make demo``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from audiodiff_jax import checkpointing, names, sampling, sharding
from audiodiff_jax import config as config_lib
from audiodiff_jax.config import MeshConfig
from audiodiff_jax.model import make_model

MIN_SECONDS, MAX_SECONDS = 10.0, 300.0
MANIFEST = "manifest.jsonl"
ISSUES = "sweep_issues.jsonl"
_MIN_STD = 1e-6  # as data_pipeline/loader.py: the std the latents were divided by is at least this
_LATENTS_SPEC = PartitionSpec(("data", "fsdp"), "sequence")
_ROWS_SPEC = PartitionSpec(("data", "fsdp"))


class GenerationError(ValueError):
    """Bad input to generation (checkpoint, codec, prompt, duration...); the message says which."""


# ---------------------------------------------------------------------------
# Checkpoints


def find_checkpoint(path: str, step: int | None = None) -> tuple[epath.Path, int]:
    """Resolves ``path`` (a run workdir, its ``checkpoints`` folder or one step folder).

    Returns:
      (step folder, step). The latest complete step unless ``step`` is given.

    Raises:
      GenerationError: the path is missing, holds no complete checkpoint, lacks the
        step, or the step folder lacks an item the sampler needs.
    """
    try:
        return checkpointing.find_step(path, step, required_items=("state", "config", "dataset_card"))
    except checkpointing.CheckpointNotFound as e:
        hint = "; train a few steps first" if "no complete checkpoint" in str(e) else ""
        raise GenerationError(f"{e}{hint}") from e


def _read_json_item(item_dir: epath.Path) -> dict:
    try:
        return checkpointing.read_json_item(item_dir)
    except checkpointing.CheckpointNotFound as e:
        raise GenerationError(str(e)) from e


def read_checkpoint_meta(step_dir: epath.Path):
    """The resolved config and the dataset card saved with a checkpoint step."""
    from data_pipeline.shards import DatasetCard, ShardError

    try:
        cfg = config_lib.from_configdict(_read_json_item(step_dir / "config"))
    except config_lib.ConfigError as e:
        raise GenerationError(f"config saved in {step_dir / 'config'}: {e}") from e
    try:
        card = DatasetCard.from_dict(_read_json_item(step_dir / "dataset_card"), where=str(step_dir))
    except ShardError as e:
        raise GenerationError(f"dataset card saved in {step_dir / 'dataset_card'}: {e}") from e
    return cfg, card


# ---------------------------------------------------------------------------
# What to generate


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """Everything that decides one output (with the checkpoint and the edit audio)."""

    prompt: str
    seconds: float
    seed: int = 0
    negative_prompt: str = ""
    guidance: float = 5.0  # classifier-free guidance scale (1 = off)
    guidance_rescale: float = 0.0  # phi of guidance rescale (0 = off)
    steps: int = 50
    sampler: str = "dpmpp_2m"
    schedule: str = "uniform"
    eta: float = 0.0  # DDIM noise (0 = deterministic)
    strength: float = 1.0  # audio-to-audio variation: start time (1 = from pure noise)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AudioEdit:
    """Audio to continue, inpaint or vary, as normalized latents ``[frames, channels]``.

    ``known [frames]`` marks frames kept as they are (continuation: the start;
    inpainting: everything outside the range to regenerate); ``variation`` starts the
    sampler from these latents noised to ``SampleParams.strength``.
    """

    latents: np.ndarray
    known: np.ndarray | None = None
    variation: bool = False


class Generated(NamedTuple):
    latents: list[np.ndarray]  # per request: raw codec latents [frames, channels]
    denoise_s: float  # wall time of the sampling loops (all windows)
    windows: int
    compiled: bool  # whether this call traced and compiled a new program


def _plan_windows(frames: int, window: int, overlap: int) -> list[int]:
    """Start frames of the windows covering ``frames``; the last one ends at the song's end."""
    if window <= 0 or frames <= window:
        return [0]
    hop = window - overlap
    starts = list(range(0, frames - window, hop))
    starts.append(frames - window)
    return starts


class Generator:
    """A checkpoint's model restored for sampling on a mesh, with its tokenizer and codec.

    Args:
      checkpoint: run workdir, its checkpoints folder, or a step folder.
      codec: an object with the ``audiodiff_jax.codec.interface.Codec`` protocol, or
        None (latents only; :meth:`decode` then fails).
      step: checkpoint step (default: the latest complete one).
      use_ema: restore the EMA weights (default) or the raw ones.
      mesh: the sampling mesh (default: ``sharding.make_mesh(MeshConfig())``, all
        devices on ``data``). Batches are split over ``data x fsdp``, frames over
        ``sequence``, heads over ``tensor``.
      tokenizer_path: sentencepiece model (default: the copy saved with the checkpoint,
        else the one the training data used).
      window_frames: longest sequence generated in one pass; longer songs go window
        by window (default: the training window ``data.window_frames``; 0 = always
        one pass).
      overlap_frames: frames each window shares with the previous one (default: a
        quarter of the window).
      min_seconds, max_seconds: accepted durations.
    """

    def __init__(
        self,
        checkpoint: str,
        codec: Any = None,
        *,
        step: int | None = None,
        use_ema: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        tokenizer_path: str | None = None,
        window_frames: int | None = None,
        overlap_frames: int | None = None,
        min_seconds: float = MIN_SECONDS,
        max_seconds: float = MAX_SECONDS,
    ):
        from data_pipeline import loader
        from data_pipeline.tokenizer import Tokenizer

        self.step_dir, self.step = find_checkpoint(checkpoint, step)
        self.checkpoint = str(checkpoint)
        self.cfg, self.card = read_checkpoint_meta(self.step_dir)
        self.weights = "ema" if use_ema else "raw"
        self.min_seconds, self.max_seconds = float(min_seconds), float(max_seconds)
        cfg = self.cfg
        if self.card.codec.latent_channels != cfg.model.latent_channels:
            raise GenerationError(
                f"checkpoint {self.step_dir}: model.latent_channels={cfg.model.latent_channels} but its "
                f"dataset card says latent_channels={self.card.codec.latent_channels}"
            )
        self.codec = codec
        if codec is not None:
            self._check_codec(codec)
        self.latent_rate = float(self.card.codec.latent_rate)
        self.channels = cfg.model.latent_channels
        self.window = cfg.data.window_frames if window_frames is None else int(window_frames)
        self.overlap = self.window // 4 if overlap_frames is None else int(overlap_frames)
        if self.window > 0 and not 0 < self.overlap < self.window:
            raise GenerationError(
                f"overlap_frames={self.overlap} must be in (0, window_frames={self.window}) "
                "for windowed songs"
            )
        self.mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig())
        self._check_mesh()
        if tokenizer_path is not None:
            self.tokenizer = Tokenizer(tokenizer_path)
        elif (self.step_dir / "tokenizer").exists():
            # The copy saved with the checkpoint: no need for the training shards.
            try:
                self.tokenizer = Tokenizer.from_json(
                    _read_json_item(self.step_dir / "tokenizer"), where=str(self.step_dir / "tokenizer")
                )
            except ValueError as e:
                raise GenerationError(str(e)) from e
        else:  # checkpoints written before the tokenizer item existed
            try:
                tokenizer_path = loader.resolve_tokenizer_path(cfg.data, self.card)
            except config_lib.ConfigError as e:
                raise GenerationError(f"{e}; pass the tokenizer file explicitly (--tokenizer)") from e
            self.tokenizer = Tokenizer(tokenizer_path)
        tokenizer_path = self.tokenizer.path
        if self.tokenizer.vocab_size > cfg.model.text.vocab_size:
            raise GenerationError(
                f"tokenizer {tokenizer_path} has {self.tokenizer.vocab_size} pieces, more than the "
                f"model's model.text.vocab_size={cfg.model.text.vocab_size}: not the run's tokenizer"
            )
        self.model = make_model(cfg.model)
        self.params = self._restore_params(use_ema)
        self._fns: dict[tuple, Callable] = {}

    # -- set-up checks ---------------------------------------------------------------

    def _check_codec(self, codec) -> None:
        cc, dc = codec.card, self.card.codec
        if cc.latent_channels != self.cfg.model.latent_channels:
            raise GenerationError(
                f"codec {cc.name!r} has latent_channels={cc.latent_channels} but checkpoint "
                f"{self.step_dir} was trained on {self.cfg.model.latent_channels}-channel latents "
                f"(codec {dc.name!r})"
            )
        if not math.isclose(cc.latent_rate, dc.latent_rate, rel_tol=1e-6):
            raise GenerationError(
                f"codec {cc.name!r} runs at {cc.latent_rate:.4g} latent frames/s but checkpoint "
                f"{self.step_dir} was trained at {dc.latent_rate:.4g} (codec {dc.name!r})"
            )
        if cc.name != dc.name:
            logging.warning(
                "decoding with codec %r; the checkpoint was trained on %r latents", cc.name, dc.name
            )

    def _check_mesh(self) -> None:
        sizes = dict(self.mesh.shape)
        tp, m = sizes.get("tensor", 1), self.cfg.model
        for name, sub in (("model", m), ("model.text", m.text)):
            if sub.num_heads % tp:
                raise GenerationError(
                    f"{name}.num_heads={sub.num_heads} is not divisible by mesh tensor={tp}"
                )
            if int(sub.width * sub.mlp_ratio) % tp:
                raise GenerationError(f"{name} MLP width is not divisible by mesh tensor={tp}")

    def _restore_params(self, use_ema: bool):
        shardings = sharding.named_shardings(self.model.logical_axes(), self.mesh)
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self.model.abstract_params(),
            shardings,
        )
        try:
            params, _ = checkpointing.restore_params(str(self.step_dir), abstract, use_ema=use_ema)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
            raise GenerationError(
                f"could not restore the {'EMA' if use_ema else 'raw'} weights of {self.step_dir} "
                f"(half-written or damaged checkpoint?): {type(e).__name__}: {e}"
            ) from e
        return params

    # -- requests --------------------------------------------------------------------

    @property
    def batch_shards(self) -> int:
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

    def frames_for(self, seconds: float) -> int:
        return int(round(seconds * self.latent_rate))

    def check(self, p: SampleParams) -> None:
        """Raises GenerationError naming the first bad field of ``p``."""
        if not isinstance(p.prompt, str) or not p.prompt.strip():
            raise GenerationError(f"prompt={p.prompt!r} is empty; give a caption")
        if not (isinstance(p.seconds, int | float) and math.isfinite(p.seconds)) or not (
            self.min_seconds <= p.seconds <= self.max_seconds
        ):
            raise GenerationError(
                f"seconds={p.seconds} is out of range [{self.min_seconds:g}, {self.max_seconds:g}]"
            )
        if p.sampler not in sampling.SAMPLERS:
            raise GenerationError(f"sampler={p.sampler!r}; one of {sampling.SAMPLERS}")
        if p.schedule not in sampling.SCHEDULES:
            raise GenerationError(f"schedule={p.schedule!r}; one of {sampling.SCHEDULES}")
        if not isinstance(p.steps, int) or not 1 <= p.steps <= 10_000:
            raise GenerationError(f"steps={p.steps!r} must be an integer in [1, 10000]")
        if not isinstance(p.seed, int) or not 0 <= p.seed < 2**31:
            raise GenerationError(f"seed={p.seed!r} must be an integer in [0, 2^31)")
        if not math.isfinite(p.guidance) or p.guidance < 0:
            raise GenerationError(f"guidance={p.guidance} must be finite and >= 0")
        if not 0.0 <= p.guidance_rescale <= 1.0:
            raise GenerationError(f"guidance_rescale={p.guidance_rescale} must be in [0, 1]")
        if not 0.0 <= p.eta <= 1.0:
            raise GenerationError(f"eta={p.eta} must be in [0, 1]")
        if not 0.0 < p.strength <= 1.0:
            raise GenerationError(f"strength={p.strength} must be in (0, 1]")

    @staticmethod
    def group_key(p: SampleParams, frames: int) -> tuple:
        """Requests with equal keys run in one batch (one compiled program).

        Guidance on/off is part of the key (not a per-row no-op) so that a row's
        program, and thus its result, never depends on its batch mates.
        """
        return (frames, p.sampler, p.steps, p.guidance != 1.0)

    # -- audio edits -----------------------------------------------------------------

    def encode(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Audio ``[channels, samples]`` -> normalized latents ``[frames, channels]``."""
        if self.codec is None:
            raise GenerationError("no codec: cannot encode audio for an edit")
        raw = np.asarray(self.codec.encode(np.asarray(audio, np.float32), sample_rate), np.float32)
        mean = np.asarray(self.card.latent_mean, np.float32)
        std = np.maximum(np.asarray(self.card.latent_std, np.float32), _MIN_STD)
        return (raw - mean) / std

    def continuation(self, audio: np.ndarray, sample_rate: int) -> AudioEdit:
        """Keep ``audio`` as the start of the song and continue it."""
        lat = self.encode(audio, sample_rate)
        return AudioEdit(lat, known=np.ones(lat.shape[0], bool))

    def inpainting(self, audio: np.ndarray, sample_rate: int, start_s: float, end_s: float) -> AudioEdit:
        """Regenerate seconds [start_s, end_s) of ``audio``, keep the rest."""
        lat = self.encode(audio, sample_rate)
        a, b = self.frames_for(start_s), self.frames_for(end_s)
        if not 0 <= a < b <= lat.shape[0]:
            raise GenerationError(
                f"inpainting range [{start_s}, {end_s}) s is not inside the audio "
                f"({lat.shape[0] / self.latent_rate:.2f} s)"
            )
        known = np.ones(lat.shape[0], bool)
        known[a:b] = False
        return AudioEdit(lat, known=known)

    def variation(self, audio: np.ndarray, sample_rate: int) -> AudioEdit:
        """Start from ``audio`` noised to ``SampleParams.strength`` (audio-to-audio)."""
        return AudioEdit(self.encode(audio, sample_rate), variation=True)

    # -- sampling --------------------------------------------------------------------

    def _sample_fn(
        self, method: str, steps: int, batch: int, frames_pad: int, valid: int, cfg: bool, known: bool
    ):
        key = (method, steps, batch, frames_pad, valid, cfg, known)
        if key in self._fns:
            return self._fns[key], False
        apply = self.model.apply

        def fn(params, tok_c, tok_u, scale, rescale, start, total, keys_data, ts, eta, init, known_x, mask):
            nf = jnp.full((batch,), valid, jnp.int32)
            denoise = sampling.guided_denoiser(
                apply,
                params,
                tokens_cond_bl=tok_c,
                tokens_uncond_bl=tok_u if cfg else None,
                scale_b=scale,
                rescale_b=rescale,
                seconds_start_b=start,
                seconds_total_b=total,
                num_frames_b=nf,
            )
            return sampling.sample(
                denoise,
                init,
                ts,
                jax.random.wrap_key_data(keys_data),
                method=method,
                eta_b=eta,
                inpaint=sampling.Inpaint(known_x, mask) if known else None,
                valid_frames=valid,
                constrain=lambda x: sharding.constrain(x, (names.BATCH, names.LENGTH, None)),
            )

        jitted = jax.jit(fn, out_shardings=NamedSharding(self.mesh, _LATENTS_SPEC))
        self._fns[key] = jitted
        return jitted, True

    def _put(self, x: np.ndarray, spec: PartitionSpec) -> jax.Array:
        # make_array_from_callback works on one host and on many (each host holds the
        # full host array and gives every local device its slice).
        x = np.ascontiguousarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda idx: x[idx])

    @staticmethod
    def _get(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def tokens(self, text: str) -> np.ndarray:
        return self.tokenizer.encode(text, self.cfg.model.text.max_len)

    def generate_latents(
        self, requests: Sequence[SampleParams], edit: AudioEdit | None = None, batch_size: int | None = None
    ) -> Generated:
        """Samples one batch of requests that share :meth:`group_key`.

        Args:
          requests: checked params (see :meth:`check`), all with one group key.
          edit: optional audio to continue / inpaint / vary (shared by every row).
          batch_size: pad the batch to this many rows (a multiple of the mesh's
            data x fsdp size is used) so every batch of a sweep has one shape.

        Returns:
          :class:`Generated` with each request's raw (denormalized) latents.
        """
        if not requests:
            return Generated([], 0.0, 0, False)
        for p in requests:
            self.check(p)
        frames = self.frames_for(requests[0].seconds)
        keys = {self.group_key(p, self.frames_for(p.seconds)) for p in requests}
        if len(keys) != 1:
            raise GenerationError(f"one batch needs one group key (frames, sampler, steps, cfg); got {keys}")
        _, method, steps, use_cfg = keys.pop()
        shards = self.batch_shards
        batch = max(len(requests), batch_size or 0)
        batch = -(-batch // shards) * shards
        rows = list(requests) + [requests[-1]] * (batch - len(requests))  # padding rows repeat the last
        c = self.channels
        seq = int(self.mesh.shape["sequence"])
        starts = _plan_windows(frames, self.window, self.overlap)
        win = frames if len(starts) == 1 else self.window
        win_pad = -(-win // seq) * seq  # frames padded to split evenly over the sequence axis

        # Song-level inputs.
        song_known = np.zeros((frames, c), np.float32)
        song_mask = np.zeros((frames,), np.float32)
        song_init = np.zeros((frames, c), np.float32)
        variation = False
        if edit is not None:
            n = min(frames, edit.latents.shape[0])
            if edit.latents.shape[1] != c:
                raise GenerationError(f"edit latents have {edit.latents.shape[1]} channels, the model {c}")
            if edit.known is not None:
                song_known[:n] = edit.latents[:n]
                song_mask[:n] = edit.known[:n]
            if edit.variation:
                song_init[:n] = edit.latents[:n]
                variation = True
        t_start = [p.strength if variation else 1.0 for p in rows]
        ts = np.stack(
            [
                sampling.time_grid(
                    p.steps, schedule=p.schedule, shift=self.cfg.diffusion.schedule_shift, t_start=t0
                )
                for p, t0 in zip(rows, t_start, strict=True)
            ]
        )
        tok_c = np.stack([self.tokens(p.prompt) for p in rows])
        tok_u = np.stack([self.tokens(p.negative_prompt) for p in rows])
        scale = np.asarray([p.guidance for p in rows], np.float32)
        rescale = np.asarray([p.guidance_rescale for p in rows], np.float32)
        eta = np.asarray([p.eta for p in rows], np.float32)
        total = np.asarray([p.seconds for p in rows], np.float32)
        base_keys = [jax.random.key(p.seed) for p in rows]

        out = np.zeros((batch, frames, c), np.float32)
        t0 = time.perf_counter()
        compiled_any = False
        with jax.set_mesh(self.mesh):
            put_rows = lambda a: self._put(a, _ROWS_SPEC)
            common = [
                put_rows(tok_c),
                put_rows(tok_u),
                put_rows(scale),
                put_rows(rescale),
            ]
            for w, a in enumerate(starts):
                b = a + win
                known = np.broadcast_to(song_known[a:b], (batch, win, c)).copy()
                mask = np.broadcast_to(song_mask[a:b], (batch, win)).copy()
                if w > 0:  # the overlap with what the previous windows made is known
                    prev_end = starts[w - 1] + win
                    known[:, : prev_end - a] = out[:, a:prev_end]
                    mask[:, : prev_end - a] = 1.0
                init = np.broadcast_to(song_init[a:b], (batch, win, c))
                pad = ((0, 0), (0, win_pad - win), (0, 0))
                has_known = bool(mask.any())
                fn, compiled = self._sample_fn(method, steps, batch, win_pad, win, use_cfg, has_known)
                compiled_any |= compiled
                key_data = np.stack(
                    [np.asarray(jax.random.key_data(jax.random.fold_in(k, w))) for k in base_keys]
                )
                result = fn(
                    self.params,
                    *common,
                    put_rows(np.full((batch,), a / self.latent_rate, np.float32)),
                    put_rows(total),
                    put_rows(key_data),
                    put_rows(ts),
                    put_rows(eta),
                    self._put(np.pad(init, pad), _LATENTS_SPEC),
                    self._put(np.pad(known, pad), _LATENTS_SPEC),
                    self._put(np.pad(mask, pad[:2]), PartitionSpec(("data", "fsdp"), "sequence")),
                )
                out[:, a:b] = self._get(result)[:, :win]
        denoise_s = time.perf_counter() - t0
        mean = np.asarray(self.card.latent_mean, np.float32)
        std = np.maximum(np.asarray(self.card.latent_std, np.float32), _MIN_STD)
        raw = [out[i] * std + mean for i in range(len(requests))]
        return Generated(raw, denoise_s, len(starts), compiled_any)

    def decode(self, raw_latents: np.ndarray) -> np.ndarray:
        """Raw latents ``[frames, channels]`` -> audio ``[audio_channels, samples]``."""
        if self.codec is None:
            raise GenerationError("no codec given: cannot decode latents to audio")
        return np.asarray(self.codec.decode(raw_latents), np.float32)


# ---------------------------------------------------------------------------
# Sweeps


@dataclasses.dataclass(frozen=True)
class Grid:
    """The axes of a sweep; each prompt row is crossed with all of them."""

    guidance: tuple[float, ...] = (5.0,)
    steps: tuple[int, ...] = (50,)
    samplers: tuple[str, ...] = ("dpmpp_2m",)
    seeds: tuple[int, ...] = (0,)
    seconds: tuple[float, ...] = (180.0,)
    guidance_rescale: float = 0.0
    schedule: str = "uniform"
    eta: float = 0.0
    negative_prompt: str = ""
    strength: float = 1.0


# Fields a prompt row may set; a set field replaces that axis of the grid for the row.
ROW_FIELDS: dict[str, type] = {
    "prompt": str,
    "negative_prompt": str,
    "seconds": float,
    "seed": int,
    "guidance": float,
    "guidance_rescale": float,
    "steps": int,
    "sampler": str,
    "schedule": str,
    "eta": float,
    "strength": float,
}


@dataclasses.dataclass(frozen=True)
class SweepItem:
    index: int  # position in the grid (manifest order)
    params: SampleParams
    where: str  # where the item came from, for error messages


@dataclasses.dataclass(frozen=True)
class SweepIssue:
    where: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def parse_prompt_row(row: Any, where: str) -> dict[str, Any]:
    """Checks one prompt row (a dict of :data:`ROW_FIELDS`); raises GenerationError."""
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise GenerationError(f"{where}: a row must be a JSON object with a 'prompt', got {row!r:.60}")
    unknown = sorted(set(row) - set(ROW_FIELDS))
    if unknown:
        raise GenerationError(f"{where}: unknown field(s) {unknown}; valid: {sorted(ROW_FIELDS)}")
    if "prompt" not in row:
        raise GenerationError(f"{where}: missing field 'prompt'")
    out = {}
    for key, value in row.items():
        tp = ROW_FIELDS[key]
        ok = isinstance(value, tp) and not isinstance(value, bool)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise GenerationError(f"{where}: field {key}={value!r:.60} must be of type {tp.__name__}")
        out[key] = value
    if not out["prompt"].strip():
        raise GenerationError(f"{where}: field prompt is empty")
    return out


def read_prompts_file(path: str) -> tuple[list[tuple[str, dict]], list[SweepIssue]]:
    """Reads a JSONL prompts file: one object per line (``{"prompt": ..., "seconds": ...}``).

    Returns:
      (good rows as (where, row), issues for the bad ones). Blank lines and lines
      starting with ``#`` are skipped.
    """
    rows, issues = [], []
    try:
        lines = epath.Path(path).read_text().splitlines()
    except FileNotFoundError as e:
        raise GenerationError(f"prompts file {path!r} does not exist") from e
    for n, line in enumerate(lines, start=1):
        where = f"{path}:{n}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rows.append((where, parse_prompt_row(json.loads(line), where)))
        except json.JSONDecodeError as e:
            issues.append(SweepIssue(where, f"not valid JSON ({e.msg} at column {e.colno})"))
        except GenerationError as e:
            issues.append(SweepIssue(where, str(e).removeprefix(where + ": ")))
    return rows, issues


def expand_grid(rows: Iterable[tuple[str, dict]], grid: Grid) -> list[SweepItem]:
    """Prompt rows x grid -> items, in a fixed order (rows, seconds, samplers, steps, guidance, seeds)."""
    items = []
    for where, row in rows:
        axes = {
            "seconds": [row["seconds"]] if "seconds" in row else list(grid.seconds),
            "sampler": [row["sampler"]] if "sampler" in row else list(grid.samplers),
            "steps": [row["steps"]] if "steps" in row else list(grid.steps),
            "guidance": [row["guidance"]] if "guidance" in row else list(grid.guidance),
            "seed": [row["seed"]] if "seed" in row else list(grid.seeds),
        }
        for seconds in axes["seconds"]:
            for sampler in axes["sampler"]:
                for steps in axes["steps"]:
                    for guidance in axes["guidance"]:
                        for seed in axes["seed"]:
                            p = SampleParams(
                                prompt=row["prompt"],
                                seconds=float(seconds),
                                seed=int(seed),
                                negative_prompt=row.get("negative_prompt", grid.negative_prompt),
                                guidance=float(guidance),
                                guidance_rescale=float(row.get("guidance_rescale", grid.guidance_rescale)),
                                steps=int(steps),
                                sampler=sampler,
                                schedule=row.get("schedule", grid.schedule),
                                eta=float(row.get("eta", grid.eta)),
                                strength=float(row.get("strength", grid.strength)),
                            )
                            items.append(SweepItem(len(items), p, where))
    return items


def item_id(params: SampleParams, step: int, weights: str, edit_tag: str = "") -> str:
    """Stable id of one output: the same parameters on the same checkpoint step -> same id."""
    blob = json.dumps(
        {"params": params.to_dict(), "step": step, "weights": weights, "edit": edit_tag}, sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _slug(text: str, n: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-") or "song"


def read_manifest(path: str) -> tuple[dict[str, dict], int]:
    """Rows by id; a torn last line (an interrupted write) is skipped. Returns (rows, skipped)."""
    rows, bad = {}, 0
    if not os.path.exists(path):
        return rows, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                bad += 1
    return rows, bad


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Writes ``audio [channels, samples]`` as 16-bit PCM, atomically."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0).T, sample_rate, subtype="PCM_16", format="WAV")
    _atomic_write_bytes(path, buf.getvalue())


class SweepResult(NamedTuple):
    rows: list[dict]  # manifest rows in grid order
    issues: list[SweepIssue]
    generated: int  # outputs made by this call (the rest were already done)
    report: str  # path of the report page ("" if not written)


def run_sweep(
    gen: Generator,
    items: Sequence[SweepItem],
    out_dir: str,
    *,
    issues: Sequence[SweepIssue] = (),
    batch_size: int | None = None,
    edit: AudioEdit | None = None,
    edit_tag: str = "",
    title: str = "audiodiff-jax samples",
    on_batch_done: Callable[[int], None] | None = None,
    write_report: bool = True,
) -> SweepResult:
    """Generates every item not already in ``out_dir/manifest.jsonl``.

    Items are checked first (bad ones become issues); good ones are grouped by
    :meth:`Generator.group_key`, in grid order, and run ``batch_size`` at a time (every
    batch padded to that size, so all batches of a group share one program). After
    each batch its WAVs and spectrograms are written, then its manifest rows
    appended: an interrupted sweep loses at most the batch in flight. A batch that
    fails is reported and the sweep goes on.

    Args:
      gen: the generator (with a codec).
      items: from :func:`expand_grid`.
      out_dir: output folder (WAVs, PNGs, manifest, issues, report.html).
      issues: problems found before (bad prompt rows), reported with the rest.
      batch_size: rows per batch (default: the mesh's data x fsdp size).
      edit, edit_tag: audio edit shared by every item, and a name for it that goes
        into the ids (a different edit must not count as done).
      title: heading of the report page.
      on_batch_done: called with the number of batches done so far (progress, tests).
      write_report: write ``report.html`` at the end.
    """
    from audiodiff_jax import report

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    done, torn = read_manifest(manifest_path)
    if torn:
        logging.warning(
            "%s: skipped %d unreadable line(s) (interrupted write); redoing them", manifest_path, torn
        )
    issues = list(issues)
    batch_size = batch_size or gen.batch_shards
    primary = jax.process_index() == 0

    ids = {it.index: item_id(it.params, gen.step, gen.weights, edit_tag) for it in items}
    pending: dict[tuple, list[SweepItem]] = {}
    already = 0
    for it in items:
        try:
            gen.check(it.params)
        except GenerationError as e:
            issue = SweepIssue(it.where, str(e))
            if issue not in issues:  # a bad row expands to many items: say it once
                issues.append(issue)
            continue
        row = done.get(ids[it.index])
        if row is not None and os.path.exists(os.path.join(out_dir, row["file"])):
            already += 1
            continue
        pending.setdefault(gen.group_key(it.params, gen.frames_for(it.params.seconds)), []).append(it)
    batches = [
        group[i : i + batch_size] for group in pending.values() for i in range(0, len(group), batch_size)
    ]
    total_items = sum(len(b) for b in batches)
    logging.info(
        "sweep: %d outputs, %d already done, %d to make in %d batches of <= %d; %d issue(s)",
        len(items),
        already,
        total_items,
        len(batches),
        batch_size,
        len(issues),
    )
    made = 0
    card = gen.codec.card if gen.codec is not None else None
    for b, batch in enumerate(batches):
        params = [it.params for it in batch]
        try:
            res = gen.generate_latents(params, edit=edit, batch_size=batch_size)
            for it, lat in zip(batch, res.latents, strict=True):
                t0 = time.perf_counter()
                audio = gen.decode(lat)
                decode_s = time.perf_counter() - t0
                iid = ids[it.index]
                stem = f"{_slug(it.params.prompt)}-s{it.params.seed}-{iid[:10]}"
                row = {
                    "id": iid,
                    "index": it.index,
                    "file": stem + ".wav",
                    "spectrogram": stem + ".png",
                    **it.params.to_dict(),
                    "frames": int(lat.shape[0]),
                    "latent_rate": gen.latent_rate,
                    "windows": res.windows,
                    "audio_seconds": audio.shape[-1] / card.sample_rate,
                    "sample_rate": card.sample_rate,
                    "codec": card.name,
                    "checkpoint": gen.checkpoint,
                    "checkpoint_step": gen.step,
                    "weights": gen.weights,
                    "model_preset": gen.cfg.model.preset,
                    "edit": edit_tag,
                    "source": it.where,
                    # Everything that differs between two runs of the same output lives here.
                    "timings": {
                        "batch_denoise_s": round(res.denoise_s, 4),
                        "denoise_s_per_output": round(res.denoise_s / len(batch), 4),
                        "decode_s": round(decode_s, 4),
                        "batch_rows": len(batch),
                        "compiled": res.compiled,
                        "realtime_factor": round(
                            it.params.seconds / max(res.denoise_s / len(batch), 1e-9), 2
                        ),
                    },
                }
                if primary:
                    write_wav(os.path.join(out_dir, row["file"]), audio, card.sample_rate)
                    report.write_spectrogram_png(
                        os.path.join(out_dir, row["spectrogram"]), audio, card.sample_rate
                    )
                    with open(manifest_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row, sort_keys=True) + "\n")
                done[iid] = row
                made += 1
            logging.info(
                "sweep: batch %d/%d done (%d rows, %.2fs denoising, %d window(s))",
                b + 1,
                len(batches),
                len(batch),
                res.denoise_s,
                res.windows,
            )
        except Exception as e:  # noqa: BLE001 - one failed batch must not stop the sweep
            logging.exception("sweep: batch %d failed", b + 1)
            for it in batch:
                issues.append(SweepIssue(it.where, f"generation failed: {type(e).__name__}: {e}"))
        if on_batch_done is not None:
            on_batch_done(b + 1)

    rows = sorted((done[ids[it.index]] for it in items if ids[it.index] in done), key=lambda r: r["index"])
    # Rows of other grids sweeping into the same folder stay, after this grid's rows.
    mine = {r["id"] for r in rows}
    others = [r for r in done.values() if r["id"] not in mine]
    report_path = ""
    if primary:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows + others)
        _atomic_write_bytes(manifest_path, text.encode("utf-8"))
        _atomic_write_bytes(
            os.path.join(out_dir, ISSUES), "".join(json.dumps(i.to_dict()) + "\n" for i in issues).encode()
        )
        if write_report:
            m = gen.cfg.model
            facts = {
                "checkpoint": gen.checkpoint,
                "checkpoint step": gen.step,
                "weights": gen.weights,
                "model": f"{m.preset or 'custom'}: width {m.width}, depth {m.depth}",
                "codec": f"{card.name} ({card.sample_rate} Hz, {gen.latent_rate:.2f} latent frames/s)",
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
                f"mesh {dict(gen.mesh.shape)}",
            }
            report_path = report.write_report(out_dir, rows + others, issues, title=title, facts=facts)
    for i in issues:
        logging.warning("sweep issue: %s: %s", i.where, i.message)
    return SweepResult(rows, issues, made, report_path)


# ---------------------------------------------------------------------------
# One call for the demo


def generate_songs(
    checkpoint: str,
    prompts: Sequence[str | dict],
    out_dir: str,
    *,
    seconds: float = 180.0,
    seeds: Sequence[int] = (0,),
    guidance: float = 5.0,
    steps: int = 50,
    sampler: str = "dpmpp_2m",
    codec: Any = None,
    codec_name: str = "",
    mesh: jax.sharding.Mesh | None = None,
    use_ema: bool = True,
    batch_size: int | None = None,
    title: str = "audiodiff-jax songs",
    **generator_kwargs,
) -> SweepResult:
    """Generates a song per prompt and seed from a run's latest checkpoint.

    Writes ``out_dir``: one WAV and spectrogram PNG per song, ``manifest.jsonl``,
    ``sweep_issues.jsonl`` and ``report.html``. Rerunning skips the songs already made.

    Args:
      checkpoint: run workdir (or checkpoints folder, or step folder).
      prompts: captions, or prompt rows (dicts of :data:`ROW_FIELDS`).
      out_dir: output folder.
      seconds, seeds, guidance, steps, sampler: the song parameters.
      codec: a codec object; None loads one with ``audiodiff_jax.codec.load_codec``
        (``codec_name``, or the name in the checkpoint's dataset card).
      mesh, use_ema, batch_size: see :class:`Generator` and :func:`run_sweep`.
      generator_kwargs: more :class:`Generator` arguments (window_frames, ...).
    """
    if codec is None:
        step_dir, _ = find_checkpoint(checkpoint)
        _, card = read_checkpoint_meta(step_dir)
        codec = load_named_codec(codec_name or card.codec.name)
    gen = Generator(checkpoint, codec, mesh=mesh, use_ema=use_ema, **generator_kwargs)
    rows, issues = [], []
    for n, prompt in enumerate(prompts):
        where = f"prompt {n}"
        try:
            rows.append((where, parse_prompt_row(prompt, where)))
        except GenerationError as e:
            issues.append(SweepIssue(where, str(e)))
    grid = Grid(
        guidance=(guidance,), steps=(steps,), samplers=(sampler,), seeds=tuple(seeds), seconds=(seconds,)
    )
    return run_sweep(gen, expand_grid(rows, grid), out_dir, issues=issues, batch_size=batch_size, title=title)


def load_named_codec(name: str):
    """The codec called ``name``: ``audiodiff_jax.codec.load_codec(name)``.

    ``name`` may also be ``"package.module:factory"``, a callable returning a codec
    object (custom codecs, tests).
    """
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as e:
            raise GenerationError(f"codec factory {name!r} cannot be loaded: {e}") from e
    try:
        from audiodiff_jax.codec import load_codec
    except ImportError as e:
        raise GenerationError(
            f"audiodiff_jax.codec.load_codec is not available ({e}); pass a codec object"
        ) from e
    return load_codec(name)
