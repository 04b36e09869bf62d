"""Device memory: what the devices hold, what a compiled program needs, and an
out-of-memory error that says what to change.

- :func:`device_scalars`: bytes in use and peak per device, from
  ``Device.memory_stats()`` where the backend reports them (GPU, TPU). A backend that
  reports nothing (the CPU: ``memory_stats()`` is None) gives no fields at all, never
  zeros, so a chart or a reader of ``metrics.jsonl`` cannot mistake "unknown" for "empty".
- :class:`CompiledMemory`: a compiled program's own memory analysis per device
  (``Compiled.memory_analysis()``: arguments, outputs, the outputs that reuse donated
  arguments, temporaries, generated code).
- :func:`out_of_memory`: XLA's RESOURCE_EXHAUSTED error (at compile or at run time) as
  one line: the memory the program wanted, what the device has, and the config fields
  that change it, with their values. Raised ``from`` the backend's error, whose text
  (the allocator's or compiler's dump) stays in the log at ``-v=1`` (``programs/cli.py``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax

from audiodiff_jax.core import names
from audiodiff_jax.core.errors import UserError

GiB = 2**30


def fmt_bytes(b: float) -> str:
    """``12.34 GiB``, ``5.00 MiB``, ``17 B``."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def _local_devices() -> list[Any]:
    return jax.local_devices()


def device_scalars(devices: Sequence[Any] | None = None) -> dict[str, float]:
    """Bytes in use and peak of every device that reports them (default: this process's).

    Returns ``names.MEMORY_IN_USE`` / ``MEMORY_PEAK`` per device id, their largest
    values and the smallest device's ``bytes_limit``; each only where the backend
    reports it, so ``{}`` on a backend without memory statistics.
    """
    devices = _local_devices() if devices is None else devices
    out: dict[str, float] = {}
    in_use, peak, limit = [], [], []
    for d in devices:
        stats = d.memory_stats()
        if not stats:
            continue
        if "bytes_in_use" in stats:
            in_use.append(float(stats["bytes_in_use"]))
            out[names.MEMORY_IN_USE.format(d.id)] = in_use[-1]
        if "peak_bytes_in_use" in stats:
            peak.append(float(stats["peak_bytes_in_use"]))
            out[names.MEMORY_PEAK.format(d.id)] = peak[-1]
        if stats.get("bytes_limit"):
            limit.append(float(stats["bytes_limit"]))
    if in_use:
        out[names.MEMORY_IN_USE_MAX] = max(in_use)
    if peak:
        out[names.MEMORY_PEAK_MAX] = max(peak)
    if limit:
        out[names.MEMORY_LIMIT] = min(limit)
    return out


def device_capacity(devices: Sequence[Any] | None = None) -> int | None:
    """What one device has for arrays (the smallest ``bytes_limit``); None where unreported."""
    limit = device_scalars(devices).get(names.MEMORY_LIMIT)
    return int(limit) if limit else None


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """A compiled program's memory per device, from XLA's buffer assignment."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int
    code_bytes: int

    @classmethod
    def of(cls, compiled: Any) -> CompiledMemory | None:
        """From a ``jax.stages.Compiled``; None where the backend gives no analysis."""
        m = compiled.memory_analysis()
        if m is None:
            return None
        return cls(
            argument_bytes=int(m.argument_size_in_bytes),
            output_bytes=int(m.output_size_in_bytes),
            alias_bytes=int(m.alias_size_in_bytes),
            temp_bytes=int(m.temp_size_in_bytes),
            code_bytes=int(m.generated_code_size_in_bytes),
        )

    @property
    def total_bytes(self) -> int:
        """Live at once at the peak: inputs, outputs not aliased to inputs, scratch, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def scalars(self) -> dict[str, float]:
        return {
            names.COMPILED_ARGUMENTS: float(self.argument_bytes),
            names.COMPILED_OUTPUTS: float(self.output_bytes),
            names.COMPILED_ALIASED: float(self.alias_bytes),
            names.COMPILED_TEMPORARIES: float(self.temp_bytes),
            names.COMPILED_CODE: float(self.code_bytes),
            names.COMPILED_TOTAL: float(self.total_bytes),
        }

    def describe(self, capacity: int | None = None) -> str:
        """One line: the parts, and the total against ``capacity`` when known."""
        of = f" of {fmt_bytes(capacity)} ({100 * self.total_bytes / capacity:.0f}%)" if capacity else ""
        return (
            f"{fmt_bytes(self.total_bytes)} per device{of}: arguments {fmt_bytes(self.argument_bytes)}, "
            f"outputs {fmt_bytes(self.output_bytes)} ({fmt_bytes(self.alias_bytes)} reuse donated "
            f"arguments), temporaries {fmt_bytes(self.temp_bytes)}, "
            f"generated code {fmt_bytes(self.code_bytes)}"
        )


# -- out of memory ---------------------------------------------------------------------


class OutOfMemory(UserError):
    """A program needs more device memory than the device has; the message says what to change."""


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether ``error`` (or its text) is XLA running out of device memory (compiling or running)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?"
# XLA:TPU at compile time: "the total memory required for HLO temporaries (96.96G)
# exceeds available HBM (15.75G)"; older libtpu: "Used 20.5G of 15.48G hbm".
_REQUIRED = re.compile(rf"required for ([\w ]+?) \({_SIZE}\) exceeds available \w+ \({_SIZE}\)")
_USED_OF = re.compile(rf"Used {_SIZE} of {_SIZE} (\w+)")
# The GPU / CPU allocators at run time: "Out of memory while trying to allocate 1234 bytes".
_ALLOCATE = re.compile(r"allocat\w* ([0-9]+) bytes")


def _size(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit.upper()])


def reported_sizes(message: str) -> tuple[int | None, int | None, str]:
    """``(bytes wanted, bytes the device has, what was wanted)`` as XLA's message states
    them; None for what it does not state."""
    m = _REQUIRED.search(message)
    if m:
        return _size(m.group(2), m.group(3)), _size(m.group(4), m.group(5)), m.group(1)
    m = _USED_OF.search(message)
    if m:
        return _size(m.group(1), m.group(2)), _size(m.group(3), m.group(4)), f"{m.group(5)} in use"
    m = _ALLOCATE.search(message)
    if m:
        return int(m.group(1)), None, "one allocation"
    return None, None, ""


def config_advice(cfg: Any, fields: dict[str, str]) -> str:
    """``data.global_batch_size=64 (fewer rows per step), ...``: each dotted field of
    ``cfg`` with its value and which way to turn it."""
    parts = []
    for path, hint in fields.items():
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        parts.append(f"{path}={value!r} ({hint})")
    return ", ".join(parts)


def out_of_memory(
    error: BaseException | str,
    *,
    where: str,
    advice: str,
    compiled: CompiledMemory | None = None,
    capacity: int | None = None,
) -> OutOfMemory:
    """The one-line error for an out-of-memory ``error`` (raise it ``from`` the error).

    Args:
      error: XLA's error (or its text).
      where: what ran out, e.g. "compiling the train step", "at step 120".
      advice: the config fields that change the program's memory (:func:`config_advice`).
      compiled: the program's memory analysis, when it compiled.
      capacity: what the device has, when known otherwise (``memory_stats``, the chip's HBM).
    """
    wanted, has, what = reported_sizes(str(error))
    capacity = has or capacity
    if what == "one allocation" and compiled is not None:
        need = (
            f"the program needs {fmt_bytes(compiled.total_bytes)} per device (arguments "
            f"{fmt_bytes(compiled.argument_bytes)}, temporaries {fmt_bytes(compiled.temp_bytes)}) "
            f"and failed allocating {fmt_bytes(wanted)} more"
        )
    elif wanted is not None:
        need = f"it needs {fmt_bytes(wanted)} per device ({what})"
    elif compiled is not None:
        need = f"the program needs {fmt_bytes(compiled.total_bytes)} per device"
    else:
        need = "it needs more than the device has"
    device = f"the device has {fmt_bytes(capacity)}" if capacity else "the device's size is not reported"
    return OutOfMemory(f"out of device memory {where}: {need}, {device}; to fit, change {advice}")
