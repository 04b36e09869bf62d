"""TPU slice names: what ``v5p-128`` or ``v5e:16x16`` means in chips, hosts and HBM.

Pure Python (no jax), so launchers can read a topology without a device runtime;
``aot.py`` builds compile-only devices from it. Pod names count what Google Cloud
sells: ``v4-N`` and ``v5p-N`` count TensorCores (two per chip, run as one "megacore"
device), ``v5e-N`` / ``v5litepod-N`` and ``v6e-N`` count chips. libtpu's own names
(``v5p:4x4x4``) are accepted too. Several slices over DCN: ``num_slices``.
"""

from __future__ import annotations

import dataclasses
import math
import re

from audiodiff_jax.core.config import ConfigError

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
