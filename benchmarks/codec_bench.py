"""Codec quality on held-out renders and encode / decode speed.

    python benchmarks/codec_bench.py --codec=default --heldout_dir=/tmp/codec_audio/heldout

Quality, per clip then averaged (``heldout_dir`` holds WAVs and the ``clips.jsonl``
written by ``python -m data_pipeline.codec_corpus``; clips marked monophonic get the
pitch metric):

- SI-SDR (dB) of decode(encode(x)) against x;
- multi-resolution STFT distance (the training loss's: spectral convergence + log
  magnitude L1, FFT sizes 2048..128);
- mel L1: mean |log10 mel(x) - log10 mel(y)| (80 bands, n_fft 1024, hop 256, floor 1e-5);
- pitch kept: on monophonic clips, the share of frames that librosa pyin finds voiced
  in x whose pitch in y is voiced and within 50 cents.

Speed: seconds of audio encoded / decoded per wall second on a long signal (chunked,
after one warm-up call), on the default JAX device. ``--codec=random:PRESET`` times a
``configs/codec.py`` preset at random weights (speed only: e.g. ``random:stable``, the
64-channel 44.1 kHz stereo layout, on an accelerator).

    python benchmarks/codec_bench.py --codec=random:stable --speed_seconds=300

Real produced songs (``python -m data_pipeline.real_music`` names them and holds some
out of the codec's training), whole songs, pitch on excerpts:

    python benchmarks/codec_bench.py --songs_dir=/tmp/real_music/heldout --speed_seconds=0
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from audiodiff_jax.codec import codec as codec_lib
from audiodiff_jax.codec import config as codec_config
from audiodiff_jax.codec import model as model_lib
from configs import codec as codec_presets


def random_codec(preset: str, latent_channels: int | None = None, **codec_kwargs):
    """A ``JaxCodec`` of the ``configs/codec.py`` preset ``preset`` at random weights
    (``latent_channels`` overrides the preset's); its card is named ``random-PRESET``."""
    cd = codec_presets.get_config(preset)
    cd.model.name = f"random-{preset}"
    if latent_channels:
        cd.model.latent_channels = latent_channels
    m = codec_config.from_configdict(cd).model
    params = jax.jit(model_lib.make_vae(m).init)(jax.random.key(0))
    return codec_lib.JaxCodec(m, params, **codec_kwargs)


def open_codec(name: str):
    """``random:PRESET`` (random weights) or a ``load_codec`` argument."""
    if name.startswith("random:"):
        return random_codec(name.split(":", 1)[1])
    return codec_lib.load_codec(name)


def mel_l1(x: np.ndarray, y: np.ndarray, sr: int) -> float:
    import librosa

    kw = dict(sr=sr, n_fft=1024, hop_length=256, n_mels=80)
    mx = librosa.feature.melspectrogram(y=x, **kw)
    my = librosa.feature.melspectrogram(y=y, **kw)
    return float(np.mean(np.abs(np.log10(mx + 1e-5) - np.log10(my + 1e-5))))


def pitch_kept(x: np.ndarray, y: np.ndarray, sr: int) -> float:
    """Share of x's voiced frames where y is voiced within 50 cents (librosa pyin)."""
    import librosa

    kw = dict(fmin=65.0, fmax=2093.0, sr=sr, frame_length=2048)
    fx, vx, _ = librosa.pyin(x, **kw)
    fy, vy, _ = librosa.pyin(y, **kw)
    voiced = vx & np.isfinite(fx)
    if not voiced.any():
        return float("nan")
    ok = vy & np.isfinite(fy)
    cents = np.full(fx.shape, np.inf)
    both = voiced & ok
    cents[both] = np.abs(1200 * np.log2(fy[both] / fx[both]))
    return float(np.mean(cents[voiced] <= 50.0))


def quality(codec, heldout_dir: str, max_clips: int = 0) -> dict:
    from audiodiff_jax.codec import losses
    from audiodiff_jax.codec.data import load_wav

    sr = codec.model.sample_rate
    meta = {}
    jsonl = os.path.join(heldout_dir, "clips.jsonl")
    if os.path.exists(jsonl):
        for line in open(jsonl):
            row = json.loads(line)
            meta[row["file"]] = row
    files = sorted(glob.glob(os.path.join(heldout_dir, "*.wav")))
    if max_clips:
        files = files[:max_clips]
    rows = []
    for f in files:
        x = load_wav(f, sr, codec.model.audio_channels)
        y = codec.reconstruct(x, sr)
        row = {
            "file": os.path.basename(f),
            "si_sdr_db": losses.si_sdr(x, y),
            "stft_distance": losses.stft_distance(x, y),
            "mel_l1": mel_l1(x.mean(0), y.mean(0), sr),
        }
        if meta.get(os.path.basename(f), {}).get("monophonic"):
            row["pitch_kept"] = pitch_kept(x.mean(0), y.mean(0), sr)
        rows.append(row)
        print(json.dumps(row), flush=True)
    pitch = [r["pitch_kept"] for r in rows if np.isfinite(r.get("pitch_kept", np.nan))]
    return {
        "clips": len(rows),
        "monophonic_clips": len(pitch),
        "seconds": float(sum(load_wav(f, sr, 1).shape[1] for f in files) / sr),
        "si_sdr_db": float(np.mean([r["si_sdr_db"] for r in rows])),
        "si_sdr_db_median": float(np.median([r["si_sdr_db"] for r in rows])),
        "stft_distance": float(np.mean([r["stft_distance"] for r in rows])),
        "mel_l1": float(np.mean([r["mel_l1"] for r in rows])),
        "pitch_kept": float(np.mean(pitch)) if pitch else float("nan"),
    }


def excerpts(x: np.ndarray, count: int, seconds: float, sr: int) -> np.ndarray:
    """``count`` windows of ``seconds`` spread evenly over ``x`` (all of it when shorter), joined."""
    n = int(seconds * sr)
    if x.shape[-1] <= count * n:
        return x
    starts = np.linspace(0, x.shape[-1] - n, count).astype(int)
    return np.concatenate([x[..., s : s + n] for s in starts], axis=-1)


def songs_quality(codec, songs_dir: str, pitch_excerpts: int = 6, excerpt_seconds: float = 10.0) -> dict:
    """Whole songs (any audio format under ``songs_dir``): SI-SDR, STFT distance and mel L1
    over each whole song; pitch kept (pyin, as for renders) on ``pitch_excerpts`` windows of
    ``excerpt_seconds`` spread over each song (pyin runs at ~3x real time on 2 cores)."""
    from audiodiff_jax.codec import losses
    from audiodiff_jax.codec.data import audio_files, load_wav

    sr = codec.model.sample_rate
    files = audio_files(songs_dir)
    if not files:
        raise FileNotFoundError(f"--songs_dir={songs_dir!r} holds no audio files")
    rows = []
    for f in files:
        x = load_wav(f, sr, codec.model.audio_channels)
        t0 = time.perf_counter()
        y = codec.reconstruct(x, sr)
        wall = time.perf_counter() - t0
        xm, ym = x.mean(0), y.mean(0)
        row = {
            "song": os.path.basename(f),
            "seconds": round(x.shape[1] / sr, 1),
            "si_sdr_db": losses.si_sdr(x, y),
            "stft_distance": losses.stft_distance(x, y),
            "mel_l1": mel_l1(xm, ym, sr),
            "pitch_kept": pitch_kept(
                excerpts(xm, pitch_excerpts, excerpt_seconds, sr),
                excerpts(ym, pitch_excerpts, excerpt_seconds, sr),
                sr,
            ),
            "input_peak": float(np.abs(x).max()),
            "output_peak": float(np.abs(y).max()),
            "reconstruct_s": round(wall, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ("si_sdr_db", "stft_distance", "mel_l1", "pitch_kept")
    return {
        "songs": len(rows),
        "seconds": float(sum(r["seconds"] for r in rows)),
        **{k: float(np.nanmean([r[k] for r in rows])) for k in keys},
        "si_sdr_db_median": float(np.median([r["si_sdr_db"] for r in rows])),
        "pitch_excerpts": f"{pitch_excerpts} x {excerpt_seconds:g} s per song",
        "per_song": rows,
    }


def songs_figure(codecs: dict, songs_dir: str, path: str, seconds: float = 6.0) -> str:
    """One row per song: spectrograms of ``seconds`` from the middle of the song, then of
    that excerpt through each codec of ``codecs`` (label -> codec), as a PNG at ``path``."""
    from matplotlib.figure import Figure

    from audiodiff_jax.codec.data import audio_files, load_wav
    from audiodiff_jax.core import report

    files = audio_files(songs_dir)
    sr = next(iter(codecs.values())).model.sample_rate
    cols = 1 + len(codecs)
    fig = Figure(figsize=(3.2 * cols, 1.9 * len(files)), dpi=100, layout="constrained")
    axes = fig.subplots(len(files), cols, squeeze=False)
    for r, f in enumerate(files):
        x = load_wav(f, sr, 1)
        mid, n = x.shape[1] // 2, int(seconds * sr)
        x = x[:, max(0, mid - n // 2) : max(0, mid - n // 2) + n]
        panels = [("original", x)] + [(label, c.reconstruct(x, sr)) for label, c in codecs.items()]
        for col, (label, audio) in enumerate(panels):
            db, (t0, t1, f0, f1) = report.spectrogram_db(audio, sr)
            ax = axes[r][col]
            ax.imshow(
                db,
                origin="lower",
                aspect="auto",
                extent=(t0, t1, f0 / 1000, f1 / 1000),
                cmap="magma",
                vmin=-80.0,
                vmax=0.0,
            )
            ax.set_xlim(0.0, seconds)
            ax.set_title(f"{os.path.basename(f)}: {label}" if col == 0 else label, fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("kHz", fontsize=7)
    report.save_figure_png(fig, path)
    return path


def speed(codec, seconds: float) -> dict:
    sr = codec.model.sample_rate
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal((codec.model.audio_channels, int(seconds * sr)))).clip(-1, 1)
    x = x.astype(np.float32)
    t0 = time.perf_counter()
    # Warm-up: compiles the chunk shapes (a whole batch of chunks and the remainder).
    codec.decode(codec.encode(x[:, : int(sr * min(seconds, 30))], sr))
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    z = codec.encode(x, sr)
    t1 = time.perf_counter()
    codec.decode(z)
    t2 = time.perf_counter()
    return {
        "device": jax.devices()[0].device_kind,
        "codec": codec.card.name,
        "sample_rate": sr,
        "audio_channels": codec.model.audio_channels,
        "latent_channels": codec.card.latent_channels,
        "hop": codec.hop,
        "params_M": round(sum(x.size for x in jax.tree.leaves(codec.params)) / 1e6, 3),
        "signal_seconds": seconds,
        "warmup_incl_compile_s": round(warmup_s, 3),
        "encode_s": round(t1 - t0, 4),
        "decode_s": round(t2 - t1, 4),
        "encode_audio_s_per_s": seconds / (t1 - t0),
        "decode_audio_s_per_s": seconds / (t2 - t1),
        "encode_latent_frames_per_s": z.shape[0] / (t1 - t0),
    }


def main(argv):
    del argv
    codec = open_codec(_CODEC.value)
    out = {"codec": _CODEC.value, "card": codec.card.to_dict()}
    if _HELDOUT.value:
        out["quality"] = quality(codec, _HELDOUT.value, _MAX_CLIPS.value)
    if _SONGS.value:
        out["songs"] = songs_quality(codec, _SONGS.value)
    if _FIGURE.value:
        codecs = {_COMPARE.value: open_codec(_COMPARE.value)} if _COMPARE.value else {}
        codecs[_CODEC.value] = codec
        out["figure"] = songs_figure(codecs, _SONGS.value or _HELDOUT.value, _FIGURE.value)
    if _SPEED_SECONDS.value > 0:
        out["speed"] = speed(codec, _SPEED_SECONDS.value)
    print(json.dumps(out, indent=2))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    # Flags are defined here, not at import, so benchmarks/suite.py can import every bench.
    _CODEC = flags.DEFINE_string(
        "codec", "default", "load_codec argument (default, a folder, a run workdir) or random:PRESET."
    )
    _HELDOUT = flags.DEFINE_string("heldout_dir", "", "Held-out renders (WAV + clips.jsonl).")
    _SONGS = flags.DEFINE_string(
        "songs_dir", "", "Whole songs, any format (e.g. python -m data_pipeline.real_music's heldout/)."
    )
    _FIGURE = flags.DEFINE_string(
        "figure",
        "",
        "Write spectrograms (original, --compare_codec, --codec) of each song's middle here (PNG).",
    )
    _COMPARE = flags.DEFINE_string("compare_codec", "", "Another codec for the --figure, e.g. default.")
    _SPEED_SECONDS = flags.DEFINE_float("speed_seconds", 60.0, "Length of the speed-test signal.")
    _MAX_CLIPS = flags.DEFINE_integer("max_clips", 0, "Use at most this many clips (0 = all).")
    _OUT = flags.DEFINE_string("out_json", "", "Also write the figures here.")
    app.run(main)
