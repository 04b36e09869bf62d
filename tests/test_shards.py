"""Tests of the latent shard format, the dataset card and the caption tokenizer."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from audiodiff_jax.data import cards
from audiodiff_jax.data import records as records_lib
from audiodiff_jax.data.cards import DatasetCard, ShardError
from audiodiff_jax.data.records import ShardSource
from audiodiff_jax.data.tokenizer import Tokenizer
from data_pipeline import tokenizer
from data_pipeline.shards import ShardWriter

CODEC = {
    "name": "test-codec",
    "sample_rate": 22050,
    "audio_channels": 1,
    "hop": 1024,
    "latent_rate": 22050 / 1024,
    "latent_channels": 3,
}


def make_records(n, seed=0, channels=3, offset=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = int(rng.integers(1, 40))
        out.append(
            {
                "latents": (
                    rng.normal(size=(frames, channels)) * np.geomspace(0.1, 3.0, channels) + offset
                ).astype(np.float32),
                "caption": f"clip {i} — ünïcode piano" if i % 4 else "",
                "seconds_start": float(rng.uniform(0, 30)),
                "seconds_total": float(rng.uniform(30, 300)),
                "source_id": f"src/{i}",
                "labels": {"instrument": "piano", "tempo": 70 + i, "key": "C minor", "loud": i % 2 == 0},
            }
        )
    return out


def write(out_dir, records, **kw):
    kw.setdefault("num_shards", 3)
    with ShardWriter(str(out_dir), CODEC, **kw) as w:
        for r in records:
            w.add(r)
    return w.card


def assert_record_equal(got, want):
    assert got["latents"].dtype == want["latents"].dtype
    np.testing.assert_array_equal(got["latents"], want["latents"])
    for k in ("caption", "seconds_start", "seconds_total", "source_id", "labels"):
        assert got[k] == want[k], k


# ---------------------------------------------------------------------------
# Records


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_record_round_trip_is_exact(dtype):
    rec = make_records(1)[0] | {"caption": "a slow piano piece in C minor"}
    rec["latents"] = rec["latents"].astype(dtype)
    got = records_lib.decode_record(records_lib.encode_record(rec), where="x")
    assert_record_equal(got, rec)


def test_record_without_labels_decodes_to_empty_labels():
    rec = make_records(1)[0]
    del rec["labels"]
    assert records_lib.decode_record(records_lib.encode_record(rec), where="x")["labels"] == {}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"latents": np.zeros((4,), np.float32)}, "latents"),
        ({"latents": np.zeros((4, 3), np.float64)}, "latents"),
        ({"latents": np.full((4, 3), np.nan, np.float32)}, "latents"),
        ({"caption": None}, "caption"),
        ({"seconds_total": -1.0}, "seconds_total"),
        ({"labels": {"tempo": [1, 2]}}, "tempo"),
        ({"extra": 1}, "extra"),
    ],
)
def test_encode_rejects_bad_fields_by_name(change, field):
    with pytest.raises(ShardError, match=field):
        records_lib.encode_record(make_records(1)[0] | change)


def test_decode_errors_name_the_place():
    data = records_lib.encode_record(make_records(1)[0])
    where = "f.array_record, record 7"
    with pytest.raises(ShardError, match="f.array_record, record 7: not a latent record"):
        records_lib.decode_record(b"XXXX" + data[4:], where=where)
    with pytest.raises(ShardError, match="record 7: .*payload"):
        records_lib.decode_record(data[:-5], where=where)
    with pytest.raises(ShardError, match="record 7: truncated"):
        records_lib.decode_record(data[:5], where=where)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    with pytest.raises(ShardError, match="record 7: latents checksum"):
        records_lib.decode_record(bytes(flipped), where=where)
    header_broken = bytearray(data)
    header_broken[12] = ord("}")
    with pytest.raises(ShardError, match="record 7: corrupt record header"):
        records_lib.decode_record(bytes(header_broken), where=where)


# ---------------------------------------------------------------------------
# Writer, card, reader


def test_shards_and_card_round_trip(tmp_path):
    records = make_records(10)
    card = write(
        tmp_path, records, metadata={"corpus": "unit"}, tokenizer="tok.model", tokenizer_vocab_size=7
    )
    assert DatasetCard.load(str(tmp_path)) == card
    assert [s.file for s in card.shards] == [records_lib.shard_file_name(i, 3) for i in range(3)]
    assert [s.num_records for s in card.shards] == [4, 3, 3]  # round robin
    assert card.num_records == 10
    assert card.total_frames == sum(len(r["latents"]) for r in records)
    assert (card.tokenizer, card.tokenizer_vocab_size, card.metadata) == ("tok.model", 7, {"corpus": "unit"})
    source = ShardSource(str(tmp_path))
    assert len(source) == 10
    got = sorted((source[i] for i in range(len(source))), key=lambda r: r["source_id"])
    for g, r in zip(got, sorted(records, key=lambda r: r["source_id"]), strict=True):
        assert_record_equal(g, r)
    assert source[0]["record_index"] == 0


def test_records_per_shard(tmp_path):
    card = write(tmp_path, make_records(7), num_shards=None, records_per_shard=3)
    assert [s.num_records for s in card.shards] == [3, 3, 1]
    assert sorted(os.listdir(tmp_path)) == sorted([cards.CARD_FILE] + [s.file for s in card.shards])


def test_more_shards_than_records_drops_empty_ones(tmp_path):
    card = write(tmp_path, make_records(2), num_shards=5)
    assert [s.file for s in card.shards] == [
        records_lib.shard_file_name(0, 2),
        records_lib.shard_file_name(1, 2),
    ]
    assert len(ShardSource(str(tmp_path))) == 2


def test_channel_stats_match_numpy(tmp_path):
    # A large mean makes a naive sum-of-squares variance lose digits; the streaming update must not.
    records = make_records(25, channels=3, offset=1000.0)
    card = write(tmp_path, records)
    frames = np.concatenate([r["latents"] for r in records]).astype(np.float64)
    np.testing.assert_allclose(card.latent_mean, frames.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(card.latent_std, frames.std(axis=0), rtol=1e-9)


def test_channel_count_must_match_codec(tmp_path):
    with pytest.raises(ShardError, match="latent_channels=3"):
        write(tmp_path, make_records(1, channels=4))


def test_exception_mid_write_leaves_nothing_visible(tmp_path):
    records = make_records(6)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(tmp_path), CODEC, num_shards=2) as w:
            for r in records[:4]:
                w.add(r)
            # While writing, readers see neither shards nor a card.
            assert glob.glob(str(tmp_path / "latents-*")) == []
            assert not (tmp_path / cards.CARD_FILE).exists()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # temporary files removed too


def test_existing_dataset_needs_overwrite(tmp_path):
    write(tmp_path, make_records(4), num_shards=2)
    with pytest.raises(ShardError, match="overwrite=True"):
        ShardWriter(str(tmp_path), CODEC, num_shards=1)
    card = write(tmp_path, make_records(3, seed=1), num_shards=1, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted([cards.CARD_FILE, records_lib.shard_file_name(0, 1)])
    assert len(ShardSource(str(tmp_path))) == card.num_records == 3


def test_truncated_shard_names_the_file(tmp_path):
    card = write(tmp_path, make_records(9))
    path = tmp_path / card.shards[1].file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{path}: not a readable ArrayRecord file"):
        ShardSource(str(tmp_path))


def test_missing_shard_and_count_mismatch_name_the_file(tmp_path):
    card = write(tmp_path, make_records(9))
    bad = dataclasses.replace(
        card, shards=(card.shards[0], cards.ShardInfo(card.shards[1].file, 4), card.shards[2])
    )
    bad = dataclasses.replace(bad, num_records=10)
    bad.save(str(tmp_path))
    with pytest.raises(ShardError, match=f"{card.shards[1].file}: holds 3 records, dataset_card.json says 4"):
        ShardSource(str(tmp_path))
    card.save(str(tmp_path))
    os.remove(tmp_path / card.shards[2].file)
    with pytest.raises(
        ShardError, match=f"{card.shards[2].file}: shard listed in dataset_card.json is missing"
    ):
        ShardSource(str(tmp_path))


def test_corrupted_bytes_in_file_name_file_and_record(tmp_path):
    records = make_records(6)
    card = write(tmp_path, records, num_shards=1)
    path = tmp_path / card.shards[0].file
    data = bytearray(path.read_bytes())
    pos = bytes(data).find(
        records_lib.encode_record(records[2])
    )  # uncompressed shards keep record bytes contiguous
    assert pos > 0
    for k in range(pos + 60, pos + 70):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    source = ShardSource(str(tmp_path))
    with pytest.raises(ShardError, match=f"{path}, record 2: "):
        source[2]
    assert_record_equal(source[3], records[3])  # other records still readable


def test_bad_magic_in_valid_shard_names_file_and_record(tmp_path):
    records = make_records(3)
    card = write(tmp_path, records, num_shards=1)
    path = str(tmp_path / card.shards[0].file)
    os.remove(path)
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, r in enumerate(records):
        data = records_lib.encode_record(r)
        writer.write(b"JUNK" + data[4:] if i == 1 else data)
    writer.close()
    source = ShardSource(str(tmp_path))
    with pytest.raises(ShardError, match=f"{path}, record 1: not a latent record"):
        source[1]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("total_frames"), "missing field.*total_frames"),
        (lambda d: d.update(extra=1), "unknown field.*extra"),
        (lambda d: d["latent_std"].pop(), "latent_std has 2 entries, codec.latent_channels=3"),
        (lambda d: d["codec"].update(hop=0), "codec: field hop=0"),
        (lambda d: d["codec"].update(sample_rate="x"), "codec: field sample_rate"),
        (lambda d: d.update(num_records=99), "num_records=99"),
        (lambda d: d["shards"][0].update(file="../x.array_record"), r"shards\[0\].file"),
        (lambda d: d.update(version=99), "version=99"),
    ],
)
def test_card_validation_names_the_field(tmp_path, edit, message):
    write(tmp_path, make_records(4))
    path = tmp_path / cards.CARD_FILE
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ShardError, match=message):
        DatasetCard.load(str(tmp_path))


def test_shard_source_pickles_without_readers(tmp_path):
    import pickle

    records = make_records(3)
    write(tmp_path, records, num_shards=1)
    source = ShardSource(str(tmp_path))
    clone = pickle.loads(pickle.dumps(source))
    assert_record_equal(clone[1], source[1])


# ---------------------------------------------------------------------------
# Tokenizer

CAPTIONS = [
    "a slow piano piece in C minor at 70 bpm",
    "a fast jazz guitar tune in G major at 140 bpm",
    "ambient organ drone in D minor, slow",
    "folk violin dance in A major, lively, 110 bpm",
] * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tokenizer.train_tokenizer(CAPTIONS, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=64)
    return Tokenizer(path)


def test_tokenizer_ids_and_small_vocab(tok):
    assert 4 < tok.vocab_size <= 64  # hard_vocab_limit=False: the small caption set gives fewer pieces
    ids = tok.encode(CAPTIONS[0], 32)
    assert ids.dtype == np.int32 and ids.shape == (32,)
    n = int(np.argmax(ids == tokenizer.EOS_ID))
    assert n > 3 and (ids[:n] > tokenizer.EOS_ID).all()  # real ids, no pad/eos inside the caption
    assert (ids[n + 1 :] == tokenizer.PAD_ID).all()
    assert tok.decode(ids) == CAPTIONS[0]


def test_empty_caption_is_eos_then_pad(tok):
    np.testing.assert_array_equal(tok.encode("", 6), [tokenizer.EOS_ID, 0, 0, 0, 0, 0])


def test_truncation_keeps_length_and_eos_last(tok):
    long = " ".join(CAPTIONS)
    ids = tok.encode(long, 8)
    assert ids.shape == (8,) and ids[-1] == tokenizer.EOS_ID and (ids[:-1] > tokenizer.EOS_ID).all()
    np.testing.assert_array_equal(ids[:-1], tok.encode(long, 64)[:7])


def test_tokenizer_pickles(tok):
    import pickle

    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(tok)).encode(CAPTIONS[1], 16), tok.encode(CAPTIONS[1], 16)
    )


def test_identical_captions_give_identical_model_bytes(tok, tmp_path):
    # Another folder and another name: the model must not record where it was written.
    path = tokenizer.train_tokenizer(CAPTIONS, str(tmp_path / "elsewhere" / "other"), vocab_size=64)
    with open(path, "rb") as f, open(tok.path, "rb") as g:
        assert f.read() == g.read()
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["other.model", "other.vocab"]  # no temporary left


def test_train_for_dataset_records_tokenizer_in_card(tmp_path):
    write(tmp_path, make_records(12))
    path = tokenizer.train_for_dataset(str(tmp_path), vocab_size=64)
    card = DatasetCard.load(str(tmp_path))
    assert card.tokenizer == "tokenizer.model" and os.path.join(str(tmp_path), card.tokenizer) == path
    assert card.tokenizer_vocab_size == Tokenizer(path).vocab_size
    # The longest caption's length in tokens (with EOS) goes into the card: training
    # warns when model.text.max_len would cut captions.
    captions = [r["caption"] for r in make_records(12)]
    assert card.metadata["caption_tokens_max"] == max(Tokenizer(path).length(c) for c in captions) > 1


def test_few_distinct_words_still_give_whole_word_pieces(tmp_path):
    """Captions spelled from a few labels (rendered corpora): the tokenizer keeps whole
    words (BPE; sentencepiece's unigram trainer cut these to single characters, 35
    tokens a caption, and a 24-token text encoder never saw the tempo)."""
    keys = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
    rng = np.random.default_rng(0)
    captions = [
        f"{inst} and drums in {keys[rng.integers(12)]} {mode} at {tempo} bpm"
        for inst in ("piano", "electric piano", "guitar", "strings", "organ")
        for mode in ("major", "minor")
        for tempo in (80, 96, 114, 136, 162)
        for _ in range(4)
    ]
    tok = Tokenizer(tokenizer.train_tokenizer(captions, str(tmp_path / "tok"), vocab_size=256))
    assert tok.length("electric piano and drums in Ab major at 114 bpm") <= 12
    assert max(tok.length(c) for c in captions) <= 12
