"""The demo's prompted corpus: generated pieces whose key, tempo and instrument are the
caption's, with some (key, tempo) combinations held out of training.

Clip ``i`` of seed ``s`` is a pure function of ``(s, i)``. It is a four-bar loop in
4/4 written note by note, then rendered by ``data_pipeline.render``:

- a chord progression of the key (I-IV-V-I, I-vi-IV-V, I-V-vi-IV, I-IV-I-V in major;
  i-iv-V-i, i-VI-iv-V, i-VII-VI-V, i-iv-i-V in minor, with the raised leading tone in
  V), its roots in the bass on beats 1 and 3;
- the chord played by the named instrument as a block or an arpeggio, one of a few
  patterns;
- a melody of the key's scale on the same instrument, starting and ending on the tonic;
- drums: kick on 1 and 3, snare on 2 and 4, closed hi-hat on every beat.

The caption says exactly that: ``"piano and drums in D minor at 124 bpm"``. The labels
(``key``, ``mode``, ``tempo``, ``instrument``) are the ones the evaluation
(``audiodiff_jax.evaluation.adherence``) reads, so the demo can set what a prompt asks
for against what a sampled song's estimators hear.

Held out of training (:func:`is_held_out`): for each of the 24 keys one of the
:data:`TEMPOS`, a different one from key to key. Every key and every tempo is in the
training clips; only their pairings in :func:`held_out_prompts` are not, and those are
what the demo asks for.

    audiodiff-corpus prompts --out_dir=/data/prompted --num_clips=768
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline import render
from data_pipeline.corpus_scores import Clip, render_corpus
from data_pipeline.manifest import Entry

TONICS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")
# Quarter notes per minute; neighbours more than 1.08 / 0.92 apart, so an estimate
# within 8% of one is never within 8% of another.
TEMPOS = (80, 96, 114, 136, 162)
# (GM program, caption name): instruments that sustain chords and play melodies.
INSTRUMENTS = ((0, "piano"), (4, "electric piano"), (24, "guitar"), (48, "strings"), (16, "organ"))
BEATS_PER_BAR = 4
BARS = 4

_MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
_MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)  # natural minor; V borrows the raised 7th
# Chords as (root degree 0..6, quality); quality "maj"/"min"/"dim".
_PROGRESSIONS = {
    "major": (
        ((0, "maj"), (3, "maj"), (4, "maj"), (0, "maj")),
        ((0, "maj"), (5, "min"), (3, "maj"), (4, "maj")),
        ((0, "maj"), (4, "maj"), (5, "min"), (3, "maj")),
        ((0, "maj"), (3, "maj"), (0, "maj"), (4, "maj")),
    ),
    "minor": (
        ((0, "min"), (3, "min"), (4, "maj"), (0, "min")),
        ((0, "min"), (5, "maj"), (3, "min"), (4, "maj")),
        ((0, "min"), (6, "maj"), (5, "maj"), (4, "maj")),
        ((0, "min"), (3, "min"), (0, "min"), (4, "maj")),
    ),
}
_THIRDS = {"maj": (0, 4, 7), "min": (0, 3, 7), "dim": (0, 3, 6)}
# Per beat, which chord tones sound when (fractions of a beat): block chords, broken
# chords in eighths, and an alberti-like pattern.
_PATTERNS = ("block", "eighths", "alberti")
_KICK, _SNARE, _HAT = 36, 38, 42


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a clip plays (everything its caption states)."""

    tonic: int  # pitch class 0..11
    mode: str
    tempo: int
    program: int
    instrument: str

    @property
    def key(self) -> str:
        return TONICS[self.tonic]

    @property
    def key_index(self) -> int:
        return 2 * self.tonic + MODES.index(self.mode)

    def caption(self) -> str:
        return f"{self.instrument} and drums in {self.key} {self.mode} at {self.tempo} bpm"

    def labels(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "mode": self.mode,
            "tempo": self.tempo,
            "time_signature": "4/4",  # every loop is four bars of 4/4
            "instrument": self.instrument,
        }


def held_out_tempo(key_index: int) -> int:
    """The tempo held out of training for key ``key_index`` (``2 * tonic + mode``):
    spread so that each tempo is held out for about as many keys as the others."""
    return TEMPOS[(7 * key_index) % len(TEMPOS)]


def is_held_out(choice: Choice) -> bool:
    return choice.tempo == held_out_tempo(choice.key_index)


def held_out_prompts() -> list[Choice]:
    """The 24 held-out combinations, one per key, instruments in turn."""
    out = []
    for k in range(2 * len(TONICS)):
        program, name = INSTRUMENTS[k % len(INSTRUMENTS)]
        out.append(Choice(k // 2, MODES[k % 2], held_out_tempo(k), program, name))
    return out


def training_choice(seed: int, index: int) -> tuple[Choice, np.random.Generator]:
    """Clip ``index``'s choice (never a held-out combination) and its generator for the rest."""
    rng = np.random.default_rng([seed, index])
    while True:
        program, name = INSTRUMENTS[int(rng.integers(len(INSTRUMENTS)))]
        choice = Choice(
            int(rng.integers(12)),
            MODES[int(rng.integers(2))],
            TEMPOS[int(rng.integers(len(TEMPOS)))],
            program,
            name,
        )
        if not is_held_out(choice):
            return choice, rng


def _chord_pitches(choice: Choice, degree: int, quality: str) -> list[int]:
    scale = _MAJOR_SCALE if choice.mode == "major" else _MINOR_SCALE
    root = choice.tonic + scale[degree]
    return [root + i for i in _THIRDS[quality]]


def piece_midi(choice: Choice, rng: np.random.Generator, seconds: float):
    """The ``pretty_midi.PrettyMIDI`` of a clip: the four-bar loop repeated to ``seconds``."""
    import pretty_midi

    beat = 60.0 / choice.tempo
    loop_beats = BARS * BEATS_PER_BAR
    loops = int(np.ceil(seconds / (loop_beats * beat)))
    progression = _PROGRESSIONS[choice.mode][int(rng.integers(len(_PROGRESSIONS[choice.mode])))]
    pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
    octave = 48 + int(rng.integers(0, 2)) * 12  # chords around C3 or C4
    scale = _MAJOR_SCALE if choice.mode == "major" else _MINOR_SCALE
    # The melody: one note per beat (sometimes two eighths), a walk on the scale around
    # the tonic an octave above the chords, first and last note the tonic.
    steps = rng.choice([-2, -1, -1, 0, 1, 1, 2], size=loop_beats)
    degrees = np.clip(np.cumsum(steps) - steps[0], -3, 9)
    degrees[-1] = 0
    eighths = rng.random(loop_beats) < 0.3

    pm = pretty_midi.PrettyMIDI(initial_tempo=float(choice.tempo))
    inst = pretty_midi.Instrument(program=choice.program, name=choice.instrument)
    drums = pretty_midi.Instrument(program=0, is_drum=True, name="drums")

    def note(track, pitch, start, dur, vel):
        track.notes.append(pretty_midi.Note(int(vel), int(pitch), float(start), float(start + dur)))

    for loop in range(loops):
        t0 = loop * loop_beats * beat
        for bar, (degree, quality) in enumerate(progression):
            chord = [octave + p for p in _chord_pitches(choice, degree, quality)]
            if choice.mode == "minor" and degree == 4:  # V in minor: raised leading tone
                chord[1] = octave + choice.tonic + 11
            bar_t = t0 + bar * BEATS_PER_BAR * beat
            bass = octave - 12 + (chord[0] - octave) % 12
            note(inst, bass, bar_t, 2 * beat * 0.95, 88)
            note(inst, bass, bar_t + 2 * beat, 2 * beat * 0.95, 80)
            for b in range(BEATS_PER_BAR):
                bt = bar_t + b * beat
                if pattern == "block":
                    for p in chord:
                        note(inst, p, bt, beat * 0.9, 70)
                elif pattern == "eighths":
                    note(inst, chord[b % 3], bt, beat * 0.45, 72)
                    note(inst, chord[(b + 1) % 3], bt + beat / 2, beat * 0.45, 64)
                else:  # alberti: low, high, middle, high
                    for j, idx in enumerate((0, 2, 1, 2)):
                        note(inst, chord[idx], bt + j * beat / 4, beat / 4 * 0.9, 60 + (8 if j == 0 else 0))
                # Drums: kick 1 and 3, snare 2 and 4, hat every beat.
                note(drums, _KICK if b % 2 == 0 else _SNARE, bt, 0.1, 100)
                note(drums, _HAT, bt, 0.05, 70)
        for b in range(loop_beats):
            d = int(degrees[b])
            pitch = octave + 12 + choice.tonic + 12 * (d // 7) + scale[d % 7]
            bt = t0 + b * beat
            if eighths[b] and b < loop_beats - 1:
                note(inst, pitch, bt, beat * 0.45, 90)
                d2 = d + 1
                note(
                    inst,
                    octave + 12 + choice.tonic + 12 * (d2 // 7) + scale[d2 % 7],
                    bt + beat / 2,
                    0.45 * beat,
                    84,
                )
            else:
                note(inst, pitch, bt, beat * 0.9, 90)
    pm.instruments.extend([inst, drums])
    return pm


def render_choice(
    choice: Choice,
    rng: np.random.Generator,
    clip_id: str,
    *,
    sample_rate: int,
    channels: int,
    clip_seconds: float,
    synth: str = "tinysoundfont",
) -> Clip:
    pm = piece_midi(choice, rng, clip_seconds)
    audio = render.render_midi(
        pm, sample_rate, channels=channels, max_seconds=clip_seconds, tail_seconds=0.0, synth=synth
    )
    entry = Entry(
        id=clip_id,
        audio=f"audio/{clip_id}.wav",
        caption=choice.caption(),
        labels=choice.labels(),
        seconds_start=0.0,
        seconds_total=round(audio.shape[1] / sample_rate, 6),
    )
    return Clip(entry, audio)


def render_clip(
    seed: int,
    index: int,
    *,
    sample_rate: int = 22050,
    channels: int = 1,
    clip_seconds: float = 12.0,
    synth: str = "tinysoundfont",
) -> Clip:
    """Renders training clip ``index`` of corpus ``seed`` (a pure function of both)."""
    choice, rng = training_choice(seed, index)
    return render_choice(
        choice,
        rng,
        f"prompted-{seed}-{index:06d}",
        sample_rate=sample_rate,
        channels=channels,
        clip_seconds=clip_seconds,
        synth=synth,
    )


def render_clips(
    out_dir: str,
    num_clips: int,
    *,
    seed: int = 0,
    sample_rate: int = 22050,
    channels: int = 1,
    clip_seconds: float = 12.0,
    synth: str = "tinysoundfont",
    workers: int = 1,
    progress: bool = False,
) -> str:
    """Renders ``num_clips`` training clips (no held-out combination) to ``out_dir``
    (``audio/*.wav`` and ``manifest.jsonl``); returns the manifest's path."""
    kwargs = dict(sample_rate=sample_rate, channels=channels, clip_seconds=clip_seconds, synth=synth)
    return render_corpus(
        render_clip,
        out_dir,
        num_clips,
        seed=seed,
        kwargs=kwargs,
        workers=workers,
        progress=progress,
        desc="render prompted clips",
    )


def held_out_renders(seed: int, **kwargs) -> Iterator[Clip]:
    """Renders of the held-out prompts themselves (what a perfect model would play):
    the estimators' ceiling on this corpus."""
    for k, choice in enumerate(held_out_prompts()):
        rng = np.random.default_rng([seed, 1_000_000 + k])
        yield render_choice(choice, rng, f"heldout-{seed}-{k:02d}", **kwargs)
