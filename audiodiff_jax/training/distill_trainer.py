"""Distilling a few-step student from a teacher: a trainer on the shared loop.

A distillation run is a DiT run whose config names a teacher (``distill.teacher``: a
run's checkpoint or an export; ``configs/distill.py:TEACHER`` copies the model from it and
turns on ``model.guidance_input``). The method (``distill.method = "progressive"``):

- **Progressive distillation** (Salimans & Ho 2022) in one phase of ratio
  ``distill.substeps``, as TRACT's time distillation (Berthelot et al. 2023): each row
  draws a step ``i`` of the student's ``distill.steps``-step grid, noises its latents to
  ``t_i``, lets the teacher take ``substeps`` deterministic DDIM steps down to
  ``t_{i+1}`` (``diffusion/distill.py``, in memory, inside the step) and teaches the
  student the v for which ONE DDIM step lands on the teacher's end point.
- **Guidance distillation** (Meng et al. 2023, "On Distillation of Guided Diffusion
  Models"): the teacher's steps use classifier-free guidance at a scale ``w`` drawn per
  row in ``[distill.guidance_min, distill.guidance_max]`` (its unconditional branch the
  empty caption without controls, as sampling runs it); the student takes ``w`` as an
  input (``model.guidance_input``) and evaluates once per step. Evaluators still sweep
  the guidance scale.
- **A student as teacher** (``model.guidance_input`` in the teacher) is run as it samples:
  its own DDIM grid, one evaluation per step at the row's ``w``. So 8 -> 4 steps is a
  second phase with ``substeps = 2`` (``configs/distill.py``).

Everything else is a DiT run's: the train state (the student's weights, AdamW, EMAs),
the loop (resume, SIGTERM save, asynchronous checkpoints, goodput, evaluation), the data
(Grain shards encoded like the teacher's; masked-context draws for the known frames,
which the teacher's steps keep as sampling does). The teacher's weights are an input of
the step that nothing differentiates, updates or donates. Checkpoints hold the student
only, and, as the JSON item ``distill``, the method, its grid and the teacher's identity
(name and content hash); a resumed run refuses a teacher whose hash differs.

The student starts as the teacher (its guidance embedder at zero output, so it first
predicts the teacher's conditional v). After training, ``audiodiff-calibrate``
(``sweeps/calibrate.py``) may set ``distill.guidance_offset``: what sampling adds to the
scale asked for before it enters the student, and what a next phase adds to the scale it
gives a student-teacher. Its config's sample section is set to what it
was trained for (``ddim``, ``distill.steps``, ``distill.schedule``): a checkpoint or
export of it samples right by default, and ``Generator.check`` refuses other steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from audiodiff_jax.checkpoints import checkpointing, export, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import names, sharding
from audiodiff_jax.core.config import Config, ConfigError
from audiodiff_jax.data.batch import Batch
from audiodiff_jax.diffusion import distill, objective, samplers
from audiodiff_jax.model import make_model
from audiodiff_jax.training import adapter_trainer, dit_trainer, loop
from audiodiff_jax.training.dit_trainer import TrainState

GUIDANCE = "guidance_embedder"  # model/dit.py: the student's guidance input
# Model fields a student may set its own way besides the execution ones.
STUDENT_FIELDS = adapter_trainer.EXECUTION_FIELDS + ("model.guidance_input",)
GUIDANCE_STREAM = 13  # fold_in index of the guidance-scale draws within a step's key
INDEX_STREAM = 14  # ... and of the grid-step draws


def teacher_is_student(teacher_cfg: Config) -> bool:
    return bool(teacher_cfg.model.guidance_input)


def make_distill_step(
    cfg: Config,
    student_fns,
    teacher_fns,
    tx,
    schedule,
    *,
    uncond_tokens: np.ndarray,
    guided_teacher: bool,
    teacher_offset: float = 0.0,
):
    """Builds ``step(state, batch, teacher_params) -> (state, metrics)`` (module docstring).

    ``uncond_tokens [L]``: the empty caption, the unconditional branch of a guided teacher;
    ``teacher_offset``: a student-teacher's calibration (``distill.guidance_offset``)."""
    d = cfg.distill
    _, fine = distill.grids(d.steps, d.substeps, schedule=d.schedule, shift=cfg.diffusion.schedule_shift)
    fine = jnp.asarray(fine)
    m = d.substeps

    def step(state: TrainState, batch: Batch, teacher: Any):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        noise_rng = jax.random.split(rng)[1]
        x0 = batch.latents
        b = x0.shape[0]
        index = jax.random.randint(jax.random.fold_in(rng, INDEX_STREAM), (b,), 0, d.steps)
        times = fine[index[:, None] * m + jnp.arange(m + 1)[None, :]]  # [B, m + 1]
        t, s = times[:, 0], times[:, -1]
        w = jax.random.uniform(
            jax.random.fold_in(rng, GUIDANCE_STREAM), (b,), minval=d.guidance_min, maxval=d.guidance_max
        )
        noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32)
        noise = sharding.constrain(noise, (names.BATCH, names.LENGTH, None))
        z_t, _ = objective.add_noise(x0, noise, t)
        cond, loss_mask, known_mask = dit_trainer.context_draw(cfg, rng, batch)
        known = None if known_mask is None else (x0, noise, known_mask)
        if guided_teacher:
            tokens = jnp.broadcast_to(jnp.asarray(uncond_tokens, jnp.int32), cond.tokens.shape)
            denoise = samplers.guided_denoiser(
                teacher_fns.apply,
                teacher,
                cond,
                uncond_tokens=tokens,
                scale_b=w,
                rescale_b=jnp.zeros_like(w),
            )
        else:  # a student as it samples: its input is the scale asked for, calibrated
            w_in = w + teacher_offset
            denoise = lambda z, tt: teacher_fns.apply(teacher, z, tt, cond._replace(guidance=w_in))
        z_s = distill.teacher_steps(
            denoise, z_t, times, known=known, method=d.teacher_sampler if guided_teacher else "ddim"
        )
        v_target = jax.lax.stop_gradient(distill.ddim_target(z_t, z_s, t, s))
        student_cond = cond._replace(guidance=w)

        def loss_fn(params):
            v = student_fns.apply(params, z_t, t, student_cond)
            return objective.masked_mse(v, v_target, loss_mask)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return dit_trainer.apply_gradients(cfg, tx, schedule, state, loss, grads)

    return step


class DistillTrainer(dit_trainer.Trainer):
    """The DiT trainer of the student, with the teacher on the mesh as a step input."""

    def __init__(
        self,
        cfg: Config,
        mesh: jax.sharding.Mesh,
        teacher_cfg: Config,
        teacher_params: Any = None,
        *,
        uncond_tokens: np.ndarray,
    ):
        """``teacher_params``: host arrays, placed on ``mesh`` here; None builds the jitted
        functions only (ahead-of-time compiles: :meth:`abstract_teacher`)."""
        super().__init__(cfg, mesh)
        self.teacher_cfg = teacher_cfg
        self.teacher_model = make_model(teacher_cfg.model)
        self.teacher_shardings = sharding.named_shardings(self.teacher_model.logical_axes(), mesh)
        self.teacher = (
            None if teacher_params is None else adapter_trainer._place(teacher_params, self.teacher_shardings)
        )
        guided = not teacher_is_student(teacher_cfg)
        # One student step: the teacher's evaluations (two rows each when guided) of m
        # substeps, forward only, besides the student's forward and backward.
        evals = cfg.distill.substeps * (2 if guided else 1)
        self.step_flops = self.step_flops * (1 + evals / 3)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step = make_distill_step(
            cfg,
            self.model,
            self.teacher_model,
            self.tx,
            self.schedule,
            uncond_tokens=uncond_tokens,
            guided_teacher=guided,
            teacher_offset=float(teacher_cfg.distill.guidance_offset) if not guided else 0.0,
        )
        with jax.set_mesh(mesh):
            self.train_step = jax.jit(
                lambda state, teacher, batch: step(state, batch, teacher),
                in_shardings=(self.state_shardings, self.teacher_shardings, self.batch_shardings),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=(0,),
            )

    def abstract_teacher(self) -> Any:
        return sharding.with_shardings(self.teacher_model.abstract_params(), self.teacher_shardings)

    def step(self, state: TrainState, batch: Batch):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, self.teacher, batch)

    def compile(self, state: TrainState, batch: Batch) -> jax.stages.Compiled:
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(state, self.teacher, batch).compile()

    def initial_state(self) -> TrainState:
        """The teacher's weights (a fresh guidance embedder at zero output when it has
        none), or ``train.init_from``'s: a student's, to go on from (another teacher
        sampler, more steps)."""
        cfg = self.cfg
        if cfg.train.init_from:
            return loop.start_state(self.init_state, self.abstract_params, cfg.train)
        params = jax.tree.map(jnp.copy, self.teacher)
        if GUIDANCE not in params:
            fresh = self.init_state(cfg.train.seed).params[GUIDANCE]
            params = {**params, GUIDANCE: fresh}
        logging.info("the student starts as the teacher %s", cfg.distill.teacher)
        return self.init_state(cfg.train.seed, params=params)


def student_config(cfg: Config) -> Config:
    """``cfg`` with the sample section set to what the student is trained for (module docstring)."""
    d = cfg.distill
    return config_lib.replace(
        cfg,
        sample=config_lib.replace(
            cfg.sample,
            samplers=("ddim",),
            steps=(d.steps,),
            schedule=(d.schedule,),
            eta=0.0,
            guidance_rescale=(0.0,),
            negative_prompt="",
            guidance=d.accepted_guidance(cfg.sample.guidance),
        ),
    )


def check_teacher(cfg: Config, teacher: adapter_trainer.Base) -> None:
    """A student-teacher must sample on the grid the student's steps refine."""
    d = cfg.distill
    if teacher_is_student(teacher.cfg):
        td = teacher.cfg.distill
        if td.steps != d.steps * d.substeps or td.schedule != d.schedule:
            raise ConfigError(
                f"distill.teacher={d.teacher!r} is a student of {td.steps} {td.schedule} steps; a student "
                f"of distill.steps={d.steps} with distill.substeps={d.substeps} on {d.schedule!r} needs "
                f"{d.steps * d.substeps} {d.schedule} steps "
                f"(set distill.substeps={max(td.steps // d.steps, 1)})"
            )
        low, high = td.requested_range()
        if not (low <= d.guidance_min and d.guidance_max <= high):
            raise ConfigError(
                f"distill.guidance_min/max=[{d.guidance_min:g}, {d.guidance_max:g}] reaches beyond the "
                f"teacher's [{low:g}, {high:g}]"
            )
    try:
        distill.grids(d.steps, d.substeps, schedule=d.schedule, shift=cfg.diffusion.schedule_shift)
    except ValueError as e:
        raise ConfigError(f"distill.schedule={d.schedule!r}: {e}") from e
    if cfg.diffusion.schedule_shift != teacher.cfg.diffusion.schedule_shift:
        raise ConfigError(
            f"diffusion.schedule_shift={cfg.diffusion.schedule_shift} but the teacher's is "
            f"{teacher.cfg.diffusion.schedule_shift}: their time grids would differ"
        )


def train(
    cfg: Config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    process_start: float | None = None,
    step_timeout_s: float = 0.0,
    make_evaluator: dit_trainer.EvaluatorFactory | None = None,
) -> loop.TrainResult:
    """Distills the student of ``cfg`` from ``distill.teacher`` in ``workdir`` (arguments
    as ``dit_trainer.train``); the teacher and the data are checked before the workdir is
    touched."""
    config_lib.validate(cfg, num_devices=jax.device_count() if mesh is None else mesh.size)
    d = cfg.distill
    teacher = adapter_trainer.Base(d.teacher, d.teacher_weights, field="distill.teacher")
    card = dit_trainer.check_dataset(cfg)
    adapter_trainer.check_against_base(
        cfg,
        card,
        teacher,
        where=f"the teacher distill.teacher={d.teacher!r}",
        model_may_differ=STUDENT_FIELDS,
        why="a student's model is its teacher's (configs/distill.py:TEACHER copies it)",
    )
    check_teacher(cfg, teacher)
    cfg = student_config(cfg)
    adapter_trainer.check_started_on(
        workdir, source.DISTILL_ITEM, "teacher", teacher, f"distill.teacher={d.teacher!r}"
    )
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh)
    logging.info("mesh %s over %d devices, %s", dict(mesh.shape), mesh.size, checkpointing.process_info())
    uncond = teacher.tokenizer.encode("", cfg.model.text.max_len)
    trainer = DistillTrainer(cfg, mesh, teacher.cfg, teacher.params, uncond_tokens=uncond)
    del teacher.params  # on the mesh now
    data_iter, json_items = dit_trainer.data_and_items(cfg, card)
    guided = not teacher_is_student(teacher.cfg)
    json_items[source.DISTILL_ITEM] = {
        "method": d.method,
        "steps": d.steps,
        "substeps": d.substeps,
        "schedule": d.schedule,
        "guidance": [d.guidance_min, d.guidance_max],
        "teacher": teacher.identity,
        "teacher_evals_per_step": 2 if guided else 1,
    }
    logging.info(
        "distillation (%s): a %d-step student from the teacher %s (%s), %d teacher %s steps per "
        "student step%s, guidance %g..%g; %d steps",
        d.method,
        d.steps,
        teacher.identity["name"],
        export.short_hash(teacher.identity["hash"]),
        d.substeps,
        d.teacher_sampler if guided else "ddim",
        " with classifier-free guidance" if guided else " (a student itself)",
        d.guidance_min,
        d.guidance_max,
        cfg.train.num_steps,
    )
    return dit_trainer.run_loop(
        cfg,
        trainer,
        mesh,
        card,
        workdir,
        data_iter,
        json_items,
        step_timeout_s,
        process_start,
        make_evaluator,
    )
