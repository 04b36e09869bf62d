"""Shared helpers of the tests: tiny configs, demo shards, reading checkpoints back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from audiodiff_jax.core import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(shards_dir: str, **changes) -> config_lib.Config:
    from configs import tiny

    cd = tiny.get_config()
    cd.data.shards_dir = shards_dir
    cfg = config_lib.from_configdict(cd)
    return config_lib.replace(cfg, **changes) if changes else cfg


def random_export(cfg: config_lib.Config, out: str, seed: int, *, jitter: float = 0.05) -> str:
    """An export (``audiodiff-export``'s folder) of ``cfg``'s model whose every parameter
    is random: its init at ``seed`` plus ``jitter`` of noise, so that no layer starts at
    zero (a trained model has none either). The card and tokenizer are its shards'."""
    import dataclasses

    import jax

    from audiodiff_jax.checkpoints import export
    from audiodiff_jax.data import loader
    from audiodiff_jax.data.cards import DatasetCard
    from audiodiff_jax.data.tokenizer import Tokenizer
    from audiodiff_jax.model import make_model

    params = make_model(cfg.model).init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda x: np.asarray(x) + jitter * rng.standard_normal(x.shape).astype(np.float32), params
    )
    card = DatasetCard.load(cfg.data.shards_dir)
    items = {
        "config": dataclasses.asdict(cfg),
        "dataset_card": card.to_dict(),
        "tokenizer": Tokenizer(loader.resolve_tokenizer_path(cfg.data, card)).to_json(),
    }
    return export.write(
        str(out), params, weights="ema0.999", aliases=["ema"], step=0, source="random", json_items=items
    )


def write_shards(out_dir: str, *, num_clips: int = 48, latent_channels: int = 8, num_shards: int = 2) -> str:
    from data_pipeline import demo_shards

    demo_shards.write_demo_shards(
        out_dir,
        num_clips=num_clips,
        latent_channels=latent_channels,
        num_shards=num_shards,
        seed=0,
        vocab_size=256,
    )
    return out_dir


def bin_path(name: str) -> str:
    """A console script of this package, installed beside the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), name)


def read_state(workdir: str, step: int | None = None) -> dict:
    """The saved train state of a run as numpy arrays (restored without a mesh)."""
    import orbax.checkpoint as ocp
    from etils import epath  # local or gs:// workdirs

    root = epath.Path(workdir) / "checkpoints"
    if step is None:
        step = max(int(d.name) for d in root.iterdir() if d.name.isdigit())
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(root / str(step) / "state")
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        import jax

        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(root / str(step) / "state", restore_args=restore_args)


def assert_trees_equal(a, b, what: str):
    import jax

    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"{what}: tree structures differ"
    for (path, x), (_, y) in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{jax.tree_util.keystr(path)}: shape/dtype"
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8)), (
            f"{what}{jax.tree_util.keystr(path)} differs"
        )


def last_logged_step(workdir: str) -> int:
    """The last step a run wrote to ``metrics.jsonl`` (0 before the first)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line).get("step", 0) for line in open(path) if line.strip()]
    return max(steps, default=0)


def wait_then_sigterm(proc, workdir: str, at_step: int, timeout: float = 300) -> int:
    """Sends SIGTERM once the run logged ``at_step``; returns its exit status."""
    start = time.monotonic()
    while last_logged_step(workdir) < at_step:
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() - start < timeout, "run made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def run_side_by_side(
    commands: dict[str, list[str]], *, cwd: str, timeout: float
) -> dict[str, subprocess.CompletedProcess]:
    """Runs the commands at once (each mostly imports, so they overlap well) on CPU;
    name -> finished process. A command still running after ``timeout`` is killed."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {
        name: subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done
