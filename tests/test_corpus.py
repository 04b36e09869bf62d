"""Corpus builders: General MIDI rendering, music21 score clips, MMA grooves, audio folders."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("music21")
pytest.importorskip("tinysoundfont")

from data_pipeline import audio_folder, corpus_grooves, corpus_scores, render  # noqa: E402

PEAK = 10 ** (render.DEFAULT_PEAK_DB / 20)


@pytest.fixture(scope="module")
def chorale():
    from music21 import corpus

    render.configure_music21()
    return corpus.parse("bach/bwv66.6")  # F# minor, 4/4, four voices


def test_render_piece_states_exact_facts_and_never_clips(chorale):
    audio, facts = render.render_piece(
        chorale, programs=[73, 68, 71, 70], tempo=120, transpose=-2, measures=(1, 2), sample_rate=16000
    )
    # F# minor down a major second is E minor, written in the score (not guessed).
    assert (facts.key, facts.mode, facts.key_source) == ("E", "minor", "score")
    assert facts.time_signature == "4/4" and facts.tempo == 120
    # Two 4/4 bars at 120 bpm = 4 s, plus the 1 s release tail.
    assert audio.shape == (2, 5 * 16000)
    assert audio.dtype == np.float32
    np.testing.assert_allclose(np.abs(audio).max(), PEAK, rtol=1e-5)
    # The pickup bar (one quarter) comes before measure 1.
    assert facts.seconds_start == pytest.approx(0.5)
    assert facts.seconds_total == pytest.approx(float(chorale.highestTime) * 0.5)
    # Deterministic, and the caller's score keeps its own tempo marks.
    again, _ = render.render_piece(
        chorale, programs=[73, 68, 71, 70], tempo=120, transpose=-2, measures=(1, 2), sample_rate=16000
    )
    np.testing.assert_array_equal(audio, again)
    from music21 import tempo

    assert [m.number for m in chorale.recurse().getElementsByClass(tempo.MetronomeMark)][:1] != [120]


def test_instruments_change_the_sound(chorale):
    kw = dict(tempo=100, measures=(1, 1), sample_rate=16000, channels=1)
    flute, _ = render.render_piece(chorale, programs=[73], **kw)
    organ, _ = render.render_piece(chorale, programs=[19], **kw)
    assert flute.shape == organ.shape == (1, flute.shape[1])
    assert np.abs(flute - organ).mean() > 0.01


def test_transposition_spelling_prefers_fewer_accidentals():
    from music21 import key, stream

    s = stream.Score([stream.Part([key.Key("F")])])
    assert render.transpose_interval(s, 6) == "A4"  # F -> B major (5 sharps), not Cb (7 flats)
    s = stream.Score([stream.Part([key.Key("D")])])
    assert render.transpose_interval(s, -1) == "-A1"  # D -> Db major (5 flats), not C# (-m2: 7 sharps)


def test_render_clips_writes_wavs_and_a_manifest(tmp_path):
    path = corpus_scores.render_clips(
        str(tmp_path), 3, seed=1, sample_rate=16000, clip_seconds=3.0, collections=["bach", "essenFolksong"]
    )
    rows = [json.loads(line) for line in open(path)]
    assert [r["id"] for r in rows] == [f"score-1-{i:06d}" for i in range(3)]
    for r in rows:
        audio, sr = sf.read(tmp_path / r["audio"], always_2d=True)
        assert sr == 16000 and audio.shape[1] == 2 and 0 < len(audio) <= 3 * 16000
        assert np.abs(audio).max() <= PEAK + 1e-3  # 16-bit rounding
        labels = r["labels"]
        assert labels["collection"] in ("bach", "essenFolksong")
        # The caption states the label facts.
        assert f"{labels['key']} {labels['mode']}" in r["caption"]
        assert f"{labels['tempo']} bpm" in r["caption"]
        assert labels["instruments"].split(", ")[0] in r["caption"]
        assert r["seconds_total"] >= r["seconds_start"] + len(audio) / sr - 1e-3
    # Clip i is a pure function of (seed, i).
    clip = corpus_scores.render_clip(
        1, 2, sample_rate=16000, clip_seconds=3.0, collections=["bach", "essenFolksong"]
    )
    assert clip.entry.caption == rows[2]["caption"]


def test_spelled_chords_are_enharmonically_right():
    major = corpus_grooves.MAJOR_PROGRESSIONS["I-V-vi-IV"]
    assert corpus_grooves.spell_chords(major, "Db", "major") == ["Db", "Ab", "Bbm", "Gb"]
    minor = corpus_grooves.MINOR_PROGRESSIONS["ii-V-i"]
    assert corpus_grooves.spell_chords(minor, "F#", "minor") == ["G#m7b5", "C#7", "F#m7", "F#m7"]
    blues = corpus_grooves.MAJOR_PROGRESSIONS["12-bar blues"]
    assert corpus_grooves.spell_chords(blues, "Eb", "major")[4] == "Ab7"


def test_groove_clips(tmp_path):
    if corpus_grooves.shutil.which("mma") is None:
        pytest.skip("MMA is not installed (apt-get install -y mma); the groove corpus needs it")
    path = corpus_grooves.render_grooves(
        str(tmp_path), 2, seed=3, sample_rate=16000, clip_seconds=3.0, grooves=["BossaNova", "Waltz"]
    )
    rows = [json.loads(line) for line in open(path)]
    for r in rows:
        labels = r["labels"]
        assert labels["groove"] in ("BossaNova", "Waltz")
        assert labels["genre"] in r["caption"] and f"{labels['tempo']} bpm" in r["caption"]
        assert labels["time_signature"] == ("3/4" if labels["groove"] == "Waltz" else "4/4")
        # Every named instrument is in the caption; grooves have a rhythm section.
        assert "drums" in labels["instruments"]
        audio, sr = sf.read(tmp_path / r["audio"])
        assert sr == 16000 and len(audio) == 3 * 16000 and np.abs(audio).max() > 0.5


def test_missing_mma_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(corpus_grooves.shutil, "which", lambda name: None)
    with pytest.raises(corpus_grooves.MmaMissing, match="apt-get install -y mma"):
        corpus_grooves.render_grooves("/nonexistent", 1)


def test_audio_folder_captions_from_csv_and_file_names(tmp_path):
    tone = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    os.makedirs(tmp_path / "jazz")
    for name in ("jazz/slow_piano-trio.wav", "b.flac", "c.ogg", "d.wav"):
        sf.write(tmp_path / name, tone, 8000)
    (tmp_path / "captions.csv").write_text(
        "file,caption,tempo,genre\n"
        "b.flac,a calm flute,72,ambient\n"
        "c.ogg,first caption,90,\n"
        "c.ogg,second caption,91,\n"
        "gone.wav,a file that is not there,1,\n"
        "d.wav,,100,\n"
    )
    entries, problems = audio_folder.scan_folder(str(tmp_path))
    by_id = {e.id: e for e in entries}
    assert sorted(by_id) == ["b.flac", "c.ogg", "d.wav", "jazz/slow_piano-trio.wav"]  # ids keep the extension
    b = by_id["b.flac"]
    assert b.caption == "a calm flute" and b.labels == {"tempo": 72, "genre": "ambient"}
    assert by_id["c.ogg"].caption == "first caption"
    assert by_id["d.wav"].caption == "d"
    assert by_id["jazz/slow_piano-trio.wav"].caption == "jazz, slow piano trio"
    reasons = {(os.path.basename(p.path), p.severity): p.reason for p in problems}
    assert "not found" in reasons[("gone.wav", "skipped")]
    assert "2 different caption rows" in reasons[("c.ogg", "warning")]
    assert "empty caption" in reasons[("d.wav", "warning")]
    assert "no caption in captions.csv" in reasons[("slow_piano-trio.wav", "warning")]


def test_real_music_folders(tmp_path):
    """data_pipeline/real_music: a missing package is named with its install command; the
    installed songs become train/ and heldout/ links (held-out ones only in heldout/) and
    songs.json says which is which, with the licence."""
    from audiodiff_jax.core.errors import UserError
    from data_pipeline import real_music

    music = tmp_path / "pkg" / "music"
    (music / "album").mkdir(parents=True)
    for name in ("a song.ogg", "album/b.flac"):
        sf.write(music / name, np.zeros(8000, np.float32), 8000, format=name.rsplit(".", 1)[1].upper())
    pkg = real_music.Package("some-music", str(music / "**" / "*.*"), "GPL-2+", "someone")
    absent = real_music.Package("other-music", str(tmp_path / "none" / "*.ogg"), "GPL-2+", "x")
    with pytest.raises(
        UserError, match="other-music not installed; run: apt-get install -y some-music other-music"
    ):
        real_music.find_songs((pkg, absent), heldout=())
    with pytest.raises(UserError, match="held-out songs"):
        real_music.find_songs((pkg,), heldout=("some-music/c.ogg",))
    songs = real_music.find_songs((pkg,), heldout=("some-music/a song.ogg",))
    summary = real_music.write_folders(str(tmp_path / "out"), songs)
    assert sorted(os.listdir(tmp_path / "out" / "heldout")) == ["some-music-a_song.ogg"]
    assert sorted(os.listdir(tmp_path / "out" / "train")) == ["some-music-album-b.flac"]
    assert {s["file"]: s["split"] for s in summary["songs"]} == {
        "some-music-a_song.ogg": "heldout",
        "some-music-album-b.flac": "train",
    }
    assert json.load(open(tmp_path / "out" / "songs.json"))["songs"][0]["licence"] == "GPL-2+"
    assert summary["songs"][0]["seconds"] == 1.0
