"""Latent precompute: real renders to shards the loader reads, bad input, kill + resume, two processes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from audiodiff_jax.core.config import DataConfig
from audiodiff_jax.data import loader
from audiodiff_jax.data.cards import CARD_FILE, DatasetCard
from audiodiff_jax.data.records import ShardSource, load_records
from data_pipeline import precompute
from tests.helpers import REPO
from tests.precompute_codec import PoolingCodec

CODEC_SPEC = "tests.precompute_codec:make_codec"


def _tone(seconds: float, sr: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1)


@pytest.fixture(scope="module")
def tone_folder(tmp_path_factory):
    """12 short songs with a caption JSONL; different lengths and pitches so every record differs."""
    folder = tmp_path_factory.mktemp("tones")
    rows = []
    for i in range(12):
        name = f"song{i:02d}.wav"
        sf.write(folder / name, _tone(0.5 + 0.1 * i, 16000, 110.0 * (1 + i % 5)), 16000)
        rows.append({"file": name, "caption": f"tone number {i}", "pitch": 110 * (1 + i % 5)})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _cli(corpus, out_dir, *extra, env=None):
    cmd = [sys.executable, "-m", "data_pipeline.precompute", f"--corpus={corpus}", f"--out_dir={out_dir}"]
    cmd += [f"--codec={CODEC_SPEC}", "--files_per_shard=2", "--batch_size=1", "--progress=false"]
    cmd += ["--tokenizer_vocab_size=0", *extra]
    return cmd, {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **(env or {})}


def _dataset_bytes(out_dir):
    """Every file that makes up the dataset (card + shards), as bytes."""
    card = DatasetCard.load(out_dir)
    files = [CARD_FILE] + [s.file for s in card.shards]
    assert sorted(os.listdir(out_dir)) == sorted(files + [precompute.SUMMARY_FILE])  # no leftovers
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in files}


@pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("music21", "tinysoundfont")),
    reason="corpus extra (music21, tinysoundfont) not installed",
)
def test_rendered_scores_to_shards_to_loader(tmp_path):
    from data_pipeline import corpus_scores

    corpus_dir, out = str(tmp_path / "scores"), str(tmp_path / "latents")
    corpus_scores.render_clips(
        corpus_dir, 4, seed=0, sample_rate=16000, clip_seconds=3.0, collections=["bach"]
    )
    corpus = precompute.FolderCorpus(corpus_dir)
    summary = precompute.precompute(
        corpus, out, PoolingCodec(), files_per_shard=3, batch_size=2, tokenizer_vocab_size=64, progress=False
    )
    assert summary["num_records"] == 4 and summary["num_skipped"] == 0 and summary["num_shards"] == 2
    card = DatasetCard.load(out)
    assert card.tokenizer == "tokenizer.model" and card.codec.name == "test-pooling"
    records = {r["source_id"]: r for r in load_records(out)}
    manifest = {e.id: e for e in corpus.entries}
    for clip_id, r in records.items():
        e = manifest[clip_id]
        assert r["caption"] == e.caption and r["labels"] == e.labels
        assert r["seconds_start"] == pytest.approx(e.seconds_start)
        # Latents are the codec's encoding of the 8 kHz mono audio: 50 frames per second.
        audio, sr = sf.read(os.path.join(corpus_dir, e.audio))
        assert r["latents"].shape == (int(np.ceil(len(audio) / sr * 8000 / 160)), 4)
    all_frames = np.concatenate([r["latents"] for r in records.values()])
    np.testing.assert_allclose(card.latent_mean, all_frames.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(card.latent_std, all_frames.std(0), rtol=1e-5, atol=1e-6)
    cfg = DataConfig(shards_dir=out, window_frames=32, global_batch_size=2, cfg_dropout=0.0, prefetch=0)
    batch = next(iter(loader.make_dataset(cfg, text_max_len=16, process_index=0, process_count=1)))
    assert batch.latents.shape == (2, 32, 4) and batch.cond.tokens.shape == (2, 16)
    assert np.isfinite(batch.latents).all() and (batch.cond.tokens[:, 0] > 3).all()


def test_bad_files_are_reported_and_good_ones_kept(tmp_path):
    folder, out = tmp_path / "corpus", str(tmp_path / "latents")
    folder.mkdir()
    sf.write(folder / "good1.wav", _tone(1.0, 16000), 16000)
    sf.write(folder / "good2.flac", _tone(1.0, 44100, channels=2), 44100)
    sf.write(folder / "dup.wav", _tone(0.5, 16000), 16000)
    sf.write(folder / "dup.flac", _tone(0.5, 16000), 16000)  # same name as dup.wav: both are kept
    sf.write(folder / "surround.wav", _tone(0.5, 16000, channels=6), 16000)
    sf.write(folder / "odd_rate.wav", _tone(0.5, 12345), 12345)
    sf.write(folder / "nan.wav", np.full((800, 1), np.nan, np.float32), 16000, subtype="FLOAT")
    (folder / "junk.mp3").write_bytes(os.urandom(3000))
    (folder / "empty.ogg").write_bytes(b"")
    sf.write(folder / "cut.wav", _tone(1.0, 16000), 16000)
    data = (folder / "cut.wav").read_bytes()
    (folder / "cut.wav").write_bytes(data[: len(data) // 2])
    sf.write(folder / "silent0.wav", np.zeros((0, 1), np.float32), 16000)
    (folder / "captions.csv").write_text(
        "file,caption\ngood1.wav,first good\ngood1.wav,first good\ngood2.flac,second good\nmissing.wav,gone\n"
    )
    summary = precompute.precompute(
        precompute.FolderCorpus(str(folder)), out, PoolingCodec(), files_per_shard=4, progress=False
    )
    skipped = {os.path.basename(p["path"]): p["reason"] for p in summary["skipped"]}
    assert set(skipped) == {
        "nan.wav",
        "junk.mp3",
        "empty.ogg",
        "cut.wav",
        "silent0.wav",
        "missing.wav",
    }
    assert "NaN" in skipped["nan.wav"]
    assert "unreadable" in skipped["junk.mp3"]
    assert "zero-length" in skipped["empty.ogg"] and "zero-length" in skipped["silent0.wav"]
    assert "truncated" in skipped["cut.wav"]
    assert "not found" in skipped["missing.wav"]
    warnings = [(os.path.basename(p["path"]), p["reason"]) for p in summary["warnings"]]
    assert ("surround.wav", "6 channels mixed down to 1") in warnings
    assert any(n == "odd_rate.wav" and "unusual sample rate 12345 Hz" in r for n, r in warnings)
    assert any(n == "good1.wav" and "2 identical caption rows" in r for n, r in warnings)
    assert any(n == "odd_rate.wav" and "no caption" in r for n, r in warnings)
    # The good files (and the converted ones) are all there, readable, and nothing else.
    records = load_records(out)
    ids = ["dup.flac", "dup.wav", "good1.wav", "good2.flac", "odd_rate.wav", "surround.wav"]
    assert sorted(r["source_id"] for r in records) == ids
    assert summary["num_records"] == len(ShardSource(out)) == 6
    by_id = {r["source_id"]: r for r in records}
    assert by_id["good2.flac"]["caption"] == "second good"
    assert by_id["good2.flac"]["seconds_total"] == pytest.approx(1.0)
    assert by_id["odd_rate.wav"]["latents"].shape[0] == 25  # 0.5 s at 50 frames/s, whatever the input rate
    text = precompute.format_summary(summary)
    assert "junk.mp3" in text and "skipped 6, warnings" in text


def test_kill_and_resume_equals_a_clean_run(tone_folder, tmp_path):
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    cmd, env = _cli(tone_folder, clean)
    subprocess.run(cmd, env=env, check=True, timeout=120, capture_output=True)
    # 6 units of 2 files at 0.15 s a file: kill once two units are done, mid third unit.
    cmd, env = _cli(tone_folder, resumed, env={"AUDIODIFF_TEST_CODEC_DELAY": "0.15"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = os.path.join(resumed, precompute.WORK_DIR)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(work, "unit-00001.json")):
        assert proc.poll() is None and time.time() < deadline, "precompute ended or hung before the kill"
        time.sleep(0.02)
    time.sleep(0.15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not os.path.exists(os.path.join(resumed, CARD_FILE))  # not complete: no card, no visible shard
    assert not [f for f in os.listdir(resumed) if f.startswith("latents-")]
    done_before = sorted(f for f in os.listdir(work) if f.endswith(".json") and f.startswith("unit-"))
    assert done_before and len(done_before) < 6
    cmd, env = _cli(tone_folder, resumed)
    out = subprocess.run(cmd, env=env, check=True, timeout=120, capture_output=True, text=True).stdout
    assert "12 records from 12 files" in out
    assert _dataset_bytes(resumed) == _dataset_bytes(clean)
    # Units finished before the kill were not redone: the rerun encoded only the rest.
    assert f"this process: {12 - 2 * len(done_before)} files" in out


def test_two_processes_split_the_work(tone_folder, tmp_path):
    """The same command on every process, launched like training (``launch.local``): each
    process takes its index and count from the launcher, none is typed per host."""
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    cmd, env = _cli(tone_folder, single)
    subprocess.run(cmd, env=env, check=True, timeout=120, capture_output=True)
    log = str(tmp_path / "codec.log")
    cmd, env = _cli(tone_folder, double, "--wait_timeout_s=60", env={"AUDIODIFF_TEST_CODEC_LOG": log})
    launcher = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1"]
    launcher += [f"--logs_to={tmp_path / 'logs'}", "--timeout_s=120", "--"]
    res = subprocess.run(launcher + cmd, env=env, cwd=REPO, timeout=180, capture_output=True, text=True)
    assert res.returncode == 0, (tmp_path / "logs" / "process_0.log").read_text()[-3000:]
    summary = json.load(open(os.path.join(double, precompute.SUMMARY_FILE)))
    # Unit u ran in process u % 2, each file in exactly one unit, every file once.
    for unit in summary["units"]:
        assert unit["process_index"] == unit["unit"] % 2
    ids = [i for unit in summary["units"] for i in unit["ids"]]
    assert sorted(ids) == [f"song{i:02d}.wav" for i in range(12)]
    calls = [line.split() for line in open(log)]
    assert len(calls) == 12 and len({crc for _, crc in calls}) == 12
    assert len({pid for pid, _ in calls}) == 2
    assert _dataset_bytes(double) == _dataset_bytes(single)


def test_tfds_audio_folder_precompute(tone_folder, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from data_pipeline.tfds_audio_folder import AudioFolder, AudioFolderConfig

    builder = AudioFolder(
        config=AudioFolderConfig(name="tones", folder=tone_folder), data_dir=str(tmp_path / "tfds")
    )
    builder.download_and_prepare(file_format="array_record")
    corpus = precompute.TfdsCorpus("audio_folder/tones", data_dir=str(tmp_path / "tfds"))
    summary = precompute.precompute(
        corpus, str(tmp_path / "out"), PoolingCodec(), files_per_shard=5, progress=False
    )
    assert summary["num_records"] == 12
    records = {r["source_id"]: r for r in load_records(str(tmp_path / "out"))}
    assert sorted(records) == [f"song{i:02d}.wav" for i in range(12)]
    assert records["song03.wav"]["caption"] == "tone number 3"
    assert records["song03.wav"]["labels"]["pitch"] == 440


def _copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_a_changed_corpus_is_updated_incrementally_and_equals_a_clean_run(tone_folder, tmp_path, monkeypatch):
    folder = _copy_folder(tone_folder, tmp_path / "tones")
    out = str(tmp_path / "latents")
    run = lambda corpus_dir, out_dir: precompute.precompute(  # noqa: E731
        precompute.FolderCorpus(corpus_dir), out_dir, PoolingCodec(), files_per_shard=3, progress=False
    )
    run(folder, out)
    # A new file, a changed file (new audio), a changed caption, a removed file.
    sf.write(os.path.join(folder, "song12.wav"), _tone(0.7, 16000, 990.0), 16000)
    sf.write(os.path.join(folder, "song03.wav"), _tone(0.9, 16000, 123.0), 16000)
    rows = [json.loads(line) for line in open(os.path.join(folder, "captions.jsonl"))]
    rows = [r for r in rows if r["file"] != "song05.wav"]
    rows[6]["caption"] = "a new caption for song 7"
    rows.append({"file": "song12.wav", "caption": "tone number 12", "pitch": 990})
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.remove(os.path.join(folder, "song05.wav"))
    log = str(tmp_path / "codec.log")
    monkeypatch.setenv("AUDIODIFF_TEST_CODEC_LOG", log)
    summary = run(folder, out)
    assert not summary.get("already_complete")
    inc = summary["incremental"]
    assert inc["new"] == ["song12.wav"] and inc["changed"] == ["song03.wav", "song07.wav"]
    assert inc["removed"] == ["song05.wav"] and inc["reused"] == 9 and inc["previous_records"] == 12
    assert len(open(log).readlines()) == 3  # only what is new or changed went through the codec
    text = precompute.format_summary(summary)
    assert "1 new, 2 changed, 1 removed files; 9 records of unchanged files reused" in text
    assert "  removed  song05.wav" in text
    records = {r["source_id"]: r for r in load_records(out)}
    assert sorted(records) == sorted([f"song{i:02d}.wav" for i in range(13) if i != 5])
    assert records["song07.wav"]["caption"] == "a new caption for song 7"
    assert records["song03.wav"]["latents"].shape[0] == 45  # the new 0.9 s audio
    # The same bytes as a run from scratch over the changed folder.
    clean = str(tmp_path / "clean")
    run(folder, clean)
    assert _dataset_bytes(out) == _dataset_bytes(clean)
    again = run(folder, out)
    assert again["already_complete"] and _dataset_bytes(out) == _dataset_bytes(clean)


def test_a_dataset_of_another_codec_is_not_updated(tone_folder, tmp_path):
    out = str(tmp_path / "latents")
    corpus = precompute.FolderCorpus(tone_folder)
    precompute.precompute(corpus, out, PoolingCodec(), files_per_shard=6, progress=False)
    before = _dataset_bytes(out)
    with pytest.raises(precompute.PrecomputeError, match="holds a dataset made with codec 'test-pooling'"):
        precompute.precompute(corpus, out, PoolingCodec(hop=80), files_per_shard=6, progress=False)
    assert _dataset_bytes(out) == before
    # Another files_per_shard is no reason to re-encode: the records are reused, the shards recut.
    summary = precompute.precompute(corpus, out, PoolingCodec(), files_per_shard=4, progress=False)
    assert summary["num_shards"] == 3 and summary["incremental"]["reused"] == 12
    assert summary["incremental"]["settings"] == {"files_per_shard": [6, 4]}
