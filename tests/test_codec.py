"""The codec: config, shapes and latent rate per preset, chunking, bad input, shipped weights.

Training (a few steps lower the loss, resume equality, discriminator) is in
``tests/test_codec_train.py``.
"""

import os

import jax
import numpy as np
import pytest

from audiodiff_jax.codec import chunked, inputs, losses
from audiodiff_jax.codec import config as codec_config
from audiodiff_jax.codec import model as model_lib
from audiodiff_jax.codec.codec import JaxCodec, load_codec
from audiodiff_jax.core.config import ConfigError
from configs import codec as codec_configs

TESTDATA = os.path.join(os.path.dirname(codec_config.__file__), "testdata")
CLIP = os.path.join(TESTDATA, "heldout_clip.wav")
# Floors of the shipped weights on the bundled held-out clip (3 s of heldout-0000).
# Measured: SI-SDR 6.98 dB, STFT distance 1.61 (BENCHMARKS.md has the 40-clip figures).
# References: the previous default, trained without a strong waveform term, scored
# -48.6 dB and 2.10 (magnitudes only, no phase); white noise at the clip's level scores
# STFT 4.26, silence 10.3 and about -120 dB.
SI_SDR_FLOOR_DB = 4.0
STFT_DISTANCE_CEILING = 1.8


def _cfg(preset: str, **changes) -> codec_config.CodecConfig:
    cd = codec_configs.get_config(preset)
    for k, v in changes.items():
        section, key = k.split(".")
        cd[section][key] = v
    return codec_config.from_configdict(cd)


@pytest.fixture(scope="module")
def tiny_codec():
    cfg = _cfg("tiny")
    params = jax.jit(model_lib.make_vae(cfg.model).init)(jax.random.key(0))
    return JaxCodec(cfg.model, params, chunk_frames=64, overlap_frames=32, batch_size=2)


# ---------------------------------------------------------------------------
# Config


def test_config_refuses_unknown_and_missing_keys():
    cd = codec_configs.get_config("small")
    cd.model.unknown_width = 3
    with pytest.raises(ConfigError, match="model.unknown_width"):
        codec_config.from_configdict(cd)
    d = codec_configs.get_config("small").to_dict()
    del d["loss"]["kl_weight"]
    with pytest.raises(ConfigError, match="loss.kl_weight"):
        codec_config.from_configdict(d)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="data.crop_samples=1000 is not a multiple of the hop 1024"):
        codec_config.validate(_cfg("small", **{"data.crop_samples": 1000}))
    with pytest.raises(ConfigError, match="model.widths has 3 entries"):
        codec_config.validate(_cfg("small", **{"model.widths": (8, 16, 32)}))
    with pytest.raises(ConfigError, match="global_batch_size=6 is not divisible by mesh.data"):
        codec_config.validate(_cfg("small", **{"data.global_batch_size": 6}), num_devices=8)
    with pytest.raises(ValueError, match="unknown preset"):
        codec_configs.get_config("huge")


# ---------------------------------------------------------------------------
# Shapes and latent rate per preset


@pytest.mark.parametrize(
    "preset,sample_rate,channels,hop,latent_channels",
    [("small", 22050, 1, 1024, 32), ("stable", 44100, 2, 2048, 64), ("tiny", 8000, 1, 64, 4)],
)
def test_shapes_and_latent_rate(preset, sample_rate, channels, hop, latent_channels):
    cfg = _cfg(preset)
    codec_config.validate(cfg)
    m = cfg.model
    assert (m.sample_rate, m.audio_channels, codec_config.hop_of(m), m.latent_channels) == (
        sample_rate,
        channels,
        hop,
        latent_channels,
    )
    if preset != "tiny":
        assert abs(m.sample_rate / codec_config.hop_of(m) - 21.533) < 1e-3  # Stable Audio's latent rate
    fns = model_lib.make_vae(m)
    frames = 5
    audio = jax.ShapeDtypeStruct((2, frames * hop, channels), np.float32)
    latents = jax.ShapeDtypeStruct((2, frames, latent_channels), np.float32)
    # Abstract evaluation: shapes of the stable preset without its compute.
    enc = jax.eval_shape(lambda p, x: fns.merge(p).encode(x), fns.abstract_params(), audio)
    dec = jax.eval_shape(lambda p, z: fns.merge(p).decode(z), fns.abstract_params(), latents)
    assert enc.shape == (2, frames, 2 * latent_channels)
    assert dec.shape == (2, frames * hop, channels)


def test_tiny_codec_encode_decode_lengths(tiny_codec):
    hop = tiny_codec.hop
    for n in (1, hop - 1, hop, 5 * hop + 7, 100 * hop + 3):  # short, ragged, longer than a chunk
        x = np.random.default_rng(n).uniform(-0.5, 0.5, (1, n)).astype(np.float32)
        z = tiny_codec.encode(x, 8000)
        assert z.shape == (-(-n // hop), 4)
        assert tiny_codec.decode(z).shape == (1, z.shape[0] * hop)


# ---------------------------------------------------------------------------
# Chunking


def test_crossfade_weights_sum_to_one():
    # With the identity as the "network", any length must come back unchanged:
    # the chunk weights sum to exactly one everywhere, including the moved last chunk.
    for frames in (3, 40, 41, 97, 1000):
        x = np.random.default_rng(frames).standard_normal((frames * 4, 2)).astype(np.float32)
        y = chunked.chunked_apply(
            lambda b: b, x, in_per_frame=4, out_per_frame=4, chunk_frames=40, overlap_frames=12, batch_size=3
        )
        np.testing.assert_allclose(y, x, atol=1e-6)
    with pytest.raises(ValueError, match="overlap_frames"):
        chunked.chunked_apply(
            lambda b: b, x, in_per_frame=4, out_per_frame=4, chunk_frames=40, overlap_frames=30
        )


def test_chunked_memory_is_the_output_plus_the_chunks():
    """A long decode-shaped call (1 latent frame -> 256 samples) allocates the output once
    and per-chunk buffers, nothing of full length per chunk join (tracemalloc sees numpy)."""
    import tracemalloc  # noqa: PLC0415

    frames, hop = 6000, 256
    x = np.ones((frames, 1), np.float32)
    up = lambda b: np.repeat(b, hop, axis=1)
    out_bytes = frames * hop * 4
    tracemalloc.start()
    try:
        y = chunked.chunked_apply(
            up, x, in_per_frame=1, out_per_frame=hop, chunk_frames=256, overlap_frames=64, batch_size=4
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(y, 1.0, atol=1e-6)
    chunk_bytes = 4 * 256 * hop * 4  # one batch of output chunks
    assert peak < out_bytes + 6 * chunk_bytes, (peak / 1e6, out_bytes / 1e6)


def test_short_inputs_share_a_few_programs(tiny_codec):
    """Clips of 12 different lengths below one chunk compile at most 3 encoders and 3
    decoders (16, 32, 64 frames), and give the same latents as a single pass of their own
    length except in the last frames, which see the padding's silence."""
    codec = JaxCodec(tiny_codec.model, tiny_codec.params, chunk_frames=64, overlap_frames=32, batch_size=2)
    rng = np.random.default_rng(1)
    clips = {f: rng.uniform(-0.5, 0.5, (1, f * codec.hop)).astype(np.float32) for f in range(5, 65, 5)}
    latents = {}
    for frames, x in clips.items():
        latents[frames] = codec.encode(x, 8000)
        assert latents[frames].shape[0] == frames
        assert codec.decode(latents[frames]).shape[-1] == frames * codec.hop
    assert codec._encode._cache_size() == 3 and codec._decode._cache_size() == 3
    for frames in (30, 45, 60):
        single = codec.encode(clips[frames], 8000, single_pass=True)
        np.testing.assert_allclose(latents[frames][: frames - 8], single[: frames - 8], atol=1e-4)


def test_chunked_matches_single_pass(tiny_codec):
    """Stated tolerance: chunked and single-pass results agree within 1e-4 (absolute,
    for signals of unit scale) when the overlap margin covers the receptive field."""
    x = np.random.default_rng(0).uniform(-0.8, 0.8, (1, 150 * tiny_codec.hop + 11)).astype(np.float32)
    z1 = tiny_codec.encode(x, 8000, single_pass=True)
    z2 = tiny_codec.encode(x, 8000)
    np.testing.assert_allclose(z2, z1, atol=1e-4)
    y1 = tiny_codec.decode(z1, single_pass=True)
    y2 = tiny_codec.decode(z1)
    np.testing.assert_allclose(y2, y1, atol=1e-4)


def _seam_energy_db(diff: np.ndarray, ref: np.ndarray, boundaries, half_width: int) -> float:
    """Energy of ``diff`` in windows around ``boundaries`` relative to ``ref``'s there, dB."""
    idx = np.concatenate(
        [np.arange(max(b - half_width, 0), min(b + half_width, diff.shape[-1])) for b in boundaries]
    )
    e = np.sum(diff[..., idx] ** 2)
    return float(10 * np.log10(e / np.sum(ref[..., idx] ** 2) + 1e-30))


@pytest.fixture(scope="module")
def shipped():
    return load_codec()


@pytest.fixture(scope="module")
def clip(shipped):
    from audiodiff_jax.codec.data import load_wav

    return load_wav(CLIP, shipped.model.sample_rate, 1)


def test_no_seam_at_chunk_boundaries(shipped, clip):
    """Energy of (chunked - single pass) around chunk boundaries, with the shipped weights.

    A 9 s signal (the clip, reversed, again) decoded in 64-frame chunks overlapping by 32
    (a margin of 8 frames, the receptive field) must agree with the single pass to
    float rounding: below -60 dB of the signal around the joins (measured: -151 dB).
    With a margin of half the receptive field (48/16) the chunks disagree near their
    edges and the crossfade keeps the join below -40 dB (measured: -72 dB). Chunks
    decoded on their own and butted together (a hard cut) are measured the same way
    and must be far louder (> -30 dB; measured: -10 dB), which shows the measurement
    can see a seam.
    """
    hop = shipped.hop
    x = np.concatenate([clip, clip[:, ::-1], clip], axis=1)
    z = shipped.encode(x, shipped.model.sample_rate)
    single = shipped.decode(z, single_pass=True)

    def seam_db(chunk, overlap):
        codec = JaxCodec(shipped.model, shipped.params, chunk_frames=chunk, overlap_frames=overlap)
        starts = chunked.chunk_starts(z.shape[0], chunk, overlap)
        joins = [(a + b + chunk) * hop // 2 for a, b in zip(starts[1:], starts[:-1], strict=True)]
        return _seam_energy_db(codec.decode(z) - single, single, joins, 2 * hop)

    cut = np.concatenate(
        [shipped.decode(z[i : i + 32], single_pass=True) for i in range(0, z.shape[0], 32)], -1
    )
    seam_cut = _seam_energy_db(
        cut - single, single, list(range(32 * hop, z.shape[0] * hop, 32 * hop)), 2 * hop
    )
    assert seam_cut > -30.0, seam_cut
    assert seam_db(64, 32) < -60.0
    assert seam_db(48, 16) < -40.0


# ---------------------------------------------------------------------------
# Bad input


def test_bad_input_behaviours(tiny_codec):
    sr = 8000
    ok = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 640)).astype(np.float32)
    with pytest.raises(inputs.CodecInputError, match="empty"):
        tiny_codec.encode(np.zeros((1, 0), np.float32), sr)
    bad = ok.copy()
    bad[0, 100] = np.nan
    bad[0, 200] = np.inf
    with pytest.raises(inputs.CodecInputError, match="2 NaN/Inf samples .*sample 100"):
        tiny_codec.encode(bad, sr)
    zeroed = inputs.prepare_audio(bad, sr, sample_rate=sr, channels=1, nonfinite="zero")
    assert zeroed[0, 100] == 0 and zeroed[0, 200] == 0 and np.isfinite(zeroed).all()
    with pytest.raises(inputs.CodecInputError, match=r"looks like \[samples, channels\]"):
        tiny_codec.encode(np.zeros((640, 2), np.float32), sr)
    with pytest.raises(inputs.CodecInputError, match="integer PCM stored as float"):
        tiny_codec.encode(ok * 30000, sr)
    # Clipping: hard-clipped to [-1, 1].
    loud = inputs.prepare_audio(ok * 3, sr, sample_rate=sr, channels=1)
    assert np.max(np.abs(loud)) == 1.0 and np.sum(np.abs(loud) == 1.0) > 10
    # int16 PCM is scaled by full scale.
    pcm = inputs.prepare_audio((ok * 32767).astype(np.int16), sr, sample_rate=sr, channels=1)
    np.testing.assert_allclose(pcm, ok, atol=1e-4)
    # Channels: stereo mixed to mono (mean); mono duplicated; 3 -> 2 refused.
    st = np.stack([ok[0], -ok[0] * 0.5])
    np.testing.assert_allclose(
        inputs.prepare_audio(st, sr, sample_rate=sr, channels=1), (ok * 0.25), atol=1e-7
    )
    assert inputs.prepare_audio(ok, sr, sample_rate=sr, channels=2).shape == (2, 640)
    with pytest.raises(inputs.CodecInputError, match="3 channels, but the codec takes 2"):
        inputs.prepare_audio(np.zeros((3, 640), np.float32), sr, sample_rate=sr, channels=2)
    # Sample rate: resampled (a 16 kHz input has twice the samples -> the same latent frames),
    # or refused when resampling is off.
    t = np.arange(1280) / 16000
    tone16 = (0.5 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32)
    assert tiny_codec.encode(tone16, 16000).shape == (10, 4)
    res = inputs.prepare_audio(tone16, 16000, sample_rate=8000, channels=1)
    assert res.shape == (1, 640)
    strict = JaxCodec(tiny_codec.model, tiny_codec.params, resample=False)
    with pytest.raises(inputs.CodecInputError, match="sample rate 16000 Hz, but the codec runs at 8000 Hz"):
        strict.encode(tone16, 16000)
    # Latents: wrong channel count, NaN, empty.
    with pytest.raises(inputs.CodecInputError, match=r"expected \[frames, 4\]"):
        tiny_codec.decode(np.zeros((3, 5), np.float32))
    with pytest.raises(inputs.CodecInputError, match="NaN/Inf"):
        tiny_codec.decode(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(inputs.CodecInputError, match="empty"):
        tiny_codec.decode(np.zeros((0, 4), np.float32))


# ---------------------------------------------------------------------------
# Metrics


def test_si_sdr_reference_values():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(16000)
    noise = rng.standard_normal(16000)
    noise -= ref * np.dot(noise, ref) / np.dot(ref, ref)  # orthogonal to ref
    noise *= np.linalg.norm(ref) / np.linalg.norm(noise) / 10.0  # 20 dB below
    assert abs(losses.si_sdr(ref, 0.3 * (ref + noise)) - 20.0) < 0.1  # scale-invariant
    assert losses.si_sdr(ref, ref) > 100


# ---------------------------------------------------------------------------
# The shipped default


def test_shipped_card(shipped):
    from audiodiff_jax.codec.interface import Codec
    from audiodiff_jax.data.cards import CodecCard

    assert isinstance(shipped, Codec)
    card = shipped.card
    assert CodecCard.from_dict(card.to_dict()) == card
    assert (card.sample_rate, card.audio_channels, card.hop, card.latent_channels) == (22050, 1, 1024, 32)
    assert abs(card.latent_rate - 21.533) < 1e-3
    assert load_codec(card.name).card == card  # what a dataset card records finds it
    full = shipped.card_dict()
    assert len(full["latent_mean"]) == 32 and all(s > 0 for s in full["latent_std"])
    weights = os.path.join(os.path.dirname(codec_config.__file__), "weights", "weights.npz")
    assert os.path.getsize(weights) <= 20 * 1024 * 1024


def test_shipped_weights_si_sdr_floor(shipped, clip):
    y = shipped.reconstruct(clip, shipped.model.sample_rate)
    assert y.shape == clip.shape
    score = losses.si_sdr(clip, y)
    assert score >= SI_SDR_FLOOR_DB, f"SI-SDR {score:.2f} dB < floor {SI_SDR_FLOOR_DB} dB"
    distance = losses.stft_distance(clip, y)
    assert distance <= STFT_DISTANCE_CEILING, f"STFT distance {distance:.3f} > {STFT_DISTANCE_CEILING}"


def test_shipped_music_codec(shipped, clip):
    """``load_codec("music")``: the same layout as the default, its own name (its latents
    differ) found by that name too, at most 20 MB, and on the held-out render it does
    not fall below the default's floor."""
    music = load_codec("music")
    assert music.card.name == "audiodiff-vae-music" != shipped.card.name
    assert load_codec(music.card.name).card == music.card
    assert (music.card.hop, music.card.latent_channels) == (shipped.card.hop, shipped.card.latent_channels)
    weights = os.path.join(os.path.dirname(codec_config.__file__), "weights_music", "weights.npz")
    assert os.path.getsize(weights) <= 20 * 1024 * 1024
    y = music.reconstruct(clip, music.model.sample_rate)
    score = losses.si_sdr(clip, y)
    assert score >= SI_SDR_FLOOR_DB, f"SI-SDR {score:.2f} dB < floor {SI_SDR_FLOOR_DB} dB"


def test_silence_decodes_to_near_silence(shipped):
    y = shipped.reconstruct(np.zeros((1, 22050), np.float32), 22050)
    assert float(np.sqrt(np.mean(y**2))) < 0.01  # measured 0.0016


def test_save_and_load_round_trip(tiny_codec, tmp_path):
    tiny_codec.latent_mean, tiny_codec.latent_std = np.zeros(4), np.ones(4)
    tiny_codec.save(str(tmp_path))
    again = load_codec(str(tmp_path), chunk_frames=64, overlap_frames=32)
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (1, 40 * 64)).astype(np.float32)
    np.testing.assert_array_equal(again.encode(x, 8000), tiny_codec.encode(x, 8000))
    assert again.card == tiny_codec.card
    with pytest.raises(FileNotFoundError, match="holds neither"):
        load_codec(str(tmp_path / "nothing"))


def test_limiter_keeps_quiet_audio_and_bounds_loud_audio_smoothly():
    from audiodiff_jax.codec import limiter  # noqa: PLC0415

    sr = 22050
    t = np.arange(sr) / sr
    quiet = (0.5 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32)
    same, db = limiter.limit(quiet, sr)
    assert db == 0.0 and np.array_equal(same, quiet)
    loud = quiet * 3.0  # peaks 1.5, as a loud song decodes
    out, db = limiter.limit(loud, sr)
    assert np.abs(out).max() <= limiter.CEILING + 1e-6
    np.testing.assert_allclose(db, 20 * np.log10(1.5 / limiter.CEILING), atol=0.05)
    # Not a clipper: the waveform keeps its shape (a scaled sine, no flat tops; a hard
    # clip at the ceiling correlates 0.98 with it) ...
    assert np.corrcoef(out[0, 2000:-2000], loud[0, 2000:-2000])[0, 1] > 0.9999
    # ... and the gain moves slowly: a short burst is turned down, the rest untouched.
    burst = quiet.copy()
    burst[:, 10000:10100] *= 3.0
    out, _ = limiter.limit(burst, sr)
    assert np.abs(out).max() <= limiter.CEILING + 1e-6
    np.testing.assert_array_equal(out[:, :9000], burst[:, :9000])
    np.testing.assert_array_equal(out[:, 11000:], burst[:, 11000:])
