"""Groove corpus: chord progressions played by MMA's named accompaniment grooves.

MMA ("Musical MIDI Accompaniment", Debian package ``mma``) turns a chord chart into
a full band arrangement in one of hundreds of named grooves (BossaNova, Swing,
CountryWaltz, ...). Clip ``i`` of corpus ``seed`` draws a groove, a key, a tempo
and a progression written in Roman numerals; the numerals are spelled in the key
by music21, so chord names are enharmonically right (vi of Db major is Bbm, not
A#m). The MIDI that MMA writes is rendered by ``data_pipeline/render.py``, and the
caption states genre, groove, instruments (read back from the MIDI's programs),
key, tempo, time signature and chords.

Output: ``OUT/audio/ID.wav`` and ``OUT/manifest.jsonl``, like ``corpus_scores``::

    apt-get install -y mma
    audiodiff-corpus grooves --out_dir=/data/grooves --num_clips=2000 --clip_seconds=20
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline import render
from data_pipeline.corpus_scores import _and_join, render_corpus
from data_pipeline.manifest import Entry

# MMA groove -> (genre as captions say it, beats per bar). Beats come from the groove
# file's "Time" setting; the time signature label is what MMA actually plays.
GROOVES = {
    "Swing": ("swing", 4),
    "BossaNova": ("bossa nova", 4),
    "BasicRock": ("rock", 4),
    "50sRock": ("fifties rock and roll", 4),
    "Ballad": ("ballad", 4),
    "BlueGrass": ("bluegrass", 4),
    "Blues": ("blues", 4),
    "CountrySwing": ("country swing", 4),
    "CountryWaltz": ("country waltz", 3),
    "Waltz": ("waltz", 3),
    "JazzWaltz": ("jazz waltz", 3),
    "Rhumba": ("rhumba", 4),
    "Tango": ("tango", 4),
    "Polka": ("polka", 4),
    "Ska": ("ska", 4),
    "Folk": ("folk", 4),
    "FolkRock": ("folk rock", 4),
    "Hymn": ("hymn", 4),
    "RagTime": ("ragtime", 4),
    "Dixie": ("dixieland jazz", 4),
    "BigBand": ("big band swing", 4),
    "Mambo": ("mambo", 4),
    "Salsa": ("salsa", 4),
    "ChaCha": ("cha-cha", 4),
    "Merengue": ("merengue", 4),
    "SoftRock": ("soft rock", 4),
    "PopBallad": ("pop ballad", 4),
    "R&B": ("rhythm and blues", 4),
    "Zydeco": ("zydeco", 4),
    "WesternSwing": ("western swing", 4),
    "8Beat": ("eight-beat pop", 4),
    "SlowBlues": ("slow blues", 4),
    "Lullaby": ("lullaby", 4),
    "Trance": ("trance", 4),
}
# Progressions as (Roman numeral, MMA chord suffix) per bar. MMA suffixes: "" major,
# "m" minor, "7" dominant seventh, "M7" major seventh, "m7", "m7b5" half-diminished.
MAJOR_PROGRESSIONS = {
    "I-vi-ii-V": (("I", "M7"), ("vi", "m7"), ("ii", "m7"), ("V", "7")),
    "I-IV-V-I": (("I", ""), ("IV", ""), ("V", "7"), ("I", "")),
    "I-V-vi-IV": (("I", ""), ("V", ""), ("vi", "m"), ("IV", "")),
    "ii-V-I": (("ii", "m7"), ("V", "7"), ("I", "M7"), ("I", "M7")),
    "I-iii-IV-V": (("I", ""), ("iii", "m"), ("IV", ""), ("V", "7")),
    "12-bar blues": tuple((f, "7") for f in ("I", "I", "I", "I", "IV", "IV", "I", "I", "V", "IV", "I", "V")),
}
MINOR_PROGRESSIONS = {
    "i-iv-V-i": (("i", "m"), ("iv", "m"), ("V", "7"), ("i", "m")),
    "i-VI-III-VII": (("i", "m"), ("VI", ""), ("III", ""), ("VII", "")),
    "ii-V-i": (("ii", "m7b5"), ("V", "7"), ("i", "m7"), ("i", "m7")),
    "i-VII-VI-V": (("i", "m"), ("VII", ""), ("VI", ""), ("V", "7")),
}
# Keys with at most 5 sharps or flats, spelled as key signatures spell them.
MAJOR_KEYS = ("C", "G", "D", "A", "E", "B", "F", "Bb", "Eb", "Ab", "Db")
MINOR_KEYS = ("A", "E", "B", "F#", "C#", "D", "G", "C", "F", "Bb")
TEMPO_RANGE = (70, 170)
_CAPTION_SUFFIX = {"": "", "m": "m", "7": "7", "M7": "maj7", "m7": "m7", "m7b5": "m7b5"}


class MmaMissing(RuntimeError):
    """MMA is not installed."""


def mma_path() -> str:
    """Path of the ``mma`` program, or :class:`MmaMissing` saying how to install it."""
    path = shutil.which("mma")
    if path is None:
        raise MmaMissing(
            "the groove corpus needs MMA (Musical MIDI Accompaniment): apt-get install -y mma "
            "(Debian/Ubuntu), or see https://www.mellowood.ca/mma/"
        )
    return path


def spell_chords(progression: Sequence[tuple[str, str]], tonic: str, mode: str) -> list[str]:
    """Roman numerals -> MMA chord names in a key, e.g. (("vi", "m"),) in Db major -> ["Bbm"]."""
    from music21 import key as m21key
    from music21 import roman

    k = m21key.Key(tonic.replace("b", "-") if len(tonic) > 1 else tonic, mode)
    return [
        render.pitch_name(roman.RomanNumeral(figure, k).root().name) + suffix
        for figure, suffix in progression
    ]


def chart(groove: str, tempo: int, chords: Sequence[str], bars: int) -> str:
    """The MMA source: the groove, the tempo, and ``bars`` bars cycling through the chords."""
    lines = [f"Tempo {tempo}", f"Groove {groove}"]
    lines += [f"{i + 1} {chords[i % len(chords)]}" for i in range(bars)]
    return "\n".join(lines) + "\n"


def run_mma(source: str) -> bytes:
    """MMA source -> MIDI bytes (MMA runs in a temporary folder)."""
    mma = mma_path()
    with tempfile.TemporaryDirectory(prefix="audiodiff-mma-") as tmp:
        src, mid = os.path.join(tmp, "chart.mma"), os.path.join(tmp, "chart.mid")
        with open(src, "w") as f:
            f.write(source)
        proc = subprocess.run([mma, src, "-f", mid], capture_output=True, text=True, cwd=tmp, check=False)
        if proc.returncode != 0 or not os.path.exists(mid):
            raise RuntimeError(
                f"mma failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-500:]}"
            )
        with open(mid, "rb") as f:
            return f.read()


@dataclasses.dataclass(frozen=True)
class GrooveClip:
    entry: Entry
    audio: np.ndarray


def render_groove_clip(
    seed: int,
    index: int,
    *,
    sample_rate: int = 44100,
    channels: int = 2,
    clip_seconds: float = 10.0,
    grooves: Sequence[str] | None = None,
    synth: str = "tinysoundfont",
) -> GrooveClip:
    """Clip ``index`` of groove corpus ``seed`` (a pure function of both and the installed MMA)."""
    import pretty_midi

    names = sorted(grooves or GROOVES)
    unknown = [g for g in names if g not in GROOVES]
    if unknown:
        raise ValueError(f"unknown groove(s) {unknown}; choose from {sorted(GROOVES)}")
    rng = np.random.default_rng([seed, index])
    groove = names[int(rng.integers(len(names)))]
    genre, beats = GROOVES[groove]
    mode = "major" if rng.random() < 0.65 else "minor"
    keys, progressions = (
        (MAJOR_KEYS, MAJOR_PROGRESSIONS) if mode == "major" else (MINOR_KEYS, MINOR_PROGRESSIONS)
    )
    tonic = keys[int(rng.integers(len(keys)))]
    prog_name = sorted(progressions)[int(rng.integers(len(progressions)))]
    tempo = int(rng.integers(TEMPO_RANGE[0], TEMPO_RANGE[1] + 1))
    chords = spell_chords(progressions[prog_name], tonic, mode)
    bar_seconds = beats * 60.0 / tempo
    bars = max(2, int(np.ceil(clip_seconds / bar_seconds)))
    pm = pretty_midi.PrettyMIDI(io.BytesIO(run_mma(chart(groove, tempo, chords, bars))))
    audio = render.render_midi(pm, sample_rate, channels=channels, max_seconds=clip_seconds, synth=synth)
    # Instruments heard in the clip: some grooves bring a part in only after a few bars.
    played = [inst for inst in pm.instruments if any(n.start < clip_seconds for n in inst.notes)]
    instruments = []
    for inst in sorted(played, key=lambda i: (not i.is_drum, i.program)):
        name = render.program_name(inst.program, inst.is_drum)
        if name not in instruments:
            instruments.append(name)
    # The chords heard in the clip (it may end before the chart does).
    heard = min(bars, int(np.ceil(audio.shape[1] / sample_rate / bar_seconds)))
    heard_chords = [chords[i % len(chords)] for i in range(max(1, heard))]
    caption_chords = " ".join(_caption_chord(c) for c in heard_chords[: len(chords)])
    key_text = f"{tonic} {mode}"
    templates = (
        f"a {genre} groove in {key_text} at {tempo} bpm with {_and_join(instruments)}; "
        f"chords {caption_chords}",
        f"{genre}, {beats}/4, {tempo} bpm, {key_text}: {_and_join(instruments)} playing {caption_chords}",
        f"{_and_join(instruments)} in a {genre} style, {key_text}, {tempo} bpm, progression {caption_chords}",
    )
    clip_id = f"groove-{seed}-{index:06d}"
    labels: dict[str, Any] = {
        "corpus": "mma-grooves",
        "genre": genre,
        "groove": groove,
        "instruments": ", ".join(instruments),
        "key": tonic,
        "mode": mode,
        "tempo": tempo,
        "time_signature": f"{beats}/4",
        "chords": " ".join(chords),
        "progression": prog_name,
    }
    entry = Entry(
        id=clip_id,
        audio=f"audio/{clip_id}.wav",
        caption=templates[int(rng.integers(len(templates)))],
        labels=labels,
        seconds_start=0.0,
        seconds_total=round(audio.shape[1] / sample_rate, 6),
    )
    return GrooveClip(entry, audio)


def _caption_chord(name: str) -> str:
    root_len = 2 if len(name) > 1 and name[1] in "#b" else 1
    return name[:root_len] + _CAPTION_SUFFIX.get(name[root_len:], name[root_len:])


def render_grooves(
    out_dir: str,
    num_clips: int,
    *,
    seed: int = 0,
    sample_rate: int = 44100,
    channels: int = 2,
    clip_seconds: float = 10.0,
    grooves: Sequence[str] | None = None,
    synth: str = "tinysoundfont",
    workers: int = 1,
    progress: bool = False,
) -> str:
    """Renders ``num_clips`` clips to ``out_dir/audio/*.wav`` + ``manifest.jsonl``; returns its path."""
    mma_path()  # fail before creating anything if MMA is missing
    kwargs = dict(
        sample_rate=sample_rate,
        channels=channels,
        clip_seconds=clip_seconds,
        grooves=tuple(grooves) if grooves else None,
        synth=synth,
    )
    return render_corpus(
        render_groove_clip,
        out_dir,
        num_clips,
        seed=seed,
        kwargs=kwargs,
        workers=workers,
        progress=progress,
        desc="render grooves",
    )
