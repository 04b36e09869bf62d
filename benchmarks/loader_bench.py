"""Benchmark of the Grain loader: latent frames per second delivered to the host.

    python benchmarks/loader_bench.py --window_frames=6460 --batch=8 --workers=0

Writes demo shards of long clips to a temporary folder (or reads ``--shards_dir``),
then times ``--batches`` batches after ``--warmup``. DESIGN.md's target: at least 10x
the frames per second that a host's training step consumes (compare with
``benchmarks/train_bench.py``). Prints one JSON line.
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app, flags

from audiodiff_jax import config as config_lib
from audiodiff_jax.data import loader
from data_pipeline import demo_shards

_SHARDS = flags.DEFINE_string("shards_dir", "", "Existing shards (default: write demo shards).")
_CHANNELS = flags.DEFINE_integer("latent_channels", 64, "Latent channels of the demo shards.")
_WINDOW = flags.DEFINE_integer("window_frames", 6460, "Training window.")
_BATCH = flags.DEFINE_integer("batch", 8, "Per-host batch.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Grain worker processes.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches.")


def main(argv):
    del argv
    shards_dir = _SHARDS.value
    if not shards_dir:
        shards_dir = tempfile.mkdtemp(prefix="loader_bench_")
        demo_shards.write_demo_shards(
            shards_dir,
            num_clips=64,
            latent_channels=_CHANNELS.value,
            num_shards=4,
            seed=0,
            vocab_size=256,
            max_frames=2 * _WINDOW.value,
        )
    cfg = config_lib.replace(
        config_lib.Config(),
        **{
            "data.shards_dir": shards_dir,
            "data.window_frames": _WINDOW.value,
            "data.global_batch_size": _BATCH.value,
            "data.worker_count": _WORKERS.value,
        },
    )
    it = iter(loader.make_dataset(cfg.data, text_max_len=128, process_index=0, process_count=1))
    for _ in range(_WARMUP.value):
        next(it)
    t0 = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(it)
    dt = (time.perf_counter() - t0) / _BATCHES.value
    print(
        json.dumps(
            {
                "window_frames": _WINDOW.value,
                "batch": _BATCH.value,
                "latent_channels": _CHANNELS.value,
                "workers": _WORKERS.value,
                "batch_time_s": round(dt, 5),
                "latent_frames_per_s": round(_BATCH.value * _WINDOW.value / dt, 1),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
