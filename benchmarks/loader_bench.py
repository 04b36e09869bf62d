"""Benchmark of the Grain loader: latent frames per second delivered to the host.

    python benchmarks/loader_bench.py --window_frames=6460 --batch=8 --workers=0,1,2

Writes demo shards of long clips to a temporary folder (or reads ``--shards_dir``),
then, for each ``--workers`` count (``data.worker_count``: Grain worker processes via
``mp_prefetch``, 0 = in the main process), times ``--batches`` batches after
``--warmup`` (the warm-up absorbs the workers' start). Reports frames/s, frames/s per
worker process and per CPU core the pipeline can use (the workers, or with none the
``data.prefetch`` threads of the main process, at most the cores).
docs/DESIGN.md's target: at least 10x the frames per second that a host's accelerators
consume (compare with ``benchmarks/train_bench.py``). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app, flags

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.data import loader
from data_pipeline import demo_shards


def write_shards(out_dir: str, window_frames: int, latent_channels: int, num_clips: int = 64) -> str:
    demo_shards.write_demo_shards(
        out_dir,
        num_clips=num_clips,
        latent_channels=latent_channels,
        num_shards=4,
        seed=0,
        vocab_size=256,
        max_frames=2 * window_frames,
    )
    return out_dir


def time_loader(
    shards_dir: str,
    *,
    window_frames: int,
    batch: int,
    workers: int,
    batches: int,
    warmup: int,
    prefetch: int = 2,
) -> dict:
    """Frames/s of the loader of ``data.worker_count=workers`` on ``shards_dir``."""
    cfg = config_lib.replace(
        config_lib.Config(),
        **{
            "data.shards_dir": shards_dir,
            "data.window_frames": window_frames,
            "data.global_batch_size": batch,
            "data.worker_count": workers,
            "data.prefetch": prefetch,
        },
    )
    ds = loader.make_dataset(cfg.data, text_max_len=128, process_index=0, process_count=1)
    it = iter(ds)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = (time.perf_counter() - t0) / batches
    del it  # stops the worker processes
    cores = os.cpu_count() or 1
    fps = batch * window_frames / dt
    # In the main process (0 workers) the batches are built by ``prefetch`` threads.
    used = min(workers if workers else max(prefetch, 1), cores)
    return {
        "workers": workers,
        "prefetch": prefetch,
        "warmup_s": round(warmup_s, 3),
        "batch_time_s": round(dt, 5),
        "latent_frames_per_s": round(fps, 1),
        "frames_per_s_per_worker": round(fps / max(workers, 1), 1),
        "cores_used": used,
        "frames_per_s_per_core": round(fps / used, 1),
    }


def run(
    *,
    window_frames: int,
    batch: int,
    latent_channels: int,
    workers: list[int],
    batches: int,
    warmup: int,
    shards_dir: str = "",
    prefetch: int = 2,
    num_clips: int = 64,
) -> dict:
    """One row per worker count (see :func:`time_loader`)."""
    own = not shards_dir
    if own:
        shards_dir = write_shards(
            tempfile.mkdtemp(prefix="loader_bench_"), window_frames, latent_channels, num_clips
        )
    try:
        rows = []
        for w in workers:
            row = time_loader(
                shards_dir,
                window_frames=window_frames,
                batch=batch,
                workers=w,
                batches=batches,
                warmup=warmup,
                prefetch=prefetch,
            )
            print(f"[loader_bench] {json.dumps(row)}", flush=True)
            rows.append(row)
    finally:
        if own:
            shutil.rmtree(shards_dir, ignore_errors=True)
    return {
        "window_frames": window_frames,
        "batch": batch,
        "latent_channels": latent_channels,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "best_latent_frames_per_s": max(r["latent_frames_per_s"] for r in rows),
    }


def main(argv):
    del argv
    result = run(
        window_frames=_WINDOW.value,
        batch=_BATCH.value,
        latent_channels=_CHANNELS.value,
        workers=[int(w) for w in _WORKERS.value],
        batches=_BATCHES.value,
        warmup=_WARMUP.value,
        shards_dir=_SHARDS.value,
        prefetch=_PREFETCH.value,
    )
    print(json.dumps(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    # Flags are defined here, not at import, so benchmarks/suite.py can import every bench.
    _SHARDS = flags.DEFINE_string("shards_dir", "", "Existing shards (default: write demo shards).")
    _CHANNELS = flags.DEFINE_integer("latent_channels", 64, "Latent channels of the demo shards.")
    _WINDOW = flags.DEFINE_integer("window_frames", 6460, "Training window.")
    _BATCH = flags.DEFINE_integer("batch", 8, "Per-host batch.")
    _WORKERS = flags.DEFINE_list("workers", ["0"], "Grain worker process counts to time.")
    _PREFETCH = flags.DEFINE_integer("prefetch", 2, "data.prefetch: batches (and threads) in flight.")
    _BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches.")
    _WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches (worker start included).")
    _OUT = flags.DEFINE_string("out_json", "", "Also write the figures here.")
    app.run(main)
