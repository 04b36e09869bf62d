r"""``audiodiff-compile``: will this config fit that pod? Compile it here and see.

    audiodiff-compile --config=configs/dit.py:1B --topology=v5p-128
    audiodiff-compile --config=configs/dit.py:3B --topology=v5e-256 --num_slices=2 \
        --config.mesh.fsdp=-1 --json_out=/tmp/3b_v5e.json

    audiodiff-compile --config=configs/dit.py:1B --topology=v5p-128 \
        --programs=train,adapter_train --config.adapters.rank=16

    # Distillation: the student's step with its teacher (the same model without the
    # guidance input) as an input, then the student's sampler (DDIM, distill.steps,
    # one evaluation per step).
    audiodiff-compile --config=configs/dit.py:1B --topology=v5p-128 --programs=train,distill_train
    audiodiff-compile --config=configs/dit.py:1B --topology=v5p-128 --programs=sample \
        --config.model.guidance_input=True --config.distill.steps=8

Compiles the real train step (``Trainer``'s jit: shardings, donation, splash
attention; ``adapter_train``: the adapter trainer's step, the base an input;
``distill_train``: the distillation trainer's step, the teacher an input) and the
sampling loop of ``audiodiff-sample`` for a TPU
slice this machine does not have (``audiodiff_jax/compilation/aot.py``), and prints per-chip
memory (arguments, outputs, temporaries, generated code) against the chip's HBM,
FLOPs, and the largest buffers when the program does not fit.

``distill_train`` takes any DiT config: its model with ``model.guidance_input`` on is
the student, off the teacher, with the ``distill`` section's steps and substeps
(defaults 8 and 4). ``sample`` with ``model.guidance_input`` on compiles a student's
sampler as ``audiodiff-sample`` runs it: DDIM on ``distill.steps`` steps whatever the
sample section says, the guidance scale an input, no unconditional branch.

A program that does not fit, compiled or refused by the compiler for lack of memory,
ends the output with one line on stderr: the memory it wants per chip, what the chip has,
and the config fields (or flags) that change it, with their values. The compiler's own
message is in the log at ``-v=1``.

Exit status: 0 when every compiled program fits, 1 when one does not fit or fails to
compile, 2 for a config or topology error.
"""

from __future__ import annotations

import json
import os
import sys

# Compile-only TPU devices come from libtpu directly; the default backend stays the
# CPU, or jax would try (and fail, slowly) to open TPU chips this machine lacks.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's machine-wide lock guards real chips; a compile-only client needs none, and
# with the lock a second compile on this machine would fail.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from audiodiff_jax.compilation import aot
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import flops, sharding, topology
from audiodiff_jax.programs import cli

PROGRAMS = ("train", "sample", "adapter_train", "distill_train")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dit.py:1B")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU pod (v5p-128, v5e-256, v4-32, v6e-64), libtpu shape (v5p:4x4x8) or cuda:NAME."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice).")
_PROGRAMS = flags.DEFINE_list(
    "programs",
    ["train", "sample"],
    "Which programs to compile: "
    + ", ".join(PROGRAMS)
    + " (adapter_train: low-rank adapters of the adapters section on the frozen model; "
    "distill_train: a student of the model, model.guidance_input on, taught by the model without "
    "it; neither needs weights).",
)
_ATTENTION = flags.DEFINE_string(
    "attention", "splash", "model.attention for the compile ('config' keeps the config's)."
)
_SAMPLE_SONGS = flags.DEFINE_integer(
    "sample_songs", 0, "Songs sampled at once (0 = one per batch shard of the mesh)."
)
_SAMPLE_FRAMES = flags.DEFINE_integer("sample_frames", 0, "Latent frames per song (0 = data.window_frames).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Override the chip's HBM (GiB), e.g. to leave headroom.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the report as JSON to this file.")

EXIT_DOES_NOT_FIT = 1
EXIT_CONFIG_ERROR = 2


def main(argv):
    del argv
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required")
    unknown = [p for p in _PROGRAMS.value if p not in PROGRAMS]
    if unknown:
        raise app.UsageError(f"--programs: unknown program(s) {unknown}; one of {', '.join(PROGRAMS)}")
    try:
        cfg = config_lib.from_configdict(_CONFIG.value)
        if "distill_train" in _PROGRAMS.value:
            aot.distill_configs(cfg)  # the distill section's grid, before anything compiles
        if _ATTENTION.value != "config":
            cfg = config_lib.replace(cfg, **{"model.attention": _ATTENTION.value})
        if _TOPOLOGY.value.startswith("cuda:"):
            devices = aot.get_gpu_devices(_TOPOLOGY.value[len("cuda:") :])
            target = f"GPU {_TOPOLOGY.value} ({len(devices)} devices)"
            hbm = int(_HBM_GIB.value * topology.GiB) or 80 * topology.GiB
            peak = flops.peak_flops_per_device(devices[0]) or 0.0
            config_lib.validate(cfg, num_devices=len(devices))
        else:
            spec = topology.parse_topology(_TOPOLOGY.value, _NUM_SLICES.value)
            cfg = aot.prepare_config(cfg, spec)
            devices = aot.get_devices(spec)
            target = spec.describe()
            hbm = int(_HBM_GIB.value * topology.GiB) or spec.generation.hbm_bytes
            peak = spec.generation.peak_bf16_flops
    except config_lib.ConfigError as e:
        print(f"audiodiff-compile: config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except RuntimeError as e:
        print(f"audiodiff-compile: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)

    mesh = sharding.make_mesh(cfg.mesh, devices)
    print(f"target: {target}")
    print(
        f"model: {cfg.model.preset or 'custom'} width {cfg.model.width} depth {cfg.model.depth}, "
        f"attention={cfg.model.attention}, remat={cfg.model.remat}, dtype={cfg.model.dtype}"
    )
    print(f"mesh: {dict(mesh.shape)}")
    reports = []
    for program in _PROGRAMS.value:
        logging.info("compiling %s for %s", program, target)
        if program == "train":
            r = aot.compile_train_step(cfg, mesh, hbm, peak)
        elif program == "adapter_train":
            r = aot.compile_adapter_train_step(cfg, mesh, hbm, peak)
        elif program == "distill_train":
            r = aot.compile_distill_train_step(cfg, mesh, hbm, peak)
        elif program == "sample":
            songs = _SAMPLE_SONGS.value or sharding.batch_shards(mesh)
            frames = _SAMPLE_FRAMES.value or cfg.data.window_frames
            r = aot.compile_sample_step(cfg, mesh, hbm, songs=songs, frames=frames, peak_flops=peak)
        else:  # PROGRAMS, checked above
            raise AssertionError(program)
        print(r.format(), flush=True)
        reports.append(r)
    ok = all(r.fits for r in reports)
    print("RESULT: " + ("every program fits" if ok else "does not fit (see above)"), flush=True)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(
                {
                    "target": target,
                    "topology": _TOPOLOGY.value,
                    "num_slices": _NUM_SLICES.value,
                    "mesh": dict(mesh.shape),
                    "config": json.loads(config_lib.to_json(cfg)),
                    "programs": [r.to_dict() for r in reports],
                    "fits": ok,
                },
                f,
                indent=2,
            )
    for r in reports:
        if r.out_of_memory:
            print(f"audiodiff-compile: {r.memory_error()}", file=sys.stderr, flush=True)
    sys.exit(0 if ok else EXIT_DOES_NOT_FIT)


def run():
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
