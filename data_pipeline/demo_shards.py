"""Synthetic latent shards with learnable structure: a STAND-IN until the real codec lands.

No audio is involved. Each "song" gets structured labels (instrument, key, mode,
tempo, genre), a caption spelled from them ("a slow piano piece in C minor at 70
bpm"), and latents that are a smooth, deterministic function of those labels and of
the absolute time in the song, plus a little noise:

- tempo -> frequency of a beat oscillation (tempo / 60 Hz) shared by all channels,
- instrument -> a fixed channel pattern that scales the oscillation,
- key and mode -> a per-channel offset,
- genre -> the strength of the second harmonic,
- position in the song -> a slow fade-in / fade-out envelope (so ``seconds_start`` /
  ``seconds_total`` carry information).

Clip lengths vary: some records are shorter than a training window, most are
medium, a few are long songs; some records are excerpts of a longer song
(``seconds_start`` > 0). The made-up codec card is named ``synthetic-demo``
(22050 Hz, hop 1024, so 21.53 latent frames per second). A tokenizer is trained on
the captions and recorded in the dataset card.

Everything is a pure function of ``seed``: the same arguments give the same bytes.
Replace with the codec's pre-encoding program once it exists.

    audiodiff-make-demo-shards --out_dir=/tmp/demo_latents --num_clips=256
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.programs import cli
from data_pipeline.shards import ShardWriter
from data_pipeline.tokenizer import DEFAULT_FILE, Tokenizer, train_tokenizer

SAMPLE_RATE = 22050
HOP = 1024
LATENT_RATE = SAMPLE_RATE / HOP

INSTRUMENTS = ("piano", "guitar", "violin", "flute", "organ", "cello", "trumpet", "harp")
KEYS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")
GENRES = ("classical", "jazz", "folk", "ambient", "rock", "electronic")
NOISE_STD = 0.1
# The label -> latent mapping is a property of this generator, not of a run, so it
# uses its own fixed seed: datasets made with different seeds share one structure.
_STRUCTURE_SEED = 20240601


def demo_codec_card(latent_channels: int) -> dict[str, Any]:
    return {
        "name": "synthetic-demo",
        "sample_rate": SAMPLE_RATE,
        "audio_channels": 1,
        "hop": HOP,
        "latent_rate": LATENT_RATE,
        "latent_channels": latent_channels,
    }


def _speed_word(tempo: int) -> str:
    return "slow" if tempo < 90 else ("fast" if tempo >= 130 else "lively")


def caption_for(labels: dict[str, Any]) -> str:
    """The caption spelled from a record's labels (two phrasings, picked by genre)."""
    speed = _speed_word(labels["tempo"])
    key = f"{labels['key']} {labels['mode']}"
    if GENRES.index(labels["genre"]) % 2 == 0:
        return f"a {speed} {labels['instrument']} piece in {key} at {labels['tempo']} bpm, {labels['genre']}"
    return f"{labels['genre']} {labels['instrument']} in {key}, {speed}, {labels['tempo']} bpm"


def _structure(latent_channels: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_STRUCTURE_SEED)
    c = latent_channels
    return {
        "instrument": rng.normal(size=(len(INSTRUMENTS), c)),
        "key_phase": rng.uniform(0, 2 * np.pi, size=c),
        "mode": rng.choice([-1.0, 1.0], size=c),
        "harmonic": rng.normal(size=c),
    }


def song_latents(
    labels: dict[str, Any],
    start_frame: int,
    num_frames: int,
    song_frames: int,
    latent_channels: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Latents ``[num_frames, C]`` of frames [start_frame, start_frame + num_frames) of a song."""
    s = _structure(latent_channels)
    t = (start_frame + np.arange(num_frames)) / LATENT_RATE  # seconds from the start of the song
    song_seconds = song_frames / LATENT_RATE
    beat = 2 * np.pi * (labels["tempo"] / 60.0) * t
    genre = GENRES.index(labels["genre"]) / (len(GENRES) - 1)
    wave = np.sin(beat)[:, None] * s["instrument"][INSTRUMENTS.index(labels["instrument"])]
    wave = wave + genre * np.sin(2 * beat)[:, None] * s["harmonic"]
    key_offset = 0.5 * np.cos(2 * np.pi * KEYS.index(labels["key"]) / 12 + s["key_phase"])
    key_offset = key_offset * (s["mode"] if labels["mode"] == "minor" else 1.0)
    fade = np.clip(np.minimum(t, song_seconds - t) / 2.0, 0.0, 1.0)  # 2 s fades at both ends
    latents = key_offset + (0.2 + 0.8 * fade)[:, None] * wave
    noise = rng.normal(scale=NOISE_STD, size=latents.shape)
    return (latents + noise).astype(np.float32)


def _labels(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "instrument": str(rng.choice(INSTRUMENTS)),
        "key": str(rng.choice(KEYS)),
        "mode": str(rng.choice(MODES)),
        "tempo": int(rng.integers(60, 181)),
        "genre": str(rng.choice(GENRES)),
    }


def demo_records(num_clips: int, latent_channels: int, seed: int, max_frames: int = 2000):
    """Yields ``num_clips`` records (fields as in ``shards.encode_record``).

    Record i draws from its own generator seeded by (seed, i), labels first, so a
    record does not depend on the others and its caption not on ``max_frames``.
    """
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        labels = _labels(rng)
        kind = rng.random()
        if kind < 0.15:  # short clips: shorter than typical training windows
            song_frames = int(rng.integers(8, 48))
        elif kind < 0.9:  # medium clips
            song_frames = int(rng.integers(48, max(49, max_frames // 4)))
        else:  # long songs
            song_frames = int(rng.integers(max_frames // 2, max_frames + 1))
        # Every third record is an excerpt of its (longer) song rather than the whole song.
        if i % 3 == 2 and song_frames > 16:
            num_frames = int(rng.integers(8, song_frames // 2 + 1))
            start = int(rng.integers(0, song_frames - num_frames + 1))
        else:
            num_frames, start = song_frames, 0
        yield {
            "latents": song_latents(labels, start, num_frames, song_frames, latent_channels, rng),
            "caption": caption_for(labels),
            "seconds_start": start / LATENT_RATE,
            "seconds_total": song_frames / LATENT_RATE,
            "source_id": f"demo-{seed}-{i:06d}",
            "labels": labels,
        }


def demo_captions(num_clips: int, seed: int) -> list[str]:
    """The captions :func:`demo_records` will produce, without making latents."""
    return [caption_for(_labels(np.random.default_rng([seed, i]))) for i in range(num_clips)]


def write_demo_shards(
    out_dir: str,
    num_clips: int = 256,
    latent_channels: int = 8,
    num_shards: int = 4,
    seed: int = 0,
    vocab_size: int = 256,
    max_frames: int = 2000,
    overwrite: bool = True,
) -> DatasetCard:
    """Writes a synthetic dataset (shards, tokenizer, card) into ``out_dir``; returns the card.

    Args:
      out_dir: dataset folder.
      num_clips: number of records.
      latent_channels: channels of the made-up codec.
      num_shards: ArrayRecord files.
      seed: everything is a function of it.
      vocab_size: upper bound of the tokenizer vocabulary (the captions use far fewer pieces).
      max_frames: length of the longest songs, in latent frames.
      overwrite: replace a dataset already in ``out_dir``.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    # Captions first (cheap: labels only) so the tokenizer exists before the card is written.
    tok_path = train_tokenizer(
        demo_captions(num_clips, seed), os.path.join(out_dir, DEFAULT_FILE[: -len(".model")]), vocab_size
    )
    with ShardWriter(
        out_dir,
        demo_codec_card(latent_channels),
        num_shards=min(num_shards, num_clips),
        tokenizer=DEFAULT_FILE,
        tokenizer_vocab_size=Tokenizer(tok_path).vocab_size,
        metadata={"generator": "data_pipeline.demo_shards", "seed": seed, "num_clips": num_clips},
        overwrite=overwrite,
    ) as writer:
        for record in demo_records(num_clips, latent_channels, seed, max_frames):
            writer.add(record)
    return writer.card


def run() -> None:
    """Console entry point ``audiodiff-make-demo-shards``."""
    from absl import flags

    # Defined here, not at import, so importing this module adds no global flags.
    flags.DEFINE_string("out_dir", None, "dataset folder to write", required=True)
    flags.DEFINE_integer("num_clips", 256, "number of records")
    flags.DEFINE_integer("latent_channels", 8, "latent channels of the made-up codec")
    flags.DEFINE_integer("num_shards", 4, "ArrayRecord files")
    flags.DEFINE_integer("seed", 0, "everything is a function of it")
    flags.DEFINE_integer("vocab_size", 256, "upper bound of the tokenizer vocabulary")
    flags.DEFINE_integer("max_frames", 2000, "longest song in latent frames")

    def main(argv):
        del argv
        f = flags.FLAGS
        card = write_demo_shards(
            f.out_dir, f.num_clips, f.latent_channels, f.num_shards, f.seed, f.vocab_size, f.max_frames
        )
        print(
            f"wrote {card.num_records} records ({card.total_frames} frames) in {len(card.shards)} shards "
            f"to {f.out_dir}; tokenizer vocab {card.tokenizer_vocab_size}"
        )

    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
