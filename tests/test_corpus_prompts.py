"""The demo's prompted corpus (``data_pipeline/corpus_prompts.py``) and its measure of
learning (``launch/demo_prompts.py``): held-out pairings never trained on, captions that
state what the audio plays, and the prompted-vs-measured table."""

import collections
import json

import numpy as np
import pytest

pytest.importorskip("tinysoundfont")
pytest.importorskip("librosa")

from data_pipeline import corpus_prompts as cp  # noqa: E402
from launch import demo_prompts  # noqa: E402

SR = 22050


def test_held_out_pairings_are_never_trained_on_and_cover_every_key_and_tempo():
    held = cp.held_out_prompts()
    assert len(held) == 24 and len({c.key_index for c in held}) == 24
    # Each tempo is held out for 4 or 5 keys, never for all of them.
    assert sorted(collections.Counter(c.tempo for c in held).values()) == [4, 5, 5, 5, 5]
    held_pairs = {(c.key_index, c.tempo) for c in held}
    train = [cp.training_choice(0, i)[0] for i in range(600)]
    assert not any((c.key_index, c.tempo) in held_pairs for c in train)
    # ... while every key, every tempo and every instrument is in training.
    assert {c.key_index for c in train} == set(range(24))
    assert {c.tempo for c in train} == set(cp.TEMPOS)
    assert {c.instrument for c in train} == {name for _, name in cp.INSTRUMENTS}
    # Neighbouring tempos are far enough apart that one estimate is never within 8% of two.
    tol = demo_prompts.TEMPO_TOLERANCE
    ratios = np.array(cp.TEMPOS[1:]) / np.array(cp.TEMPOS[:-1])
    assert np.all(ratios > (1 + tol) / (1 - tol))


def test_clips_are_pure_functions_of_seed_and_index(tmp_path):
    a = cp.render_clip(3, 5, clip_seconds=2.0, sample_rate=SR)
    b = cp.render_clip(3, 5, clip_seconds=2.0, sample_rate=SR)
    c = cp.render_clip(3, 6, clip_seconds=2.0, sample_rate=SR)
    assert a.entry == b.entry and np.array_equal(a.audio, b.audio)
    assert a.audio.shape == (1, 2 * SR) and a.audio.dtype == np.float32
    assert 0 < np.max(np.abs(a.audio)) < 1.0
    assert not np.array_equal(a.audio, c.audio)
    choice = cp.training_choice(3, 5)[0]
    assert (
        a.entry.caption
        == f"{choice.instrument} and drums in {choice.key} {choice.mode} at {choice.tempo} bpm"
    )
    assert a.entry.labels == {
        "key": choice.key,
        "mode": choice.mode,
        "tempo": choice.tempo,
        "time_signature": "4/4",
        "instrument": choice.instrument,
    }
    path = cp.render_clips(str(tmp_path / "corpus"), 3, seed=3, clip_seconds=1.0, sample_rate=SR)
    rows = [json.loads(line) for line in open(path)]
    assert [r["id"] for r in rows] == ["prompted-3-000000", "prompted-3-000001", "prompted-3-000002"]
    assert all((tmp_path / "corpus" / r["audio"]).exists() for r in rows)


@pytest.fixture(scope="module")
def measured_renders(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("renders"))
    demo_prompts.write_renders(folder, seed=0, sample_rate=SR, channels=1, seconds=8.0)
    return demo_prompts.measure(folder)


def test_renders_of_the_prompts_play_what_the_captions_say(measured_renders):
    """The estimators hear the captions' tempo in every render and the key in most (the
    misses are the relative major of a minor key): the table's ceiling."""
    rows, acc = measured_renders
    assert len(rows) == 24
    assert acc["tempo"] == 1.0 and acc["onsets"] == 1.0
    assert acc["key"] >= 0.7
    for r in rows:
        assert r.tempo_ok and abs(r.tempo_measured - r.tempo_prompted) <= 0.08 * r.tempo_prompted
        assert r.key_prompted in r.prompt
    text = demo_prompts.verdicts(acc)
    assert text["tempo"].startswith("100% (target 60%, chance 20%): met")
    assert text["onsets"] == "100% (target 90%): met"


def test_prompt_rows_judge_key_tempo_and_onsets():
    base = {"prompt": "piano and drums in F# minor at 124 bpm", "file": "a.wav"}
    rows = demo_prompts.prompt_rows(
        [
            {**base, "key": "F# minor", "tempo_bpm": 130.0, "onset_rate": 3.0, "drone": False},
            {**base, "file": "b.wav", "key": "A major", "tempo_bpm": 248.0, "onset_rate": 0.4},
            {**base, "file": "c.wav", "key": None, "tempo_bpm": 115.0, "onset_rate": 5.0, "drone": True},
            {"prompt": "no labels here", "file": "d.wav", "key": "C major", "tempo_bpm": 100.0},
        ]
    )
    assert [(r.key_ok, r.tempo_ok, r.onsets_ok) for r in rows] == [
        (True, True, True),  # 130 is within 8% of 124
        (False, False, False),  # double time is wrong; 0.4 onsets/s is too few
        (False, True, False),  # 115 is within 8%; a drone has no onsets to speak of
    ]
    acc = demo_prompts.accuracies(rows)
    assert acc == pytest.approx({"key": 1 / 3, "tempo": 2 / 3, "onsets": 1 / 3})
    assert demo_prompts.verdicts(acc)["key"] == "33% (target 75%, chance 4%): NOT met"


def test_shipped_demo_weights_fit_the_demo_model_and_the_demo_shards(tmp_path):
    """make demo continues from ``audiodiff_jax/demo_weights``: an export that fits the
    demo config's model, at most 20 MB, whose card and tokenizer the demo's shards take."""
    import os

    import jax

    from audiodiff_jax.checkpoints import export
    from audiodiff_jax.codec import load_codec
    from audiodiff_jax.core import config as config_lib
    from audiodiff_jax.data.cards import DatasetCard
    from audiodiff_jax.data.tokenizer import EOS_ID, UNK_ID, Tokenizer
    from audiodiff_jax.model import make_model
    from configs import demo as demo_config
    from data_pipeline.shards import ShardWriter
    from launch import demo

    weights = demo.DEMO_WEIGHTS
    assert export.is_export(weights)
    size = sum(os.path.getsize(os.path.join(weights, f)) for f in os.listdir(weights))
    assert size <= 20 * 2**20
    cfg = config_lib.from_configdict(demo_config.get_config("continue"))
    params = export.load_params(weights, make_model(cfg.model).abstract_params())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    history = demo.pretrain_loss(weights)
    assert len(history) > 10 and history[max(history)] < history[min(history)]

    # The demo's shards (here: two records from the shipped codec's card) take the
    # weights' latent statistics and tokenizer; every held-out prompt tokenizes without
    # unknown pieces.
    codec_card = load_codec("default").card.to_dict()
    shards = str(tmp_path / "shards")
    with ShardWriter(shards, codec_card, num_shards=1) as w:
        for i in range(2):
            w.add(
                {
                    "latents": np.full((8, codec_card["latent_channels"]), float(i), np.float32),
                    "caption": "x",
                    "source_id": f"r{i}",
                    "seconds_start": 0.0,
                    "seconds_total": 8 / codec_card["latent_rate"],
                }
            )
    card = demo.adopt_weights_card(shards, weights)
    source = DatasetCard.from_dict(export.read_json_item(weights, "dataset_card"))
    assert card.latent_mean == source.latent_mean and card.latent_std == source.latent_std
    assert DatasetCard.load(shards) == card and card.num_records == 2
    assert card.metadata[demo.ADOPTED] == weights  # what a rerun of the demo checks for
    tok = Tokenizer(os.path.join(shards, card.tokenizer))
    assert card.metadata["caption_tokens_max"] == tok.length("x")  # the captions of these shards
    assert tok.vocab_size == card.tokenizer_vocab_size <= cfg.model.text.vocab_size
    for c in cp.held_out_prompts():
        ids = list(tok.encode(c.caption(), cfg.model.text.max_len))
        assert UNK_ID not in ids and EOS_ID in ids, c.caption()  # known pieces, none cut off
