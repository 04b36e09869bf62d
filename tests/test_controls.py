"""Musical controls (issue 25): tempo, key and time signature as conditioning.

The spelling of the labels (core/music.py), the model's control embedder (zero at
init: a model given controls computes what it computed without them), the loader's
labels and their dropout (a model without controls gets the stream it always got),
the sampler's unconditional branch without controls, and the sampling program's flags
and prompt rows (a control the model does not take, a meter it never saw: one line,
exit 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import music
from audiodiff_jax.core.config import DataConfig
from audiodiff_jax.data import loader
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.diffusion import samplers
from audiodiff_jax.model import make_model
from data_pipeline import demo_shards
from tests.helpers import REPO, bin_path

ALL = ("tempo", "key", "meter")


def test_labels_are_spelled_one_way():
    assert music.key_from_text("F# minor") == music.key_from_text("Gb minor") == 6 + 12
    assert music.key_from_text("Bb major") == 10 and music.key_name(10) == "Bb major"
    assert music.key_from_text("") == music.MISSING
    for bad in ("H minor", "F#", "minor"):
        with pytest.raises(ValueError, match="is not a key"):
            music.key_from_text(bad)
    assert music.meter_index("3/4") == music.METERS.index("3/4") and music.meter_index("") == -1
    with pytest.raises(ValueError, match="11/16"):
        music.meter_index("11/16")
    # Corpus labels (tonic and mode apart), text keys, missing and unreadable values.
    assert music.controls_from_labels(
        {"key": "Ab", "mode": "minor", "tempo": 96, "time_signature": "4/4"}
    ) == (
        96.0,
        8 + 12,
        0,
    )
    assert music.controls_from_labels({"key": "D major", "tempo": "120"}) == (120.0, 2, -1)
    assert music.controls_from_labels({"tempo": 5000, "key": "?", "meter": "13/7"}) == (0.0, -1, -1)
    assert music.controls_from_labels(None) == (0.0, -1, -1)
    # Fourier features of log-bpm: equal ratios are equal steps.
    u = music.tempo_unit(np.array([60.0, 120.0, 80.0, 160.0]))
    assert u[1] - u[0] == pytest.approx(u[3] - u[2]) and 0 <= u.min() and u.max() <= 1
    tally = music.new_tally()
    for labels in ({"tempo": 80, "key": "C major"}, {"tempo": 162, "time_signature": "3/4"}, {}):
        music.add_to_tally(tally, labels)
    merged = music.merge_tallies([tally, tally])
    assert merged["records"] == 6 and merged["tempo"] == {"count": 4, "min": 80.0, "max": 162.0}
    assert merged["key"] == {"C major": 2} and merged["meter"] == {"3/4": 2}


def _model_pair():
    from configs import demo

    cfg = config_lib.from_configdict(demo.get_config())
    old = config_lib.replace(cfg, **{"model.controls": ()}).model
    new = config_lib.replace(cfg, **{"model.controls": ALL, "model.latent_rate": 22050 / 1024})
    return make_model(old), make_model(new.model), cfg


def _cond(b, cfg, **controls):
    return Conditioning(
        jnp.ones((b, cfg.model.text.max_len), jnp.int32),
        jnp.zeros(b),
        jnp.full(b, 12.0),
        jnp.full(b, cfg.data.window_frames, jnp.int32),
        **controls,
    )


def test_controls_start_at_zero_and_then_steer_the_model():
    old, new, cfg = _model_pair()
    p_old, p_new = old.init(jax.random.key(0)), new.init(jax.random.key(0))
    # The parameters a model without controls has are the same, drawn the same.
    assert set(p_new) - set(p_old) == {"control_embedder"}
    for path, leaf in jax.tree_util.tree_leaves_with_path({k: p_new[k] for k in p_old}):
        ref = p_old
        for k in path:
            ref = ref[k.key]
        np.testing.assert_array_equal(ref, leaf, err_msg=jax.tree_util.keystr(path))
    b, t = 3, cfg.data.window_frames
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.model.latent_channels))
    tb = jnp.array([0.2, 0.5, 0.9])
    asked = dict(bpm=jnp.array([80.0, 162.0, 0.0]), key=jnp.array([3, 20, -1]), meter=jnp.array([0, 1, -1]))
    y_old = old.apply(p_old, x, tb, _cond(b, cfg))
    np.testing.assert_array_equal(y_old, new.apply(p_new, x, tb, _cond(b, cfg, **asked)))
    np.testing.assert_array_equal(y_old, new.apply(p_new, x, tb, _cond(b, cfg)))  # None: all missing
    # Once trained (here: every parameter perturbed; at init the blocks' modulations are
    # zero and nothing reads c), each control moves the prediction, and only for the
    # rows that ask for it; a missing value is its own learned vector.
    leaves, tree = jax.tree.flatten(p_new)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    p_tr = jax.tree.unflatten(
        tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    )
    base = new.apply(p_tr, x, tb, _cond(b, cfg, **asked))
    for field, value in (
        ("bpm", jnp.array([96.0, 162.0, 0.0])),
        ("key", jnp.array([4, 20, -1])),
        ("meter", jnp.array([2, 1, -1])),
    ):
        moved = new.apply(p_tr, x, tb, _cond(b, cfg, **{**asked, field: value}))
        changed = np.abs(np.asarray(moved - base)).reshape(b, -1).max(axis=1) > 0
        assert changed.tolist() == [True, False, False], field


def test_the_unconditional_branch_asks_for_no_controls():
    seen = []

    def apply_fn(params, z, t, cond):
        seen.append(cond)
        return z

    b = 2
    cond = Conditioning(
        jnp.ones((b, 4), jnp.int32),
        jnp.zeros(b),
        jnp.ones(b),
        jnp.full(b, 8),
        bpm=jnp.array([80.0, 120.0]),
        key=jnp.array([1, 2]),
        meter=jnp.array([0, 1]),
    )
    denoise = samplers.guided_denoiser(
        apply_fn,
        None,
        cond,
        uncond_tokens=jnp.zeros((b, 4), jnp.int32),
        scale_b=jnp.ones(b),
        rescale_b=jnp.zeros(b),
    )
    denoise(jnp.zeros((b, 8, 2)), jnp.ones(b))
    both = seen[0]
    assert both.bpm.tolist() == [80.0, 120.0, 0.0, 0.0]
    assert both.key.tolist() == [1, 2, -1, -1] and both.meter.tolist() == [0, 1, -1, -1]


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    demo_shards.write_demo_shards(
        out, num_clips=24, latent_channels=4, num_shards=2, seed=1, vocab_size=96, max_frames=120
    )
    return out


def _batches(shards_dir, n, controls=(), **data):
    cfg = DataConfig(
        shards_dir=shards_dir,
        window_frames=16,
        global_batch_size=8,
        prefetch=0,
        **{"cfg_dropout": 0.0, **data},
    )
    it = iter(loader.make_dataset(cfg, text_max_len=12, process_index=0, process_count=1, controls=controls))
    return [next(it) for _ in range(n)]


def test_the_loader_yields_labels_and_drops_each_on_its_own(shards_dir):
    plain = _batches(shards_dir, 6)
    labelled = _batches(shards_dir, 6, controls=ALL, control_dropout=0.0)
    from audiodiff_jax.data.records import ShardSource

    src = ShardSource(shards_dir)
    for a, b in zip(plain, labelled, strict=True):
        # A model without controls gets the stream it always got (no extra draws).
        np.testing.assert_array_equal(a.latents, b.latents)
        np.testing.assert_array_equal(a.cond.tokens, b.cond.tokens)
        for row, index in enumerate(b.record_index):
            bpm, key, meter = music.controls_from_labels(src[int(index)]["labels"])
            assert bpm > 0 and key >= 0  # the demo shards label tempo and key, not meter
            assert (b.cond.bpm[row], b.cond.key[row], b.cond.meter[row]) == (bpm, key, meter)
    dropped = _batches(shards_dir, 40, controls=ALL, control_dropout=0.3)
    bpm = np.concatenate([b.cond.bpm for b in dropped])
    key = np.concatenate([b.cond.key for b in dropped])
    rate_bpm, rate_key = float(np.mean(bpm == 0)), float(np.mean(key < 0))
    assert 0.2 < rate_bpm < 0.4 and 0.2 < rate_key < 0.4
    assert 0.05 < float(np.mean((bpm == 0) & (key < 0))) < 0.16  # independent draws (0.09)
    # A dropped caption drops every control: the unconditional branch of guidance.
    null = _batches(shards_dir, 3, controls=ALL, control_dropout=0.0, cfg_dropout=1.0)
    assert all((b.cond.bpm == 0).all() and (b.cond.key < 0).all() for b in null)


def _sample(*args, cwd):
    return subprocess.run(
        [bin_path("audiodiff-sample"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
    )


def test_sampling_flags_and_rows_that_the_model_cannot_take(tmp_path):
    """The shipped demo weights take tempo, key and meter; their card knows which."""
    out = str(tmp_path / "bad")
    common = (
        "--checkpoint=demo",
        f"--out={out}",
        "--prompt=piano and drums",
        "--seconds=2",
        "--min_seconds=1",
        "--steps=2",
    )
    res = _sample(*common, "--time_signature=3/4", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "time_signature='3/4': the model never saw this time signature in training (seen: 4/4)" in res.stderr
    )
    res = _sample(*common, "--key=H minor", cwd=tmp_path)
    assert res.returncode == 2 and "--key=H minor" in res.stderr and "is not a key" in res.stderr
    res = _sample(*common, "--bpm=900", cwd=tmp_path)
    assert res.returncode == 2 and "--bpm=900" in res.stderr
    assert not os.path.exists(os.path.join(out, "manifest.jsonl"))
    # A tempo far from what the model learned is sampled, with one warning line; the
    # rows of a prompts file set controls like any field, and the manifest keeps them.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps(
            {"prompt": "piano and drums in D minor", "bpm": 250, "key": "D minor", "time_signature": "4/4"}
        )
        + "\n"
    )
    good = str(tmp_path / "good")
    res = _sample(
        "--checkpoint=demo",
        f"--out={good}",
        f"--prompts_file={prompts}",
        "--seconds=2",
        "--min_seconds=1",
        "--steps=2",
        "--eval=false",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bpm=250.0 is outside what this model learned: its training data held 80 to 162 bpm" in res.stderr
    row = json.loads(open(os.path.join(good, "manifest.jsonl")).readline())
    assert (row["bpm"], row["key"], row["time_signature"]) == (250.0, "D minor", "4/4")


def test_a_model_without_a_control_refuses_it_and_a_card_bounds_it():
    from audiodiff_jax.checkpoints import source
    from audiodiff_jax.core.errors import GenerationError
    from audiodiff_jax.sampling import generation

    src = source.WeightsSource("demo")
    tokenizer = src.tokenizer()
    old_cfg = config_lib.replace(src.cfg, **{"model.controls": ()})
    gen = generation.Generator(old_cfg, src.card, tokenizer, None)
    p = generation.SampleParams("piano and drums in D minor", seconds=12.0)
    gen.check(p)
    for change, control in (
        (dict(bpm=96.0), "tempo"),
        (dict(key="D minor"), "key"),
        (dict(time_signature="4/4"), "meter"),
    ):
        with pytest.raises(GenerationError, match=f"this model takes no {control} \\(model.controls=none\\)"):
            gen.check(dataclasses.replace(p, **change))


def test_the_beat_grid_is_the_beat_phase_of_each_frame():
    """Per frame, cos and sin of 2 pi m (seconds_start + i / latent_rate) * bpm / 60 for m in
    BEAT_MULTIPLES (read through an identity projection), zero without a tempo."""
    from audiodiff_jax.model import dit

    rate = 22050 / 1024
    m = len(dit.BEAT_MULTIPLES)
    emb = dit.ControlEmbedder(
        ("tempo",),
        16,
        2 * m,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        keys=dit.ParamKeys(jax.random.key(0)),
    )
    emb.beat_proj.kernel.value = jnp.eye(2 * m)
    cond = _cond_rows(seconds_start=jnp.array([0.0, 3.5, 1.0]), bpm=jnp.array([120.0, 81.0, 0.0]))
    got = np.asarray(emb.beat_grid(cond, 40, rate))
    seconds = np.array([0.0, 3.5, 1.0])[:, None] + np.arange(40) / rate
    phase = (
        2
        * np.pi
        * (seconds * np.array([120.0, 81.0, 0.0])[:, None] / 60)[..., None]
        * np.array(dit.BEAT_MULTIPLES)
    )
    want = np.concatenate([np.cos(phase), np.sin(phase)], axis=-1)
    want[2] = 0.0
    np.testing.assert_allclose(got, want, atol=2e-4)


def _cond_rows(seconds_start, bpm):
    b = seconds_start.shape[0]
    return Conditioning(
        jnp.ones((b, 4), jnp.int32), seconds_start, jnp.full(b, 60.0), jnp.full(b, 40), bpm=bpm
    )
