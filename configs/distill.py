"""Distillation runs: a few-step student of a teacher (``audiodiff_jax/training/distill_trainer.py``).

    audiodiff-train --config=configs/distill.py:TEACHER --workdir=runs/student8 \
        --config.data.shards_dir=latents/train

``TEACHER`` is a run's workdir (or one of its step folders) or an export
(``audiodiff-export``); ``demo`` names the DiT shipped in ``audiodiff_jax/demo_weights``.
The model, the diffusion settings, the training window and the sampling defaults are
the teacher's, read from it, with ``model.guidance_input`` on (the student takes the
guidance scale). The shards must be encoded like the teacher's data
(``audiodiff-precompute --like=TEACHER``).

A teacher that samples with classifier-free guidance gives an 8-step student (4 teacher
DDIM steps per student step); a teacher that is itself a student gives one of half its
steps (``substeps = 2``): progressive distillation, one phase per halving.

After training, ``audiodiff-calibrate`` fits the student's guidance input to the teacher
on captions it trained on (``distill.guidance_offset``: a few-step student tends to sound
like its teacher at a lower scale). The recipe was measured on the demo model
(BENCHMARKS.md, "Few-step students").
"""

from audiodiff_jax.checkpoints import source


def get_config(arg=None):
    if not arg:
        raise ValueError(
            "configs/distill.py needs its teacher: --config=configs/distill.py:TEACHER "
            "(a run, a checkpoint step or an export; 'demo' is the shipped demo DiT)"
        )
    teacher = source.resolve(arg)
    config, saved = source.configdict_like(teacher)
    config.model.guidance_input = True
    config.data.cfg_dropout = saved.data.cfg_dropout
    config.data.control_dropout = saved.data.control_dropout
    config.distill.teacher = teacher
    if saved.model.guidance_input:  # a student: the next phase halves its steps
        config.distill.steps = max(saved.distill.steps // 2, 1)
        config.distill.substeps = saved.distill.steps // config.distill.steps
        config.distill.schedule = saved.distill.schedule
        # The scales the teacher-student accepts (its trained range, calibrated).
        low, high = saved.distill.requested_range()
        config.distill.guidance_min = low
        config.distill.guidance_max = high
    else:
        config.distill.steps = 8
        config.distill.substeps = 4
        # The teacher's own sampler (DPM++(2M)) over each student step: its 32-step DDIM
        # ends 2x as far from its 50-step songs as another seed does (BENCHMARKS.md).
        config.distill.teacher_sampler = "dpmpp_2m"
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 50
    config.optim.ema_decay = 0.995
    config.train.num_steps = 1000
    config.train.log_every = 25
    config.checkpoint.every_steps = 250
    return config
