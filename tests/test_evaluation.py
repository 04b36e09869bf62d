"""The evaluation (audiodiff_jax/evaluation, audiodiff-eval) against signals whose answer
is known: click tracks at known tempi, scales and chords in known keys rendered through
the General MIDI soundfont, tones at known loudness, silence, a drone; the Fréchet
distance against its closed form on Gaussians; and the sanity ordering of the set
distance on real renders."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from audiodiff_jax.evaluation import adherence, embeddings, folder, notes, page, song
from tests.helpers import REPO

librosa = pytest.importorskip("librosa")
pytest.importorskip("pyloudnorm")
pretty_midi = pytest.importorskip("pretty_midi")
render = pytest.importorskip("data_pipeline.render")

SR = 22050


def clicks(bpm: float, seconds: float = 12.0) -> np.ndarray:
    times = np.arange(0.25, seconds, 60.0 / bpm)
    return librosa.clicks(times=times, sr=SR, length=int(seconds * SR), click_freq=1500.0)[None] * 0.5


def midi_in_key(tonic: int, mode: str, *, bpm: float = 120.0, repeats: int = 2, program: int = 0):
    """A scale (one octave up and down) then the I-IV-V-I (i-iv-V-i) cadence, in eighths at ``bpm``."""
    steps = [0, 2, 4, 5, 7, 9, 11, 12] if mode == "major" else [0, 2, 3, 5, 7, 8, 11, 12]
    third = 4 if mode == "major" else 3
    chords = [(0, third, 7), (5, 5 + third, 12), (7, 11, 14), (0, third, 7)]
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    inst = pretty_midi.Instrument(program=program)
    beat = 60.0 / bpm
    t = 0.0
    base = 60 + tonic
    for _ in range(repeats):
        for s in steps + steps[::-1]:
            inst.notes.append(pretty_midi.Note(90, base + s, t, t + beat / 2 * 0.9))
            t += beat / 2
        for chord in chords:
            for _ in range(2):
                for s in chord:
                    inst.notes.append(pretty_midi.Note(80, base - 12 + s, t, t + beat * 0.9))
                t += beat
    pm.instruments.append(inst)
    return pm


def rendered(pm) -> np.ndarray:
    return render.render_midi(pm, SR, channels=1, tail_seconds=0.3)


@pytest.fixture(scope="module")
def transcriber():
    tr = notes.load_transcriber()
    if tr is None:
        pytest.skip("basic-pitch or onnxruntime is not installed (the eval extra)")
    return tr


# ---------------------------------------------------------------------------
# Tempo, key, notes


@pytest.mark.parametrize("bpm", [80.0, 118.0, 150.0])
def test_tempo_of_click_tracks(bpm):
    est = song.song_metrics(clicks(bpm), SR)["tempo_bpm"]
    assert song.tempo_agrees(est, bpm), f"click track at {bpm} bpm read as {est}"


@pytest.mark.parametrize("tonic,mode", [(2, "major"), (9, "minor"), (8, "major"), (6, "minor")])
def test_key_of_rendered_scales_and_cadences(tonic, mode):
    row = song.song_metrics(rendered(midi_in_key(tonic, mode)), SR, window_seconds=5.0)
    assert row["key"] == song.key_name(tonic, mode), row["key"]
    assert row["key_confidence"] > 0.6
    assert song.tempo_agrees(row["tempo_bpm"], 120.0) or song.tempo_agrees(row["tempo_bpm"], 240.0)


def test_notes_of_a_rendered_scale(transcriber):
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    pitches = [60, 62, 64, 65, 67, 69, 71, 72]
    for i, p in enumerate(pitches):
        inst.notes.append(pretty_midi.Note(100, p, 0.5 * i, 0.5 * i + 0.45))
    pm.instruments.append(inst)
    scale = rendered(pm)
    found = transcriber.transcribe(scale[0], SR)
    assert sorted(n.pitch for n in found) == pitches
    assert [round(n.start * 2) for n in sorted(found, key=lambda n: n.start)] == list(range(8))
    row = song.song_metrics(scale, SR, transcriber=transcriber)
    assert row["pitch_source"] == "basic-pitch"
    assert row["note_density"] == pytest.approx(8 / row["seconds"], rel=0.01)
    # A C major triad held: three pitch classes of equal duration -> log2(3) bits. (The
    # transcriber hears the decaying piano re-strike or a faint harmonic, at most.)
    triad = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    for p in (48, 52, 55):
        inst.notes.append(pretty_midi.Note(100, p, 0.0, 2.0))
    triad.instruments.append(inst)
    audio = rendered(triad)
    assert {48, 52, 55} <= {n.pitch for n in transcriber.transcribe(audio[0], SR)}
    row = song.song_metrics(audio, SR, transcriber=transcriber)
    assert row["pitch_class_entropy"] == pytest.approx(np.log2(3), abs=0.15)


# ---------------------------------------------------------------------------
# Loudness and peaks


def sine(freq: float, dbfs: float, seconds: float = 5.0, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR * 2)) / (SR * 2)  # at 44.1 kHz
    return (10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t + phase))[None].astype(np.float32)


def test_loudness_of_tones_matches_bs1770():
    # BS.1770: a 997 Hz sine's K-weighting gain (+0.691 dB) cancels the -0.691 offset, so
    # L = 10 log10(sum over channels of A^2/2): -20 dBFS peak -> -23.01 LUFS mono.
    mono = sine(997.0, -20.0)
    assert song.integrated_lufs(mono, 2 * SR) == pytest.approx(10 * np.log10(0.1**2 / 2), abs=0.05)
    stereo = np.concatenate([mono, mono])  # both channels: +3.01 dB
    assert song.integrated_lufs(stereo, 2 * SR) == pytest.approx(-20.0, abs=0.05)
    quiet = sine(997.0, -40.0)
    assert song.integrated_lufs(quiet, 2 * SR) == pytest.approx(-43.01, abs=0.05)
    assert song.integrated_lufs(np.zeros((1, 2 * SR)), 2 * SR) is None


def test_true_peak_sees_between_samples_and_clipping_is_counted():
    # fs/4 sine at 45 degrees: every sample is at +-0.707, the waveform peaks at 1.0.
    x = np.sin(np.pi / 2 * np.arange(44100) + np.pi / 4)[None].astype(np.float32) * 0.99
    assert float(20 * np.log10(np.max(np.abs(x)))) == pytest.approx(-3.10, abs=0.02)
    assert song.true_peak_dbtp(x) == pytest.approx(20 * np.log10(0.99), abs=0.3)
    row = song.song_metrics(np.clip(sine(440.0, 3.0), -1, 1), 2 * SR)
    assert 0.3 < row["clipped_share"] < 0.6  # |1.41 sin| >= 1 for half of each period
    assert song.song_metrics(sine(440.0, -6.0), 2 * SR)["clipped_share"] == 0.0


# ---------------------------------------------------------------------------
# Silence, drones, windows


def test_silence_and_drone_and_music():
    silence = song.song_metrics(np.zeros((1, 6 * SR), np.float32), SR)
    assert silence["silence_share"] == 1.0 and silence["lufs"] is None and silence["key"] is None
    assert silence["tempo_bpm"] == 0.0 and silence["onset_rate"] == 0.0 and not silence["drone"]
    t = np.arange(10 * SR) / SR
    chord = sum(np.sin(2 * np.pi * f * t) for f in (110.0, 164.8, 220.0, 277.2)) / 4
    drone = song.song_metrics((chord * (0.8 + 0.2 * np.sin(2 * np.pi * 0.2 * t)))[None], SR)
    assert drone["drone"], drone
    assert drone["chroma_stability"] > 0.95 and drone["onset_rate"] < 0.25
    music = song.song_metrics(rendered(midi_in_key(0, "major")), SR)
    assert not music["drone"] and music["onset_rate"] > 1.0 and music["chroma_stability"] < 0.95
    half = np.concatenate(
        [rendered(midi_in_key(0, "major", repeats=1)), np.zeros((1, 8 * SR), np.float32)], 1
    )
    assert 0.3 < song.song_metrics(half, SR)["silence_share"] < 0.7


def test_window_bounds():
    assert song.window_bounds(20.0) == [(0.0, 20.0)]
    assert song.window_bounds(65.0) == [(0.0, 30.0), (30.0, 65.0)]  # a 5 s tail joins
    assert song.window_bounds(75.0) == [(0.0, 30.0), (30.0, 60.0), (60.0, 75.0)]


def test_key_and_tempo_per_window_and_their_stability():
    c_major = rendered(midi_in_key(0, "major", bpm=120.0))
    f_sharp = rendered(midi_in_key(6, "major", bpm=120.0))
    n = min(c_major.shape[1], f_sharp.shape[1])
    seconds = n / SR
    modulating = np.concatenate([c_major[:, :n], c_major[:, :n], f_sharp[:, :n]], 1)
    row = song.song_metrics(modulating, SR, window_seconds=seconds)
    keys = [w["key"] for w in row["window_metrics"]]
    assert keys == ["C major", "C major", "F# major"], keys
    assert row["key"] == "C major" and row["key_stability"] == pytest.approx(2 / 3, abs=1e-3)
    same = song.song_metrics(np.concatenate([c_major, c_major], 1), SR, window_seconds=c_major.shape[1] / SR)
    assert same["key_stability"] == 1.0 and same["tempo_stability"] == 1.0


# ---------------------------------------------------------------------------
# Prompt adherence


def test_labels_from_prompts_and_manifests():
    assert adherence.labels_from({"prompt": "a waltz in F# minor at 96 bpm"}) == {
        "tempo": 96.0,
        "key": (6, "minor"),
    }
    corpus = {"caption": "...", "labels": {"key": "B-", "mode": "major", "tempo": 72}}
    assert adherence.labels_from(corpus) == {"tempo": 72.0, "key": (10, "major")}
    assert adherence.labels_from({"prompt": "solo cello"}) == {}
    ok = adherence.adherence({"tempo_bpm": 123.0, "key": "Gb minor"}, {"tempo": 120.0, "key": (6, "minor")})
    assert ok["tempo_ok"] and ok["key_ok"] and ok["key_score"] == 1.0
    octave = adherence.adherence(
        {"tempo_bpm": 240.0, "key": "A major"}, {"tempo": 120.0, "key": (6, "minor")}
    )
    assert not octave["tempo_ok"] and octave["tempo_ok_octave"]
    assert not octave["key_ok"] and octave["key_score"] == 0.3  # relative major
    assert adherence.mirex_key_score((7, "major"), (0, "major")) == 0.5
    assert adherence.mirex_key_score((0, "minor"), (0, "major")) == 0.2


# ---------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_forms():
    g = embeddings.Gaussian
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    one = embeddings.frechet_distance(
        g(np.array([1.0]), np.array([[4.0]]), 0), g(np.array([-2.0]), np.array([[1.0]]), 0)
    )
    assert one == pytest.approx(9.0 + 1.0, rel=1e-9)
    # Diagonal: |m1 - m2|^2 + sum (sqrt(v1) - sqrt(v2))^2.
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 3, 5), rng.uniform(0.5, 3, 5)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    a, b = g(m1, np.diag(v1), 0), g(m2, np.diag(v2), 0)
    assert embeddings.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # A rotation of both changes nothing (full covariances).
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rot = embeddings.frechet_distance(
        g(q @ m1, q @ np.diag(v1) @ q.T, 0), g(q @ m2, q @ np.diag(v2) @ q.T, 0)
    )
    assert rot == pytest.approx(want, rel=1e-6)
    assert embeddings.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # From samples, the estimate approaches the closed form.
    xa = rng.normal(size=(40000, 5)) * np.sqrt(v1) + m1
    xb = rng.normal(size=(40000, 5)) * np.sqrt(v2) + m2
    est = embeddings.frechet_distance(embeddings.Gaussian.of(xa), embeddings.Gaussian.of(xb))
    assert est == pytest.approx(want, rel=0.03)


def test_user_embeddings_from_local_files(tmp_path):
    audio = rendered(midi_in_key(0, "major", repeats=1))
    proj = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
    np.savez(tmp_path / "proj.npz", matrix=proj, bias=np.ones(8, np.float32))
    got = embeddings.get_embedder(f"npz:{tmp_path / 'proj.npz'}")(audio, SR)
    np.testing.assert_allclose(got, embeddings.mel_embed(audio, SR) @ proj + 1.0, rtol=1e-5)
    np.savez(tmp_path / "bad.npz", matrix=np.ones((3, 4)))
    with pytest.raises(embeddings.EmbeddingError, match=r"bad.npz: matrix has shape \(3, 4\)"):
        embeddings.get_embedder(f"npz:{tmp_path / 'bad.npz'}")
    with pytest.raises(embeddings.EmbeddingError, match="use one of"):
        embeddings.get_embedder("clap")
    with pytest.raises(embeddings.EmbeddingError, match="no such file"):
        embeddings.get_embedder(f"onnx:{tmp_path / 'missing.onnx'}")
    # An ONNX model from a local path: basic-pitch's own (input [batch, 43844, 1] at 22050 Hz).
    bp = pytest.importorskip("basic_pitch")
    model = os.path.join(os.path.dirname(bp.__file__), "saved_models", "icassp_2022", "nmp.onnx")
    emb = embeddings.get_embedder(f"onnx:{model}@22050")
    out = emb(audio, SR)
    assert out.shape == (-(-audio.shape[1] // 43844), 88) and np.all(np.isfinite(out))


# ---------------------------------------------------------------------------
# The sanity ordering on real renders


def test_set_distance_orders_real_renders():
    eval_sets = pytest.importorskip("data_pipeline.eval_sets")
    pytest.importorskip("music21")
    kw = dict(seconds=5.0, sample_rate=SR, seed=0)
    sets = {
        "train": eval_sets.render_scores("train", 6, **kw),
        "heldout": eval_sets.render_scores("heldout", 6, **kw),
        "other": eval_sets.render_scores("train", 6, other_timbres=True, **kw),
        "noise": eval_sets.drones_and_noise(6, **kw),
    }
    embed = embeddings.get_embedder(embeddings.DEFAULT_EMBEDDING)
    g = {k: embeddings.Gaussian.of(np.concatenate([embed(a, SR) for a in v])) for k, v in sets.items()}
    d = {k: embeddings.frechet_distance(g["train"], g[k]) for k in ("heldout", "other", "noise")}
    assert d["heldout"] < d["other"] < d["noise"], d


# ---------------------------------------------------------------------------
# A folder like a sweep's: manifest, metrics files, summary, page


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsweep")
    out, ref = root / "sweep", root / "reference"
    out.mkdir()
    (ref / "a").mkdir(parents=True)
    rows = []
    for i, (guidance, sampler, tonic) in enumerate([(3.0, "euler", 2), (7.0, "euler", 2), (3.0, "heun", 7)]):
        name = f"song-{i}.wav"
        sf.write(out / name, rendered(midi_in_key(tonic, "major", repeats=1)).T, SR, subtype="PCM_16")
        rows.append(
            {
                "id": f"id{i}",
                "file": name,
                "spectrogram": f"song-{i}.png",
                "prompt": "piano scales in D major, 120 bpm",
                "guidance": guidance,
                "sampler": sampler,
                "steps": 10,
                "seed": i,
                "checkpoint_step": 100,
            }
        )
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    for i in range(2):
        sf.write(ref / "a" / f"r{i}.wav", rendered(midi_in_key(2 * i, "major", repeats=1, program=48)).T, SR)
    result = folder.evaluate_folder(str(out), reference=str(ref), progress=False)
    return out, result


def test_evaluate_folder_writes_rows_keyed_by_manifest_id(sweep_folder):
    out, result = sweep_folder
    assert [r["id"] for r in result.rows] == ["id0", "id1", "id2"]
    lines = [json.loads(x) for x in (out / folder.METRICS_FILE).read_text().splitlines()]
    assert lines == result.rows
    by_id = {r["id"]: r for r in lines}
    assert by_id["id0"]["guidance"] == 3.0 and by_id["id2"]["sampler"] == "heun"
    assert by_id["id0"]["key"] == "D major" and by_id["id0"]["key_ok"]
    assert by_id["id2"]["key"] == "G major" and not by_id["id2"]["key_ok"]  # the prompt said D major
    assert by_id["id0"]["key_label"] == "D major" and by_id["id0"]["tempo_label"] == 120.0
    summary = json.loads((out / folder.SUMMARY_FILE).read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["adherence"]["key_accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    assert "octave errors wrong" in summary["adherence"]["tempo_tolerance"]
    assert "estimator_ceilings" in summary["adherence"]
    assert [u["where"].endswith("broken.wav") for u in summary["unreadable"]] == [True]
    dist = summary["set_distance"]
    assert dist["embedding"] == embeddings.DEFAULT_EMBEDDING and dist["frechet_distance"] > 0
    assert dist["windows"] >= 3 * 8 and dist["reference_windows"] >= 2 * 8


def test_eval_page_plots_and_headless_chromium(sweep_folder, tmp_path):
    out, result = sweep_folder
    path = page.write_eval_page(str(out), result.rows, result.summary, title="eval <test>")
    assert page.varying_axes(result.rows) == ["guidance", "sampler"]
    for axis in ("guidance", "sampler"):
        with Image.open(out / f"eval-{axis}.png") as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert not (out / "eval-steps.png").exists()  # one value: nothing to plot
    html = open(path).read()
    assert "eval &lt;test&gt;" in html and html.count('<tr data-id="') == 3
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed: apt-get update && apt-get install -y chromium")
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        f"file://{path}",
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-plots-ok="2"' in dom, "the metric plots did not decode in the browser"
    assert "Set distance" in dom and "broken.wav" in dom


def test_rerun_measures_only_changed_songs(sweep_folder, tmp_path, monkeypatch):
    out, result = sweep_folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # copy2: same sizes and modification times
    (copy / "broken.wav").unlink()
    measured = []
    real = song.song_metrics
    monkeypatch.setattr(song, "song_metrics", lambda *a, **k: measured.append(1) or real(*a, **k))
    again = folder.evaluate_folder(str(copy), progress=False)
    assert measured == [] and again.rows == result.rows
    sf.write(copy / "song-1.wav", clicks(100.0, 4.0).T, SR, subtype="PCM_16")  # a new song-1
    again = folder.evaluate_folder(str(copy), progress=False)
    assert len(measured) == 1 and again.rows[0] == result.rows[0] and again.rows[2] == result.rows[2]
    assert again.rows[1]["id"] == "id1" and again.rows[1]["seconds"] == 4.0


def test_cli_help_bad_input_and_run(sweep_folder, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "audiodiff_jax.programs.eval_main"]
    run = lambda *a: subprocess.run(base + list(a), capture_output=True, text=True, env=env, timeout=300)  # noqa: E731
    helped = run("--help")
    assert helped.returncode == 0 and "--reference" in helped.stdout and "metrics.jsonl" in helped.stdout
    missing = run(f"--folder={tmp_path / 'nope'}")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "nope does not exist" in missing.stderr
    bad = run(f"--folder={tmp_path}", "--embedding=clap", f"--reference={tmp_path}")
    assert bad.returncode == 2 and "no audio files" in bad.stderr
    small = tmp_path / "small"
    small.mkdir()
    sf.write(small / "x.wav", clicks(100.0, 6.0).T, SR)
    done = run(f"--folder={small}", "--notranscribe")
    assert done.returncode == 0, done.stderr
    row = json.loads((small / "metrics.jsonl").read_text())
    assert row["id"] == "x.wav" and song.tempo_agrees(row["tempo_bpm"], 100.0)
    assert (small / "eval.html").exists()
