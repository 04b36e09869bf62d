"""Typed configuration: the one place that holds every default.

Config files under ``configs/`` are Python (``get_config(arg) -> ConfigDict``). They
start from :func:`default_configdict` (built from the dataclasses below) and override
fields, so a default is written exactly once. :func:`from_configdict` turns the
ConfigDict a program received (after ``--config.section.key=value`` overrides) into a
frozen :class:`Config`, refusing unknown and missing keys with a message that names
them. :func:`validate` then checks the shapes against the mesh before anything
compiles. Library code takes the typed sub-configs, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any

import ml_collections
from absl import logging

from audiodiff_jax.core import music, names
from audiodiff_jax.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config field has a value that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Small transformer over sentencepiece ids, trained jointly with the DiT."""

    vocab_size: int = 512
    width: int = 64
    depth: int = 1
    num_heads: int = 2
    mlp_ratio: float = 4.0
    max_len: int = 32  # tokens per caption (padded / truncated to this)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Diffusion Transformer over 1-D latent sequences ``[frames, channels]``."""

    preset: str = ""  # informational: the size preset name this config came from
    latent_channels: int = 8
    width: int = 64
    depth: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    freq_dim: int = 256  # sinusoidal embedding size for timestep / timing conditioning
    max_seconds: float = 600.0  # seconds_total / seconds_start are normalized by this
    rope_theta: float = 10000.0
    attention: str = "xla"  # xla | cudnn | splash
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    # Run the blocks as one lax.scan instead of unrolling them: XLA compiles one block
    # instead of `depth` copies (AOT compile time of DiT-1B/3B for 256 chips drops by
    # about the depth). Parameters and checkpoints are the same either way.
    scan_layers: bool = False
    # Masked context: the model also takes known clean latents and their mask (trained on
    # random prefixes, suffixes and spans; diffusion.context_none_prob of rows get none).
    masked_context: bool = False
    # Musical controls the model takes beside the caption (core/music.py): any of
    # "tempo" (Fourier features of log-bpm), "key" (24 keys), "meter" (time signatures),
    # each embedded into the conditioning vector and missing when a record has no label.
    # () = none: the model and its parameters are what they were before controls.
    controls: tuple[str, ...] = ()
    # Latent frames per second of the codec the model learns (the dataset card's; training
    # fills it in when 0). With the tempo control the model also takes a beat grid per
    # frame (cos/sin of the beat phase at 1/4, 1/2, 1, 2 and 4 times the beat rate).
    latent_rate: float = 0.0
    # The guidance scale as an input (a distilled student, ``training/distill_trainer.py``):
    # one evaluation gives the guided prediction; False = classifier-free guidance runs
    # the model twice. Its embedder starts at zero output.
    guidance_input: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    text: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Continuous-time v-prediction with the cosine schedule."""

    schedule_shift: float = 1.0  # 1.0 = plain cosine; >1 moves time toward more noise
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    context_none_prob: float = 0.25  # with model.masked_context: share of rows trained with no context


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Latent shards (ArrayRecord + dataset card) read through Grain."""

    shards_dir: str = ""  # folder holding dataset_card.json and *.array_record
    window_frames: int = 64  # training crop length in latent frames
    global_batch_size: int = 8
    shuffle_seed: int = 0
    num_epochs: int = 0  # 0 = repeat forever
    cfg_dropout: float = 0.1  # probability that a caption is replaced by the empty one
    # With model.controls: probability that each control is dropped (made missing), each
    # on its own draw; a dropped caption drops them all (the unconditional branch).
    control_dropout: float = 0.1
    tokenizer: str = ""  # sentencepiece model; "" = the one named in the dataset card
    worker_count: int = 0  # Grain worker processes per host (0 = in the main process)
    prefetch: int = 2  # batches prefetched on the host


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. ICI sizes within a slice; DCN sizes across slices (multi-slice pods).

    At most one ICI size may be -1 (all remaining devices of a slice).
    """

    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping, weight EMA."""

    learning_rate: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = train.num_steps
    end_lr_ratio: float = 0.1  # final lr = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0
    # The EMA sampling uses by default (weights "ema", also "ema<decay>", e.g. "ema0.999").
    ema_decay: float = 0.999
    # More EMAs kept beside it, each restorable by its name "ema<decay>" (optim.ema_name):
    # the best decay is only known after training.
    extra_ema_decays: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    init_from: str = ""  # another run's workdir or checkpoint step dir: weights only
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = look up from the device kind


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever (0 = off)
    async_save: bool = True


def _help(default, text: str):
    """A dataclass field with a help text (``audiodiff-sample`` shows it for its flag)."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sampling defaults: ``audiodiff-sample``'s flags, sweep grids, ``generate_songs``.

    The tuple fields are the axes of a sweep: every prompt is crossed with all of
    their values (a prompt row may fix any of them but ``weights``, which with the
    checkpoint step is an axis of the whole sweep). The rest apply to every output.
    The section is saved with the checkpoint, so a run samples with its own defaults;
    a flag of ``audiodiff-sample`` overrides one field.
    """

    seconds: tuple[float, ...] = _help((180.0,), "Durations in seconds.")
    seeds: tuple[int, ...] = _help((0,), "Seeds (each in [0, 2^31)).")
    guidance: tuple[float, ...] = _help((5.0,), "Classifier-free guidance scales (1 = off).")
    steps: tuple[int, ...] = _help((50,), "Sampler steps.")
    samplers: tuple[str, ...] = _help(("dpmpp_2m",), "Samplers: ddim, dpmpp_2m, euler, heun.")
    guidance_rescale: tuple[float, ...] = _help((0.0,), "Guidance rescale phi in [0, 1] (0 = off).")
    # logsnr by measurement: DPM++2M is second order on it, first order on uniform
    # (BENCHMARKS.md, "Samplers and time grids").
    schedule: tuple[str, ...] = _help(("logsnr",), "Step schedules: uniform, logsnr, karras.")
    weights: tuple[str, ...] = _help(
        ("ema",),
        "Weight sets: raw, ema (the EMA of optim.ema_decay) or ema<decay> for any decay the run "
        "keeps (optim.ema_decay, optim.extra_ema_decays), e.g. ema0.9999.",
    )
    bpm: tuple[float, ...] = _help(
        (0.0,), "Tempi in bpm for models with the tempo control (model.controls); 0 = none asked."
    )
    key: tuple[str, ...] = _help(
        ("",), "Keys ('F# minor', 'Bb major') for models with the key control; '' = none asked."
    )
    time_signature: tuple[str, ...] = _help(
        ("",), "Time signatures ('4/4', '3/4', '6/8'...) for models with the meter control; '' = none."
    )
    eta: float = _help(0.0, "DDIM eta in [0, 1] (0 = deterministic).")
    negative_prompt: str = _help("", "Negative prompt for guidance (default: empty caption).")
    strength: float = _help(1.0, "Variation strength in (0, 1]: how far toward noise.")
    window_frames: int = _help(-1, "Longest one-pass sequence (-1 = training window, 0 = all).")
    overlap_frames: int = _help(-1, "Window overlap in frames (-1 = window / 4).")
    min_seconds: float = _help(10.0, "Shortest accepted duration.")
    max_seconds: float = _help(300.0, "Longest accepted duration.")
    batch_size: int = _help(0, "Rows per batch (0 = the mesh's data x fsdp size).")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (``audiodiff_jax/evaluators/train_eval.py``), every ``every_steps``.

    The validation loss is measured on fixed held-out examples with fixed noise and
    fixed times, stratified into ``buckets`` equal time ranges, so its numbers compare
    across steps and across runs. Demo samples are generated for fixed prompts with
    the ``sample`` section's settings (its first seed, sampler, step count and schedule;
    each of its guidance scales; one training window at most) through the same sampler
    as ``audiodiff-sample``, and written to TensorBoard and a page.
    """

    every_steps: int = 0  # 0 = off; the last step is evaluated too
    shards_dir: str = ""  # held-out shards (same codec as data.shards_dir); "" = no validation loss
    num_examples: int = 16  # held-out windows (the first records, cropped from their start)
    buckets: int = 5  # equal time ranges of [0, 1]; each example is scored once per bucket
    seed: int = 0  # fixed noise and times
    prompts: tuple[str, ...] = ()  # demo-sample captions; () = no demo samples
    codec: str = ""  # decodes demo samples: "" = the codec the dataset card names; a name or "module:factory"


# The projections of a DiT block an adapter can target (``model/dit.py``: the
# attention modules' query/key/value/out kernels, the MLP's two dense kernels).
ADAPTER_TARGETS = (
    "self_attn.query",
    "self_attn.key",
    "self_attn.value",
    "self_attn.out",
    "cross_attn.query",
    "cross_attn.key",
    "cross_attn.value",
    "cross_attn.out",
    "mlp.fc1",
    "mlp.fc2",
)


@dataclasses.dataclass(frozen=True)
class AdaptersConfig:
    """Low-rank adapters (LoRA) on the DiT's projections (``audiodiff_jax/model/adapters.py``).

    A run whose ``base`` is set trains only the adapters, on the frozen weights of that
    checkpoint or export (``audiodiff_jax/training/adapter_trainer.py``): each targeted
    kernel ``W`` of every block becomes ``W + (alpha / rank) * A @ B``, ``A`` random and
    ``B`` zero at the start (so the run starts at the base model). ``configs/adapter.py:BASE``
    fills the model from the base.
    """

    base: str = ""  # checkpoint (run workdir, step folder) or export of the base; "" = a full run
    base_weights: str = ""  # weight set of a base checkpoint (raw, ema...); "" = its sample.weights[0]
    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ADAPTER_TARGETS  # which projections of every block (ADAPTER_TARGETS)
    # Rank dropout: each rank component of each adapted kernel is dropped with this
    # probability at every step (the rest scaled by 1 / (1 - dropout)); 0 = off.
    dropout: float = 0.0


DISTILL_METHODS = ("progressive",)
DISTILL_TEACHER_SAMPLERS = ("ddim", "dpmpp_2m")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Few-step students distilled from a teacher (``audiodiff_jax/training/distill_trainer.py``).

    A run whose ``teacher`` is set trains a student with ``model.guidance_input`` to take,
    in ONE step of DDIM on the ``steps``-step grid and ONE model evaluation, the teacher's
    ``substeps`` guided DDIM steps over the same interval: progressive distillation
    (Salimans & Ho 2022) in one phase of ratio ``substeps`` (as TRACT, Berthelot et al.
    2023) with guidance distillation (Meng et al. 2023). The guidance scale of each row
    is drawn in ``[guidance_min, guidance_max]`` and given to the student. A teacher that
    is itself a student (``steps * substeps`` equal to its own steps) is run as it samples
    (DDIM; a guided teacher runs ``teacher_sampler``):
    its next phase (8 -> 4 steps is ``substeps=2``). ``configs/distill.py:TEACHER`` fills
    the model and the sampling defaults from the teacher.
    """

    teacher: str = ""  # checkpoint (run workdir, step folder) or export; "" = not a distillation
    teacher_weights: str = ""  # weight set of a teacher checkpoint; "" = its sample.weights[0]
    method: str = "progressive"  # DISTILL_METHODS
    steps: int = 8  # the student's sampler steps
    substeps: int = 4  # teacher steps per student step
    # The teacher's sampler over those substeps: ddim, or dpmpp_2m (its 50-step sampler's
    # method; configs/distill.py's choice). A teacher that is a student runs ddim.
    teacher_sampler: str = "ddim"
    schedule: str = "uniform"  # the time grid of both (samplers.time_grid, diffusion.schedule_shift)
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    # Added to the guidance scale a user asks a trained student for, before it enters the
    # student: the calibration fitted after training (``audiodiff-calibrate``) on captions
    # it trained on. The scales it accepts are [guidance_min, guidance_max] minus it.
    guidance_offset: float = 0.0

    def requested_range(self) -> tuple[float, float]:
        """The guidance scales a user may ask this student for (the trained range, calibrated)."""
        return max(self.guidance_min - self.guidance_offset, 1.0), self.guidance_max - self.guidance_offset

    def accepted_guidance(self, scales: typing.Sequence[float]) -> tuple[float, ...]:
        """``scales`` (a sample section's defaults) kept to :meth:`requested_range`; the
        first clamped into it when none is inside."""
        low, high = self.requested_range()
        return tuple(g for g in scales if low <= g <= high) or (min(max(scales[0], low), high),)


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Profiles of chosen training steps (``audiodiff_jax/training/profiling.py``).

    A trace covers ``num_steps`` steps from ``start_step`` (the step numbers the log
    shows; the first step of a process, which compiles, is never traced) and is written
    to ``WORKDIR/tensorboard/plugins/profile/train_steps_A-B/HOST.xplane.pb``, where
    TensorBoard's profile plugin finds it. A running job also traces ``num_steps`` steps
    (or the number the file holds) when a file ``WORKDIR/PROFILE`` appears, from the
    step after the next log step, on every host together.
    """

    start_step: int = 0  # first step of the trace; 0 = none (a WORKDIR/PROFILE file still works)
    num_steps: int = 3  # steps per trace
    hosts: str = "first"  # first: process 0 traces; all: every process writes its own trace


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    adapters: AdaptersConfig = dataclasses.field(default_factory=AdaptersConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)


# Sections added after checkpoints were already being written: reading a config that
# lacks one (the config saved in an older checkpoint, which sampling reads) fills the
# section's defaults instead of refusing it as a missing key.
SECTIONS_ADDED_LATER = {
    "sample": SampleConfig,
    "eval": EvalConfig,
    "profile": ProfileConfig,
    "adapters": AdaptersConfig,
    "distill": DistillConfig,
}


def _upgrade_old_fields(data: dict) -> None:
    """Reads configs written before fields changed (older checkpoints' saved configs,
    older config files), in place: ``optim.extra_ema_decays`` is filled in;
    ``sample.use_ema`` becomes ``sample.weights``; a single ``sample.schedule`` or
    ``sample.guidance_rescale`` value becomes a one-value axis."""
    optim = data.get("optim")
    if isinstance(optim, dict):
        optim.setdefault("extra_ema_decays", ())
    evaluation = data.get("eval")
    if isinstance(evaluation, dict):
        dropped = sorted(k for k in EVAL_FIELDS_REMOVED if k in evaluation)
        for k in dropped:
            evaluation.pop(k)
        if dropped:
            logging.warning(
                "config: eval.%s are no longer read: demo samples during training use the sample section",
                ", eval.".join(dropped),
            )
    sample = data.get("sample")
    if isinstance(sample, dict):
        if "use_ema" in sample and isinstance(sample["use_ema"], bool):
            # use_ema=False asked for the raw weights; a weights value set too wins.
            use_ema = sample.pop("use_ema")
            if tuple(sample.get("weights", ("ema",))) == ("ema",):
                sample["weights"] = ("ema",) if use_ema else ("raw",)
        for field in ("schedule", "guidance_rescale"):
            if field in sample and isinstance(sample[field], str | int | float):
                sample[field] = (sample[field],)


# Fields added after checkpoints were already being written, with the value that gives
# the behaviour of the checkpoints that lack them (their default).
FIELDS_ADDED_LATER = {
    "model.masked_context",
    "diffusion.context_none_prob",
    "model.controls",
    "model.latent_rate",
    "model.guidance_input",
    "distill.teacher_sampler",
    "distill.guidance_offset",
    "data.control_dropout",
    "sample.bpm",
    "sample.key",
    "sample.time_signature",
}

# The eval section's own sampling settings, replaced by the sample section (one set of
# sampling defaults): dropped, with one log line, from configs that still carry them.
EVAL_FIELDS_REMOVED = ("guidance", "seconds", "steps", "sampler", "schedule", "sample_seed")


# ---------------------------------------------------------------------------
# ConfigDict <-> dataclasses


def _to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def default_configdict() -> ml_collections.ConfigDict:
    """All defaults as a ConfigDict: the base every config file starts from."""
    return ml_collections.ConfigDict(_to_dict(Config()))


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value, tp, path: str):
    """Checks (and mildly coerces: int -> float, list -> tuple) one leaf value against its type.

    ``tuple[X, ...]`` fields take a tuple or a list (JSON and ConfigDicts give lists)
    of X values, each checked like a leaf.
    """
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple | list):
            raise ConfigError(f"{path}={value!r} must be a tuple (or list) of {args[0].__name__}")
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be a bool")
        return value
    if tp in (int, float, str):
        if not isinstance(value, tp) or isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be of type {tp.__name__}")
        return value
    return value


def _build(cls, data, path: str):
    if isinstance(data, ml_collections.ConfigDict):
        data = data.to_dict()
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a section (dict), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(set(fields) - set(data))
    prefix = f"{path}." if path else ""
    if unknown:
        raise ConfigError(
            "unknown config key(s): "
            + ", ".join(prefix + k for k in unknown)
            + f"; valid keys of {path or 'config'}: {', '.join(sorted(fields))}"
        )
    if missing:
        raise ConfigError("missing config key(s): " + ", ".join(prefix + k for k in missing))
    kwargs = {}
    for name in fields:
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, data[name], prefix + name)
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    return cls(**kwargs)


def from_configdict(cd: ml_collections.ConfigDict | dict) -> Config:
    """Converts a ConfigDict into a typed Config, refusing unknown and missing keys.

    A missing section of :data:`SECTIONS_ADDED_LATER` (a config saved by an older
    version) gets its defaults.
    """
    data = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
    for name, cls in SECTIONS_ADDED_LATER.items():
        data.setdefault(name, _to_dict(cls()))
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    _upgrade_old_fields(data)
    defaults = _to_dict(Config())
    for path in FIELDS_ADDED_LATER:
        section, field = path.split(".")
        if isinstance(data.get(section), dict) and field not in data[section]:
            data[section] = {**data[section], field: defaults[section][field]}
    return _build(Config, data, "")


def to_json(cfg: Config) -> str:
    return json.dumps(_to_dict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
    return from_configdict(json.loads(text))


def replace(cfg, **changes):
    """``dataclasses.replace`` that accepts dotted paths: replace(cfg, **{"model.width": 8})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def first_difference(a, b, prefix: str, ignore: tuple[str, ...] = ()) -> tuple[str, Any, Any] | None:
    """The first field (dotted path under ``prefix``, in declaration order) where two
    sections of one type differ, with both values; None when equal. Fields named in
    ``ignore`` (their dotted paths) are skipped."""
    for f in dataclasses.fields(a):
        path = f"{prefix}.{f.name}"
        if path in ignore:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            found = first_difference(x, y, path, ignore)
            if found:
                return found
        elif x != y:
            return path, x, y
    return None


# ---------------------------------------------------------------------------
# Validation (before anything compiles): one function per section, and
# :func:`validate` running all of them once, before a program compiles or restores.

ATTENTION_IMPLS = ("xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
# The samplers and step schedules that sampling.py implements (it imports these).
SAMPLERS = ("ddim", "dpmpp_2m", "euler", "heun")
SCHEDULES = ("uniform", "logsnr", "karras")
MAX_SAMPLE_STEPS = 10_000
# Names of weight sets (optim.ema_name makes the EMA ones): whether a run keeps one is
# checked against its checkpoint.
WEIGHTS_PATTERN = r"raw|ema|ema[0-9][0-9.e-]*"


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate_model(m: ModelConfig) -> None:
    _check(m.attention in ATTENTION_IMPLS, f"model.attention={m.attention!r}; one of {ATTENTION_IMPLS}")
    _check(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}; one of {REMAT_POLICIES}")
    _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r}; one of {DTYPES}")
    _check(m.param_dtype in DTYPES, f"model.param_dtype={m.param_dtype!r}; one of {DTYPES}")
    for name, sub in (("model", m), ("model.text", m.text)):
        _check(
            sub.width > 0 and sub.depth > 0 and sub.num_heads > 0,
            f"{name}: width, depth, num_heads must be > 0",
        )
        _check(
            sub.width % sub.num_heads == 0,
            f"{name}.width={sub.width} is not divisible by {name}.num_heads={sub.num_heads}",
        )
        _check(
            (sub.width // sub.num_heads) % 2 == 0,
            f"{name}.width/{name}.num_heads={sub.width // sub.num_heads} must be even (rotary embeddings)",
        )
    _check(m.latent_channels > 0, f"model.latent_channels={m.latent_channels} must be > 0")
    _check(m.freq_dim % 2 == 0, f"model.freq_dim={m.freq_dim} must be even")
    _check(m.text.max_len > 0, f"model.text.max_len={m.text.max_len} must be > 0")
    _check(m.text.vocab_size > 3, f"model.text.vocab_size={m.text.vocab_size} must be > 3")
    bad = [c for c in m.controls if c not in music.CONTROLS] + sorted(
        {c for c in m.controls if m.controls.count(c) > 1}
    )
    _check(
        not bad, f"model.controls={','.join(m.controls)}: {bad} unknown or repeated; any of {music.CONTROLS}"
    )


def validate_diffusion(df: DiffusionConfig) -> None:
    _check(
        df.timestep_sampling in TIMESTEP_SAMPLING,
        f"diffusion.timestep_sampling={df.timestep_sampling!r}; one of {TIMESTEP_SAMPLING}",
    )
    _check(df.schedule_shift > 0, f"diffusion.schedule_shift={df.schedule_shift} must be > 0")
    _check(df.logit_normal_std > 0, f"diffusion.logit_normal_std={df.logit_normal_std} must be > 0")
    _check(
        0.0 <= df.context_none_prob <= 1.0,
        f"diffusion.context_none_prob={df.context_none_prob} must be in [0, 1]",
    )


def validate_data(d: DataConfig) -> None:
    _check(d.window_frames > 0, f"data.window_frames={d.window_frames} must be > 0")
    _check(d.global_batch_size > 0, f"data.global_batch_size={d.global_batch_size} must be > 0")
    _check(0.0 <= d.cfg_dropout <= 1.0, f"data.cfg_dropout={d.cfg_dropout} must be in [0, 1]")
    _check(0.0 <= d.control_dropout <= 1.0, f"data.control_dropout={d.control_dropout} must be in [0, 1]")
    _check(
        d.num_epochs >= 0 and d.worker_count >= 0 and d.prefetch >= 0,
        f"data.num_epochs={d.num_epochs}, data.worker_count={d.worker_count}, "
        f"data.prefetch={d.prefetch} must be >= 0",
    )
    _check(0 <= d.shuffle_seed < 2**32, f"data.shuffle_seed={d.shuffle_seed} must be in [0, 2**32)")


def validate_mesh(mesh: MeshConfig) -> None:
    """The sizes alone; :func:`resolve_mesh_shape` checks them against a device count."""
    wild = [a for a in names.MESH_AXES if getattr(mesh, a) == -1]
    _check(len(wild) <= 1, f"at most one mesh axis may be -1, got {', '.join('mesh.' + a for a in wild)}")
    for a in names.MESH_AXES:
        v, dcn = getattr(mesh, a), getattr(mesh, "dcn_" + a)
        _check(v == -1 or v >= 1, f"mesh.{a}={v} must be -1 or >= 1")
        _check(dcn >= 1, f"mesh.dcn_{a}={dcn} must be >= 1")


def validate_optim(o: OptimConfig) -> None:
    _check(o.learning_rate > 0, f"optim.learning_rate={o.learning_rate} must be > 0")
    _check(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay={o.ema_decay} must be in [0, 1)")
    for d in o.extra_ema_decays:
        _check(
            0.0 <= d < 1.0,
            f"optim.extra_ema_decays={_shown(o.extra_ema_decays)}: {d!r} must be in [0, 1)",
        )
    decays = (o.ema_decay, *o.extra_ema_decays)
    _check(
        len(set(decays)) == len(decays),
        f"optim.extra_ema_decays={_shown(o.extra_ema_decays)} repeats a decay "
        f"(optim.ema_decay={o.ema_decay!r} is kept already)",
    )
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")


def validate_train(t: TrainConfig) -> None:
    _check(t.num_steps > 0, f"train.num_steps={t.num_steps} must be > 0")
    _check(t.log_every > 0, f"train.log_every={t.log_every} must be > 0")


def validate_checkpoint(c: CheckpointConfig) -> None:
    _check(c.every_steps > 0, f"checkpoint.every_steps={c.every_steps} must be > 0")
    _check(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1")


PROFILE_HOSTS = ("first", "all")


def validate_profile(p: ProfileConfig) -> None:
    _check(p.start_step >= 0, f"profile.start_step={p.start_step} must be >= 0 (0 = no profile at start)")
    _check(p.num_steps >= 1, f"profile.num_steps={p.num_steps} must be >= 1")
    _check(p.hosts in PROFILE_HOSTS, f"profile.hosts={p.hosts!r}; one of {PROFILE_HOSTS}")


# The fields that change a DiT train step's device memory, and which way to turn them:
# an out-of-memory error names them with their values (core/memory.py).
MEMORY_FIELDS = {
    "data.global_batch_size": "fewer rows per step",
    "data.window_frames": "shorter windows",
    "model.remat": "'dots_saveable' or 'full' keep fewer activations",
    "mesh.fsdp": "shard weights and optimizer state over more devices",
}


def validate_distill(d: DistillConfig) -> None:
    _check(d.method in DISTILL_METHODS, f"distill.method={d.method!r}; one of {DISTILL_METHODS}")
    _check(d.steps >= 1, f"distill.steps={d.steps} must be >= 1")
    _check(d.substeps >= 1, f"distill.substeps={d.substeps} must be >= 1")
    _check(d.schedule in SCHEDULES, f"distill.schedule={d.schedule!r}; one of {SCHEDULES}")
    _check(
        d.teacher_sampler in DISTILL_TEACHER_SAMPLERS,
        f"distill.teacher_sampler={d.teacher_sampler!r}; one of {DISTILL_TEACHER_SAMPLERS}",
    )
    _check(
        1.0 <= d.guidance_min <= d.guidance_max,
        f"distill.guidance_min={d.guidance_min}, guidance_max={d.guidance_max}: need 1 <= min <= max",
    )
    _check(
        math.isfinite(d.guidance_offset) and d.guidance_max - d.guidance_offset >= 1.0,
        f"distill.guidance_offset={d.guidance_offset}: the scales it leaves a user "
        f"(guidance_max - offset = {d.guidance_max - d.guidance_offset:g}) must reach 1",
    )
    _check(
        not d.teacher_weights or re.fullmatch(WEIGHTS_PATTERN, d.teacher_weights) is not None,
        f"distill.teacher_weights={d.teacher_weights!r} is not a weight set; raw, ema or ema<decay>",
    )


def validate_adapters(a: AdaptersConfig) -> None:
    """The section alone; the rank against the widths it adapts is checked with the
    model (``audiodiff_jax/model/adapters.py:check_rank``)."""
    _check(a.rank >= 1, f"adapters.rank={a.rank} must be >= 1")
    _check(a.alpha > 0, f"adapters.alpha={a.alpha} must be > 0")
    _check(
        len(a.targets) > 0, "adapters.targets is empty; name at least one of " + ", ".join(ADAPTER_TARGETS)
    )
    for t in a.targets:
        _check(
            t in ADAPTER_TARGETS,
            f"adapters.targets={_shown(a.targets)}: {t!r} is not a projection of a DiT block; "
            f"one of {', '.join(ADAPTER_TARGETS)}",
        )
    _check(
        len(set(a.targets)) == len(a.targets), f"adapters.targets={_shown(a.targets)} repeats a projection"
    )
    _check(0.0 <= a.dropout < 1.0, f"adapters.dropout={a.dropout} must be in [0, 1)")
    _check(
        not a.base_weights or re.fullmatch(WEIGHTS_PATTERN, a.base_weights) is not None,
        f"adapters.base_weights={a.base_weights!r} is not a weight set; raw, ema or ema<decay>",
    )


def validate_eval(e: EvalConfig) -> None:
    _check(e.every_steps >= 0, f"eval.every_steps={e.every_steps} must be >= 0 (0 = off)")
    _check(e.num_examples >= 1, f"eval.num_examples={e.num_examples} must be >= 1")
    _check(e.buckets >= 1, f"eval.buckets={e.buckets} must be >= 1")
    _check(0 <= e.seed < 2**31, f"eval.seed={e.seed} must be in [0, 2^31)")


# -- the sample section ---------------------------------------------------------------

# A field of SampleParams (one output, one prompt row) -> the sample field holding its
# default. The grid axes hold a tuple of values, under a plural name where the row's
# name is singular.
SAMPLE_PARAM_FIELDS = {
    "seconds": "seconds",
    "seed": "seeds",
    "negative_prompt": "negative_prompt",
    "guidance": "guidance",
    "guidance_rescale": "guidance_rescale",
    "steps": "steps",
    "sampler": "samplers",
    "schedule": "schedule",
    "eta": "eta",
    "strength": "strength",
    "bpm": "bpm",
    "key": "key",
    "time_signature": "time_signature",
}
# The musical controls among them, and what each asks of the model (model.controls).
SAMPLE_CONTROLS = {"bpm": "tempo", "key": "key", "time_signature": "meter"}


def sample_field_type(name: str) -> type:
    """The type of one value of sample field ``name`` (the element type of a grid axis)."""
    tp = typing.get_type_hints(SampleConfig)[name]
    return typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp


def is_sample_axis(name: str) -> bool:
    """Whether sample field ``name`` is a grid axis (a tuple of values)."""
    return typing.get_origin(typing.get_type_hints(SampleConfig)[name]) is tuple


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parses(parse, v) -> bool:
    try:
        parse(v)
    except ValueError:
        return False
    return True


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# One value of each sample field: (test, what would work).
_SAMPLE_VALUE_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "seconds": (lambda v: _number(v) and v > 0, "must be a number > 0"),
    "seeds": (lambda v: _integer(v) and 0 <= v < 2**31, "must be an integer in [0, 2^31)"),
    "guidance": (lambda v: _number(v) and v >= 0, "must be finite and >= 0"),
    "steps": (
        lambda v: _integer(v) and 1 <= v <= MAX_SAMPLE_STEPS,
        f"must be an integer in [1, {MAX_SAMPLE_STEPS}]",
    ),
    "samplers": (lambda v: v in SAMPLERS, f"is not a sampler; one of {SAMPLERS}"),
    "guidance_rescale": (lambda v: _number(v) and 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "schedule": (lambda v: v in SCHEDULES, f"is not a schedule; one of {SCHEDULES}"),
    "eta": (lambda v: _number(v) and 0.0 <= v <= 1.0, "must be in [0, 1]"),
    "negative_prompt": (lambda v: isinstance(v, str), "must be a string"),
    "strength": (lambda v: _number(v) and 0.0 < v <= 1.0, "must be in (0, 1]"),
    "bpm": (
        lambda v: _number(v) and (v == 0 or music.TEMPO_MIN <= v <= music.TEMPO_MAX),
        f"must be 0 (none) or in [{music.TEMPO_MIN:g}, {music.TEMPO_MAX:g}] bpm",
    ),
    "key": (
        lambda v: isinstance(v, str) and _parses(music.key_from_text, v),
        "is not a key; e.g. 'F# minor'",
    ),
    "time_signature": (
        lambda v: isinstance(v, str) and _parses(music.meter_index, v),
        f"is not a time signature; one of {', '.join(music.METERS)} ('' = none)",
    ),
    "window_frames": (lambda v: _integer(v) and v >= -1, "must be -1 (training window), 0 (all) or > 0"),
    "overlap_frames": (lambda v: _integer(v) and v >= -1, "must be -1 (window / 4) or >= 0"),
    "min_seconds": (lambda v: _number(v) and v > 0, "must be a number > 0"),
    "max_seconds": (lambda v: _number(v) and v > 0, "must be a number > 0"),
    "batch_size": (lambda v: _integer(v) and v >= 0, "must be an integer >= 0 (0 = the mesh's batch shards)"),
    "weights": (
        lambda v: isinstance(v, str) and re.fullmatch(WEIGHTS_PATTERN, v) is not None,
        "is not a weight set; raw, ema or ema<decay> (e.g. ema0.9999)",
    ),
}


def sample_value_problem(name: str, value) -> str:
    """What is wrong with one value of sample field ``name`` ("" if nothing).

    ``name`` may also be a :class:`SampleParams` field (``seed``, ``sampler``...);
    a grid axis is checked value by value.
    """
    test, want = _SAMPLE_VALUE_CHECKS[SAMPLE_PARAM_FIELDS.get(name, name)]
    return "" if test(value) else want


def _sample_name(field: str) -> str:
    return f"sample.{field}"


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple | list) else repr(value)


def check_sample_values(values: dict[str, Any], name: typing.Callable[[str], str] = _sample_name) -> None:
    """Checks sample fields one by one (no field against another).

    Args:
      values: sample field -> value (a tuple for a grid axis).
      name: how to name a field in the error (``sample.steps``; ``--steps`` for a flag).

    Raises:
      ConfigError: naming the field, its value and what would work.
    """
    for field, value in values.items():
        if field not in _SAMPLE_VALUE_CHECKS:
            raise ConfigError(
                f"{name(field)}: unknown sample field; valid: {', '.join(_SAMPLE_VALUE_CHECKS)}"
            )
        if is_sample_axis(field):
            _check(len(value) > 0, f"{name(field)} is empty; give at least one value")
            for v in value:
                problem = sample_value_problem(field, v)
                _check(not problem, f"{name(field)}={_shown(value)}: {v!r} {problem}")
        else:
            problem = sample_value_problem(field, value)
            _check(not problem, f"{name(field)}={value!r} {problem}")


def validate_sample(s: SampleConfig, name: typing.Callable[[str], str] = _sample_name) -> None:
    """Checks the sample section: every value, then the fields against each other."""
    check_sample_values(_to_dict(s), name)
    lo, hi = s.min_seconds, s.max_seconds
    _check(lo <= hi, f"{name('min_seconds')}={lo} is above {name('max_seconds')}={hi}")
    for v in s.seconds:
        _check(
            lo <= v <= hi,
            f"{name('seconds')}={_shown(s.seconds)}: {v!r} is out of range [{lo:g}, {hi:g}] "
            f"({name('min_seconds')}, {name('max_seconds')})",
        )
    if s.window_frames != 0:  # windowed songs: each window shares frames with the previous one
        _check(
            s.overlap_frames != 0,
            f"{name('overlap_frames')}=0: windows must overlap (-1 = a quarter of the window)",
        )
        _check(
            s.window_frames < 0 or s.overlap_frames < s.window_frames,
            f"{name('overlap_frames')}={s.overlap_frames} must be below "
            f"{name('window_frames')}={s.window_frames}",
        )


# -- shapes against the mesh -----------------------------------------------------------


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolves the -1 entry of the ICI mesh shape for ``num_devices`` devices.

    Returns the total (ICI x DCN) size of every mesh axis.
    """
    validate_mesh(mesh)
    ici = {a: getattr(mesh, a) for a in names.MESH_AXES}
    dcn = {a: getattr(mesh, "dcn_" + a) for a in names.MESH_AXES}
    num_slices = 1
    for v in dcn.values():
        num_slices *= v
    _check(
        num_devices % num_slices == 0,
        f"{num_devices} devices cannot form {num_slices} slices (product of mesh.dcn_*)",
    )
    per_slice = num_devices // num_slices
    wild = [a for a, v in ici.items() if v == -1]
    known = 1
    for v in ici.values():
        if v != -1:
            known *= v
    if wild:
        _check(
            per_slice % known == 0,
            f"mesh sizes {ici} do not divide the {per_slice} devices per slice "
            f"(mesh.{wild[0]}=-1 would not be an integer)",
        )
        ici[wild[0]] = per_slice // known
    else:
        _check(
            known == per_slice,
            f"mesh sizes {ici} use {known} devices per slice but {per_slice} are available; "
            "set one axis to -1",
        )
    return {a: ici[a] * dcn[a] for a in names.MESH_AXES}


def validate_model_on_mesh(m: ModelConfig, sizes: dict[str, int]) -> None:
    """The model's shapes against mesh axis sizes (training, sampling and AOT meshes).

    Heads and MLP widths split over ``tensor``, the model width over ``fsdp``.
    """
    tp = sizes.get("tensor", 1)
    for name, sub in (("model", m), ("model.text", m.text)):
        _check(
            sub.num_heads % tp == 0, f"{name}.num_heads={sub.num_heads} is not divisible by mesh.tensor={tp}"
        )
        mlp = int(sub.width * sub.mlp_ratio)
        _check(mlp % tp == 0, f"{name}.width*mlp_ratio={mlp} is not divisible by mesh.tensor={tp}")
    fs = sizes.get("fsdp", 1)
    _check(m.width % fs == 0, f"model.width={m.width} is not divisible by mesh.fsdp={fs}")


def validate_data_on_mesh(d: DataConfig, sizes: dict[str, int]) -> None:
    """Training batches against the mesh: rows over ``data x fsdp``, frames over ``sequence``."""
    batch_shards = sizes["data"] * sizes["fsdp"]
    _check(
        d.global_batch_size % batch_shards == 0,
        f"data.global_batch_size={d.global_batch_size} is not divisible by "
        f"mesh.data*mesh.fsdp={batch_shards} (incl. dcn_*)",
    )
    _check(
        d.window_frames % sizes["sequence"] == 0,
        f"data.window_frames={d.window_frames} is not divisible by mesh.sequence={sizes['sequence']}",
    )


def validate(cfg: Config, num_devices: int | None = None) -> None:
    """Checks that a config can work, naming the field that cannot: every section once.

    Programs call it once, after reading their config and before anything compiles
    or restores.

    Args:
      cfg: the config.
      num_devices: devices the mesh will be built from; with it, shapes are checked
        against the resolved mesh (heads and widths against ``tensor`` and ``fsdp``,
        batch against ``data * fsdp``, the window against ``sequence``).
    """
    validate_model(cfg.model)
    validate_diffusion(cfg.diffusion)
    validate_data(cfg.data)
    validate_mesh(cfg.mesh)
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    validate_checkpoint(cfg.checkpoint)
    validate_sample(cfg.sample)
    validate_eval(cfg.eval)
    validate_profile(cfg.profile)
    validate_adapters(cfg.adapters)
    validate_distill(cfg.distill)
    _check(
        not (cfg.distill.teacher and cfg.adapters.base),
        f"distill.teacher={cfg.distill.teacher!r} with adapters.base={cfg.adapters.base!r}: give one of them",
    )
    _check(
        not cfg.distill.teacher or cfg.model.guidance_input,
        "distill.teacher is set but model.guidance_input=False: a student takes the guidance scale as "
        "input (configs/distill.py:TEACHER sets it)",
    )
    _check(
        not (cfg.adapters.base and cfg.train.init_from),
        f"adapters.base={cfg.adapters.base!r} and train.init_from={cfg.train.init_from!r}: an adapter run "
        "trains on its base's frozen weights; give one of them",
    )
    if num_devices is None:
        return
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    validate_model_on_mesh(cfg.model, sizes)
    validate_data_on_mesh(cfg.data, sizes)
