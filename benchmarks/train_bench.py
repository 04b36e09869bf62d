"""Benchmark of the training step: step time, latent frames per second, TFLOP/s, MFU.

    python benchmarks/train_bench.py --config=configs/dit.py:1B \
        --config.data.window_frames=6460 --config.data.global_batch_size=8 --steps=20

Runs the real jitted, sharded, donated ``train_step`` of ``audiodiff_jax/train.py`` on
random latents already on the devices (the loader is benchmarked separately by
``benchmarks/loader_bench.py``), after ``--warmup`` steps that include compilation.
Model FLOPs follow ``audiodiff_jax/flops.py`` (no remat recompute, the MFU convention);
the peak is the device's dense bf16 peak (``flops.peak_flops_per_device``) or
``--config.train.peak_tflops_per_device``. Prints one JSON line; record it in
BENCHMARKS.md with the command and the machine.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from audiodiff_jax import config as config_lib
from audiodiff_jax import flops, sharding
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.data.batch import Batch, Conditioning
from audiodiff_jax.train import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compile included).")


def random_batch(cfg, mesh) -> Batch:
    """A :class:`Batch` of random latents and captions (``batch_spec`` shapes), on the devices."""
    shapes, _ = batch_lib.config_batch_spec(cfg)
    rng = np.random.default_rng(0)
    b, t = shapes.loss_mask.shape
    host = Batch(
        latents=rng.standard_normal(shapes.latents.shape, dtype=np.float32),
        loss_mask=np.ones((b, t), np.float32),
        cond=Conditioning(
            tokens=rng.integers(4, cfg.model.text.vocab_size, shapes.cond.tokens.shape).astype(np.int32),
            seconds_start=np.zeros((b,), np.float32),
            seconds_total=np.full((b,), 300.0, np.float32),
            num_frames=np.full((b,), t, np.int32),
        ),
    )
    return jax.device_put(host, batch_lib.batch_shardings(mesh))


def main(argv):
    del argv
    cfg = config_lib.from_configdict(_CONFIG.value)
    config_lib.validate(cfg, num_devices=jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(cfg.train.seed)
    batch = random_batch(cfg, mesh)
    t0 = time.perf_counter()
    for _ in range(_WARMUP.value):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / _STEPS.value
    step_flops = flops.train_flops_per_step(
        cfg.model, cfg.data.global_batch_size, cfg.data.window_frames, cfg.model.text.max_len
    )
    peak = cfg.train.peak_tflops_per_device * 1e12 or flops.peak_flops_per_device(jax.devices()[0])
    tflops = step_flops / dt / jax.device_count() / 1e12
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    report = {
        "preset": cfg.model.preset,
        "params_M": round(n_params / 1e6, 2),
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        "remat": cfg.model.remat,
        "global_batch": cfg.data.global_batch_size,
        "window_frames": cfg.data.window_frames,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "mesh": dict(mesh.shape),
        "warmup_incl_compile_s": round(warmup_s, 2),
        "step_time_s": round(dt, 4),
        "latent_frames_per_s": round(cfg.data.global_batch_size * cfg.data.window_frames / dt, 1),
        "model_tflop_per_step": round(step_flops / 1e12, 4),
        "tflops_per_s_per_device": round(tflops, 3),
        "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
        "loss": float(jnp.asarray(metrics["train/loss"])),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
