"""The sampler: songs, edits and windows from weights in memory (docs/DESIGN.md, contract 5).

Follow one song from the weights to the WAV:

1. Whoever holds the weights builds a :class:`Generator` from them: the parameters,
   the config and dataset card that describe them, the tokenizer and a codec. A program
   reads them from a checkpoint or an export first (``audiodiff_jax/checkpoints/source.py``;
   :func:`open_generator` does both steps); evaluation during training and
   distillation hand over the arrays they already hold. A sweep switches weight sets
   and checkpoint steps on the same Generator (:meth:`Generator.use_weights`): the
   compiled programs are kept.
2. :meth:`Generator.generate_latents` tokenizes the prompts (and the negative prompts
   for classifier-free guidance), draws each row's noise from its own seed, and runs
   the jitted sampler of ``audiodiff_jax/diffusion/samplers.py`` once per window: one
   window for a song that fits the model's window (the whole song in one pass, sharded
   over the ``sequence`` mesh axis when the mesh has one), else window by window, each
   window inpainting its overlap with the previous one (and, for models trained with
   ``model.masked_context``, taking it as context). Timing conditioning
   (``seconds_start``, ``seconds_total``) places each window in the song.
3. The latents are denormalized with the dataset card (``DatasetCard.denormalize``) and
   decoded by the codec (:meth:`Generator.decode`, with the look-ahead limiter).

The program of step 2 is a :class:`SampleProgram`: ``audiodiff-compile`` compiles the
same one. Sweeps, their manifest, WAVs and report page are ``audiodiff_jax/sweeps/sweep.py``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import soundfile as sf
from absl import logging
from jax.sharding import NamedSharding

from audiodiff_jax.checkpoints import source as source_lib
from audiodiff_jax.codec import limiter
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import music, names, optim, paths, sharding
from audiodiff_jax.core.config import MeshConfig
from audiodiff_jax.core.errors import GenerationError
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.diffusion import samplers
from audiodiff_jax.model import adapters as adapters_lib
from audiodiff_jax.model import make_model

MANIFEST = "manifest.jsonl"
ISSUES = "sweep_issues.jsonl"
# Logical axes of the sampling program's inputs (sharding.LOGICAL_RULES places them).
_ROWS = (names.BATCH,)
_LATENTS = (names.BATCH, names.LENGTH, None)
_FRAMES = (names.BATCH, names.LENGTH)


# ---------------------------------------------------------------------------
# What to generate


# Defaults of every sampling parameter: the sample section of the config (a grid
# axis gives its first value).
_SAMPLE = config_lib.SampleConfig()


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """Everything that decides one output (with the checkpoint and the edit audio).

    Besides ``prompt``, one field per :data:`config.SAMPLE_PARAM_FIELDS` entry; the
    meaning of each is documented in :class:`config.SampleConfig`.
    """

    prompt: str
    seconds: float
    seed: int = _SAMPLE.seeds[0]
    negative_prompt: str = _SAMPLE.negative_prompt
    guidance: float = _SAMPLE.guidance[0]  # classifier-free guidance scale (1 = off)
    guidance_rescale: float = _SAMPLE.guidance_rescale[0]  # phi of guidance rescale (0 = off)
    steps: int = _SAMPLE.steps[0]
    sampler: str = _SAMPLE.samplers[0]
    schedule: str = _SAMPLE.schedule[0]
    eta: float = _SAMPLE.eta  # DDIM noise (0 = deterministic)
    strength: float = _SAMPLE.strength  # audio-to-audio variation: start time (1 = from pure noise)
    # Musical controls, for models with model.controls (core/music.py): none asked by default.
    bpm: float = _SAMPLE.bpm[0]  # tempo in bpm (0 = none)
    key: str = _SAMPLE.key[0]  # "F# minor" ("" = none)
    time_signature: str = _SAMPLE.time_signature[0]  # "3/4" ("" = none)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_section(cls, prompt: str, sample: config_lib.SampleConfig, **changes) -> SampleParams:
        """The output ``sample`` (a config's sample section) describes for ``prompt``: each
        grid axis at its first value, then ``changes``."""
        params = {}
        for name in config_lib.SAMPLE_PARAM_FIELDS:
            value = getattr(sample, config_lib.SAMPLE_PARAM_FIELDS[name])
            params[name] = (
                value[0] if config_lib.is_sample_axis(config_lib.SAMPLE_PARAM_FIELDS[name]) else value
            )
        return cls(prompt, **{**params, **changes})


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Writes a sampled song ``audio [channels, samples]`` as 16-bit PCM, atomically
    (local or gs://): the one format of every song this project writes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0).T, sample_rate, subtype="PCM_16", format="WAV")
    paths.atomic_write(path, buf.getvalue())


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
    denoise_s: float  # wall time of the sampling loops (all windows), compilation excluded
    windows: int
    compiled: bool  # whether this call traced and compiled a new program
    compile_s: float = 0.0  # wall time of that compilation (reported apart)


def _plan_windows(frames: int, window: int, overlap: int) -> list[int]:
    """Start frames of the windows covering ``frames``; the last one ends at the song's end."""
    if window <= 0 or frames <= window:
        return [0]
    hop = window - overlap
    starts = list(range(0, frames - window, hop))
    starts.append(frames - window)
    return starts


def window_seams(frames: int, window: int, overlap: int) -> list[int]:
    """Frames where a window's new frames start (after the overlap it shares with what
    came before): the jump from frame ``s - 1`` to ``s`` is a seam (``audiodiff_jax/sampling/seams.py``)."""
    starts = _plan_windows(frames, window, overlap)
    return [starts[w - 1] + window for w in range(1, len(starts))]


def padded_shape(mesh: jax.sharding.Mesh, rows: int, frames: int) -> tuple[int, int]:
    """``(batch, frames)`` of a sampling program on ``mesh``: rows rounded up to split over
    the batch axes, frames rounded up to split over the sequence axis."""
    shards, seq = sharding.batch_shards(mesh), sharding.length_shards(mesh)
    return -(-rows // shards) * shards, -(-frames // seq) * seq


class SampleInputs(NamedTuple):
    """Per-row inputs of the sampling program besides the params and the conditioning."""

    uncond_tokens: Any  # int32 [B, L]: the negative prompt (the empty caption when none)
    scale: Any  # float32 [B]: guidance scale
    rescale: Any  # float32 [B]: guidance rescale
    keys_data: Any  # uint32 [B, 2]: each row's key for this window
    times: Any  # float32 [B, steps + 1]: the time grid (samplers.time_grid)
    eta: Any  # float32 [B]: DDIM noise
    init: Any  # float32 [B, T, C]: the start for a variation (zeros otherwise)
    known: Any  # float32 [B, T, C]: latents to keep (continuation, inpainting, window overlap)
    known_mask: Any  # float32 [B, T]: 1 where ``known`` holds


class SampleProgram(NamedTuple):
    """One compiled sampling program: what :class:`Generator` runs and ``audiodiff-compile`` compiles.

    ``fn(apply)`` gives ``(params, cond: Conditioning, inputs: SampleInputs) -> latents
    [batch, frames, C]``: the whole sampler loop (every step, classifier-free guidance,
    inpainting) for one window of ``frames`` (padded to split over the sequence axis;
    ``valid`` are real).
    """

    method: str
    steps: int
    batch: int
    frames: int
    valid: int
    cfg: bool
    known: bool
    # The model takes the known frames as input (model.masked_context): they condition
    # every step through the model, besides being kept. Models without it only keep them.
    context: bool = False
    # The model takes the guidance scale as input (a distilled student): one evaluation
    # per step gives the guided prediction.
    guidance_input: bool = False

    def fn(self, apply_fn: Callable[..., jax.Array]):
        def run(params, cond: Conditioning, inputs: SampleInputs) -> jax.Array:
            if self.context and self.known:
                cond = cond._replace(known=inputs.known, known_mask=inputs.known_mask)
            if self.guidance_input:
                cond = cond._replace(guidance=inputs.scale)
            denoise = samplers.guided_denoiser(
                apply_fn,
                params,
                cond,
                uncond_tokens=inputs.uncond_tokens if self.cfg else None,
                scale_b=inputs.scale,
                rescale_b=inputs.rescale,
            )
            return samplers.sample(
                denoise,
                inputs.init,
                inputs.times,
                jax.random.wrap_key_data(inputs.keys_data),
                method=self.method,
                eta_b=inputs.eta,
                inpaint=samplers.Inpaint(inputs.known, inputs.known_mask) if self.known else None,
                valid_frames=self.valid,
                constrain=lambda x: sharding.constrain(x, _LATENTS),
            )

        return run

    def out_shardings(self, mesh: jax.sharding.Mesh) -> NamedSharding:
        return sharding.named_shardings(_LATENTS, mesh)

    def abstract_args(self, cfg: config_lib.Config, abstract_params: Any, mesh: jax.sharding.Mesh):
        """``(params, cond, inputs)`` as sharded ShapeDtypeStructs, for ahead-of-time compiles."""
        b, t, c, length = self.batch, self.frames, cfg.model.latent_channels, cfg.model.text.max_len

        def s(shape, dtype, axes):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_shardings(axes, mesh))

        rows = lambda dtype, *rest: s((b, *rest), dtype, _ROWS + (None,) * len(rest))
        cond = Conditioning(
            rows(np.int32, length),
            rows(np.float32),
            rows(np.float32),
            rows(np.int32),
            bpm=rows(np.float32),
            key=rows(np.int32),
            meter=rows(np.int32),
        )
        # A student's guidance scale is SampleInputs.scale, put into cond by the program.
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        inputs = SampleInputs(
            uncond_tokens=rows(np.int32, length),
            scale=rows(np.float32),
            rescale=rows(np.float32),
            keys_data=rows(np.uint32, *key_shape),
            times=rows(np.float32, self.steps + 1),
            eta=rows(np.float32),
            init=s((b, t, c), np.float32, _LATENTS),
            known=s((b, t, c), np.float32, _LATENTS),
            known_mask=s((b, t), np.float32, _FRAMES),
        )
        return abstract_params, cond, inputs


class Generator:
    """A model's weights in memory, ready to sample on a mesh, with its tokenizer and codec.

    Args:
      cfg: the config the weights were trained with (model, data window, sample defaults).
      card: the dataset card of the latents the model learned (normalization, codec).
      tokenizer: the caption tokenizer of the run.
      codec: an object with the ``audiodiff_jax.codec.interface.Codec`` protocol, or
        None (latents only; :meth:`decode` then fails).
      params: the weights (any pytree the model's ``apply`` takes, already on ``mesh``
        or host arrays); None: set them later with :meth:`use_weights`.
      weights, step: the name of the weight set (``raw``, ``ema``, ``ema0.9999``...)
        and the training step they come from: what manifests record.
      checkpoint: where the weights came from (a path), for manifests; "" when in memory.
      mesh: the sampling mesh (default: ``sharding.make_mesh(MeshConfig())``, all
        devices on ``data``). Batches are split over ``data x fsdp``, frames over
        ``sequence``, heads over ``tensor``.
      window_frames: longest sequence generated in one pass; longer songs go window
        by window (-1: the training window ``data.window_frames``; 0 = always one
        pass).
      overlap_frames: frames each window shares with the previous one (-1: a
        quarter of the window).
      min_seconds, max_seconds: accepted durations.

    ``window_frames``, ``overlap_frames``, ``min_seconds`` and ``max_seconds`` default
    (None) to ``cfg.sample``. The weights' name is kept as :meth:`canonical_weights`
    gives it (``ema`` -> ``ema0.999``), so manifests name them the same whichever way
    they were asked for.
    """

    def __init__(
        self,
        cfg: config_lib.Config,
        card: DatasetCard,
        tokenizer: Tokenizer,
        codec: Any = None,
        *,
        params: Any = None,
        weights: str = optim.EMA,
        step: int = 0,
        checkpoint: str = "",
        mesh: jax.sharding.Mesh | None = None,
        window_frames: int | None = None,
        overlap_frames: int | None = None,
        min_seconds: float | None = None,
        max_seconds: float | None = None,
    ):
        self.cfg, self.card, self.tokenizer = cfg, card, tokenizer
        self._warned: set = set()  # (field, value) already warned of (check_controls)
        self.checkpoint = checkpoint
        self.where = f"checkpoint {checkpoint}" if checkpoint else "the weights in memory"
        given = {
            "window_frames": window_frames,
            "overlap_frames": overlap_frames,
            "min_seconds": min_seconds,
            "max_seconds": max_seconds,
        }
        given = {k: v for k, v in given.items() if v is not None}
        try:
            config_lib.check_sample_values(given, name=str)
        except config_lib.ConfigError as e:
            raise GenerationError(str(e)) from e
        self.sample = config_lib.replace(cfg.sample, **given)
        self.min_seconds, self.max_seconds = float(self.sample.min_seconds), float(self.sample.max_seconds)
        if card.codec.latent_channels != cfg.model.latent_channels:
            raise GenerationError(
                f"{self.where}: model.latent_channels={cfg.model.latent_channels} but its "
                f"dataset card says latent_channels={card.codec.latent_channels}"
            )
        if tokenizer.vocab_size > cfg.model.text.vocab_size:
            raise GenerationError(
                f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than the "
                f"model's model.text.vocab_size={cfg.model.text.vocab_size}: not the run's tokenizer"
            )
        self.codec = codec
        if codec is not None:
            self._check_codec(codec)
        self.latent_rate = float(card.codec.latent_rate)
        self.channels = cfg.model.latent_channels
        w, o = self.sample.window_frames, self.sample.overlap_frames
        self.window = cfg.data.window_frames if w < 0 else w
        self.overlap = self.window // 4 if o < 0 else o
        if self.window > 0 and not 0 < self.overlap < self.window:
            raise GenerationError(
                f"overlap_frames={self.overlap} must be in (0, window_frames={self.window}) "
                "for windowed songs"
            )
        self.mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig())
        self._check_mesh()
        self.model = make_model(cfg.model)
        self.step, self.weights, self.params = step, self.canonical_weights(weights), None
        self.adapters = source_lib.NO_ADAPTERS
        self.base_params = None  # the weights before adapters are merged in
        if params is not None:
            self.use_weights(step, weights, params)
        self._fns: dict[tuple, Callable] = {}

    def share_programs(self, other: Generator) -> None:
        """Runs the sampling programs ``other`` compiled, and shares those either compiles
        from now on: two weight sets of one model on one mesh (compared side by side)
        compile each shape once. The programs take the weights as an argument; the model
        and the mesh are the program."""
        if other.cfg.model != self.cfg.model or other.mesh != self.mesh:
            raise GenerationError(
                f"{self.where} and {other.where} differ in their model or mesh: they cannot share "
                "compiled sampling programs"
            )
        self._fns = other._fns

    # -- set-up checks ---------------------------------------------------------------

    def _check_codec(self, codec) -> None:
        cc, dc = codec.card, self.card.codec
        if cc.latent_channels != self.cfg.model.latent_channels:
            raise GenerationError(
                f"codec {cc.name!r} has latent_channels={cc.latent_channels} but checkpoint "
                f"{self.where} was trained on {self.cfg.model.latent_channels}-channel latents "
                f"(codec {dc.name!r})"
            )
        if not math.isclose(cc.latent_rate, dc.latent_rate, rel_tol=1e-6):
            raise GenerationError(
                f"codec {cc.name!r} runs at {cc.latent_rate:.4g} latent frames/s but checkpoint "
                f"{self.where} was trained at {dc.latent_rate:.4g} (codec {dc.name!r})"
            )
        if cc.name != dc.name:
            logging.warning(
                "decoding with codec %r; the checkpoint was trained on %r latents", cc.name, dc.name
            )

    def _check_mesh(self) -> None:
        # The same checks as training's config.validate, against the sampling mesh.
        try:
            config_lib.validate_model_on_mesh(self.cfg.model, dict(self.mesh.shape))
        except config_lib.ConfigError as e:
            raise GenerationError(f"{self.where} on this sampling mesh: {e}") from e

    # -- weights: checkpoint steps and weight sets ----------------------------------

    def canonical_weights(self, name: str) -> str:
        """``ema`` -> ``ema<optim.ema_decay>`` of the config; ``ema0.99990`` -> ``ema0.9999``;
        ``raw`` stays."""
        if name == optim.EMA:
            return optim.ema_name(self.cfg.optim.ema_decay)
        return optim.canonical_weights(name)

    def abstract_params(self) -> Any:
        """The model's params as ShapeDtypeStructs sharded on this mesh: the restore target
        of weights that are to be sampled here."""
        shardings = sharding.named_shardings(self.model.logical_axes(), self.mesh)
        return sharding.with_shardings(self.model.abstract_params(), shardings)

    def use_weights(
        self, step: int, name: str, params: Any, adapters: source_lib.AdapterStack | None = None
    ) -> None:
        """Samples from now on with ``params``: the weight set ``name`` of training step
        ``step``, with ``adapters`` merged in (``audiodiff_jax/model/adapters.py``). The
        merged weights have the params' shapes and shardings, so every stack and scale
        runs through the same compiled programs; a stack whose scales are all 0 leaves
        ``params`` as they are (the base's songs, bit for bit). Whether the adapters were
        trained on these weights is the caller's check (``WeightsSource.check_adapter``)."""
        stack = adapters or source_lib.NO_ADAPTERS
        same = params is self.base_params and stack.text == self.adapters.text
        self.step, self.weights = step, self.canonical_weights(name)
        if not same:
            self.base_params, self.adapters = params, stack
            self.params = self._merged(params, stack)

    def _merged(self, params: Any, stack: source_lib.AdapterStack) -> Any:
        live = [(a, scale) for a, scale in stack.layers if scale != 0]
        if not live:
            return params
        placed = []
        for a, _ in live:
            fns = adapters_lib.make_adapter(self.cfg.model, a.spec)
            shardings = sharding.named_shardings(fns.logical_axes(), self.mesh)
            placed.append(jax.tree.map(lambda x, sh: jax.device_put(np.asarray(x), sh), a.params, shardings))
        factors = [scale * a.spec.factor for a, scale in live]
        merge = jax.jit(
            lambda base, stack: adapters_lib.merge(base, list(zip(stack, factors, strict=True))),
            out_shardings=sharding.named_shardings(self.model.logical_axes(), self.mesh),
        )
        with jax.set_mesh(self.mesh):
            return merge(params, placed)

    # -- requests --------------------------------------------------------------------

    @property
    def batch_shards(self) -> int:
        return sharding.batch_shards(self.mesh)

    def frames_for(self, seconds: float) -> int:
        """Latent frames that cover ``seconds`` (rounded up: decoding trims to the length)."""
        return int(math.ceil(seconds * self.latent_rate - 1e-6))

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
        # The same checks as the sample section of the config, value by value.
        for name in config_lib.SAMPLE_PARAM_FIELDS:
            value = getattr(p, name)
            problem = config_lib.sample_value_problem(name, value)
            if problem:
                raise GenerationError(f"{name}={value!r} {problem}")
        self.check_controls(p)
        self.check_student(p)

    @property
    def student(self) -> bool:
        """Whether the model is a distilled student (``model.guidance_input``)."""
        return bool(self.cfg.model.guidance_input)

    def check_student(self, p: SampleParams) -> None:
        """A student samples as it was distilled (``training/distill_trainer.py``): deterministic
        DDIM on its grid, one evaluation per step at a guidance scale of its trained range,
        without negative prompt or guidance rescale (no unconditional branch runs)."""
        if not self.student:
            return
        d = self.cfg.distill
        what = f"this model is a student of {d.steps} steps ({d.method} distillation)"
        wrong = [
            (name, value, want)
            for name, value, want in (
                ("steps", p.steps, d.steps),
                ("sampler", p.sampler, "ddim"),
                ("schedule", p.schedule, d.schedule),
                ("eta", p.eta, 0.0),
                ("guidance_rescale", p.guidance_rescale, 0.0),
                ("negative_prompt", p.negative_prompt, ""),
            )
            if value != want
        ]
        if wrong:
            name, value, want = wrong[0]
            raise GenerationError(f"{name}={value!r}: {what}; it samples with {name}={want!r}")
        low, high = d.requested_range()
        if not low <= p.guidance <= high:
            calibrated = (
                f" (its inputs {d.guidance_min:g} to {d.guidance_max:g}, calibrated by "
                f"distill.guidance_offset={d.guidance_offset:g})"
                if d.guidance_offset
                else ""
            )
            raise GenerationError(
                f"guidance={p.guidance:g}: {what} trained for guidance {low:g} to {high:g}{calibrated}"
            )

    def model_evals(self, p: SampleParams, windows: int) -> int:
        """Model evaluations one song of ``p`` costs: per window, the sampler's evaluations
        per step, twice with classifier-free guidance (the prompt and the negative prompt
        run as one batch of two rows: two evaluations' work); a student's once."""
        per_step = samplers.EVALS_PER_STEP[p.sampler] * (2 if p.guidance != 1.0 and not self.student else 1)
        return windows * p.steps * per_step

    @property
    def distillation(self) -> str:
        """How the model was made, for manifests: ``progressive`` for a distilled student, else ""."""
        return self.cfg.distill.method if self.student else ""

    @property
    def guidance_offset(self) -> float:
        """What a student adds to the scale asked for (``distill.guidance_offset``; 0 otherwise)."""
        return float(self.cfg.distill.guidance_offset) if self.student else 0.0

    def check_controls(self, p: SampleParams) -> None:
        """A musical control the model does not take is an error; a value outside what its
        training data held (the dataset card's label tally) is a warning, once per value."""
        controls = self.cfg.model.controls
        seen = self.card.metadata.get("labels") if isinstance(self.card.metadata, dict) else None
        for name, control in config_lib.SAMPLE_CONTROLS.items():
            value = getattr(p, name)
            if value in (0, 0.0, ""):
                continue
            if control not in controls:
                raise GenerationError(
                    f"{name}={value!r}: this model takes no {control} (model.controls="
                    f"{','.join(controls) or 'none'}); say it in the prompt instead"
                )
            if not seen:
                continue
            warning = ""
            if control == "tempo":
                t = seen["tempo"]
                if not t["count"]:
                    warning = "its training data had no tempo labels"
                elif not t["min"] / 1.15 <= value <= t["max"] * 1.15:
                    warning = f"its training data held {t['min']:g} to {t['max']:g} bpm"
            else:
                names_seen = seen["key" if control == "key" else "meter"]
                canonical = (
                    music.key_name(music.key_from_text(value)) if control == "key" else value.replace(" ", "")
                )
                if canonical not in names_seen:
                    shown = ", ".join(names_seen) or "none"
                    if control == "meter":
                        raise GenerationError(
                            f"{name}={value!r}: the model never saw this time signature in training "
                            f"(seen: {shown})"
                        )
                    warning = f"its training data never had {canonical}"
            if warning and (name, value) not in self._warned:
                self._warned.add((name, value))
                logging.warning("%s=%r is outside what this model learned: %s", name, value, warning)

    def group_key(self, p: SampleParams, frames: int) -> tuple:
        """Requests with equal keys run in one batch (one compiled program).

        Guidance on/off is part of the key (not a per-row no-op) so that a row's
        program, and thus its result, never depends on its batch mates.
        """
        # A student's guidance is an input of its one evaluation: no unconditional branch.
        return (frames, p.sampler, p.steps, p.guidance != 1.0 and not self.student)

    # -- audio edits -----------------------------------------------------------------

    def encode(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Audio ``[channels, samples]`` -> normalized latents ``[frames, channels]``."""
        if self.codec is None:
            raise GenerationError("no codec: cannot encode audio for an edit")
        raw = np.asarray(self.codec.encode(np.asarray(audio, np.float32), sample_rate), np.float32)
        return self.card.normalize(raw)

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

    def _sample_fn(self, program: SampleProgram, args: tuple) -> tuple[Callable, float]:
        """The compiled program and the seconds spent compiling it now (0 when cached).

        Compiled ahead of its first call (``lower(...).compile()`` on the real arguments),
        so the sampling time reported for a song never includes compilation."""
        if program in self._fns:
            return self._fns[program], 0.0
        t0 = time.perf_counter()
        with jax.profiler.TraceAnnotation("compile_sampling_program"):  # named in a profile
            jitted = jax.jit(program.fn(self.model.apply), out_shardings=program.out_shardings(self.mesh))
            self._fns[program] = jitted.lower(*args).compile()
        return self._fns[program], time.perf_counter() - t0

    def _put(self, x: np.ndarray, logical_axes: tuple) -> jax.Array:
        # make_array_from_callback works on one host and on many (each host holds the
        # full host array and gives every local device its slice).
        x = np.ascontiguousarray(x)
        sh = sharding.named_shardings(logical_axes, self.mesh)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    @staticmethod
    def _get(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def tokens(self, text: str) -> np.ndarray:
        return self.tokenizer.encode(text, self.cfg.model.text.max_len)

    def generate_latents(
        self,
        requests: Sequence[SampleParams],
        edit: AudioEdit | None = None,
        batch_size: int | None = None,
        on_window: Callable[[int, int], None] | None = None,
    ) -> Generated:
        """Samples one batch of requests that share :meth:`group_key`.

        Args:
          requests: checked params (see :meth:`check`), all with one group key.
          edit: optional audio to continue / inpaint / vary (shared by every row).
          batch_size: pad the batch to this many rows (a multiple of the mesh's
            data x fsdp size is used) so every batch of a sweep has one shape.
          on_window: called with (windows done, windows in all) after each window
            (a progress bar); the sampling loop of a window runs on the device in one go.

        Returns:
          :class:`Generated` with each request's raw (denormalized) latents.
        """
        if not requests:
            return Generated([], 0.0, 0, False)
        if self.params is None:
            raise GenerationError(
                "no weights restored yet (Generator(restore=False)): call use_weights first"
            )
        for p in requests:
            self.check(p)
        frames = self.frames_for(requests[0].seconds)
        keys = {self.group_key(p, self.frames_for(p.seconds)) for p in requests}
        if len(keys) != 1:
            raise GenerationError(f"one batch needs one group key (frames, sampler, steps, cfg); got {keys}")
        _, method, steps, use_cfg = keys.pop()
        starts = _plan_windows(frames, self.window, self.overlap)
        win = frames if len(starts) == 1 else self.window
        batch, win_pad = padded_shape(self.mesh, max(len(requests), batch_size or 0), win)
        rows = list(requests) + [requests[-1]] * (batch - len(requests))  # padding rows repeat the last
        c = self.channels

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
                samplers.time_grid(
                    p.steps, schedule=p.schedule, shift=self.cfg.diffusion.schedule_shift, t_start=t0
                )
                for p, t0 in zip(rows, t_start, strict=True)
            ]
        )
        tok_c = np.stack([self.tokens(p.prompt) for p in rows])
        tok_u = np.stack([self.tokens(p.negative_prompt) for p in rows])
        # A student's scale is its guidance input, calibrated (distill.guidance_offset).
        scale = np.asarray([p.guidance + self.guidance_offset for p in rows], np.float32)
        rescale = np.asarray([p.guidance_rescale for p in rows], np.float32)
        eta = np.asarray([p.eta for p in rows], np.float32)
        total = np.asarray([p.seconds for p in rows], np.float32)
        bpm = np.asarray([p.bpm for p in rows], np.float32)
        key = np.asarray([music.key_from_text(p.key) for p in rows], np.int32)
        meter = np.asarray([music.meter_index(p.time_signature) for p in rows], np.int32)
        base_keys = [jax.random.key(p.seed) for p in rows]

        out = np.zeros((batch, frames, c), np.float32)
        t0 = time.perf_counter()
        compiled_any, compile_s = False, 0.0
        with jax.set_mesh(self.mesh):
            put_rows = lambda a: self._put(a, _ROWS)
            tok_c, tok_u, scale, rescale = map(put_rows, (tok_c, tok_u, scale, rescale))
            total, ts, eta = map(put_rows, (total, ts, eta))
            bpm, key, meter = map(put_rows, (bpm, key, meter))
            num_frames = put_rows(np.full((batch,), win, np.int32))
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
                program = SampleProgram(
                    method,
                    steps,
                    batch,
                    win_pad,
                    win,
                    use_cfg,
                    bool(mask.any()),
                    self.cfg.model.masked_context,
                    self.student,
                )
                key_data = np.stack(
                    [np.asarray(jax.random.key_data(jax.random.fold_in(k, w))) for k in base_keys]
                )
                start = put_rows(np.full((batch,), a / self.latent_rate, np.float32))
                args = (
                    self.params,
                    Conditioning(tok_c, start, total, num_frames, bpm=bpm, key=key, meter=meter),
                    SampleInputs(
                        uncond_tokens=tok_u,
                        scale=scale,
                        rescale=rescale,
                        keys_data=put_rows(key_data),
                        times=ts,
                        eta=eta,
                        init=self._put(np.pad(init, pad), _LATENTS),
                        known=self._put(np.pad(known, pad), _LATENTS),
                        known_mask=self._put(np.pad(mask, pad[:2]), _FRAMES),
                    ),
                )
                fn, seconds = self._sample_fn(program, args)
                compile_s += seconds
                compiled_any |= seconds > 0
                with jax.profiler.TraceAnnotation("sample_window", window=w, frames=win):
                    out[:, a:b] = self._get(fn(*args))[:, :win]
                if on_window is not None:
                    on_window(w + 1, len(starts))
        denoise_s = time.perf_counter() - t0 - compile_s
        raw = [self.card.denormalize(out[i]) for i in range(len(requests))]
        return Generated(raw, denoise_s, len(starts), compiled_any, compile_s)

    def decode(self, raw_latents: np.ndarray, seconds: float | None = None) -> np.ndarray:
        """Raw latents ``[frames, channels]`` -> audio ``[audio_channels, samples]``, cut to
        exactly ``seconds`` (to the sample) when given: whole latent frames overshoot.
        Peaks above full scale are turned down by a look-ahead limiter
        (``audiodiff_jax/codec/limiter.py``), never clipped; quieter audio is untouched."""
        if self.codec is None:
            raise GenerationError("no codec given: cannot decode latents to audio")
        audio = np.asarray(self.codec.decode(raw_latents), np.float32)
        if seconds is not None:
            audio = audio[:, : int(round(seconds * self.codec.card.sample_rate))]
        audio, reduction_db = limiter.limit(audio, self.codec.card.sample_rate)
        if reduction_db > 0:
            logging.info("decode: peaks above full scale limited by up to %.1f dB", reduction_db)
        return audio


def section_kwargs(sample: config_lib.SampleConfig) -> dict[str, Any]:
    """The :class:`Generator` arguments a sample section sets: its windows and the
    durations it accepts."""
    return dict(
        window_frames=sample.window_frames,
        overlap_frames=sample.overlap_frames,
        min_seconds=sample.min_seconds,
        max_seconds=sample.max_seconds,
    )


def open_generator(
    checkpoint: str | source_lib.WeightsSource,
    codec: Any = None,
    *,
    step: int | None = None,
    weights: str | None = None,
    use_ema: bool | None = None,
    tokenizer_path: str | None = None,
    restore: bool = True,
    adapters: source_lib.AdapterStack | None = None,
    **kwargs,
) -> tuple[Generator, source_lib.WeightsSource]:
    """Reads weights from a checkpoint or an export (the weights source), then builds the
    :class:`Generator` over them: the two steps a program takes, in one call.

    Args:
      checkpoint: run workdir, its checkpoints folder, a step folder, or an export
        folder; or a source opened already.
      codec: see :class:`Generator`.
      step: checkpoint step (default: the latest complete one).
      weights: the weight set to restore: ``raw``, ``ema`` or ``ema<decay>`` (default:
        the first of the saved config's ``sample.weights``; an export's own set).
      use_ema: the older way to choose: True = ``ema``, False = ``raw``.
      tokenizer_path: a tokenizer file (default: the copy saved with the weights).
      restore: restore the weights now (False: a sweep restores them later, every
        weight set of a step in one read, through the returned source).
      adapters: adapters to stack on the restored weights (``source.open_adapter_stacks``),
        each checked to be made for them.
      **kwargs: more :class:`Generator` arguments (mesh, window_frames, ...).

    Returns:
      (the generator, the weights source it was read from).
    """
    if isinstance(checkpoint, source_lib.WeightsSource):
        src = checkpoint
        step = src.step if step is None else step
        src.step_dir_of(step)  # the same model and codec
    else:
        src = source_lib.WeightsSource(checkpoint, step)
        step = src.step
    if weights is None and use_ema is not None:
        weights = optim.EMA if use_ema else optim.RAW
    name = src.canonical_weights(weights or src.default_weights())
    gen = Generator(
        src.cfg,
        src.card,
        src.tokenizer(tokenizer_path),
        codec,
        weights=name,
        step=step,
        checkpoint=src.path,
        **kwargs,
    )
    if restore:
        src.check_weights(step, [name])
        for adapter, _ in (adapters or source_lib.NO_ADAPTERS).layers:
            src.check_adapter(adapter, step, name)
        gen.use_weights(step, name, src.restore(step, [name], gen.abstract_params())[name], adapters)
    return gen, src
