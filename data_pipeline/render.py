"""MIDI -> audio: General MIDI synthesis for the rendered corpora (scores, grooves).

Everything that makes sound from symbolic music goes through :func:`render_midi`:
a ``pretty_midi.PrettyMIDI`` (from music21, MMA, or a ``.mid`` file) is played
through a General MIDI soundfont and comes back as float32 ``[channels, samples]``,
peak-normalized so nothing clips.

Two synthesizers:

- ``tinysoundfont`` (pip only, the default) with ``TimGM6mb.sf2``, the small GM
  soundfont that ships inside ``pretty_midi``. Events are applied at their exact
  sample positions by our own loop (not tinysoundfont's real-time sequencer), so a
  render is a pure function of the MIDI and the sample rate.
- ``fluidsynth`` (the Debian ``fluidsynth`` program) with ``fluid-soundfont-gm``
  when both are installed: fuller sound, same interface.

:func:`render_piece` adds the music21 side: a score (or an excerpt of it) with
chosen GM programs per part, one tempo and a transposition, rendered to audio plus
the exact facts about it (key, mode, time signature, ...). The varied corpus built
from many pieces is ``data_pipeline/corpus_scores.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_PEAK_DB = -1.0  # normalize to 1 dB below full scale: headroom for lossy re-encoding
FLUID_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"  # Debian fluid-soundfont-gm
_FADE_SECONDS = 0.05  # fade-out where an excerpt is cut mid-note, so the cut does not click

# Caption names for General MIDI programs (0-based). Where a program is missing,
# the GM name from pretty_midi is used, lower-cased.
GM_NAMES = {
    0: "piano",
    1: "bright piano",
    4: "electric piano",
    6: "harpsichord",
    8: "celesta",
    11: "vibraphone",
    12: "marimba",
    13: "xylophone",
    16: "drawbar organ",
    19: "church organ",
    21: "accordion",
    22: "harmonica",
    24: "nylon guitar",
    25: "steel guitar",
    26: "jazz guitar",
    27: "clean electric guitar",
    29: "overdriven guitar",
    30: "distortion guitar",
    32: "acoustic bass",
    33: "electric bass",
    34: "picked bass",
    35: "fretless bass",
    40: "violin",
    41: "viola",
    42: "cello",
    43: "contrabass",
    45: "pizzicato strings",
    46: "harp",
    48: "strings",
    49: "slow strings",
    50: "synth strings",
    52: "choir",
    56: "trumpet",
    57: "trombone",
    58: "tuba",
    60: "french horn",
    61: "brass section",
    64: "soprano sax",
    65: "alto sax",
    66: "tenor sax",
    67: "baritone sax",
    68: "oboe",
    69: "english horn",
    70: "bassoon",
    71: "clarinet",
    72: "piccolo",
    73: "flute",
    74: "recorder",
    75: "pan flute",
    80: "square lead",
    81: "sawtooth lead",
    88: "new age pad",
    89: "warm pad",
    105: "banjo",
}
DRUMS_NAME = "drums"


def program_name(program: int, is_drum: bool = False) -> str:
    """Caption name of a GM program (0-based), e.g. 40 -> ``"violin"``."""
    if is_drum:
        return DRUMS_NAME
    if program in GM_NAMES:
        return GM_NAMES[program]
    import pretty_midi

    return pretty_midi.program_to_instrument_name(program).lower()


def default_soundfont() -> str:
    """Path of ``TimGM6mb.sf2`` inside the installed pretty_midi package."""
    import pretty_midi

    path = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: pretty_midi's TimGM6mb.sf2 is missing (reinstall pretty_midi)")
    return path


def fluidsynth_available() -> bool:
    """True when the fluidsynth program and Debian's fluid-soundfont-gm are both installed."""
    return shutil.which("fluidsynth") is not None and os.path.exists(FLUID_SOUNDFONT)


@functools.lru_cache(maxsize=4)
def _soundfont_bytes(path: str) -> bytes:
    # Read once per process: a fresh Synth per render (no state carried between
    # renders) then costs only the parse of the bytes, not the disk read.
    with open(path, "rb") as f:
        return f.read()


def normalize(audio: np.ndarray, peak_db: float = DEFAULT_PEAK_DB) -> np.ndarray:
    """Scales audio so its absolute peak is ``peak_db`` dBFS; silence stays silence."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return audio.astype(np.float32)
    return (audio * (10.0 ** (peak_db / 20.0) / peak)).astype(np.float32)


def _as_pretty_midi(midi: Any):
    import pretty_midi

    if isinstance(midi, pretty_midi.PrettyMIDI):
        return midi
    if isinstance(midi, (bytes, bytearray)):
        return pretty_midi.PrettyMIDI(io.BytesIO(bytes(midi)))
    if isinstance(midi, (str, os.PathLike)):
        return pretty_midi.PrettyMIDI(os.fspath(midi))
    raise TypeError(f"midi must be a PrettyMIDI, MIDI bytes or a .mid path, got {type(midi).__name__}")


def _events(pm) -> tuple[list[tuple], dict[int, tuple[int, bool]]]:
    """Flattens a PrettyMIDI into time-sorted synth events and a channel -> program map.

    Each distinct (program, is_drum) pair gets its own synth channel, so two parts
    with the same instrument share one channel (as a MIDI file would), and up to 16
    different instruments play at once.
    """
    keys = sorted({(inst.program, inst.is_drum) for inst in pm.instruments if inst.notes})
    if len(keys) > 16:
        raise ValueError(f"{len(keys)} distinct instruments; a General MIDI synth has 16 channels")
    channel_of = {key: ch for ch, key in enumerate(keys)}
    events = []
    # Sort key (time, kind, ...): at one instant controllers (0) act before note-offs
    # (1), which come before note-ons (2), so a repeated note is re-struck, not cut.
    for inst in pm.instruments:
        if not inst.notes:
            continue
        ch = channel_of[(inst.program, inst.is_drum)]
        for cc in inst.control_changes:
            events.append((cc.time, 0, ch, "cc", cc.number, cc.value))
        for pb in inst.pitch_bends:
            events.append((pb.time, 0, ch, "pb", pb.pitch + 8192, 0))
        for note in inst.notes:
            if note.end <= note.start:
                continue
            events.append((note.start, 2, ch, "on", note.pitch, max(1, min(127, note.velocity))))
            events.append((note.end, 1, ch, "off", note.pitch, 0))
    events.sort()
    return events, {ch: key for key, ch in channel_of.items()}


def _render_tinysoundfont(pm, sample_rate: int, total_samples: int, soundfont: str) -> np.ndarray:
    import tinysoundfont

    events, programs = _events(pm)
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(_soundfont_bytes(soundfont))
    for ch, (program, is_drum) in programs.items():
        # GM drum kits live in bank 128 of a soundfont; TinySoundFont finds them with is_drums.
        synth.program_select(ch, sfid, 0, 0 if is_drum else program, is_drums=is_drum)
    out = np.zeros((total_samples, 2), np.float32)
    pos = 0
    for time, _, ch, kind, a, b in events:
        at = min(int(round(time * sample_rate)), total_samples)
        if at > pos:
            out[pos:at] = np.frombuffer(synth.generate_simple(at - pos), np.float32).reshape(-1, 2)
            pos = at
        if at >= total_samples:
            break
        if kind == "on":
            synth.noteon(ch, a, b)
        elif kind == "off":
            synth.noteoff(ch, a)
        elif kind == "cc":
            synth.control_change(ch, a, b)
        else:
            synth.pitchbend(ch, a)
    if pos < total_samples:
        out[pos:] = np.frombuffer(synth.generate_simple(total_samples - pos), np.float32).reshape(-1, 2)
    return out.T


def _render_fluidsynth(pm, sample_rate: int, total_samples: int, soundfont: str) -> np.ndarray:
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="audiodiff-fluid-") as tmp:
        mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        pm.write(mid)
        cmd = ["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(sample_rate), "-F", wav, soundfont, mid]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not os.path.exists(wav):
            raise RuntimeError(f"fluidsynth failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    out = np.zeros((total_samples, 2), np.float32)
    n = min(total_samples, audio.shape[0])
    out[:n] = audio[:n, :2] if audio.shape[1] >= 2 else audio[:n, :1]
    return out.T


def render_midi(
    midi: Any,
    sample_rate: int = 44100,
    *,
    channels: int = 2,
    max_seconds: float | None = None,
    tail_seconds: float = 1.0,
    peak_db: float = DEFAULT_PEAK_DB,
    synth: str = "tinysoundfont",
    soundfont: str | None = None,
) -> np.ndarray:
    """Renders MIDI to normalized float32 audio ``[channels, samples]``.

    Args:
      midi: a ``pretty_midi.PrettyMIDI``, MIDI file bytes, or a ``.mid`` path.
      sample_rate: output rate in Hz.
      channels: 2 (stereo, as the soundfont pans) or 1 (the mean of both sides).
      max_seconds: cut the render here (with a short fade-out); None = whole piece.
      tail_seconds: silence after the last note-off, where releases and reverb decay.
      peak_db: peak level after normalization, in dBFS (< 0: no clipping).
      synth: ``"tinysoundfont"`` (pip only) or ``"fluidsynth"`` (Debian program).
      soundfont: .sf2 path; default TimGM6mb.sf2 (tinysoundfont) or FluidR3_GM (fluidsynth).

    Returns:
      float32 ``[channels, samples]`` with ``samples = round(seconds * sample_rate)``.
    """
    if channels not in (1, 2):
        raise ValueError(f"channels={channels} must be 1 or 2")
    if sample_rate < 1000:
        raise ValueError(f"sample_rate={sample_rate} is too low for a soundfont render")
    pm = _as_pretty_midi(midi)
    seconds = pm.get_end_time() + tail_seconds
    cut = max_seconds is not None and max_seconds < seconds
    if cut:
        seconds = max_seconds
    total = max(int(round(seconds * sample_rate)), 1)
    if synth == "tinysoundfont":
        audio = _render_tinysoundfont(pm, sample_rate, total, soundfont or default_soundfont())
    elif synth == "fluidsynth":
        if not fluidsynth_available() and soundfont is None:
            raise RuntimeError(
                "synth='fluidsynth' needs the fluidsynth program and fluid-soundfont-gm "
                "(apt-get install -y fluidsynth fluid-soundfont-gm)"
            )
        audio = _render_fluidsynth(pm, sample_rate, total, soundfont or FLUID_SOUNDFONT)
    else:
        raise ValueError(f"synth={synth!r}: use 'tinysoundfont' or 'fluidsynth'")
    if cut:
        fade = min(int(_FADE_SECONDS * sample_rate), total)
        audio[:, total - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    if channels == 1:
        audio = audio.mean(axis=0, keepdims=True)
    return normalize(audio, peak_db)


# ---------------------------------------------------------------------------
# music21 scores


def configure_music21() -> None:
    """Keeps music21 offline and quiet.

    music21 only reaches the network for its "virtual corpus" or when asked to
    download; we use neither, and its bundled core corpus is read from the package.
    Setting the preference in memory (not ``environment.set``, which writes
    ``~/.music21rc``) makes sure nothing prompts or downloads.
    """
    from music21 import environment

    env = environment.Environment()
    try:
        env["autoDownload"] = "deny"
        env["warnings"] = 0
    except Exception:  # noqa: BLE001 - older/newer music21 may name these differently; defaults are offline too
        pass


@dataclasses.dataclass(frozen=True)
class PieceFacts:
    """What is known exactly about a rendered piece (becomes caption and labels)."""

    key: str  # tonic with accidentals as musicians write them: "F#", "Bb"
    mode: str  # "major" / "minor" / other music21 mode names
    key_source: str  # "score" (written in the score) or "analysis" (music21's key finder)
    time_signature: str  # "3/4"; "" when the score has none
    tempo: int  # quarter notes per minute, as rendered
    seconds: float  # rendered length
    seconds_start: float  # start of the excerpt in the whole piece at this tempo
    seconds_total: float  # length of the whole piece at this tempo
    programs: tuple[int, ...]  # GM program per part, in score order


def pitch_name(name: str) -> str:
    """music21 spelling -> caption spelling: ``"B-"`` -> ``"Bb"``, ``"F#"`` stays, ``"E--"`` -> ``"Ebb"``."""
    return name.replace("-", "b")


def score_key(score) -> tuple[str, str, str]:
    """(tonic, mode, source) of a score: its first written Key, else music21's analysis."""
    from music21 import key as m21key

    written = next(iter(score.recurse().getElementsByClass(m21key.Key)), None)
    if written is not None:
        return pitch_name(written.tonic.name), written.mode, "score"
    analysed = score.analyze("key")
    return pitch_name(analysed.tonic.name), analysed.mode, "analysis"


def score_time_signature(score) -> str:
    from music21 import meter

    ts = next(iter(score.recurse().getElementsByClass(meter.TimeSignature)), None)
    return ts.ratioString if ts is not None else ""


def transpose_interval(score, semitones: int) -> str:
    """The interval name for a transposition that keeps the key signature readable.

    +6 semitones can be spelled A4 or d5 (F major -> B major or Cb major); the
    spelling whose new key has the fewest sharps or flats wins, so captions name
    keys as a musician would write them.
    """
    from music21 import interval
    from music21 import key as m21key

    if semitones == 0:
        return "P1"
    names = {
        1: ("m2", "A1"),
        2: ("M2", "d3"),
        3: ("m3", "A2"),
        4: ("M3", "d4"),
        5: ("P4", "A3"),
        6: ("A4", "d5"),
        7: ("P5", "d6"),
        8: ("m6", "A5"),
        9: ("M6", "d7"),
        10: ("m7", "A6"),
        11: ("M7", "d8"),
    }
    if abs(semitones) not in names:
        raise ValueError(f"transpose by {semitones} semitones: use -11..11")
    written = next(iter(score.recurse().getElementsByClass(m21key.KeySignature)), None)
    sharps = written.sharps if written is not None else 0
    sign = "-" if semitones < 0 else ""
    best = None
    for name in names[abs(semitones)]:
        moved = m21key.KeySignature(sharps).transpose(interval.Interval(sign + name))
        cost = abs(moved.sharps)
        if best is None or cost < best[0]:
            best = (cost, sign + name)
    return best[1]


def render_piece(
    score,
    *,
    programs: Sequence[int],
    tempo: int,
    transpose: int = 0,
    measures: tuple[int, int] | None = None,
    sample_rate: int = 44100,
    channels: int = 2,
    max_seconds: float | None = None,
    synth: str = "tinysoundfont",
    soundfont: str | None = None,
) -> tuple[np.ndarray, PieceFacts]:
    """Renders a music21 score (or an excerpt) with chosen instruments, tempo and transposition.

    Args:
      score: a ``music21.stream.Score`` (or Part); it is not modified.
      programs: GM program (0-based) for each part, in score order (a shorter list
        repeats its last entry).
      tempo: quarter notes per minute; replaces every tempo mark of the score.
      transpose: semitones (-11..11), spelled to keep the key signature readable.
      measures: (first, last) measure numbers of an excerpt, inclusive; None = all.
      sample_rate / channels / max_seconds / synth / soundfont: as in :func:`render_midi`.

    Returns:
      (audio float32 ``[channels, samples]``, :class:`PieceFacts`).
    """
    import pretty_midi
    from music21 import stream
    from music21 import tempo as m21tempo
    from music21.midi import translate

    if not programs:
        raise ValueError("programs must name at least one GM program")
    if not 20 <= tempo <= 400:
        raise ValueError(f"tempo={tempo} must be in [20, 400] quarter notes per minute")
    whole = score if isinstance(score, stream.Score) else stream.Score([score])
    whole_quarters = float(whole.highestTime)
    start_quarters = 0.0
    piece = whole
    if measures:
        piece = whole.measures(measures[0], measures[1])
        bar = whole.parts[0].measure(measures[0]) if whole.parts else None
        if bar is not None:
            start_quarters = float(bar.getOffsetBySite(whole.parts[0]))
    # transpose() returns a copy; otherwise copy explicitly: the caller's score (and
    # the measures an excerpt shares with it) must not lose its tempo marks below.
    piece = piece.transpose(transpose_interval(piece, transpose)) if transpose else copy.deepcopy(piece)
    # One tempo for the whole render, so the caption's bpm is exact.
    for mark in list(piece.recurse().getElementsByClass(m21tempo.TempoIndication)):
        mark.activeSite.remove(mark)
    piece.insert(0, m21tempo.MetronomeMark(number=tempo))
    tonic, mode, key_source = score_key(piece)
    midi_file = translate.streamToMidiFile(piece)
    pm = pretty_midi.PrettyMIDI(io.BytesIO(midi_file.writestr()))
    pm.instruments = [inst for inst in pm.instruments if inst.notes]
    if not pm.instruments:
        raise ValueError("the score (excerpt) has no notes")
    part_programs = [programs[min(i, len(programs) - 1)] for i in range(len(pm.instruments))]
    for inst, program in zip(pm.instruments, part_programs, strict=True):
        inst.program, inst.is_drum = int(program), False
    audio = render_midi(
        pm,
        sample_rate,
        channels=channels,
        max_seconds=max_seconds,
        synth=synth,
        soundfont=soundfont,
    )
    facts = PieceFacts(
        key=tonic,
        mode=mode,
        key_source=key_source,
        time_signature=score_time_signature(piece),
        tempo=int(tempo),
        seconds=audio.shape[1] / sample_rate,
        seconds_start=start_quarters * 60.0 / tempo,
        seconds_total=whole_quarters * 60.0 / tempo,
        programs=tuple(part_programs),
    )
    return audio, facts
