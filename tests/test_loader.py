"""Tests of the Grain loader (crop, padding, normalization, CFG dropout, sharding, resume)
and of the synthetic demo shards it is tested on."""

import json
import os

import jax
import numpy as np
import pytest

from audiodiff_jax.core.config import ConfigError, DataConfig
from audiodiff_jax.data import loader
from audiodiff_jax.data.batch import Batch, Conditioning, batch_spec
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.data.records import ShardSource
from audiodiff_jax.data.tokenizer import Tokenizer
from data_pipeline import demo_shards

WINDOW = 16
TEXT_LEN = 12
NUM_CLIPS = 24


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    demo_shards.write_demo_shards(
        out, num_clips=NUM_CLIPS, latent_channels=4, num_shards=3, seed=1, vocab_size=96, max_frames=120
    )
    return out


def data_cfg(shards_dir, **kw):
    base = dict(shards_dir=shards_dir, window_frames=WINDOW, global_batch_size=4, cfg_dropout=0.0, prefetch=0)
    return DataConfig(**(base | kw))


def batches(cfg, n, process_index=0, process_count=1, state=None):
    it = iter(
        loader.make_dataset(
            cfg, text_max_len=TEXT_LEN, process_index=process_index, process_count=process_count
        )
    )
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    return out, it


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y), strict=True):
            np.testing.assert_array_equal(u, v, err_msg=jax.tree_util.keystr(path))


def test_demo_shards_are_deterministic_and_varied(shards_dir, tmp_path):
    card = DatasetCard.load(shards_dir)
    assert card.codec.name == "synthetic-demo" and card.codec.latent_channels == 4
    assert card.tokenizer == "tokenizer.model" and os.path.exists(os.path.join(shards_dir, card.tokenizer))
    again = demo_shards.write_demo_shards(
        str(tmp_path),
        num_clips=NUM_CLIPS,
        latent_channels=4,
        num_shards=3,
        seed=1,
        vocab_size=96,
        max_frames=120,
    )
    for s in card.shards:
        assert (tmp_path / s.file).read_bytes() == open(os.path.join(shards_dir, s.file), "rb").read()
    assert again.latent_mean == card.latent_mean
    source = ShardSource(shards_dir)
    lengths = [source[i]["latents"].shape[0] for i in range(len(source))]
    assert min(lengths) < WINDOW < max(lengths)  # short clips and long songs both present
    assert any(source[i]["seconds_start"] > 0 for i in range(len(source)))  # excerpts of longer songs


def test_shapes_and_dtypes(shards_dir):
    """The loader's batches are what the contract (data/batch.py: batch_spec) says."""
    (b,), _ = batches(data_cfg(shards_dir), 1)
    assert isinstance(b, Batch) and isinstance(b.cond, Conditioning)
    spec, _ = batch_spec(4, WINDOW, 4, TEXT_LEN)
    got = jax.tree.map(lambda v: (v.shape, v.dtype), b._replace(record_index=None))
    want = jax.tree.map(lambda s: (s.shape, s.dtype), spec)
    assert got == want
    assert b.record_index.shape == (4,) and b.record_index.dtype == np.int32


def test_crop_timing_padding_and_normalization(shards_dir):
    source = ShardSource(shards_dir)
    card = source.card
    tok = Tokenizer(os.path.join(shards_dir, card.tokenizer))
    mean, std = np.asarray(card.latent_mean), np.asarray(card.latent_std)
    got, _ = batches(data_cfg(shards_dir), 12)  # 48 elements: every record twice
    seen_short = seen_cropped = 0
    for b in got:
        for j in range(4):
            rec = source[int(b.record_index[j])]
            frames = rec["latents"].shape[0]
            offset = round((float(b.cond.seconds_start[j]) - rec["seconds_start"]) * card.codec.latent_rate)
            n = min(frames, WINDOW)
            assert 0 <= offset <= max(frames - WINDOW, 0)
            assert b.cond.num_frames[j] == n
            np.testing.assert_array_equal(b.loss_mask[j], (np.arange(WINDOW) < n).astype(np.float32))
            want = (rec["latents"][offset : offset + n].astype(np.float64) - mean) / std
            np.testing.assert_allclose(b.latents[j, :n], want, rtol=1e-5, atol=1e-5)
            assert (b.latents[j, n:] == 0).all()
            assert b.cond.seconds_total[j] == np.float32(rec["seconds_total"])
            np.testing.assert_array_equal(b.cond.tokens[j], tok.encode(rec["caption"], TEXT_LEN))
            seen_short += frames < WINDOW
            seen_cropped += offset > 0
    assert seen_short > 0 and seen_cropped > 0


def test_normalized_latents_have_unit_scale(shards_dir):
    got, _ = batches(data_cfg(shards_dir, window_frames=64), 12)
    lat = np.concatenate([b.latents[b.loss_mask > 0] for b in got])
    assert np.abs(lat.mean(axis=0)).max() < 0.5 and np.abs(lat.std(axis=0) - 1).max() < 0.5


def test_cfg_dropout_rate_and_null_caption(shards_dir):
    tok = Tokenizer(os.path.join(shards_dir, "tokenizer.model"))
    null = tok.encode("", TEXT_LEN)
    got, _ = batches(data_cfg(shards_dir, cfg_dropout=0.3, global_batch_size=8), 50)
    tokens = np.concatenate([b.cond.tokens for b in got])
    dropped = (tokens == null).all(
        axis=1
    )  # demo captions are never empty, so this is exactly the dropped rows
    assert abs(dropped.mean() - 0.3) < 0.07, dropped.mean()  # 400 draws: std of the rate is 0.023
    assert (tokens[dropped][:, 0] == 3).all() and (tokens[dropped][:, 1:] == 0).all()
    none, _ = batches(data_cfg(shards_dir, global_batch_size=8), 50)
    assert not (np.concatenate([b.cond.tokens for b in none]) == null).all(axis=1).any()


def test_two_processes_see_disjoint_records_covering_all(shards_dir):
    cfg = data_cfg(shards_dir)
    steps = NUM_CLIPS // cfg.global_batch_size  # one epoch
    seen, per_process = [], []
    for p in range(2):
        got, _ = batches(cfg, steps, process_index=p, process_count=2)
        assert all(b.latents.shape[0] == 2 for b in got)
        seen.append(np.concatenate([b.record_index for b in got]))
        per_process.append(got)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(NUM_CLIPS))
    # The two processes' blocks, in process order, are the single process's global
    # batches row for row (crops and caption dropout included): the trajectory does
    # not depend on the process count.
    single, _ = batches(cfg, steps)
    for s, b in enumerate(single):
        joined = jax.tree.map(lambda x, y: np.concatenate([x, y]), per_process[0][s], per_process[1][s])
        assert_batches_equal([joined], [b])


def test_epochs_are_reshuffled_and_repeat_forever(shards_dir):
    got, _ = batches(data_cfg(shards_dir), 3 * NUM_CLIPS // 4)
    order = np.concatenate([b.record_index for b in got]).reshape(3, NUM_CLIPS)
    for epoch in order:
        assert sorted(epoch) == list(range(NUM_CLIPS))
    assert (order[0] != order[1]).any() and (order[1] != order[2]).any()


def test_finite_epochs_end(shards_dir):
    ds = loader.make_dataset(
        data_cfg(shards_dir, num_epochs=1, global_batch_size=5),
        text_max_len=TEXT_LEN,
        process_index=0,
        process_count=1,
    )
    assert len(list(ds)) == NUM_CLIPS // 5


def test_same_seed_same_batches_other_seed_differs(shards_dir):
    cfg = data_cfg(shards_dir, cfg_dropout=0.5)
    a, _ = batches(cfg, 4)
    b, _ = batches(cfg, 4)
    assert_batches_equal(a, b)
    c, _ = batches(data_cfg(shards_dir, cfg_dropout=0.5, shuffle_seed=7), 4)
    assert any((x.record_index != y.record_index).any() for x, y in zip(a, c, strict=True))


def test_state_round_trip_continues_bitwise(shards_dir):
    cfg = data_cfg(shards_dir, cfg_dropout=0.5, prefetch=2)
    _, it = batches(cfg, 3)
    state = json.loads(json.dumps(it.get_state()))  # what Grain's Orbax handler stores
    after = [next(it) for _ in range(5)]
    resumed, _ = batches(cfg, 5, state=state)
    assert_batches_equal(after, resumed)


@pytest.mark.slow
def test_worker_processes_give_same_batches_and_resume(shards_dir):
    cfg0 = data_cfg(shards_dir, cfg_dropout=0.5)
    ref, _ = batches(cfg0, 6)
    cfg2 = data_cfg(shards_dir, cfg_dropout=0.5, worker_count=2, prefetch=1)
    first, it = batches(cfg2, 3)
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    it.close()
    assert_batches_equal(ref, first + rest)  # batching happens before the workers split the stream
    resumed, it2 = batches(cfg2, 3, state=json.loads(json.dumps(state)))
    it2.close()
    assert_batches_equal(rest, resumed)


def test_orbax_saves_and_restores_the_iterator(shards_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = data_cfg(shards_dir, cfg_dropout=0.5)
    _, it = batches(cfg, 2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    want = [next(it) for _ in range(3)]
    fresh = iter(loader.make_dataset(cfg, text_max_len=TEXT_LEN, process_index=0, process_count=1))
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        restored = mngr.restore(
            2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert os.path.exists(tmp_path / "ckpt" / "2" / "data_iter" / "process_0-of-1.json")
    assert_batches_equal(want, [next(restored["data_iter"]) for _ in range(3)])


def test_config_errors_name_the_field(shards_dir):
    with pytest.raises(ConfigError, match="data.global_batch_size=4 is not divisible"):
        loader.make_dataset(data_cfg(shards_dir), text_max_len=TEXT_LEN, process_index=0, process_count=3)
    with pytest.raises(ConfigError, match="data.shards_dir"):
        loader.make_dataset(data_cfg(""), text_max_len=TEXT_LEN, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        loader.make_dataset(
            data_cfg(shards_dir, tokenizer="/nonexistent.model"),
            text_max_len=TEXT_LEN,
            process_index=0,
            process_count=1,
        )
