"""Training audio for the codec: rendered music21 pieces (the crops are
``audiodiff_jax/codec/data.py``).

- :func:`render_corpus` (``python -m data_pipeline.codec_corpus``) renders pieces of the
  music21 corpus through ``data_pipeline/render.py`` (General MIDI, tinysoundfont,
  TimGM6mb.sf2) into WAV files. Pieces are split into ``train`` and ``heldout`` by a
  hash of their corpus path, so held-out clips come from pieces the codec never
  heard. Every clip draws its instruments, tempo and transposition from a generator
  seeded by (split, piece, excerpt). ``heldout`` also gets monophonic clips (one part,
  one instrument) for the pitch metric.

The recipe of the shipped weights (``weights/RECIPE.md``)::

    python -m data_pipeline.codec_corpus --out=/tmp/codec_audio --split=train --num_clips=320
    python -m data_pipeline.codec_corpus --out=/tmp/codec_audio --split=heldout --num_clips=40
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import numpy as np
import soundfile as sf
from absl import flags, logging

from audiodiff_jax.programs import cli
from data_pipeline import render

# GM programs (0-based) the renders draw from: keyboards, mallets, plucked and bowed
# strings, brass, reeds, pipes, organ, synth leads and pads; timbres the TimGM6mb
# soundfont renders distinctly.
PROGRAMS = (
    0,
    4,
    6,
    11,
    12,
    16,
    19,
    21,
    24,
    25,
    27,
    32,
    33,
    40,
    41,
    42,
    45,
    46,
    48,
    52,
    56,
    57,
    60,
    65,
    68,
    71,
    73,
    80,
    81,
    89,
)
MONO_PROGRAMS = (40, 56, 65, 68, 71, 73, 80)  # sustained single-line instruments (pyin-friendly)
HELDOUT_PERCENT = 12  # share of pieces held out (by hash of the corpus path)


def _piece_hash(path: str) -> int:
    return int(hashlib.sha1(path.encode()).hexdigest()[:8], 16)


def corpus_pieces(split: str) -> list[str]:
    """music21 corpus paths (MusicXML / Humdrum / ABC-free) of one split, sorted."""
    from music21 import corpus  # optional heavy dependency (the "corpus" extra)

    render.configure_music21()
    paths = sorted(str(p) for p in corpus.getPaths(fileExtensions=("mxl", "xml", "krn")))
    held = [
        p
        for p in paths
        if _piece_hash(os.path.relpath(p, os.path.dirname(corpus.__file__))) % 100 < HELDOUT_PERCENT
    ]
    held_set = set(held)
    if split == "heldout":
        return held
    if split == "train":
        return [p for p in paths if p not in held_set]
    raise ValueError(f"split={split!r}: 'train' or 'heldout'")


def render_corpus(
    out_dir: str,
    split: str,
    num_clips: int,
    *,
    sample_rate: int = 22050,
    clip_seconds: float = 8.0,
    seed: int = 0,
    mono_share: float = 0.0,
) -> list[dict]:
    """Renders ``num_clips`` excerpts of ``split`` pieces into ``out_dir/split/*.wav``.

    Returns the rows written to ``out_dir/split/clips.jsonl`` (file, piece, programs,
    tempo, transpose, monophonic).
    """
    from music21 import converter  # optional heavy dependency (the "corpus" extra)

    pieces = corpus_pieces(split)
    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    order = rng.permutation(len(pieces))
    rows, attempts = [], 0
    for idx in order:
        if len(rows) >= num_clips:
            break
        attempts += 1
        path = pieces[idx]
        try:
            score = converter.parse(path)
        except Exception as e:  # a few corpus files do not parse; skip and say which
            logging.warning("skip %s: %s", path, e)
            continue
        mono = rng.random() < mono_share
        parts = list(getattr(score, "parts", []))
        if mono and parts:
            from music21 import stream

            score = stream.Score([parts[0]])
            programs = [int(rng.choice(MONO_PROGRAMS))]
        else:
            programs = [int(p) for p in rng.choice(PROGRAMS, size=max(len(parts), 1))]
        n_measures = len(parts[0].getElementsByClass("Measure")) if parts else 0
        first = int(rng.integers(1, max(n_measures - 8, 1) + 1)) if n_measures > 8 else None
        tempo = int(rng.integers(60, 160))
        transpose = int(rng.integers(-5, 6))
        try:
            audio, _ = render.render_piece(
                score,
                programs=programs,
                tempo=tempo,
                transpose=transpose,
                measures=(first, first + 24) if first else None,
                sample_rate=sample_rate,
                channels=1,
                max_seconds=clip_seconds,
            )
        except Exception as e:
            logging.warning("skip %s: %s", path, e)
            continue
        if audio.shape[1] < sample_rate * 2 or float(np.sqrt(np.mean(audio**2))) < 1e-3:
            continue
        name = f"{split}-{len(rows):04d}.wav"
        sf.write(os.path.join(split_dir, name), audio.T, sample_rate, subtype="FLOAT")
        row = dict(
            file=name,
            piece=os.path.basename(path),
            programs=programs,
            tempo=tempo,
            transpose=transpose,
            monophonic=bool(mono),
            seconds=audio.shape[1] / sample_rate,
        )
        rows.append(row)
        logging.info("%s %d/%d %s", split, len(rows), num_clips, row)
    with open(os.path.join(split_dir, "clips.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv):
    del argv
    f = flags.FLAGS
    rows = render_corpus(
        f.out,
        f.split,
        f.num_clips,
        sample_rate=f.sample_rate,
        clip_seconds=f.clip_seconds,
        seed=f.seed,
        mono_share=f.mono_share,
    )
    print(f"wrote {len(rows)} clips to {os.path.join(f.out, f.split)}")


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "Output folder (gets SPLIT/*.wav and SPLIT/clips.jsonl).")
    flags.DEFINE_enum("split", "train", ["train", "heldout"], "Which pieces.")
    flags.DEFINE_integer("num_clips", 320, "Clips to render.")
    flags.DEFINE_integer("sample_rate", 22050, "Hz.")
    flags.DEFINE_float("clip_seconds", 8.0, "Longest clip.")
    flags.DEFINE_integer("seed", 0, "Draws instruments, tempi, excerpts.")
    flags.DEFINE_float("mono_share", 0.0, "Share of monophonic clips (one part, one instrument).")
    flags.mark_flag_as_required("out")
    cli.run(main, module=__name__)
