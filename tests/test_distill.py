"""Few-step students: the progressive-distillation target against its closed form, the
student that starts as its teacher, the distillation run (SIGTERM and bitwise resume
through the real program, a second phase from a student), and sampling a student.

The teacher is an export of a ``configs/tiny.py`` model with masked context and random
weights (every parameter perturbed, so no block is the identity); nothing is trained
but the students. One module fixture distills in this process: the reference run that
the program's interrupted and resumed run must equal bit for bit.
"""

import dataclasses
import json
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiodiff_jax.checkpoints import checkpointing, export, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import sharding
from audiodiff_jax.core.config import ConfigError
from audiodiff_jax.core.errors import GenerationError
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.diffusion import distill, objective, samplers
from audiodiff_jax.model import make_model
from audiodiff_jax.sampling import generation
from audiodiff_jax.sweeps import calibrate, sweep
from audiodiff_jax.training import distill_trainer
from configs import distill as distill_config
from tests.helpers import (
    REPO,
    assert_trees_equal,
    bin_path,
    random_export,
    read_state,
    tiny_config,
    wait_then_sigterm,
    write_shards,
)
from tests.test_generation import LinearCodec

NUM_STEPS = 10
DEVICES = 2
MESH = {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 1}


def _env():
    return dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
    )


# ---------------------------------------------------------------------------
# The math


def test_one_ddim_step_with_the_target_lands_on_the_teachers_end_point():
    rng = np.random.default_rng(0)
    z_t = jnp.asarray(rng.standard_normal((4, 6, 3)), jnp.float32)
    z_s = jnp.asarray(rng.standard_normal((4, 6, 3)), jnp.float32)
    t = jnp.asarray([1.0, 0.8, 0.4, 0.1], jnp.float32)
    s = jnp.asarray([0.75, 0.5, 0.0, 0.05], jnp.float32)
    v = distill.ddim_target(z_t, z_s, t, s)
    zeros = jnp.zeros((4,), jnp.float32)
    landed = samplers.ddim_step(z_t, v, t, s, zeros, jnp.zeros_like(z_t))
    np.testing.assert_allclose(np.asarray(landed), np.asarray(z_s), atol=2e-5)
    # Closed form of Salimans & Ho's x~ at a row ending at s = 0: the end point itself.
    x, _ = objective.v_to_x_eps(z_t, v, t)
    np.testing.assert_allclose(np.asarray(x[2]), np.asarray(z_s[2]), atol=1e-5)


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m"])
def test_teacher_steps_follow_a_perfect_model_and_keep_known_frames(method):
    """With the true v of a single data point, DDIM and DPM-Solver++(2M) are exact: m steps
    from t land on alpha_s x + sigma_s eps for any m; known frames follow that path too."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)

    def perfect(z, t):
        a, sg = objective.alpha_sigma(t)
        return a[:, None, None] * eps - sg[:, None, None] * x

    student, fine = distill.grids(4, 3, schedule="uniform", shift=2.0)
    assert len(student) == 5 and len(fine) == 13 and np.array_equal(fine[::3], student)
    times = jnp.asarray(np.stack([fine[0:4], fine[6:10]]))
    z_t, _ = objective.add_noise(x, eps, times[:, 0])
    mask = jnp.asarray([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)
    out = distill.teacher_steps(perfect, z_t, times, known=(x, eps, mask), method=method)
    want, _ = objective.add_noise(x, eps, times[:, -1])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
    with pytest.raises(ValueError, match="uniform"):
        distill.grids(3, 2, schedule="karras", shift=1.0)


# ---------------------------------------------------------------------------
# Teacher, shards, the reference run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=16)


def _teacher_cfg(shards):
    cfg = tiny_config(shards)
    return config_lib.replace(cfg, model=config_lib.replace(cfg.model, masked_context=True))


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):
    """An export of a tiny masked-context model whose every parameter is random."""
    return random_export(_teacher_cfg(shards), tmp_path_factory.mktemp("teacher") / "export", 0)


def _args(teacher, shards, workdir):
    return [
        f"--config={os.path.join(REPO, 'configs', 'distill.py')}:{teacher}",
        f"--workdir={workdir}",
        f"--config.data.shards_dir={shards}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=4",
        "--config.checkpoint.keep_last=5",
        "--config.optim.learning_rate=1e-3",
        "--config.distill.steps=4",
        "--config.distill.substeps=2",
        *(f"--config.mesh.{axis}={size}" for axis, size in MESH.items()),
    ]


def _cfg(teacher, shards, **distill_changes):
    cd = distill_config.get_config(teacher)
    cd.data.shards_dir = shards
    cd.train.num_steps = NUM_STEPS
    cd.train.log_every = 1
    cd.checkpoint.every_steps = 4
    cd.checkpoint.keep_last = 5
    cd.optim.learning_rate = 1e-3
    cd.distill.steps = 4
    cd.distill.substeps = 2
    for k, v in distill_changes.items():
        cd.distill[k] = v
    for axis, size in MESH.items():
        cd.mesh[axis] = size
    return config_lib.from_configdict(cd)


def _mesh(cfg):
    return sharding.make_mesh(cfg.mesh, devices=jax.devices()[:DEVICES])


@pytest.fixture(scope="module")
def student_run(teacher, shards, tmp_path_factory):
    """The reference distillation, uninterrupted, in this process (the program's code)."""
    workdir = str(tmp_path_factory.mktemp("student") / "run")
    cfg = _cfg(teacher, shards)
    result = distill_trainer.train(cfg, workdir, mesh=_mesh(cfg))
    assert result.final_step == NUM_STEPS
    return workdir


def test_a_student_starts_as_its_teachers_conditional_prediction(teacher, shards):
    tcfg = source.WeightsSource(teacher).cfg
    scfg = config_lib.replace(tcfg, model=config_lib.replace(tcfg.model, guidance_input=True))
    tparams = source.WeightsSource(teacher).host_params(None, "ema")
    student = make_model(scfg.model)
    fresh = student.init(jax.random.key(3))
    sparams = {**tparams, distill_trainer.GUIDANCE: fresh[distill_trainer.GUIDANCE]}
    b, frames = 3, 16
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.standard_normal((b, frames, tcfg.model.latent_channels)), jnp.float32)
    t = jnp.asarray([0.9, 0.5, 0.2], jnp.float32)
    cond = Conditioning(
        tokens=jnp.asarray(rng.integers(4, 50, (b, tcfg.model.text.max_len)), jnp.int32),
        seconds_start=jnp.zeros((b,)),
        seconds_total=jnp.full((b,), 30.0),
        num_frames=jnp.full((b,), frames, jnp.int32),
    )
    want = make_model(tcfg.model).apply(tparams, z, t, cond)
    got = student.apply(sparams, z, t, cond._replace(guidance=jnp.asarray([1.0, 4.0, 7.5])))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sigterm_and_restart_of_the_program_is_bitwise_identical(teacher, shards, student_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    args = [bin_path("audiodiff-train"), *_args(teacher, shards, resumed)]
    proc = subprocess.Popen(args, env=_env(), cwd=tmp_path)
    assert wait_then_sigterm(proc, resumed, at_step=3) == 0
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(resumed, "checkpoints")) if d.isdigit())
    stopped_at = ckpts[-1]
    assert 3 <= stopped_at < NUM_STEPS, ckpts
    done = subprocess.run(args, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from checkpoint step {stopped_at}" in done.stderr
    a, b = read_state(student_run), read_state(resumed)
    assert int(a["step"]) == int(b["step"]) == NUM_STEPS
    for field in ("params", "ema_params", "opt_state"):
        assert_trees_equal(a[field], b[field], field)
    ha, hb = read_loss_history(student_run), read_loss_history(resumed)
    assert sorted(ha) == list(range(1, NUM_STEPS + 1)) and ha == hb
    # The checkpoint names its teacher by content hash, and holds no copy of it.
    step_dir, _ = checkpointing.find_step(resumed)
    item = checkpointing.read_json_item(step_dir / source.DISTILL_ITEM)
    assert item["teacher"]["hash"] == export.read_meta(teacher)["content_hash"]
    assert (item["method"], item["steps"], item["substeps"]) == ("progressive", 4, 2)
    assert set(b["params"]) == set(read_state(student_run)["params"])
    # The student learned: its guidance embedder's last layer moved off zero.
    assert np.abs(b["params"][distill_trainer.GUIDANCE]["fc2"]["kernel"]).max() > 0
    # Its saved config samples as it was distilled.
    cfg = source.WeightsSource(resumed).cfg
    assert (cfg.sample.samplers, cfg.sample.steps, cfg.sample.schedule) == (("ddim",), (4,), ("uniform",))


def test_a_second_phase_halves_the_steps_of_a_student(student_run, shards, tmp_path):
    cd = distill_config.get_config(student_run)
    assert (cd.distill.steps, cd.distill.substeps) == (2, 2)
    cd.data.shards_dir = shards
    cd.train.num_steps = 2
    for axis, size in MESH.items():
        cd.mesh[axis] = size
    cfg = config_lib.from_configdict(cd)
    result = distill_trainer.train(cfg, str(tmp_path / "phase2"), mesh=_mesh(cfg))
    assert result.final_step == 2
    item = checkpointing.read_json_item(
        checkpointing.find_step(str(tmp_path / "phase2"))[0] / source.DISTILL_ITEM
    )
    assert item["teacher_evals_per_step"] == 1 and item["steps"] == 2
    # A student teacher on another grid is refused before anything is written.
    bad = config_lib.replace(cfg, distill=config_lib.replace(cfg.distill, substeps=3))
    with pytest.raises(ConfigError, match="distill.substeps=2"):
        distill_trainer.train(bad, str(tmp_path / "bad"), mesh=_mesh(cfg))
    assert not os.path.exists(tmp_path / "bad")


def test_a_resumed_run_refuses_another_teacher(student_run, shards, tmp_path):
    path = random_export(_teacher_cfg(shards), tmp_path / "other", 9, jitter=0.0)
    cfg = _cfg(path, shards)
    with pytest.raises(ConfigError, match="other weights .* than the teacher this run started on"):
        distill_trainer.train(cfg, student_run, mesh=_mesh(cfg))


# ---------------------------------------------------------------------------
# Sampling a student


def test_a_student_samples_windowed_songs_and_continuations_in_one_evaluation_a_step(
    student_run, teacher, tmp_path
):
    src = source.WeightsSource(student_run)
    gen, _ = generation.open_generator(
        src, LinearCodec(src.card.codec.latent_channels), weights="ema", window_frames=16, overlap_frames=4
    )
    assert gen.student and gen.distillation == "progressive"
    p = generation.SampleParams.from_section("a song", gen.sample, seconds=3.0, guidance=4.0)
    assert (p.sampler, p.steps) == ("ddim", 4)
    frames = gen.frames_for(p.seconds)
    res = gen.generate_latents([p])
    assert res.windows > 1 and res.latents[0].shape == (frames, gen.channels)
    assert np.isfinite(res.latents[0]).all()
    assert gen.model_evals(p, res.windows) == res.windows * 4  # one evaluation per step
    # The guidance scale is an input: another scale, another song, same program.
    other = gen.generate_latents([dataclasses.replace(p, guidance=2.0)])
    assert not other.compiled and not np.array_equal(other.latents[0], res.latents[0])
    # A continuation keeps the known frames exactly.
    audio = gen.decode(res.latents[0])
    edit = gen.continuation(audio[:, : audio.shape[-1] // 2], gen.codec.card.sample_rate)
    cont = gen.generate_latents([p], edit=edit)
    n = edit.latents.shape[0]
    assert 0 < n < frames
    np.testing.assert_allclose(gen.card.normalize(cont.latents[0][:n]), edit.latents, atol=1e-4)
    assert np.isfinite(cont.latents[0]).all()
    # What it was not distilled for is refused in one line naming the field.
    for change, match in (
        ({"steps": 50}, "steps=50: this model is a student of 4 steps"),
        ({"sampler": "dpmpp_2m"}, "sampler='dpmpp_2m'"),
        ({"guidance": 9.0}, "guidance=9: .* trained for guidance 1 to 6"),
        ({"negative_prompt": "noise"}, "negative_prompt='noise'"),
    ):
        with pytest.raises(GenerationError, match=match):
            gen.check(dataclasses.replace(p, **change))
    assert math.isclose(gen.cfg.distill.guidance_max, 6.0)

    # Teacher and student rows side by side in one folder: cost and method in each row.
    codec = LinearCodec(src.card.codec.latent_channels)
    out = str(tmp_path / "side_by_side")
    for model in (teacher, student_run):
        sweep.generate_songs(model, ["a song"], out, seconds=1.0, guidance=4.0, codec=codec)
    rows = {r["distillation"]: r for r in sweep.read_manifest(os.path.join(out, sweep.MANIFEST))[0].values()}
    t, s = rows[""], rows["progressive"]
    assert t["model_evals"] == t["windows"] * t["steps"] * 2 and s["model_evals"] == s["windows"] * 4


# ---------------------------------------------------------------------------
# Calibrating a student's guidance input (audiodiff-calibrate)


def test_a_calibrated_student_is_given_the_scale_asked_for_plus_its_offset(student_run, teacher, tmp_path):
    out = calibrate.write_calibrated(student_run, str(tmp_path / "calibrated"), {"offset": 1.0})
    src, cal = source.WeightsSource(student_run), source.WeightsSource(out)
    assert cal.cfg.distill.guidance_offset == 1.0 and export.read_meta(out)["calibration"] == {"offset": 1.0}
    assert cal.identity(None, cal.default_weights())["hash"] == src.identity(None, "ema")["hash"]
    assert cal.cfg.distill.requested_range() == (1.0, 5.0)
    assert all(1.0 <= g <= 5.0 for g in cal.cfg.sample.guidance)
    codec = LinearCodec(src.card.codec.latent_channels)
    gen, _ = generation.open_generator(src, codec, weights="ema")
    gen_cal, _ = generation.open_generator(cal, codec)
    p = generation.SampleParams.from_section("a song", gen.sample, seconds=2.0, guidance=4.0)
    want = gen.generate_latents([p]).latents[0]
    np.testing.assert_array_equal(
        gen_cal.generate_latents([dataclasses.replace(p, guidance=3.0)]).latents[0], want
    )
    with pytest.raises(
        GenerationError, match=r"guidance=5.5: .* trained for guidance 1 to 5 \(its inputs 1 to 6"
    ):
        gen_cal.check(dataclasses.replace(p, guidance=5.5))
    # Its next phase draws the scales it accepts (and gives it each plus its offset).
    cd = distill_config.get_config(out)
    assert (cd.distill.guidance_min, cd.distill.guidance_max, cd.distill.guidance_offset) == (1.0, 5.0, 0.0)
    with pytest.raises(calibrate.CalibrationError, match="not a distilled student"):
        calibrate.open_student(teacher)
    with pytest.raises(calibrate.CalibrationError, match="exists and is not empty"):
        calibrate.write_calibrated(student_run, out, {"offset": 0.0})


def test_the_calibration_program_finds_the_offset_that_reproduces_the_teacher(student_run, tmp_path):
    """The "teacher" is the uncalibrated student, the student its copy calibrated by +1:
    the copy reproduces the teacher's songs exactly at offset 0 (its input 3 + 0), and
    the fit must find that among the candidates (the one outside its inputs left out)."""
    plus1 = calibrate.write_calibrated(student_run, str(tmp_path / "plus1"), {"offset": 1.0})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"song number {i}"}) + "\n" for i in range(4)))
    out, fitted = tmp_path / "fit", tmp_path / "fitted"
    proc = subprocess.run(
        [
            bin_path("audiodiff-calibrate"),
            f"--student={plus1}",
            f"--teacher={student_run}",
            f"--prompts={prompts}",
            f"--out={out}",
            f"--export={fitted}",
            "--guidance=3",
            "--offsets=-1,0,1,9",
            "--seconds=2",
            "--codec=tests.test_generation:make_codec",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / calibrate.RESULT).read_text())
    assert result["offset"] == 0.0 and list(result["distance_by_offset"]) == ["-1", "0", "1"]
    d = result["distance_by_offset"]
    assert d["0"] < 1e-3 * min(d["-1"], d["1"]) and result["teacher_seed_distance"] > 0
    assert (out / calibrate.PLOT).stat().st_size > 0 and "offset +0" in proc.stdout
    assert source.WeightsSource(str(fitted)).cfg.distill.guidance_offset == 0.0
