"""The real training loop on tiny data, in this process (8 fake CPU devices)."""

import json
import os

import jax
import numpy as np
import pytest

from audiodiff_jax.checkpoints import checkpointing
from audiodiff_jax.core import sharding
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.training import dit_trainer, loop
from tests.helpers import assert_trees_equal, read_state, tiny_config, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")))


def _fixed_eval_loss(cfg, trainer, params, shards):
    """v-loss on one fixed batch, fixed times and fixed noise: a low-variance yardstick."""
    import jax.numpy as jnp

    from audiodiff_jax.data import loader
    from audiodiff_jax.diffusion import objective

    batch = next(
        iter(
            loader.make_dataset(
                cfg.data, text_max_len=cfg.model.text.max_len, process_index=0, process_count=1
            )
        )
    )
    x = jnp.asarray(batch.latents)
    t = jnp.linspace(0.1, 0.9, x.shape[0])
    noise = jax.random.normal(jax.random.key(123), x.shape)
    z, v = objective.add_noise(x, noise, t)
    pred = trainer.model.apply(params, z, t, batch.cond)
    return float(objective.masked_mse(pred, v, jnp.asarray(batch.loss_mask)))


def test_loop_learns_and_checkpoints(shards, tmp_path):
    cfg = tiny_config(
        shards,
        **{
            "train.num_steps": 60,
            "checkpoint.every_steps": 30,
            "train.log_every": 10,
            "optim.learning_rate": 3e-3,
        },
    )
    trainer = dit_trainer.Trainer(cfg, sharding.make_mesh(cfg.mesh))
    init_params = jax.device_get(trainer.init_state(cfg.train.seed).params)
    result = dit_trainer.train(cfg, str(tmp_path))
    assert result.final_step == 60 and not result.preempted
    history = read_loss_history(str(tmp_path))
    assert sorted(history) == list(range(1, 61))
    # The output layer starts at zero, so the first loss is E[v^2] ~ 1 on normalized latents.
    assert 0.6 < history[1] < 1.5
    before = _fixed_eval_loss(cfg, trainer, init_params, shards)
    after = _fixed_eval_loss(cfg, trainer, jax.device_get(result.state.params), shards)
    assert after < 0.9 * before, (before, after)
    # Checkpoint items: state, per-process iterator, config, dataset card.
    step_dir = tmp_path / "checkpoints" / "60"
    assert {p.name for p in step_dir.iterdir()} >= {"state", "data_iter", "config", "dataset_card"}
    assert len(list((step_dir / "data_iter").glob("*process*"))) == jax.process_count()
    saved_cfg = checkpointing.read_config_json(str(tmp_path))
    assert saved_cfg["model"]["width"] == cfg.model.width and saved_cfg["data"]["shards_dir"] == shards
    card = json.loads(next((step_dir / "dataset_card").iterdir()).read_text())
    assert card["codec"]["latent_channels"] == cfg.model.latent_channels
    saved = read_state(str(tmp_path))
    assert int(saved["step"]) == 60
    assert_trees_equal(saved["params"], jax.device_get(result.state.params), "params")
    assert_trees_equal(saved["ema_params"], jax.device_get(result.state.ema_params), "ema")
    # EMA differs from the raw weights after training.
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(a - b).max()), saved["params"], saved["ema_params"])
    )
    assert max(diffs) > 0


def test_state_is_created_sharded(shards):
    cfg = tiny_config(shards, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = dit_trainer.Trainer(cfg, mesh)
    state = trainer.init_state(0)
    expected = trainer.param_shardings
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected), strict=True):
        assert got.sharding == want
    # Adam moments follow their params.
    mu = state.opt_state[1][0].mu
    for got, want in zip(jax.tree.leaves(mu), jax.tree.leaves(expected), strict=True):
        assert got.sharding == want


def test_keep_last_plus_every_kth(shards, tmp_path):
    cfg = tiny_config(
        shards,
        **{
            "train.num_steps": 8,
            "checkpoint.every_steps": 1,
            "checkpoint.keep_last": 2,
            "checkpoint.keep_every": 3,
        },
    )
    dit_trainer.train(cfg, str(tmp_path))
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == [3, 6, 7, 8]

    # A damaged newest step (its largest data file cut in half): the run resumes from the
    # newest readable step (7), sets step 8 aside, and makes the same step 8 again
    # (bit for bit: same schedule, same data position).
    before = read_state(str(tmp_path), 8)
    files = [f for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    result = dit_trainer.train(cfg, str(tmp_path))
    assert result.final_step == 8
    (aside,) = os.listdir(tmp_path / "checkpoints.unreadable")
    assert aside.startswith("8-")
    assert_trees_equal(read_state(str(tmp_path), 8), before, "step 8 made again")


def test_divergence_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    good = tiny_config(shards, **{"train.num_steps": 4, "checkpoint.every_steps": 2})
    dit_trainer.train(good, str(tmp_path))
    before = read_state(str(tmp_path), 4)
    bad = tiny_config(
        shards,
        **{
            "train.num_steps": 8,
            "checkpoint.every_steps": 1,
            "optim.learning_rate": 1e38,
            "optim.warmup_steps": 0,
        },
    )
    with pytest.raises(loop.TrainingDiverged, match=r"diverged at step 5.*checkpoint step 4"):
        dit_trainer.train(bad, str(tmp_path))
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept[-1] == 4
    assert_trees_equal(read_state(str(tmp_path), 4), before, "state")


def test_init_from_copies_weights_only(shards, tmp_path):
    src = tmp_path / "src"
    dit_trainer.train(tiny_config(shards, **{"train.num_steps": 3, "checkpoint.every_steps": 3}), str(src))
    src_state = read_state(str(src))
    dst = tmp_path / "dst"
    cfg = tiny_config(
        shards, **{"train.num_steps": 1, "train.init_from": str(src), "checkpoint.every_steps": 1}
    )
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = dit_trainer.Trainer(cfg, mesh)
    params, step = checkpointing.restore_params(cfg.train.init_from, trainer.abstract_params())
    assert step == 3
    assert_trees_equal(jax.device_get(params), src_state["params"], "params")
    result = dit_trainer.train(cfg, str(dst))
    assert result.final_step == 1  # a new run: step 0 -> 1, not 3 -> 4


def test_latent_channel_mismatch_is_named(shards, tmp_path):
    cfg = tiny_config(shards, **{"model.latent_channels": 5})
    with pytest.raises(Exception, match=r"model\.latent_channels=5.*latent_channels=8"):
        dit_trainer.train(cfg, str(tmp_path))
