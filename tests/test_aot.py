"""Ahead-of-time compilation for TPU slices this machine does not have (needs libtpu).

The real train step (``Trainer``'s jit: shardings, donation) and a CFG sampling step
compile for v5p topologies through libtpu's compile-only devices, Pallas splash
attention included, and report per-chip memory against HBM. Without libtpu the
compile tests are skipped with a message; pod-name parsing runs everywhere.
"""

import json
import os
import re
import subprocess

import pytest

from audiodiff_jax.compilation import aot
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import memory, topology
from audiodiff_jax.core.config import ConfigError
from configs import tiny
from tests.helpers import REPO, bin_path

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed: pip install 'audiodiff-jax[tpu]' to compile for TPU topologies",
)


@pytest.mark.parametrize(
    "name,shape,chips",
    [
        ("v5p-128", (4, 4, 4), 64),  # v5p names count TensorCores: 2 per chip
        ("v5p-8", (2, 2, 1), 4),
        ("v5p-16", (2, 2, 2), 8),
        ("v4-32", (2, 2, 4), 16),
        ("v5p-256", (4, 4, 8), 128),
        ("v5p-2048", (8, 8, 16), 1024),
        ("v5e-256", (16, 16), 256),  # v5e / v6e names count chips
        ("v5litepod-16", (4, 4), 16),
        ("v5e-8", (2, 4), 8),
        ("v6e-64", (8, 8), 64),
        ("v5p:4x4x8", (4, 4, 8), 128),  # libtpu's own names
        ("v5e:8x16", (8, 16), 128),
    ],
)
def test_pod_names_map_to_slice_shapes(name, shape, chips):
    spec = topology.parse_topology(name)
    assert spec.chip_shape == shape and spec.num_chips == chips
    assert topology.parse_topology(spec.libtpu_name).chip_shape == shape


def test_bad_topology_names_say_what_works():
    with pytest.raises(ConfigError, match="must be even"):
        topology.parse_topology("v5p-7")
    with pytest.raises(ConfigError, match="not a power of two"):
        topology.parse_topology("v5e-48")
    with pytest.raises(ConfigError, match="e.g. v5p-128"):
        topology.parse_topology("h100-8")
    with pytest.raises(ConfigError, match="3 sides"):
        topology.parse_topology("v5p:4x4")
    assert topology.parse_topology("v5p-128", num_slices=2).num_chips == 128


def _tiny(**changes):
    from configs import tiny

    cfg = config_lib.from_configdict(tiny.get_config())
    # Any length runs the kernel (padded to its 128 block); 256 frames keeps compiles quick.
    return config_lib.replace(cfg, **{"model.attention": "splash", "data.window_frames": 256, **changes})


@needs_libtpu
def test_multislice_devices_and_mesh():
    from audiodiff_jax.core import sharding

    spec = topology.parse_topology("v5p-16", num_slices=2)
    devices = aot.get_devices(spec)
    assert len(devices) == 16 and devices[0].device_kind.startswith("TPU v5")
    assert {d.slice_index for d in devices} == {0, 1}
    cfg = aot.prepare_config(_tiny(**{"data.global_batch_size": 16}), spec)
    assert cfg.mesh.dcn_data == 2  # data parallel across the slices
    mesh = sharding.make_mesh(cfg.mesh, devices)
    assert mesh.shape["data"] == 16
    # The data axis is slice-major: its first half is slice 0, so only the gradient
    # reduction across the halves crosses DCN.
    along_data = mesh.devices.reshape(-1)
    assert {d.slice_index for d in along_data[:8]} == {0} and {d.slice_index for d in along_data[8:]} == {1}


@needs_libtpu
def test_tiny_train_step_compiles_with_splash_and_reports_memory():
    from audiodiff_jax.core import sharding

    spec = topology.parse_topology("v5p-8")
    cfg = aot.prepare_config(_tiny(), spec)
    mesh = sharding.make_mesh(cfg.mesh, aot.get_devices(spec))
    # An HBM of 1 MiB: the program compiles but cannot fit, and the report says why.
    report = aot.compile_train_step(cfg, mesh, hbm_bytes=2**20, peak_flops=spec.generation.peak_bf16_flops)
    assert report.compiled, report.error
    # Every attention layer runs the kernel: each DiT block's self- and cross-attention
    # (captions padded up to the 128 block) and each text-encoder layer.
    per_step = 2 * cfg.model.depth + cfg.model.text.depth
    assert report.kernels.get("splash_mha_fwd_segmented_residuals") == per_step, report.kernels
    assert not report.kernel_missing
    assert any(k.startswith("splash_mha_dkv") for k in report.kernels)  # the backward kernels too
    # Donation: the new state reuses the old state's buffers.
    assert report.argument_bytes > 0 and report.alias_bytes > 0.9 * report.argument_bytes - 2**16
    assert report.temp_bytes > 0 and report.code_bytes > 0 and report.xla_flops > 0
    assert not report.fits and report.biggest
    text = report.format()
    assert "DOES NOT FIT" in text and "GiB" in text and "splash_mha" in text
    assert "largest inputs per chip" in text and "largest arrays the program creates" in text
    assert report.biggest_inputs[0].what.startswith("argument state.")
    sizes = [b.bytes for b in report.biggest]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    # The one line a user gets: what the program needs, what the chip has, what to change.
    assert report.out_of_memory
    line = str(report.memory_error())
    assert "\n" not in line and line.startswith("out of device memory in train_step: the program needs ")
    assert f"{memory.fmt_bytes(report.total_bytes)} per device, the device has 1.00 MiB" in line
    assert "data.global_batch_size=8 (" in line and "model.remat='none' (" in line and "mesh.fsdp=1 (" in line
    report.hbm_bytes = spec.generation.hbm_bytes
    assert report.fits and "FITS" in report.format() and not report.out_of_memory


@needs_libtpu
def test_adapter_train_step_compiles_with_the_base_as_a_frozen_input():
    """The adapter trainer's step needs no base weights to compile: the base is a sharded
    input like the batch. The state (donated) holds the factors, their EMA and moments."""
    from audiodiff_jax.core import sharding
    from audiodiff_jax.model import adapters, count_params, make_model

    spec = topology.parse_topology("v5p-8")
    cfg = aot.prepare_config(_tiny(**{"adapters.rank": 4}), spec)
    mesh = sharding.make_mesh(cfg.mesh, aot.get_devices(spec))
    report = aot.compile_adapter_train_step(cfg, mesh, spec.generation.hbm_bytes)
    assert report.compiled and report.fits, report.error
    assert report.kernels.get("splash_mha_fwd_segmented_residuals", 0) > 0
    n = count_params(make_model(cfg.model).abstract_params())
    fns = adapters.make_adapter(cfg.model, adapters.AdapterSpec.from_config(cfg.adapters))
    k = adapters.count_params(fns.abstract_params())
    # Replicated on a data-parallel mesh: fp32 factors, EMA and two moments, plus scalars;
    # the base's fp32 weights once.
    assert 16 * k <= report.state_bytes < 16 * k + 1024 and report.frozen_bytes == 4 * n
    assert report.state_bytes < report.frozen_bytes
    # Only the state is donated (the base is read, never written): what the outputs reuse
    # is the state's buffers (TPU tiling pads the small factors), never the base's.
    assert report.state_bytes <= report.alias_bytes < report.argument_bytes - report.frozen_bytes, (
        report.format()
    )
    assert "train state" in report.format() and "frozen base" in report.format()


@needs_libtpu
def test_distill_train_step_compiles_with_the_teacher_as_a_frozen_input():
    """``distill_train`` of a plain config: the student (the model with the guidance input)
    holds a train state, donated; the teacher (the model without) is an input of fp32
    weights that nothing donates; the model FLOPs count the teacher's guided evaluations."""
    from audiodiff_jax.core import flops, sharding
    from audiodiff_jax.model import count_params, make_model

    spec = topology.parse_topology("v5p-8")
    cfg = aot.prepare_config(_tiny(), spec)
    assert not cfg.model.guidance_input
    mesh = sharding.make_mesh(cfg.mesh, aot.get_devices(spec))
    report = aot.compile_distill_train_step(
        cfg, mesh, spec.generation.hbm_bytes, spec.generation.peak_bf16_flops
    )
    assert report.compiled and report.fits, report.error
    assert report.kernels.get("splash_mha_fwd_segmented_residuals", 0) > 0
    student, teacher = aot.distill_configs(cfg)
    n_teacher = count_params(make_model(teacher.model).abstract_params())
    n_student = count_params(make_model(student.model).abstract_params())
    assert n_student > n_teacher  # the guidance embedder
    # Replicated on a data-parallel mesh: the teacher's fp32 weights once; the student's
    # fp32 params, EMA and two moments, plus scalars.
    assert report.frozen_bytes == 4 * n_teacher
    assert 16 * n_student <= report.state_bytes < 16 * n_student + 1024
    # Only the student's state is donated: the outputs never reuse the teacher's buffers.
    assert report.state_bytes <= report.alias_bytes <= report.argument_bytes - report.frozen_bytes
    d = student.distill
    train = flops.train_flops_per_step(cfg.model, 8, 256, cfg.model.text.max_len)
    assert report.model_flops == pytest.approx(train * (1 + 2 * d.substeps / 3) / mesh.size)
    text = report.format()
    assert f"{d.steps}-step student" in text and "teacher" in text and "frozen base" not in text


@needs_libtpu
def test_student_sample_program_compiles_with_one_evaluation_per_step():
    """A student's sampler (model.guidance_input): DDIM on distill.steps, the guidance
    scale an input, no unconditional branch: one evaluation per step in its FLOPs."""
    from audiodiff_jax.core import flops, sharding

    spec = topology.parse_topology("v5p-8")
    cfg = aot.prepare_config(_tiny(**{"model.guidance_input": True, "distill.steps": 4}), spec)
    mesh = sharding.make_mesh(cfg.mesh, aot.get_devices(spec))
    program = aot.sample_program(cfg, mesh, songs=4, frames=256)
    assert program.guidance_input and not program.cfg
    assert (program.method, program.steps) == ("ddim", 4)
    assert aot.sample_evals(program) == 4
    report = aot.compile_sample_step(cfg, mesh, spec.generation.hbm_bytes, songs=4, frames=256)
    assert report.compiled and report.fits, report.error
    forward = flops.train_flops_per_step(cfg.model, program.batch, program.frames, cfg.model.text.max_len) / 3
    assert report.model_flops == pytest.approx(forward * 4 / mesh.size)
    assert "sample      (ddim, 4 steps, student: guidance an input, 1 evaluation per step" in report.name
    # The same model without the input samples with classifier-free guidance: two rows a step.
    plain = aot.sample_program(_tiny(), mesh, songs=4, frames=256)
    assert plain.cfg and not plain.guidance_input and aot.sample_evals(plain) == 2 * plain.steps


@needs_libtpu
def test_splash_runs_at_a_window_that_is_not_a_block_multiple():
    """700 frames (700 % 128 = 60, as the shipped 6,460) get as many kernels as 640."""
    from audiodiff_jax.core import sharding

    spec = topology.parse_topology("v5p-8")
    counts = []
    for frames in (640, 700):
        cfg = aot.prepare_config(_tiny(**{"data.window_frames": frames}), spec)
        mesh = sharding.make_mesh(cfg.mesh, aot.get_devices(spec))
        report = aot.compile_train_step(cfg, mesh, hbm_bytes=spec.generation.hbm_bytes)
        assert report.compiled, report.error
        counts.append(report.kernels)
    assert counts[0] == counts[1] and counts[0].get("splash_mha_fwd_segmented_residuals", 0) > 0, counts
    # A config that asks for splash but gets none is reported loudly.
    missing = aot.StepReport(name="x", hbm_bytes=1, expect_kernel="splash_mha", compiled=True)
    assert missing.kernel_missing and "WARNING: no splash_mha kernel" in missing.format()


@needs_libtpu
@pytest.mark.slow
def test_1b_train_step_compiles_for_v5p():
    """The whole 1B preset (18 scanned blocks of width 1536, 12 heads of 128, bf16
    compute, fp32 params, remat, its 12-layer text encoder), FSDP over a v5p-8, with
    a 512-frame window to keep the compile within a CI budget. BENCHMARKS.md holds
    the full-size (6,460-frame, 64- and 256-chip) reports.
    """
    from audiodiff_jax.core import sharding
    from audiodiff_jax.model import count_params, make_model
    from configs import dit

    cfg = config_lib.from_configdict(dit.get_config("1B"))
    assert cfg.model.scan_layers and cfg.model.depth == 18
    cfg = config_lib.replace(
        cfg, **{"model.attention": "splash", "data.window_frames": 512, "data.global_batch_size": 4}
    )
    spec = topology.parse_topology("v5p-8")
    cfg = aot.prepare_config(cfg, spec)
    mesh = sharding.make_mesh(cfg.mesh, aot.get_devices(spec))
    report = aot.compile_train_step(cfg, mesh, spec.generation.hbm_bytes, spec.generation.peak_bf16_flops)
    assert report.compiled, report.error
    assert report.fits, report.format()
    # fp32 params, EMA and Adam's two moments (16 bytes per parameter), FSDP over 4 chips.
    n = count_params(make_model(cfg.model).abstract_params())
    assert 0.9 * 16 * n / 4 < report.argument_bytes < 1.1 * 16 * n / 4, report.format()
    # Splash forward and backward kernels (head_dim 128 tiles) for the DiT and the text encoder.
    assert report.kernels.get("splash_mha_fwd_segmented_residuals", 0) >= 2
    assert any(k.startswith("splash_mha_dkv") for k in report.kernels)
    # XLA counts a while body once: with scanned blocks its count is far below the model's.
    assert report.model_flops > report.xla_flops > 0


@needs_libtpu
@pytest.mark.slow
def test_compile_cli_sample_step_multislice(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [
            bin_path("audiodiff-compile"),
            f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            "--topology=v5e-4",
            "--num_slices=2",
            "--programs=sample",
            "--config.data.window_frames=256",
            f"--json_out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "target: v5e-4 (v5e:2x2: 4 chips x 2 slices over DCN, 16 GiB HBM per chip)" in res.stdout
    # The program audiodiff-sample runs (generation.SampleProgram), with the config's sample defaults.
    s = config_lib.from_configdict(tiny.get_config()).sample
    want = f"sample      ({s.samplers[0]}, {s.steps[0]} steps, CFG on: 8 songs x 256 frames)"
    assert want in res.stdout and "FITS" in res.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["mesh"]["data"] == 8 and report["config"]["mesh"]["dcn_data"] == 2
    (prog,) = report["programs"]
    assert prog["compiled"] and prog["total_bytes"] <= prog["hbm_bytes"]


@needs_libtpu
def test_compile_cli_oversized_config_ends_in_one_memory_line():
    """XLA attention over 16,384 frames x 64 rows: the TPU compiler refuses the program
    (about 97 GiB of temporaries per 16 GiB chip); the output ends in one line that says
    so and names the fields to change, with the compiler's own text only at -v=1."""
    res = subprocess.run(
        [
            bin_path("audiodiff-compile"),
            f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            "--topology=v5e-4",
            "--programs=train",
            "--attention=config",
            "--config.data.window_frames=16384",
            "--config.data.global_batch_size=64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"audiodiff-compile: out of device memory in train_step: it needs [0-9.]+ GiB per device "
        r"\(HLO temporaries\), the device has [0-9.]+ GiB; to fit, change data\.global_batch_size=64 "
        r"\(fewer rows per step\), data\.window_frames=16384 \(shorter windows\), model\.remat='none' "
        r"\(.*\), mesh\.fsdp=1 \(.*\)",
        last,
    ), last
    assert "DOES NOT COMPILE: RESOURCE_EXHAUSTED" in res.stdout and "RESULT: does not fit" in res.stdout


def test_compile_cli_rejects_bad_topology():
    res = subprocess.run(
        [
            bin_path("audiodiff-compile"),
            f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            "--topology=v5p-7",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "must be even" in res.stderr
