r"""What content hashes cost: hashing throughput per core, and their share of saving and restoring.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/integrity_bench.py --config=demo --state=train
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/integrity_bench.py --config=dit:1B --state=weights

1. Throughput of the hashes the standard library offers (and CRC-32), one thread on
   ``--hash_mb`` MiB of random float32, then SHA-256 over the same bytes in 8 pieces on
   the hashing threads (``integrity.pool``), to show how it scales with cores.
2. A DiT-shaped state of random float32 arrays on one CPU device: ``--state=train``
   holds what a training checkpoint holds (params, EMA params and AdamW's two moments,
   16 bytes per parameter), ``--state=weights`` the params and EMA only (8 bytes per
   parameter; the train state of DiT-1B, 16.6 GB, does not fit this 24 GiB machine
   twice). It is saved ``--repeats`` times through the training loop's own
   ``checkpointing.RunCheckpointer`` (asynchronous) with content hashes and without:
   the blocking part (the call until it returns: what the loop waits for) and the time
   until the background write (and hashing) finished. Then the last step is restored
   (``manager.restore``, files in the page cache) and checked against its hashes
   (``integrity.verify_step``), each timed.

Prints one JSON line (``--out_json`` writes it too); medians over the repeats.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from audiodiff_jax.checkpoints import checkpointing, integrity
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.model import make_model

_CONFIG = flags.DEFINE_string("config", "demo", "Model config by name (configs/NAME.py:ARG).")
_STATE = flags.DEFINE_enum("state", "train", ["train", "weights"], "What the saved state holds.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves per mode.")
_HASH_MB = flags.DEFINE_integer("hash_mb", 256, "MiB hashed for the throughput figures.")
_DIR = flags.DEFINE_string("dir", "", "Where the checkpoints go (default: a temporary folder).")
_OUT = flags.DEFINE_string("out_json", "", "Also write the JSON line here.")

ALGORITHMS = {
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "blake2b": lambda b: hashlib.blake2b(b).digest(),
    "sha1": lambda b: hashlib.sha1(b).digest(),
    "md5": lambda b: hashlib.md5(b).digest(),
    "crc32 (zlib, 32-bit)": lambda b: zlib.crc32(b),
}


def throughput(mb: int) -> dict:
    buf = np.random.default_rng(0).standard_normal(mb * 2**18, dtype=np.float32).view(np.uint8)
    out = {}
    for name, fn in ALGORITHMS.items():
        fn(buf[: 1 << 20])
        t0 = time.perf_counter()
        fn(buf)
        out[name] = buf.nbytes / (time.perf_counter() - t0) / 1e9
    pieces = np.array_split(buf, 8)
    t0 = time.perf_counter()
    list(integrity.pool().map(integrity.digest, pieces))
    out[f"sha256, {integrity.pool()._max_workers} threads"] = buf.nbytes / (time.perf_counter() - t0) / 1e9
    return {k: round(v, 3) for k, v in out.items()}


def make_state(cfg_name: str, kind: str) -> dict:
    name, _, arg = cfg_name.partition(":")
    cd = importlib.import_module(f"configs.{name}").get_config(arg or None)
    shapes = make_model(config_lib.from_configdict(cd).model).abstract_params()
    device = jax.devices()[0]
    rng = np.random.default_rng(0)

    def leaf(s):
        return jax.device_put(rng.standard_normal(s.shape, np.float32), device)

    fields = ("params", "ema_params") + (("mu", "nu") if kind == "train" else ())
    state = {f: jax.tree.map(leaf, shapes) for f in fields}
    state["step"] = jax.device_put(np.int32(1), device)
    return state


def main(argv):
    del argv
    report = {"config": _CONFIG.value, "state": _STATE.value, "hash_gb_per_s": throughput(_HASH_MB.value)}
    print(json.dumps(report["hash_gb_per_s"]), flush=True)
    root = _DIR.value or tempfile.mkdtemp(prefix="integrity_bench_")
    state = make_state(_CONFIG.value, _STATE.value)
    leaves = jax.tree.leaves(state)
    report["state_gb"] = round(sum(x.nbytes for x in leaves) / 1e9, 3)
    report["params"] = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    saves = {}
    for hashes in (False, True, False, True):  # interleaved: the machine's load drifts
        mode = "hashes" if hashes else "no hashes"
        workdir = os.path.join(root, mode.replace(" ", "_"))
        ckpt = checkpointing.RunCheckpointer(
            workdir, keep_last=1, keep_every=0, async_save=True, item_names=("state",), content_hashes=hashes
        )
        step0 = len(ckpt.all_steps()) and max(ckpt.all_steps())
        for r in range(_REPEATS.value):
            t0 = time.perf_counter()
            ckpt.save(step0 + r + 1, state)
            blocking = time.perf_counter() - t0
            ckpt.wait()
            total = time.perf_counter() - t0
            saves.setdefault(mode, []).append((blocking, total))
            print(f"[{mode}] save: blocking {blocking:.3f} s, until written {total:.2f} s", flush=True)
        ckpt.close()
    report["save"] = {
        mode: {
            "blocking_s": round(statistics.median(b for b, _ in runs), 3),
            "written_s": round(statistics.median(t for _, t in runs), 2),
            "runs": [[round(b, 3), round(t, 2)] for b, t in runs],
        }
        for mode, runs in saves.items()
    }
    del state, leaves
    gc.collect()
    workdir = os.path.join(root, "hashes")
    ckpt = checkpointing.RunCheckpointer(
        workdir, keep_last=1, keep_every=0, async_save=True, item_names=("state",)
    )
    step = ckpt.latest_step()
    restores, checks = [], []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        restored = ckpt.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        jax.block_until_ready(restored.state)
        restores.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        integrity.verify_step(ckpt.directory / str(step), restored.state, where=f"step {step}")
        checks.append(time.perf_counter() - t0)
        print(f"restore {restores[-1]:.2f} s, check {checks[-1]:.2f} s", flush=True)
        del restored
        gc.collect()
    ckpt.close()
    report["restore_s"] = round(statistics.median(restores), 2)
    report["check_s"] = round(statistics.median(checks), 2)
    report["machine"] = f"{os.cpu_count()} cores, jax {jax.__version__}, {jax.devices()[0].platform}"
    if not _DIR.value:
        shutil.rmtree(root, ignore_errors=True)
    line = json.dumps(report)
    print(line)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
