"""Ahead-of-time compilation for accelerators this machine does not have.

Before paying for a pod slice, compile the real programs for it here and read their
per-chip memory against the chip's HBM::

    audiodiff-compile --config=configs/dit.py:1B --topology=v5p-128

How it works: with ``libtpu`` installed, ``jax.experimental.topologies`` describes
the devices of any TPU slice (compile-only devices: they can be lowered and compiled
for, never run). The mesh of :func:`audiodiff_jax.sharding.make_mesh` is built from
those devices exactly as on the pod, the train step is the one ``Trainer`` jits
(same shardings, same donation), and it is lowered against ``ShapeDtypeStruct``
stand-ins that carry the shardings, so nothing is allocated. XLA's TPU compiler then
partitions, schedules and buffer-assigns the program as it would on the pod, Pallas
splash attention included; its memory analysis is the per-chip footprint.

Topology names. Pod names count what Google Cloud sells: ``v4-N`` and ``v5p-N`` count
TensorCores (two per chip, run as one "megacore" device), ``v5e-N`` /
``v5litepod-N`` and ``v6e-N`` count chips. So ``v5p-128`` is 64 chips in a 4x4x4
torus and ``v5e-256`` is 256 chips in a 16x16 grid. libtpu's own names
(``v5p:4x4x4``, ``v5e:16x16``) are accepted too, for shapes that are not the default
one of their size. Several slices over DCN: ``num_slices``.

GPU: jax describes GPU topologies only through its CUDA plugin
(``jax.experimental.topologies.get_topology_desc(platform="cuda", ...)``), which needs
``jax[cuda12]`` installed; :func:`get_devices` passes ``cuda:NAME`` through and
reports plainly when that is not possible.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from audiodiff_jax import config as config_lib
from audiodiff_jax import flops, names, sharding
from audiodiff_jax.config import Config, ConfigError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """What a TPU generation's names mean and what one chip holds."""

    name: str  # the prefix libtpu takes in topology names ("v5p" in "v5p:4x4x4")
    aliases: tuple[str, ...]  # other prefixes of pod names ("v5litepod-256")
    cores_per_name_unit: int  # pod names count TensorCores (2 per chip) or chips (1)
    dims: int  # 3: 3-D torus (v4, v5p); 2: 2-D grid (v5e, v6e)
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip (dense)
    megacore: bool  # both TensorCores of a chip run as one device


GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", (), 2, 3, 32 * GiB, 275e12, True),
    "v5p": TpuGeneration("v5p", (), 2, 3, 95 * GiB, 459e12, True),
    "v5e": TpuGeneration("v5e", ("v5litepod", "v5lite"), 1, 2, 16 * GiB, 197e12, False),
    "v6e": TpuGeneration("v6e", ("v6litepod",), 1, 2, 32 * GiB, 918e12, False),
}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """One TPU target: a generation, the chip grid of one slice, and a slice count."""

    generation: TpuGeneration
    chip_shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.chip_shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.chip_shape))}"

    @property
    def pod_name(self) -> str:
        g = self.generation
        return f"{g.name}-{self.chips_per_slice * g.cores_per_name_unit}"

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices over DCN" if self.num_slices > 1 else ""
        return (
            f"{self.pod_name} ({self.libtpu_name}: {self.chips_per_slice} chips{slices}, "
            f"{self.generation.hbm_bytes / GiB:.0f} GiB HBM per chip)"
        )


def default_chip_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Google Cloud gives a power-of-two chip count.

    3-D tori (v4, v5p) start at 2x2x1 (4 chips, one host) and 2x2x2, then double the
    last of their smallest sides: 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... 2-D grids (v5e, v6e)
    do the same from 1x1: 1x2, 2x2, 2x4, 4x4, ..., 16x16.
    """
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"{chips} chips is not a power of two; give the shape itself, e.g. v5p:4x4x8")
    if dims == 3:
        if chips < 4:
            raise ConfigError(f"3-D TPU slices have at least 4 chips (got {chips})")
        if chips == 4:
            return (2, 2, 1)
        shape = [2, 2, 2]
    else:
        shape = [1, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(k for k, v in enumerate(shape) if v == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> TopologySpec:
    """``v5p-128``, ``v5e-256``, ``v5litepod-16``, ``v4-32``, ``v6e-64`` or ``v5p:4x4x4``."""
    if num_slices < 1:
        raise ConfigError(f"num_slices={num_slices} must be >= 1")
    by_prefix = {p: g for g in GENERATIONS.values() for p in (g.name, *g.aliases)}
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)[:=_]([0-9]+(?:x[0-9]+)*)", text)
    if m and m.group(1) in by_prefix:
        gen = by_prefix[m.group(1)]
        shape = tuple(int(v) for v in m.group(2).split("x"))
        if len(shape) != gen.dims:
            raise ConfigError(f"topology {name!r}: {gen.name} slices have {gen.dims} sides, got {len(shape)}")
        return TopologySpec(gen, shape, num_slices)
    m = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", text)
    if m and m.group(1) in by_prefix:
        gen = by_prefix[m.group(1)]
        count = int(m.group(2))
        if count % gen.cores_per_name_unit:
            raise ConfigError(
                f"topology {name!r}: {gen.name} pod names count TensorCores "
                f"({gen.cores_per_name_unit} per chip), so the number must be even"
            )
        chips = count // gen.cores_per_name_unit
        return TopologySpec(gen, default_chip_shape(chips, gen.dims), num_slices)
    known = ", ".join(sorted(by_prefix))
    raise ConfigError(
        f"topology {name!r} is not a TPU pod name (GEN-N with GEN one of {known}, e.g. v5p-128) "
        "or a libtpu topology (e.g. v5p:4x4x4)"
    )


def libtpu_available() -> bool:
    """Whether TPU programs can be compiled here (the ``libtpu`` package is installed)."""
    from jax._src import xla_bridge

    try:
        return xla_bridge.get_tpu_library_path() is not None
    except Exception:  # noqa: BLE001 - any failure to find it means "no"
        return False


def get_devices(spec: TopologySpec) -> list[Any]:
    """The compile-only devices of ``spec`` (all slices), from libtpu."""
    from jax.experimental import topologies

    if not libtpu_available():
        raise RuntimeError(
            "ahead-of-time TPU compilation needs libtpu: pip install 'audiodiff-jax[tpu]' (libtpu)"
        )
    # libtpu takes a machine-wide lock file for the chips it drives; compile-only use
    # touches no chip, and without this a second compile (or test) on the machine fails.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {}
    if spec.num_slices > 1:
        kwargs["num_slices"] = spec.num_slices
    if spec.generation.megacore:
        # Without this, libtpu lists each TensorCore of a v4/v5p chip as its own device.
        kwargs["chip_config_name"] = "megacore"
    desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.libtpu_name, **kwargs)
    devices = list(desc.devices)
    if len(devices) != spec.num_chips:
        raise RuntimeError(f"libtpu described {len(devices)} devices for {spec.describe()}")
    return devices


def get_gpu_devices(name: str) -> list[Any]:
    """Compile-only GPU devices (``cuda:NAME``), where jax's CUDA plugin can describe them."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="cuda", topology_name=name).devices)
    except Exception as e:  # noqa: BLE001 - report every way this can fail the same way
        raise RuntimeError(
            f"jax cannot describe the GPU topology {name!r} on this machine ({type(e).__name__}: {e}). "
            "GPU ahead-of-time compilation needs the jax CUDA plugin (pip install 'audiodiff-jax[gpu]'); "
            "without it, measure on a GPU with benchmarks/train_bench.py instead."
        ) from e


# ---------------------------------------------------------------------------
# Compiling and reporting


@dataclasses.dataclass
class Buffer:
    bytes: int
    what: str


@dataclasses.dataclass
class StepReport:
    """Per-chip cost of one compiled program."""

    name: str
    hbm_bytes: int
    compiled: bool = False
    compile_s: float = 0.0
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs that reuse donated argument buffers
    temp_bytes: int = 0
    code_bytes: int = 0
    xla_flops: float = 0.0  # XLA's count per chip (custom kernels count 0, while bodies once)
    model_flops: float = 0.0  # flops.py's model FLOPs of the step, per chip
    peak_flops: float = 0.0  # the chip's dense bf16 peak
    biggest_inputs: list[Buffer] = dataclasses.field(default_factory=list)
    biggest: list[Buffer] = dataclasses.field(default_factory=list)  # arrays the program creates
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # Pallas kernels in the program
    error: str = ""

    @property
    def total_bytes(self) -> int:
        """Live at once at the peak: inputs, outputs not aliased to inputs, scratch, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.compiled and self.total_bytes <= self.hbm_bytes

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits)
        return d

    def format(self) -> str:
        gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        lines = [f"== {self.name}"]
        if not self.compiled:
            lines.append(f"   DOES NOT COMPILE: {self.error}")
            return "\n".join(lines)
        lines += [
            f"   compile time   {self.compile_s:8.1f} s",
            f"   arguments      {gib(self.argument_bytes)}",
            f"   outputs        {gib(self.output_bytes)}  "
            f"({gib(self.alias_bytes).strip()} reuse donated inputs)",
            f"   temporaries    {gib(self.temp_bytes)}",
            f"   generated code {gib(self.code_bytes)}",
            f"   total per chip {gib(self.total_bytes)}  of {gib(self.hbm_bytes).strip()} HBM "
            f"({100 * self.total_bytes / self.hbm_bytes:.0f}%)",
            f"   XLA FLOPs/chip {self.xla_flops:10.3e}  (custom kernels such as splash count as 0, "
            "loop bodies such as scanned blocks once)",
            f"   model FLOPs/chip {self.model_flops:8.3e}",
        ]
        if self.kernels:
            lines.append(
                "   Pallas kernels " + ", ".join(f"{k} x{n}" for k, n in sorted(self.kernels.items()))
            )
        if self.peak_flops and self.model_flops:
            t = self.model_flops / self.peak_flops
            lines.append(f"   step time at 100% / 50% MFU: {t:.3f} s / {2 * t:.3f} s")
        if self.fits:
            lines.append("   FITS")
        else:
            over = self.total_bytes - self.hbm_bytes
            lines.append(f"   DOES NOT FIT: {_fmt_bytes(over)} over the chip's HBM.")
        if not self.fits or self.error:
            lines.append("   largest inputs per chip:")
            lines += [f"     {_fmt_bytes(b.bytes):>10}  {b.what}" for b in self.biggest_inputs]
        if self.biggest:
            lines.append("   largest arrays the program creates, per chip:")
            lines += [f"     {_fmt_bytes(b.bytes):>10}  {b.what}" for b in self.biggest]
        if self.error:
            lines.append("   compiler message:\n" + _indent(self.error, 5))
        return "\n".join(lines)


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# "%name = bf16[8,6460,1536]{2,1,0...} opcode(" in the optimized HLO text
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([0-9,]*)\][^ ]*\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
# Instructions that name an existing buffer rather than allocating one.
_NO_BUFFER = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "copy-done", "after-all"}


def largest_hlo_buffers(hlo_text: str, top: int = 12) -> list[Buffer]:
    """Largest arrays the optimized per-chip program creates, with the source op that made them.

    Reads the HLO text after SPMD partitioning (shapes are per chip). Instructions
    inside fused computations are skipped: a fusion materializes only its output.
    """
    found: dict[tuple, Buffer] = {}
    in_fused = False
    for line in hlo_text.splitlines():
        if line and not line.startswith(" "):  # a computation header (or its closing brace)
            in_fused = "fused" in line.split("(")[0] or "wrapped" in line.split("(")[0]
            continue
        if in_fused:
            continue
        m = _HLO_INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, opcode = m.groups()
        if opcode in _NO_BUFFER or dtype not in _DTYPE_BYTES:
            continue
        shape = [int(d) for d in dims.split(",") if d]
        size = math.prod(shape) * _DTYPE_BYTES[dtype]
        op = _OP_NAME.search(line)
        src = op.group(1) if op else name
        key = (dtype, tuple(shape), src)
        if key not in found:
            found[key] = Buffer(size, f"{dtype}[{','.join(map(str, shape))}] {opcode} <- {src}")
    return sorted(found.values(), key=lambda b: -b.bytes)[:top]


_CUSTOM_KERNEL = re.compile(
    r"^\s*(?:ROOT\s+)?%?([A-Za-z_][\w\-]*?)(?:\.\d+)?\s*=.*custom_call_target=\"tpu_custom_call\""
)


def custom_kernels(hlo_text: str) -> dict[str, int]:
    """Pallas (Mosaic) kernels in a compiled TPU program: name -> number of calls."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _CUSTOM_KERNEL.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def largest_arguments(args: Sequence[Any], arg_names: Sequence[str], top: int = 6) -> list[Buffer]:
    """Largest per-chip shards of the program's inputs (ShapeDtypeStructs with shardings)."""
    out = []
    for arg, arg_name in zip(args, arg_names, strict=True):
        for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]:
            shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
            size = math.prod(shard) * jnp.dtype(x.dtype).itemsize
            where = arg_name + jax.tree_util.keystr(path)
            out.append(Buffer(size, f"argument {where} {x.dtype}{list(shard)}"))
    return sorted(out, key=lambda b: -b.bytes)[:top]


def compile_and_report(
    jitted, args: Sequence[Any], arg_names: Sequence[str], report: StepReport, mesh
) -> StepReport:
    """Lowers and compiles ``jitted(*args)`` for the mesh's devices and fills ``report``."""
    start = time.perf_counter()
    arg_buffers = largest_arguments(args, arg_names)
    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError/ValueError; all mean "no"
        msg = str(e)
        report.error = _trim_compiler_error(msg)
        report.biggest_inputs = arg_buffers
        report.compile_s = time.perf_counter() - start
        return report
    report.compile_s = time.perf_counter() - start
    report.compiled = True
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    report.xla_flops = float((cost or {}).get("flops", 0.0))
    hlo = compiled.as_text()
    report.kernels = custom_kernels(hlo)
    if not report.fits:
        report.biggest_inputs = arg_buffers
        report.biggest = largest_hlo_buffers(hlo)
    return report


def _trim_compiler_error(msg: str, max_lines: int = 40) -> str:
    # XLA's out-of-memory error lists the largest allocations; keep that part readable.
    lines = [line for line in msg.splitlines() if line.strip()]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


def is_out_of_memory(report: StepReport) -> bool:
    return (not report.compiled and "RESOURCE_EXHAUSTED" in report.error) or (
        report.compiled and not report.fits
    )


def abstract_batch(
    cfg: Config, batch_size: int, frames: int, batch_sharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's batch as ShapeDtypeStructs (see ``data_pipeline/loader.py``)."""
    c, length = cfg.model.latent_channels, cfg.model.text.max_len

    def s(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

    return {
        "latents": s((batch_size, frames, c), jnp.float32),
        "loss_mask": s((batch_size, frames), jnp.float32),
        "num_frames": s((batch_size,), jnp.int32),
        "tokens": s((batch_size, length), jnp.int32),
        "seconds_start": s((batch_size,), jnp.float32),
        "seconds_total": s((batch_size,), jnp.float32),
    }


def compile_train_step(cfg: Config, mesh, hbm_bytes: int, peak_flops: float = 0.0) -> StepReport:
    """Compiles ``Trainer``'s jitted train step (shardings, donation) for ``mesh``."""
    from audiodiff_jax.train import Trainer

    trainer = Trainer(cfg, mesh)
    b, t = cfg.data.global_batch_size, cfg.data.window_frames
    args = (trainer.abstract_state(), abstract_batch(cfg, b, t, trainer.batch_sharding))
    report = StepReport(
        name=f"train_step  (global batch {b} x {t} frames)",
        hbm_bytes=hbm_bytes,
        model_flops=flops.train_flops_per_step(cfg.model, b, t, cfg.model.text.max_len) / mesh.size,
        peak_flops=peak_flops,
    )
    return compile_and_report(trainer.train_step, args, ("state", "batch"), report, mesh)


def sample_step_fn(model_fns):
    """One denoiser evaluation of the sampling loop, with classifier-free guidance.

    ``audiodiff_jax.sampling.guided_denoiser`` runs the prompt and the empty caption as
    one doubled batch and combines them (guidance scale and rescale per song); the
    sampler calls it once (Euler, DDIM, DPM++ 2M) or twice (Heun) per step, so its
    memory is the sampler's and its FLOPs x evaluations are the sampler's FLOPs.
    """
    from audiodiff_jax import sampling

    def step(params, z_btc, t_b, tokens_bl, null_tokens_bl, scale_b, rescale_b, start_b, total_b, frames_b):
        denoise = sampling.guided_denoiser(
            model_fns.apply,
            params,
            tokens_cond_bl=tokens_bl,
            tokens_uncond_bl=null_tokens_bl,
            scale_b=scale_b,
            rescale_b=rescale_b,
            seconds_start_b=start_b,
            seconds_total_b=total_b,
            num_frames_b=frames_b,
        )
        return denoise(z_btc, t_b)

    return step


def compile_sample_step(
    cfg: Config, mesh, hbm_bytes: int, *, songs: int, frames: int, peak_flops: float = 0.0
) -> StepReport:
    """Compiles one CFG denoiser evaluation for ``songs`` songs of ``frames`` latent frames.

    Parameters are sharded as in training (the EMA weights restored onto this mesh);
    the songs are split over (data, fsdp), and each runs twice (prompt, empty caption).
    """
    from audiodiff_jax.model import make_model

    model = make_model(cfg.model)
    param_shardings = sharding.named_shardings(model.logical_axes(), mesh)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        model.abstract_params(),
        param_shardings,
    )
    batch_sh = sharding.batch_sharding(mesh)
    n, c, length = songs, cfg.model.latent_channels, cfg.model.text.max_len

    def s(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)

    args = (
        params,
        s((n, frames, c), jnp.float32),  # z
        s((n,), jnp.float32),  # t
        s((n, length), jnp.int32),  # prompt tokens
        s((n, length), jnp.int32),  # empty-caption tokens
        s((n,), jnp.float32),  # guidance scale
        s((n,), jnp.float32),  # guidance rescale
        s((n,), jnp.float32),  # seconds_start
        s((n,), jnp.float32),  # seconds_total
        s((n,), jnp.int32),  # num_frames
    )
    with jax.set_mesh(mesh):
        jitted = jax.jit(sample_step_fn(model), out_shardings=batch_sh)
    report = StepReport(
        name=f"sample_step (CFG: {songs} songs x 2 x {frames} frames, one denoiser call)",
        hbm_bytes=hbm_bytes,
        # forward only: a third of the train step's 6 FLOPs per parameter and token
        model_flops=flops.train_flops_per_step(cfg.model, 2 * n, frames, length) / 3 / mesh.size,
        peak_flops=peak_flops,
    )
    arg_names = ("params", "z", "t", "tokens", "null_tokens", "scale", "rescale", "start", "total", "frames")
    return compile_and_report(jitted, args, arg_names, report, mesh)


def prepare_config(cfg: Config, spec: TopologySpec) -> Config:
    """Fits the config's DCN mesh sizes to the slice count, and validates it for the chips.

    A config written for one slice (every ``mesh.dcn_*`` = 1) runs data parallel across
    slices, as the README recommends; otherwise the ``dcn_*`` sizes must multiply to
    the slice count.
    """
    m = cfg.mesh
    dcn = m.dcn_data * m.dcn_fsdp * m.dcn_sequence * m.dcn_tensor
    if dcn == 1 and spec.num_slices > 1:
        cfg = config_lib.replace(cfg, **{"mesh.dcn_data": spec.num_slices})
    elif dcn != spec.num_slices:
        raise ConfigError(
            f"mesh.dcn_* multiply to {dcn} but the target has {spec.num_slices} slice(s); "
            f"set --num_slices={dcn} or the mesh.dcn_* sizes"
        )
    config_lib.validate(cfg, num_devices=spec.num_chips)
    return cfg


def batch_shards(mesh) -> int:
    return int(mesh.shape[names.MESH_AXES[0]] * mesh.shape[names.MESH_AXES[1]])
