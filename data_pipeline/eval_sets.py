"""Real audio sets with known relations, for checking the evaluation's set distance.

The sanity ordering a set distance must keep (issue "Evaluation built in")::

    d(train renders, held-out renders) < d(renders, the same scores with other timbres)
                                       < d(renders, drones or noise)

- :func:`render_scores`: excerpts of music21 scores of one split (``train`` /
  ``heldout``: pieces split by a hash of their corpus path, as the codec corpus does,
  ``codec_corpus.corpus_pieces``), each with instruments drawn from
  :data:`PROGRAMS`, rendered by ``render.py`` (tinysoundfont, TimGM6mb.sf2).
  ``other_timbres=True`` renders the same excerpts with every program swapped by
  :data:`OTHER_PROGRAMS`. No second General MIDI soundfont installs offline here
  (Debian's fluid-soundfont-gm is a system package, not always present), so "the
  same scores through another soundfont" is played by other instruments of the same
  soundfont: a stand-in.
- :func:`drones_and_noise`: sustained chords with a slow swell, and pink and white
  noise, at the renders' peak level: not music.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

from data_pipeline import codec_corpus, render

# The "first soundfont": keyboards, plucked and bowed strings, winds.
PROGRAMS = (0, 4, 24, 40, 42, 46, 48, 68, 71, 73)
# The stand-in for another soundfont: each program swapped for one of another family.
OTHER_PROGRAMS = {0: 19, 4: 81, 24: 30, 40: 56, 42: 58, 46: 16, 48: 52, 68: 65, 71: 80, 73: 21}


def pieces(split: str, collections: Sequence[str] = ("bach",)) -> list[str]:
    """Score paths of a split, only from the corpus folders ``collections`` (Bach's
    chorales parse in a fraction of a second; empty: every folder)."""
    paths = codec_corpus.corpus_pieces(split)
    if not collections:
        return paths
    marks = tuple(f"{os.sep}{c}{os.sep}" for c in collections)
    return [p for p in paths if any(m in p for m in marks)]


def render_scores(
    split: str,
    count: int,
    *,
    seconds: float = 6.0,
    sample_rate: int = 22050,
    seed: int = 0,
    other_timbres: bool = False,
    collections: Sequence[str] = ("bach",),
) -> list[np.ndarray]:
    """``count`` mono excerpts ``[1, samples]`` of ``split`` pieces (a pure function of the
    arguments); the same excerpts with swapped instruments when ``other_timbres``."""
    from music21 import converter  # the "corpus" extra

    render.configure_music21()
    paths = pieces(split, collections)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    out = []
    for idx in rng.permutation(len(paths)):
        if len(out) >= count:
            break
        draw = np.random.default_rng([seed, int(idx)])
        try:
            score = converter.parse(paths[idx])
        except Exception:  # noqa: BLE001 - a few corpus files do not parse; take the next
            continue
        parts = max(len(getattr(score, "parts", [])), 1)
        programs = [int(p) for p in draw.choice(PROGRAMS, size=parts)]
        if other_timbres:
            programs = [OTHER_PROGRAMS[p] for p in programs]
        tempo = int(draw.integers(70, 140))
        try:
            audio, _ = render.render_piece(
                score,
                programs=programs,
                tempo=tempo,
                measures=(1, 12),
                sample_rate=sample_rate,
                channels=1,
                max_seconds=seconds,
            )
        except Exception:  # noqa: BLE001 - excerpts without notes, odd scores: take the next
            continue
        if audio.shape[1] >= int(0.9 * seconds * sample_rate):
            out.append(audio)
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} of {count} {split} excerpts rendered")
    return out


def drones_and_noise(
    count: int, *, seconds: float = 6.0, sample_rate: int = 22050, seed: int = 0
) -> list[np.ndarray]:
    """``count`` mono clips: sustained chords (odd indices: pink noise, every fourth: white
    noise), each peak-normalized like the renders."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    out = []
    for i in range(count):
        if i % 4 == 3:
            x = rng.standard_normal(t.size)
        elif i % 2 == 1:
            spec = np.fft.rfft(rng.standard_normal(t.size))
            spec /= np.sqrt(np.maximum(np.fft.rfftfreq(t.size, 1 / sample_rate), 20.0))
            x = np.fft.irfft(spec, t.size)
        else:
            root = 110.0 * 2 ** (int(rng.integers(0, 12)) / 12)
            x = sum(np.sin(2 * np.pi * root * r * t) / (k + 1) for k, r in enumerate((1, 1.5, 2, 2.5, 3)))
            x = x * (0.8 + 0.2 * np.sin(2 * np.pi * 0.2 * t))
        out.append(render.normalize(np.asarray(x, np.float32)[None]))
    return out
