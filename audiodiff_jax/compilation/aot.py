"""Ahead-of-time compilation for accelerators this machine does not have.

Before paying for a pod slice, compile the real programs for it here and read their
per-chip memory against the chip's HBM::

    audiodiff-compile --config=configs/dit.py:1B --topology=v5p-128

How it works: with ``libtpu`` installed, ``jax.experimental.topologies`` describes
the devices of any TPU slice (compile-only devices: they can be lowered and compiled
for, never run). The mesh of :func:`audiodiff_jax.core.sharding.make_mesh` is built from
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
import numpy as np
from absl import logging

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import flops, memory, sharding
from audiodiff_jax.core.config import Config, ConfigError
from audiodiff_jax.core.topology import GiB, TopologySpec
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.diffusion import distill, samplers
from audiodiff_jax.model import make_model
from audiodiff_jax.sampling import generation
from audiodiff_jax.training.adapter_trainer import AdapterTrainer
from audiodiff_jax.training.distill_trainer import DistillTrainer
from audiodiff_jax.training.dit_trainer import Trainer


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
    # The attention kernel the config asks for ("splash_mha"): its absence is reported loudly.
    expect_kernel: str = ""
    # The config fields (or flags) that change this program's memory, with their values.
    advice: str = ""
    state_bytes: int = 0  # per chip: the train state (params, optimizer state, EMAs), an argument
    frozen_bytes: int = 0  # per chip: frozen weights handed to the step (an adapter run's base)
    frozen_label: str = "frozen base"  # what those weights are ("teacher" in distillation)

    @property
    def kernel_missing(self) -> bool:
        return bool(self.expect_kernel) and not any(k.startswith(self.expect_kernel) for k in self.kernels)

    error: str = ""

    @property
    def total_bytes(self) -> int:
        """Live at once at the peak: inputs, outputs not aliased to inputs, scratch, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.compiled and self.total_bytes <= self.hbm_bytes

    @property
    def out_of_memory(self) -> bool:
        """Compiled but over the chip's HBM, or refused by the compiler for lack of memory."""
        return (self.compiled and not self.fits) or (
            not self.compiled and memory.is_out_of_memory(self.error)
        )

    def memory_error(self) -> memory.OutOfMemory:
        """The one-line error of a program that does not fit: what it wants, what the
        chip has, the fields to change (``advice``)."""
        analysis = None
        if self.compiled:
            analysis = memory.CompiledMemory(
                self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes, self.code_bytes
            )
        return memory.out_of_memory(
            self.error,
            where=f"in {self.name.split()[0]}",
            advice=self.advice,
            compiled=analysis,
            capacity=self.hbm_bytes,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits)
        return d

    def format(self) -> str:
        gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        lines = [f"== {self.name}"]
        if not self.compiled:
            first, *rest = self.error.splitlines() or [""]
            more = " (the compiler's whole message is in the log at -v=1)" if rest else ""
            lines.append(f"   DOES NOT COMPILE: {first}{more}")
            return "\n".join(lines)
        lines += [
            f"   compile time   {self.compile_s:8.1f} s",
            f"   arguments      {gib(self.argument_bytes)}"
            + (f"  (train state {gib(self.state_bytes).strip()}" if self.state_bytes else "")
            + (f", {self.frozen_label} {gib(self.frozen_bytes).strip()}" if self.frozen_bytes else "")
            + (")" if self.state_bytes else ""),
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
        if self.kernel_missing:
            lines.append(
                f"   WARNING: no {self.expect_kernel} kernel in the compiled program: attention runs as "
                "XLA einsums with full T x T logits (memory and speed figures are not the kernel's)"
            )
        if self.peak_flops and self.model_flops:
            t = self.model_flops / self.peak_flops
            lines.append(f"   step time at 100% / 50% MFU: {t:.3f} s / {2 * t:.3f} s")
        if self.fits:
            lines.append("   FITS")
        else:
            over = self.total_bytes - self.hbm_bytes
            lines.append(f"   DOES NOT FIT: {memory.fmt_bytes(over)} over the chip's HBM.")
        if not self.fits or self.error:
            lines.append("   largest inputs per chip:")
            lines += [f"     {memory.fmt_bytes(b.bytes):>10}  {b.what}" for b in self.biggest_inputs]
        if self.biggest:
            lines.append("   largest arrays the program creates, per chip:")
            lines += [f"     {memory.fmt_bytes(b.bytes):>10}  {b.what}" for b in self.biggest]
        if self.error:
            lines.append("   compiler message:\n" + _indent(self.error, 5))
        return "\n".join(lines)


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
        logging.vlog(1, "%s: compiler message:\n%s", report.name, msg)
        report.error = _trim_compiler_error(msg)
        report.biggest_inputs = arg_buffers
        report.compile_s = time.perf_counter() - start
        return report
    report.compile_s = time.perf_counter() - start
    report.compiled = True
    mem = memory.CompiledMemory.of(compiled)
    if mem is not None:
        report.argument_bytes = mem.argument_bytes
        report.output_bytes = mem.output_bytes
        report.alias_bytes = mem.alias_bytes
        report.temp_bytes = mem.temp_bytes
        report.code_bytes = mem.code_bytes
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    report.xla_flops = float((cost or {}).get("flops", 0.0))
    hlo = compiled.as_text()
    report.kernels = custom_kernels(hlo)
    if report.kernel_missing:
        logging.warning("%s: no %s kernel in the compiled program", report.name, report.expect_kernel)
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


def _expected_kernel(cfg: Config) -> str:
    return "splash_mha" if cfg.model.attention == "splash" else ""


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def compile_train_step(cfg: Config, mesh, hbm_bytes: int, peak_flops: float = 0.0) -> StepReport:
    """Compiles ``Trainer``'s jitted train step (shardings, donation) for ``mesh``."""
    trainer = Trainer(cfg, mesh)
    b, t = cfg.data.global_batch_size, cfg.data.window_frames
    args = (trainer.abstract_state(), batch_lib.abstract_batch(cfg, mesh))
    report = StepReport(
        name=f"train_step  (global batch {b} x {t} frames)",
        hbm_bytes=hbm_bytes,
        model_flops=flops.train_flops_per_step(cfg.model, b, t, cfg.model.text.max_len) / mesh.size,
        peak_flops=peak_flops,
        expect_kernel=_expected_kernel(cfg),
        advice=memory.config_advice(cfg, config_lib.MEMORY_FIELDS),
        state_bytes=per_chip_bytes(args[0]),
    )
    return compile_and_report(trainer.train_step, args, ("state", "batch"), report, mesh)


def compile_adapter_train_step(cfg: Config, mesh, hbm_bytes: int, peak_flops: float = 0.0) -> StepReport:
    """Compiles the adapter trainer's jitted step (``adapter_trainer.AdapterTrainer``: the
    adapters of ``cfg.adapters`` on a frozen base, which is an input like the batch) for
    ``mesh``. No base weights are needed: the base is a sharded ShapeDtypeStruct too."""
    trainer = AdapterTrainer(cfg, mesh)
    b, t = cfg.data.global_batch_size, cfg.data.window_frames
    args = (trainer.abstract_state(), trainer.abstract_base(), batch_lib.abstract_batch(cfg, mesh))
    a = cfg.adapters
    report = StepReport(
        name=f"adapter_train_step  (rank {a.rank} on {len(a.targets)} projections per block; "
        f"global batch {b} x {t} frames)",
        hbm_bytes=hbm_bytes,
        model_flops=flops.train_flops_per_step(cfg.model, b, t, cfg.model.text.max_len) / mesh.size,
        peak_flops=peak_flops,
        expect_kernel=_expected_kernel(cfg),
        state_bytes=per_chip_bytes(args[0]),
        frozen_bytes=per_chip_bytes(args[1]),
    )
    return compile_and_report(trainer.train_step, args, ("state", "base", "batch"), report, mesh)


def distill_configs(cfg: Config) -> tuple[Config, Config]:
    """The student and the teacher of ``cfg``'s model: ``model.guidance_input`` on and off.

    A plain config (``configs/dit.py:1B``) gives the student it would distill with the
    ``distill`` section's defaults (8 steps, 4 teacher steps each); a student's config
    (``configs/distill.py:TEACHER``) gives itself and a teacher that samples with
    classifier-free guidance. Ahead of time the teacher is always that guided one (no
    weights are read): for a second phase, whose teacher is a student evaluated once a
    step, the program compiled is the larger one (twice the teacher's rows).

    Raises:
      ConfigError: the ``distill`` section's grid cannot be made.
    """
    student = config_lib.replace(cfg, **{"model.guidance_input": True})
    teacher = config_lib.replace(cfg, **{"model.guidance_input": False})
    d = student.distill
    try:
        distill.grids(d.steps, d.substeps, schedule=d.schedule, shift=cfg.diffusion.schedule_shift)
    except ValueError as e:
        raise ConfigError(f"distill.schedule={d.schedule!r}: {e}") from e
    return student, teacher


def compile_distill_train_step(cfg: Config, mesh, hbm_bytes: int, peak_flops: float = 0.0) -> StepReport:
    """Compiles the distillation trainer's jitted step (``distill_trainer.DistillTrainer``:
    the student's train state, donated, and the teacher's weights, an input like the
    batch that nothing donates) for ``mesh``, from :func:`distill_configs`. No weights are
    needed: the teacher is a sharded ShapeDtypeStruct, its empty caption zeros."""
    student, teacher = distill_configs(cfg)
    uncond = np.zeros((student.model.text.max_len,), np.int32)  # a stand-in: shapes only
    trainer = DistillTrainer(student, mesh, teacher, uncond_tokens=uncond)
    b, t = student.data.global_batch_size, student.data.window_frames
    args = (trainer.abstract_state(), trainer.abstract_teacher(), batch_lib.abstract_batch(student, mesh))
    d = student.distill
    report = StepReport(
        name=f"distill_train_step  ({d.steps}-step student; {d.substeps} guided teacher DDIM steps "
        f"per student step, {2 * d.substeps} teacher evaluations; global batch {b} x {t} frames)",
        hbm_bytes=hbm_bytes,
        # The student's forward and backward and the teacher's forward evaluations
        # (DistillTrainer.step_flops: train FLOPs x (1 + evaluations / 3)).
        model_flops=trainer.step_flops / mesh.size,
        peak_flops=peak_flops,
        expect_kernel=_expected_kernel(student),
        advice=memory.config_advice(student, config_lib.MEMORY_FIELDS),
        state_bytes=per_chip_bytes(args[0]),
        frozen_bytes=per_chip_bytes(args[1]),
        frozen_label="teacher",
    )
    return compile_and_report(trainer.train_step, args, ("state", "teacher", "batch"), report, mesh)


def sample_program(cfg: Config, mesh, *, songs: int, frames: int) -> generation.SampleProgram:
    """The program ``audiodiff-sample`` runs for ``songs`` rows of one ``frames``-frame window,
    with the config's first sampler and step count, guidance unless it is 1 and the
    known-frames input of windowed songs (every window after the first has one).

    A student (``model.guidance_input``) samples as ``Generator.check_student`` lets it:
    DDIM on its ``distill.steps``, one evaluation per step with the scale as input (no
    unconditional branch), whatever the sample section says."""
    s = cfg.sample
    batch, frames_pad = generation.padded_shape(mesh, songs, frames)
    student = bool(cfg.model.guidance_input)
    method, steps = ("ddim", cfg.distill.steps) if student else (s.samplers[0], s.steps[0])
    if student and (s.samplers[0], s.steps[0]) != (method, steps):
        logging.warning(
            "a student samples with %d ddim steps (distill.steps), not sample.samplers=%r, "
            "sample.steps=%r: compiling its %d ddim steps",
            steps,
            s.samplers[0],
            s.steps[0],
            steps,
        )
    return generation.SampleProgram(
        method=method,
        steps=steps,
        batch=batch,
        frames=frames_pad,
        valid=frames,
        cfg=s.guidance[0] != 1.0 and not student,
        known=True,
        context=cfg.model.masked_context,
        guidance_input=student,
    )


def sample_evals(program: generation.SampleProgram) -> int:
    """Model evaluations of one run of ``program``: its sampler's per step, twice with
    classifier-free guidance (the two rows of each song); a student's once per step."""
    return program.steps * samplers.EVALS_PER_STEP[program.method] * (2 if program.cfg else 1)


def compile_sample_step(
    cfg: Config, mesh, hbm_bytes: int, *, songs: int, frames: int, peak_flops: float = 0.0
) -> StepReport:
    """Compiles the sampling program of ``audiodiff-sample`` (:class:`generation.SampleProgram`:
    the whole sampler loop with guidance) for ``songs`` songs of ``frames`` latent frames.

    Parameters are sharded as in training (the EMA weights restored onto this mesh);
    the songs are split as the logical rules place the batch axis.
    """
    model = make_model(cfg.model)
    param_shardings = sharding.named_shardings(model.logical_axes(), mesh)
    params = sharding.with_shardings(model.abstract_params(), param_shardings)
    program = sample_program(cfg, mesh, songs=songs, frames=frames)
    args = program.abstract_args(cfg, params, mesh)
    with jax.set_mesh(mesh):
        jitted = jax.jit(program.fn(model.apply), out_shardings=program.out_shardings(mesh))
    evals = sample_evals(program)
    # forward only: a third of the train step's 6 FLOPs per parameter and token, per evaluation
    forward = flops.train_flops_per_step(cfg.model, program.batch, program.frames, cfg.model.text.max_len) / 3
    report = StepReport(
        name=(
            f"sample      ({program.method}, {program.steps} steps, "
            + (
                "student: guidance an input, 1 evaluation per step"
                if program.guidance_input
                else f"CFG {'on' if program.cfg else 'off'}"
            )
            + f": {program.batch} songs x {program.frames} frames)"
        ),
        hbm_bytes=hbm_bytes,
        model_flops=forward * evals / mesh.size,
        peak_flops=peak_flops,
        expect_kernel=_expected_kernel(cfg),
        advice=(
            f"--sample_songs={songs} (fewer songs at once; sample.batch_size when sampling), "
            f"--sample_frames={frames} (shorter windows; sample.window_frames when sampling), "
            + memory.config_advice(cfg, {"mesh.fsdp": config_lib.MEMORY_FIELDS["mesh.fsdp"]})
        ),
    )
    return compile_and_report(jitted, args, ("params", "cond", "inputs"), report, mesh)


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
