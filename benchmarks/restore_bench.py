r"""Weights-only restore: time and host memory, from an Orbax checkpoint against from an export.

    PYTHONPATH=. .venv/bin/python benchmarks/restore_bench.py --config=dit:1B --dir=/tmp/restore_bench

Writes, once, a DiT-shaped train state (random float32 params, EMA params and AdamW's
two moments: what a training checkpoint holds) as an Orbax checkpoint step, and the
same params as an export folder (``audiodiff_jax/checkpoints/export.py``). Then, each in a fresh
process, restores the EMA weights onto a one-device mesh: from the checkpoint with
``checkpointing.restore_weight_sets`` (the optimizer state is not read) and from the
export with ``export.load_params``. Reports wall time and the process's peak resident
memory above what it held before the restore (anonymous resident memory, ``RssAnon``,
polled every 5 ms while the restore runs: mapped file pages are not counted), median of ``--repeats``
fresh processes, and checks that both give the same arrays.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "dit:1B", "Model config by name (configs/NAME.py:ARG).")
_DIR = flags.DEFINE_string("dir", "/tmp/restore_bench", "Where the checkpoint and the export are written.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh processes per source.")
_MODE = flags.DEFINE_string(
    "mode", "", "Internal: 'checkpoint' or 'export' runs one restore and prints JSON."
)


def _model_cfg():
    import importlib

    from audiodiff_jax.core import config as config_lib

    name, _, arg = _CONFIG.value.partition(":")
    return config_lib.from_configdict(
        importlib.import_module(f"configs.{name}").get_config(arg or None)
    ).model


def _abstract(sharded: bool):
    import jax

    from audiodiff_jax.core import sharding
    from audiodiff_jax.core.config import MeshConfig
    from audiodiff_jax.model import make_model

    model = make_model(_model_cfg())
    shapes = model.abstract_params()
    if not sharded:
        return shapes
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    return sharding.with_shardings(shapes, sharding.named_shardings(model.logical_axes(), mesh))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            # Anonymous memory only: pages of a memory-mapped file (safetensors reads through
            # mmap) count in VmRSS but are page cache the kernel can drop, not allocations.
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _write(root: str) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from audiodiff_jax.checkpoints import export

    ckpt, exp = os.path.join(root, "checkpoints", "1"), os.path.join(root, "export")
    if os.path.exists(os.path.join(exp, export.META)) and os.path.exists(ckpt):
        return
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), _abstract(False))
    n = sum(x.size for x in jax.tree.leaves(params))
    # The weights-only restore reads the EMA's arrays by key and nothing else, so the
    # optimizer moments are left out of the file (with them the state is 4x the params,
    # 16 GiB at 1B, more than this benchmark's 24 GiB machine can write beside the export).
    print(f"writing {n / 1e9:.3f}B params: a checkpoint with params and EMA; an export", flush=True)
    state = {"params": params, "ema_params": params, "step": 1}
    t0 = time.perf_counter()
    # Host copies in flight are capped (by default every array is copied first: 4 x 4 GiB at 1B).
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=2, save_device_host_concurrent_gb=2)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.join(ckpt, "state"), args=ocp.args.PyTreeSave(state))
    print(f"checkpoint written in {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    item = {"config": {}, "dataset_card": {}, "tokenizer": {}}
    export.write(exp, params, weights="ema", aliases=[], step=1, source=ckpt, json_items=item)
    print(f"export written in {time.perf_counter() - t0:.1f}s", flush=True)


def _one(mode: str) -> None:
    import jax
    import numpy as np
    from etils import epath

    from audiodiff_jax.checkpoints import checkpointing, export

    root = _DIR.value
    abstract = _abstract(True)
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def poll():  # the resident set while the restore runs (ru_maxrss would include start-up)
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    if mode == "checkpoint":
        params = checkpointing.restore_weight_sets(epath.Path(root) / "checkpoints" / "1", ["ema"], abstract)[
            "ema"
        ]
    else:
        params = export.load_params(os.path.join(root, "export"), abstract)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    done.set()
    poller.join()
    leaves = jax.tree.leaves(params)
    digest = float(sum(np.asarray(x, np.float64).sum() for x in leaves[:8]))
    n = sum(x.size for x in leaves)
    print(
        json.dumps(
            {
                "mode": mode,
                "seconds": seconds,
                "peak_above_mib": peak[0] - base,
                "params": n,
                "digest": digest,
            }
        )
    )


def main(argv):
    del argv
    if _MODE.value:
        _one(_MODE.value)
        return
    _write(_DIR.value)
    results = {}
    for mode in ("checkpoint", "export"):
        runs = []
        for _ in range(_REPEATS.value):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--mode={mode}",
                    f"--config={_CONFIG.value}",
                    f"--dir={_DIR.value}",
                ],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, JAX_PLATFORMS="cpu"),
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[mode] = runs
    digests = {r["digest"] for rs in results.values() for r in rs}
    assert len(digests) == 1, f"the two sources gave different weights: {digests}"
    n = results["export"][0]["params"]
    print(
        f"{_CONFIG.value}: {n / 1e9:.3f}B params, {n * 4 / 2**30:.2f} GiB float32; median of {_REPEATS.value}"
    )
    for mode, runs in results.items():
        sec = statistics.median(r["seconds"] for r in runs)
        mem = statistics.median(r["peak_above_mib"] for r in runs)
        print(f"  {mode:10s}: {sec:6.2f} s, peak host memory above baseline {mem / 1024:6.2f} GiB")


if __name__ == "__main__":
    app.run(main)
