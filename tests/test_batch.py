"""The batch contract (audiodiff_jax/data/batch.py): one spec gives the shapes, dtypes and
shardings that the loader's host batch, the global device batch and the AOT stand-ins share."""

import jax
import numpy as np
from jax.sharding import PartitionSpec

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import sharding
from audiodiff_jax.core.config import MeshConfig
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.data.batch import Batch, Conditioning

B, T, C, L = 8, 12, 4, 6


def _host_batch(rng) -> Batch:
    return Batch(
        latents=rng.standard_normal((B, T, C), dtype=np.float32),
        loss_mask=np.ones((B, T), np.float32),
        cond=Conditioning(
            tokens=rng.integers(4, 50, (B, L)).astype(np.int32),
            seconds_start=rng.uniform(0, 100, B).astype(np.float32),
            seconds_total=np.full(B, 200.0, np.float32),
            num_frames=np.full(B, T, np.int32),
            bpm=rng.choice([0.0, 80.0, 162.0], B).astype(np.float32),
            key=rng.integers(-1, 24, B).astype(np.int32),
            meter=rng.integers(-1, 3, B).astype(np.int32),
        ),
        record_index=np.arange(B, dtype=np.int32),
    )


def test_global_batch_follows_the_spec_and_the_logical_rules():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, sequence=1, tensor=2))
    local = _host_batch(np.random.default_rng(0))
    glob = batch_lib.make_global_batch(local, mesh)
    assert glob.record_index is None  # host-side only
    spec, axes = batch_lib.batch_spec(B, T, C, L)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), glob) == jax.tree.map(
        lambda s: (s.shape, s.dtype), spec
    )
    # The batch dim goes where sharding.LOGICAL_RULES sends names.BATCH: data x fsdp here.
    for arr in jax.tree.leaves(glob):
        assert arr.sharding.spec[0] == ("data", "fsdp")
        assert tuple(arr.sharding.spec[1:]) in ((), (None,) * (arr.ndim - 1))
        assert arr.sharding.shard_shape(arr.shape) == (B // 4, *arr.shape[1:])
    for got, want in zip(
        jax.tree.leaves(glob), jax.tree.leaves(local._replace(record_index=None)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert batch_lib.batch_shardings(mesh).latents.spec == PartitionSpec(("data", "fsdp"), None, None)


def test_abstract_batch_matches_the_config():
    cfg = config_lib.replace(
        config_lib.Config(), **{"data.global_batch_size": B, "data.window_frames": T, "mesh.data": 8}
    )
    mesh = sharding.make_mesh(cfg.mesh)
    abstract = batch_lib.abstract_batch(cfg, mesh)
    assert abstract.latents.shape == (B, T, cfg.model.latent_channels)
    assert abstract.cond.tokens.shape == (B, cfg.model.text.max_len)
    for s in jax.tree.leaves(abstract):
        assert s.sharding.shard_shape(s.shape) == (1, *s.shape[1:])  # 8 rows over data = 8
