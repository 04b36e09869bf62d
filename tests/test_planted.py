"""Planted bad input (tests/planted.py) through every corpus path: the folder, TFDS, and --kind=check.

Done means: every good file is a record on both paths, every bad file and caption line
is named with its reason, the paths and the check agree on every verdict, nothing
crashes, and a rerun gives the same bytes.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from audiodiff_jax.data.cards import CARD_FILE, DatasetCard
from audiodiff_jax.data.records import load_records
from data_pipeline import audio_folder, precompute
from tests import planted
from tests.helpers import REPO
from tests.precompute_codec import PoolingCodec

CODEC_SPEC = "tests.precompute_codec:make_codec"
VOCAB = 96


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    p = planted.plant(str(tmp_path_factory.mktemp("planted") / "corpus"))
    yield p
    planted.restore_permissions(p.folder)


def _run(corpus, out):
    return precompute.precompute(
        corpus, out, PoolingCodec(), files_per_shard=8, tokenizer_vocab_size=VOCAB, progress=False
    )


@pytest.fixture(scope="module")
def folder_run(plant, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("folder_latents"))
    return out, _run(precompute.FolderCorpus(plant.folder), out)


def _verdicts(plant, problems):
    """{(path relative to the folder, severity, reason)} of summary problems (dicts) or Problems."""
    out = set()
    for p in problems:
        p = p if isinstance(p, dict) else p.to_json()
        rel = os.path.relpath(p["path"], plant.folder)
        out.add((rel, p["severity"], p["reason"]))
    return out


def _dataset_bytes(out_dir):
    card = DatasetCard.load(out_dir)
    files = [CARD_FILE, card.tokenizer] + [s.file for s in card.shards]
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in files}


def _printable(rel):
    return audio_folder.printable(rel)


def _check_outcomes(plant, summary, records):
    """The outcome planted for each kind, as seen in one run's summary and records."""
    assert sorted(r["source_id"] for r in records) == sorted(plant.kept.values())
    skipped = {}
    for rel, severity, reason in _verdicts(plant, summary["skipped"]):
        assert severity == "skipped"
        assert rel not in skipped, f"{rel} skipped twice: {skipped[rel]!r}, {reason!r}"
        skipped[rel] = reason
    assert sorted(skipped) == sorted(plant.skipped)  # every bad one named, nothing good among them
    for rel, text in plant.skipped.items():
        assert text in skipped[rel], (rel, skipped[rel])
    warnings = _verdicts(plant, summary["warnings"])
    for rel, text in plant.warned:
        assert any(r == _printable(rel) and text in reason for r, _, reason in warnings), (rel, text)
    assert summary["num_records"] == len(plant.kept) and summary["num_skipped"] == len(plant.skipped)
    by_id = {r["source_id"]: r for r in records}
    assert by_id["good.wav"]["caption"] == "a good tone" and by_id["good.wav"]["labels"] == {"tempo": 90}
    assert by_id["b_id.wav"]["caption"] == "second of two" and by_id["same"]["caption"] == "first of two"
    assert by_id["typo.wav"]["labels"] == {"captoin": "misspelt"} and by_id["typo.wav"]["caption"] == "typo"
    assert by_id["caf\\xe9.wav"]["caption"] == "caf\ufffd"
    # 50 latent frames per second whatever the file's rate and channels; the long file whole.
    assert by_id["long.wav"]["latents"].shape == (int(planted.LONG_SECONDS * 50), 4)
    for rel in ("surround96k.wav", "stereo48k.flac", "rate8k.wav", "odd_rate.wav", "voice.opus"):
        assert by_id[rel]["latents"].shape[0] == pytest.approx(planted.SECONDS * 50, abs=1), rel


def test_folder_path_keeps_every_good_file_and_names_every_bad_one(plant, folder_run):
    out, summary = folder_run
    _check_outcomes(plant, summary, load_records(out))
    text = precompute.format_summary(summary, max_lines=1000)
    assert f"skipped {len(plant.skipped)}, warnings" in text
    assert f"{os.path.join(plant.folder, planted.CAPTIONS)}:4: not JSON" in text


def test_check_gives_the_verdicts_precompute_gives(plant, folder_run):
    _, summary = folder_run
    entries, problems = audio_folder.scan_folder(plant.folder)
    problems += audio_folder.check_entries(plant.folder, entries, 8000, 1, workers=2)
    assert _verdicts(plant, problems) == _verdicts(plant, summary["skipped"] + summary["warnings"])
    # The command a user runs: no traceback, every verdict printed with its reason.
    cmd = [sys.executable, "-m", "data_pipeline.corpus_main", "--kind=check", f"--folder={plant.folder}"]
    cmd += [f"--codec={CODEC_SPEC}", "--max_lines=1000"]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"{len(entries)} audio files in {plant.folder}" in proc.stdout
        and f"{len(plant.kept)} good, skipped {summary['num_skipped']}, warnings {summary['num_warnings']}"
        in proc.stdout
    ), proc.stdout[:500]
    for p in summary["skipped"] + summary["warnings"]:
        assert f"  {p['severity']:8s} {p['path']}: {p['reason']}" in proc.stdout


def test_tfds_path_gives_the_same_records_and_verdicts(plant, folder_run, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from data_pipeline.tfds_audio_folder import AudioFolder, AudioFolderConfig

    data_dir = str(tmp_path / "tfds")
    config = AudioFolderConfig(name="planted", folder=plant.folder, read_threads=2)
    AudioFolder(config=config, data_dir=data_dir).download_and_prepare(file_format="array_record")
    out = str(tmp_path / "latents")
    summary = _run(precompute.TfdsCorpus("audio_folder/planted", data_dir=data_dir), out)
    records = load_records(out)
    _check_outcomes(plant, summary, records)
    folder_out, folder_summary = folder_run
    assert _verdicts(plant, summary["skipped"] + summary["warnings"]) == _verdicts(
        plant, folder_summary["skipped"] + folder_summary["warnings"]
    )
    # The same audio reached the codec: every record equals the folder path's, latents included.
    theirs = {r["source_id"]: r for r in load_records(folder_out)}
    for r in records:
        other = theirs[r["source_id"]]
        assert (r["caption"], r["labels"], r["seconds_total"]) == (
            other["caption"],
            other["labels"],
            other["seconds_total"],
        )
        np.testing.assert_array_equal(r["latents"], other["latents"])


def test_reruns_are_byte_identical_and_an_unchanged_corpus_is_complete(plant, folder_run, tmp_path):
    out, _ = folder_run
    first = _dataset_bytes(out)
    assert DatasetCard.load(out).tokenizer == "tokenizer.model"
    again = str(tmp_path / "again")
    _run(precompute.FolderCorpus(plant.folder), again)
    assert _dataset_bytes(again) == first  # tokenizer.model included
    summary = _run(precompute.FolderCorpus(plant.folder), out)
    assert summary.get("already_complete") and _dataset_bytes(out) == first
    assert precompute.format_summary(summary).startswith("already complete (no file, caption")


def test_unreadable_permissions_are_named(plant, folder_run):
    if plant.not_planted:
        pytest.skip("; ".join(plant.not_planted))
    _, summary = folder_run
    reasons = {os.path.basename(p["path"]): p["reason"] for p in summary["skipped"]}
    assert "permission denied" in reasons["locked.wav"]
    assert "folder unreadable" in reasons["closed"]
