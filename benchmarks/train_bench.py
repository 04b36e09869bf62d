"""Benchmark of the training step: step time, TFLOP/s, MFU, peak memory, and checkpoint cost.

    python benchmarks/train_bench.py --config=configs/dit.py:1B \
        --config.data.window_frames=6460 --config.data.global_batch_size=2 --steps=20 \
        --saves=2 --save_dir=/tmp/train_bench_ckpt

Runs the real jitted, sharded, donated ``train_step`` of ``audiodiff_jax/training/dit_trainer.py`` on
random latents already on the devices (the loader is benchmarked separately by
``benchmarks/loader_bench.py``), after ``--warmup`` steps that include compilation.
Model FLOPs follow ``audiodiff_jax/core/flops.py`` (no remat recompute, the MFU convention);
the peak is the device's dense bf16 peak (``flops.PEAK_BF16_FLOPS``, sources there) or
``--config.train.peak_tflops_per_device``. Peak memory is the device allocator's peak
(``memory_stats``) where the backend reports one, else the process's peak resident set.

With ``--profile_dir=DIR`` it then traces ``--profile_steps`` more steps
(``jax.profiler``, each step marked ``train`` with its number) into
``DIR/plugins/profile/train_PRESET_BxT/HOST.xplane.pb``, for TensorBoard's profile plugin
(``tensorboard --logdir=DIR``); the figures name the file.

With ``--saves=N`` it then saves the real train state N times through the training
loop's own ``checkpointing.RunCheckpointer`` (asynchronous, as ``checkpoint.async_save``),
a few steps apart, and reports the blocking part of each save (what the loop waits for
before its next step: the copy of the state off the devices) against the mean step
time, per save and spread over ``checkpoint.every_steps`` steps, and the time the
background write took to finish. Prints one JSON line (``--out_json`` writes it too).
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from audiodiff_jax.checkpoints import checkpointing
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import flops, profiler, sharding
from audiodiff_jax.core.config import Config
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.data.batch import Batch, Conditioning
from audiodiff_jax.training.dit_trainer import Trainer

GIB = 2.0**30


def random_batch(cfg: Config, mesh) -> Batch:
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


def peak_memory() -> tuple[float, str]:
    """(GiB, what): the largest device allocator peak, else this process's peak RSS."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
    if max(peaks, default=0) > 0:
        return max(peaks) / GIB, "device peak_bytes_in_use (largest device)"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host peak RSS (no device stats)"


def checkpoint_cost(trainer: Trainer, state, batch: Batch, saves: int, save_dir: str, steps_between: int):
    """Saves ``state`` ``saves`` times (async, ``steps_between`` train steps apart).

    Returns (state, figures): the blocking seconds of each ``save`` call, and the wait
    for the last background write."""
    ckpt = checkpointing.RunCheckpointer(
        save_dir, keep_last=2, keep_every=0, async_save=True, item_names=("state",)
    )
    blocking = []
    try:
        for i in range(saves):
            for _ in range(steps_between):
                state, metrics = trainer.step(state, batch)
            jax.block_until_ready((state, metrics))
            t0 = time.perf_counter()
            ckpt.save(i + 1, state)
            blocking.append(time.perf_counter() - t0)
            print(f"[train_bench] save {i + 1}/{saves}: blocking {blocking[-1]:.3f} s", flush=True)
        t0 = time.perf_counter()
        ckpt.wait()
        wait_s = time.perf_counter() - t0
    finally:
        ckpt.close()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return state, {
        "state_gib": round(state_bytes / GIB, 3),
        "saves": saves,
        "save_blocking_s": [round(b, 4) for b in blocking],
        "save_blocking_median_s": round(statistics.median(blocking), 4),
        "last_save_background_wait_s": round(wait_s, 3),
    }


def trace_steps(trainer: Trainer, state, batch: Batch, steps: int, logdir: str, run: str):
    """Traces ``steps`` train steps into ``logdir`` (run ``run``); returns (state, figures)."""
    jax.block_until_ready(state)  # the steps before stay out of the trace
    trace = profiler.Trace(logdir, run)
    t0 = time.perf_counter()
    trace.start()
    for i in range(steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=i + 1):
            state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    traced_s = time.perf_counter() - t0
    write_s = trace.stop()
    print(f"[train_bench] profile of {steps} steps: {trace.path}", flush=True)
    return state, {
        "steps": steps,
        "logdir": logdir,
        "run": run,
        "trace": str(trace.path) if trace.path else None,
        "traced_s": round(traced_s, 3),
        "write_s": round(write_s, 3),
    }


def run(
    cfg: Config,
    *,
    steps: int,
    warmup: int,
    saves: int = 0,
    save_dir: str = "",
    profile_dir: str = "",
    profile_steps: int = 2,
) -> dict:
    """Times ``steps`` train steps of ``cfg`` (after ``warmup``), optionally traces
    ``profile_steps`` more into ``profile_dir`` and times ``saves`` checkpoint saves;
    returns the figures (see the module docstring)."""
    config_lib.validate(cfg, num_devices=jax.device_count())
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(cfg.train.seed)
    batch = random_batch(cfg, mesh)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    print(f"[train_bench] {warmup} warm-up steps (compile included): {warmup_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / steps
    step_flops = flops.train_flops_per_step(
        cfg.model, cfg.data.global_batch_size, cfg.data.window_frames, cfg.model.text.max_len
    )
    peak = trainer.peak_flops
    tflops = step_flops / dt / jax.device_count() / 1e12
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    mem_gib, mem_kind = peak_memory()
    device = jax.devices()[0]
    report = {
        "preset": cfg.model.preset,
        "params_M": round(n_params / 1e6, 2),
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        "remat": cfg.model.remat,
        "global_batch": cfg.data.global_batch_size,
        "window_frames": cfg.data.window_frames,
        "devices": f"{jax.device_count()} x {device.device_kind}",
        "mesh": dict(mesh.shape),
        "warmup_incl_compile_s": round(warmup_s, 2),
        "step_time_s": round(dt, 4),
        "latent_frames_per_s": round(cfg.data.global_batch_size * cfg.data.window_frames / dt, 1),
        "model_tflop_per_step": round(step_flops / 1e12, 4),
        "tflops_per_s_per_device": round(tflops, 4),
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "peak_source": (
            "config train.peak_tflops_per_device"
            if cfg.train.peak_tflops_per_device
            else ("flops.PEAK_BF16_FLOPS" if peak else f"unknown for {device.device_kind!r}")
        ),
        "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
        "peak_memory_gib": round(mem_gib, 3),
        "peak_memory_kind": mem_kind,
        "loss": float(jnp.asarray(metrics["train/loss"])),
    }
    if profile_dir:
        run_name = (
            f"train_{cfg.model.preset or 'custom'}_{cfg.data.global_batch_size}x{cfg.data.window_frames}"
        )
        state, report["profile"] = trace_steps(trainer, state, batch, profile_steps, profile_dir, run_name)
    if saves:
        own_dir = not save_dir
        save_dir = save_dir or tempfile.mkdtemp(prefix="train_bench_ckpt_")
        try:
            state, ck = checkpoint_cost(trainer, state, batch, saves, save_dir, steps_between=2)
        finally:
            if own_dir:
                shutil.rmtree(save_dir, ignore_errors=True)
        every = cfg.checkpoint.every_steps
        ck.update(
            checkpoint_every_steps=every,
            save_blocking_share_of_step=round(ck["save_blocking_median_s"] / dt, 4),
            save_blocking_share_of_training=round(ck["save_blocking_median_s"] / (every * dt), 6),
        )
        report["checkpoint"] = ck
    return report


def main(argv):
    del argv
    cfg = config_lib.from_configdict(_CONFIG.value)
    report = run(
        cfg,
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        saves=_SAVES.value,
        save_dir=_SAVE_DIR.value,
        profile_dir=_PROFILE_DIR.value,
        profile_steps=_PROFILE_STEPS.value,
    )
    print(json.dumps(report))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    # Flags are defined here, not at import, so benchmarks/suite.py can import every bench.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
    _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compile included).")
    _SAVES = flags.DEFINE_integer("saves", 0, "Asynchronous checkpoint saves to time (0 = none).")
    _SAVE_DIR = flags.DEFINE_string("save_dir", "", "Where the saves go (default: a temporary folder).")
    _PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Trace --profile_steps steps into this log folder.")
    _PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Steps traced with --profile_dir.")
    _OUT = flags.DEFINE_string("out_json", "", "Also write the figures here.")
    app.run(main)
