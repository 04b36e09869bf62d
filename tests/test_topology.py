"""A checkpoint resumes on another mesh and another device count (8 fake CPU devices).

Written on a 2x2x2 (data, fsdp, tensor) mesh, it must restore onto a 4x2 (fsdp,
tensor) mesh and onto one device with params, optimizer state and EMA bit for bit
equal to what was saved, on the new shardings, and training must continue from it.
A checkpoint from another process count continues the data stream at the same
global position.
"""

import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest

from audiodiff_jax.checkpoints import checkpointing
from audiodiff_jax.core import sharding
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.data import loader
from audiodiff_jax.training import dit_trainer, loop
from tests.helpers import assert_trees_equal, read_state, tiny_config, write_shards

pytestmark = pytest.mark.slow

MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
MESH_42 = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}
MESH_1 = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def run_222(shards, tmp_path_factory):
    """5 steps on the 2x2x2 mesh with a checkpoint at step 4 (and 5)."""
    workdir = str(tmp_path_factory.mktemp("run222"))
    cfg = tiny_config(
        shards,
        **MESH_222,
        **{"train.num_steps": 5, "checkpoint.every_steps": 4, "train.log_every": 1},
    )
    dit_trainer.train(cfg, workdir)
    return cfg, workdir


def _copy_up_to(workdir, step, dst):
    shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(dst, "checkpoints"))
    for d in os.listdir(os.path.join(dst, "checkpoints")):
        if d.isdigit() and int(d) > step:
            shutil.rmtree(os.path.join(dst, "checkpoints", d))
    return dst


def _mesh(changes, devices):
    cfg = tiny_config("unused", **changes)
    return sharding.make_mesh(cfg.mesh, devices)


@pytest.mark.parametrize(
    "changes,num_devices", [(MESH_42, 8), (MESH_1, 1)], ids=["mesh_4x2", "single_device"]
)
def test_checkpoint_resumes_on_other_mesh(run_222, shards, tmp_path, changes, num_devices):
    cfg, workdir = run_222
    saved = read_state(workdir, step=4)
    new_cfg = tiny_config(
        shards,
        **changes,
        **{"train.num_steps": 5, "checkpoint.every_steps": 4, "train.log_every": 1},
    )
    mesh = _mesh(changes, jax.devices()[:num_devices])
    assert mesh.size == num_devices

    # Restored params, EMA and optimizer state equal the saved ones bit for bit,
    # and live on the new mesh's shardings.
    trainer = dit_trainer.Trainer(new_cfg, mesh)
    ckpt = checkpointing.RunCheckpointer(
        _copy_up_to(workdir, 4, str(tmp_path / "restore")), keep_last=5, keep_every=0, async_save=False
    )
    data_iter = iter(loader.make_dataset(new_cfg.data, text_max_len=16, process_index=0, process_count=1))
    state = loop.restore_for_mesh(ckpt, 4, trainer, data_iter)
    ckpt.close()
    restored = jax.device_get(state)
    assert int(restored.step) == 4
    assert_trees_equal(saved["params"], restored.params, "params")
    assert_trees_equal(saved["ema_params"], restored.ema_params, "ema_params")
    # optax's named tuples come back from a target-less read as plain containers: compare leaves.
    assert_trees_equal(jax.tree.leaves(saved["opt_state"]), jax.tree.leaves(restored.opt_state), "opt_state")
    for leaf, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(trainer.param_shardings), strict=True
    ):
        assert leaf.sharding.mesh.shape == mesh.shape and leaf.sharding.spec == want.spec
    if num_devices == 8:  # the 4x2 mesh really shards differently from 2x2x2
        old = sharding.named_shardings(trainer.model.logical_axes(), _mesh(MESH_222, jax.devices()))
        w = "blocks"
        assert any(
            a.shard_shape(x.shape) != b.shard_shape(x.shape)
            for a, b, x in zip(
                jax.tree.leaves(old[w]),
                jax.tree.leaves(trainer.param_shardings[w]),
                jax.tree.leaves(saved["params"][w]),
                strict=True,
            )
        )

    # Training continues on the new mesh: step 5 from the step-4 checkpoint gives the
    # loss the original mesh gave (up to float reassociation across meshes).
    resumed = _copy_up_to(workdir, 4, str(tmp_path / "continue"))
    result = dit_trainer.train(new_cfg, resumed, mesh=mesh)
    assert result.final_step == 5
    want = read_loss_history(workdir)[5]
    got = read_loss_history(resumed)[5]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_other_process_count_continues_the_data_stream(run_222, shards, tmp_path):
    """A checkpoint whose iterator files come from 2 processes, restored by 1 process."""
    cfg, workdir = run_222
    moved = _copy_up_to(workdir, 4, str(tmp_path / "procs"))
    it_dir = os.path.join(moved, "checkpoints", "4", "data_iter")
    (only,) = [f for f in os.listdir(it_dir) if f.startswith("process_")]
    state = json.load(open(os.path.join(it_dir, only)))
    os.remove(os.path.join(it_dir, only))
    for p in range(2):  # what two processes would have saved at step 4
        with open(os.path.join(it_dir, f"process_{p}-of-2.json"), "w") as f:
            json.dump(state, f)

    trainer = dit_trainer.Trainer(cfg, sharding.make_mesh(cfg.mesh))
    ckpt = checkpointing.RunCheckpointer(moved, keep_last=5, keep_every=0, async_save=False)
    data_iter = iter(loader.make_dataset(cfg.data, text_max_len=16, process_index=0, process_count=1))
    loop.restore_for_mesh(ckpt, 4, trainer, data_iter)
    ckpt.close()
    got = next(data_iter).record_index
    # The batch an uninterrupted run reads at step 5 (its 5th batch).
    fresh = iter(loader.make_dataset(cfg.data, text_max_len=16, process_index=0, process_count=1))
    for _ in range(4):
        next(fresh)
    want = next(fresh).record_index
    assert got.tolist() == want.tolist()
    # and two processes at that position read exactly that global batch, in its order,
    # as the two contiguous halves that make_global_batch puts together
    halves = []
    for p in range(2):
        two = iter(loader.make_dataset(cfg.data, text_max_len=16, process_index=p, process_count=2))
        grain.experimental.set_next_index(two, 4)
        halves += next(two).record_index.tolist()
    assert halves == want.tolist()
