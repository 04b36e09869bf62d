"""Rendered-score corpus: music21's bundled scores played by varied General MIDI ensembles.

Clip ``i`` of a corpus made with ``seed`` is a pure function of ``(seed, i)``: a
piece drawn from the catalogue (collections weighted equally, so 8,500 Essen folk
songs do not drown 430 Bach chorales), an ensemble (one instrument for every part,
or one per part chosen to suit its register), a tempo, a transposition and an
excerpt, rendered by ``data_pipeline.render``. Every fact in the caption is exact:
instruments and tempo because we chose them, key and time signature because they
are written in the score (music21's key finder fills in only where a score has no
key, and the label ``key_source`` says so), composer and title from the corpus.

Output: ``OUT/audio/ID.wav`` (16-bit PCM) and ``OUT/manifest.jsonl`` (see
``data_pipeline/manifest.py``)::

    audiodiff-corpus scores --out_dir=/data/scores --num_clips=2000 --clip_seconds=20
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from audiodiff_jax.core import paths
from data_pipeline import render
from data_pipeline.manifest import MANIFEST_FILE, Entry, write_manifest

# Corpus folder -> composer as a caption names it. Only folders listed here are
# used: the rest are test fragments or analyses without notes (demos,
# theoryExercises, monteverdi's roman-numeral files).
COLLECTIONS = {
    "bach": "Johann Sebastian Bach",
    "beethoven": "Ludwig van Beethoven",
    "mozart": "Wolfgang Amadeus Mozart",
    "haydn": "Joseph Haydn",
    "handel": "George Frideric Handel",
    "chopin": "Frederic Chopin",
    "schubert": "Franz Schubert",
    "schumann_robert": "Robert Schumann",
    "schumann_clara": "Clara Schumann",
    "corelli": "Arcangelo Corelli",
    "cpebach": "Carl Philipp Emanuel Bach",
    "palestrina": "Giovanni Pierluigi da Palestrina",
    "josquin": "Josquin des Prez",
    "joplin": "Scott Joplin",
    "verdi": "Giuseppe Verdi",
    "weber": "Carl Maria von Weber",
    "beach": "Amy Beach",
    "johnson_j_r": "J. Rosamond Johnson",
    "liliuokalani": "Liliuokalani",
    "essenFolksong": "traditional German folk song",
    "oneills1850": "traditional Irish tune",
    "ryansMammoth": "traditional American fiddle tune",
    "airdsAirs": "traditional Scottish air",
    "nottingham-dataset": "traditional English folk tune",
    "miscFolk": "traditional folk song",
}
_SCORE_EXTENSIONS = (".mxl", ".xml", ".musicxml", ".krn", ".abc")

# (GM program, lowest, highest MIDI pitch it plays well): the palette for ensembles
# chosen part by part. A part gets an instrument whose range holds its median pitch.
PALETTE = (
    (0, 21, 108),
    (4, 28, 103),
    (6, 29, 89),
    (11, 53, 89),
    (12, 45, 96),
    (19, 24, 96),
    (21, 41, 89),
    (24, 40, 84),
    (25, 40, 84),
    (26, 40, 84),
    (32, 28, 55),
    (33, 28, 55),
    (40, 55, 100),
    (41, 48, 88),
    (42, 36, 76),
    (43, 28, 60),
    (46, 24, 103),
    (48, 28, 96),
    (52, 40, 81),
    (56, 54, 82),
    (57, 40, 72),
    (58, 28, 58),
    (60, 41, 77),
    (64, 56, 88),
    (65, 49, 81),
    (66, 44, 76),
    (68, 58, 91),
    (70, 34, 75),
    (71, 50, 91),
    (73, 60, 96),
    (74, 60, 96),
)
# Instruments that can play every part of a score alone (keyboards, harp, sections).
SOLO_PROGRAMS = (0, 4, 6, 19, 46, 48, 52, 24, 12)
TRANSPOSITIONS = tuple(range(-5, 7))  # semitones; at most a tritone away keeps ranges plausible
TEMPO_RANGE = (50, 160)  # quarter notes per minute


@dataclasses.dataclass(frozen=True)
class Piece:
    """One catalogue entry: a work of the music21 core corpus."""

    path: str  # corpus-relative path, e.g. "bach/bwv66.6.mxl"
    number: int | None  # work number inside a multi-work file (abc), else None
    collection: str
    composer: str
    title: str

    @property
    def source(self) -> str:
        return f"music21:{self.path}" + (f"#{self.number}" if self.number is not None else "")


def _title(path: str, metadata) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    candidates = (metadata.title, metadata.movementName) if metadata is not None else ()
    for candidate in candidates:
        # Some corpus files carry their own file name as movement name; skip those.
        if candidate and not candidate.lower().endswith(_SCORE_EXTENSIONS) and candidate != stem:
            return " ".join(str(candidate).split()).rstrip(".")
        if candidate and candidate.lower().endswith(_SCORE_EXTENSIONS) and path.startswith("bach/"):
            break
    if path.startswith("bach/bwv"):
        return f"chorale BWV {stem[3:]}"
    return ", ".join(_words(p) for p in os.path.splitext(path)[0].split("/")[1:])


def _words(name: str) -> str:
    """File-name title -> words: ``"laDonnaEMobile"`` -> ``"la Donna EMobile"``."""
    name = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[a-z])", " ", name)
    return " ".join(name.replace("_", " ").replace("-", " ").split())


@functools.lru_cache(maxsize=1)
def catalogue() -> tuple[Piece, ...]:
    """Every usable work of music21's core corpus, sorted (a pure function of the installed music21)."""
    from music21 import corpus

    render.configure_music21()
    bundle = corpus.corpora.CoreCorpus().metadataBundle
    # MetadataBundle iterates through __getitem__, which rebuilds the list of all
    # 15,000 entries for every item (quadratic: ~15 s); its dict holds the same entries.
    entries = getattr(bundle, "_metadataEntries", None)
    pieces = []
    for entry in entries.values() if isinstance(entries, dict) else bundle:
        path = str(entry.sourcePath)
        collection = path.split("/")[0]
        if collection not in COLLECTIONS or not path.endswith(_SCORE_EXTENSIONS):
            continue
        number = None
        if path.endswith(".abc") and entry.number is not None:
            try:  # the metadata bundle stores some work numbers as strings
                number = int(entry.number)
            except (TypeError, ValueError):
                continue
        pieces.append(Piece(path, number, collection, COLLECTIONS[collection], _title(path, entry.metadata)))
    pieces.sort(key=lambda p: (p.collection, p.path, p.number or 0))
    if not pieces:
        raise RuntimeError("music21's core corpus has no usable scores (is music21 fully installed?)")
    return tuple(pieces)


def parse_piece(piece: Piece):
    """The music21 Score of a catalogue entry (read from the installed package, offline)."""
    from music21 import corpus, stream

    render.configure_music21()
    score = corpus.parse(piece.path, number=piece.number) if piece.number else corpus.parse(piece.path)
    if isinstance(score, stream.Opus):  # a multi-work file parsed whole: take the first work
        score = score.scores[0]
    return score


def choose_ensemble(score, rng: np.random.Generator) -> list[int]:
    """GM programs, one per part: a solo instrument (40%) or instruments that suit each part's register."""
    parts = list(score.parts) or [score]
    if rng.random() < 0.4:
        return [int(rng.choice(SOLO_PROGRAMS))] * len(parts)
    programs = []
    for part in parts:
        pitches = [p.midi for p in part.pitches]
        median = float(np.median(pitches)) if pitches else 60.0
        fits = [prog for prog, low, high in PALETTE if low + 3 <= median <= high - 3]
        programs.append(int(rng.choice(fits or [0])))
    return programs


def choose_excerpt(
    score, tempo: int, clip_seconds: float | None, rng: np.random.Generator
) -> tuple[int, int] | None:
    """(first, last) measure numbers of an excerpt lasting about ``clip_seconds``; None = whole piece."""
    from music21 import stream

    if clip_seconds is None or not score.parts:
        return None
    bars = [
        (m.number, float(m.getOffsetBySite(score.parts[0])), float(m.duration.quarterLength))
        for m in score.parts[0].getElementsByClass(stream.Measure)
    ]
    if len(bars) < 2:
        return None
    want = clip_seconds * tempo / 60.0  # quarter notes
    total = bars[-1][1] + bars[-1][2]
    starts = [i for i, (_, offset, _) in enumerate(bars) if total - offset >= want] or [0]
    first = int(rng.choice(starts))
    last = first
    while last + 1 < len(bars) and bars[last][1] + bars[last][2] - bars[first][1] < want:
        last += 1
    if bars[first][0] == bars[last][0] and first != last:  # repeated numbering (e.g. volta bars)
        return None
    return bars[first][0], bars[last][0]


def _and_join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def instrument_words(programs: Sequence[int]) -> list[str]:
    """Distinct caption names of an ensemble's instruments, in part order."""
    names: list[str] = []
    for program in programs:
        name = render.program_name(program)
        if name not in names:
            names.append(name)
    return names


def caption_for(piece: Piece, facts: render.PieceFacts, rng: np.random.Generator) -> str:
    """A caption stating the exact facts, in one of several phrasings."""
    instruments = _and_join(instrument_words(facts.programs))
    key = f"{facts.key} {facts.mode}"
    by = f"by {piece.composer}" if not piece.composer.startswith("traditional") else f"(a {piece.composer})"
    meter = f"{facts.time_signature} time" if facts.time_signature else "free time"
    speed = "slow" if facts.tempo < 76 else ("fast" if facts.tempo >= 120 else "moderate")
    templates = (
        f"{piece.title} {by}, arranged for {instruments}, in {key}, {meter}, {facts.tempo} bpm",
        f"{instruments} playing {piece.title} {by} in {key} at {facts.tempo} bpm, {meter}",
        f"a {speed} piece in {key} for {instruments}, {meter} at {facts.tempo} bpm: {piece.title} {by}",
    )
    return templates[int(rng.integers(len(templates)))]


def labels_for(piece: Piece, facts: render.PieceFacts, transpose: int, measures) -> dict[str, Any]:
    return {
        "corpus": "music21-scores",
        "collection": piece.collection,
        "composer": piece.composer,
        "title": piece.title,
        "instruments": ", ".join(instrument_words(facts.programs)),
        "programs": ",".join(str(p) for p in facts.programs),
        "key": facts.key,
        "mode": facts.mode,
        "key_source": facts.key_source,
        "tempo": facts.tempo,
        "time_signature": facts.time_signature,
        "transpose": int(transpose),
        "measures": f"{measures[0]}-{measures[1]}" if measures else "all",
        "source": piece.source,
    }


@dataclasses.dataclass(frozen=True)
class Clip:
    entry: Entry
    audio: np.ndarray  # float32 [channels, samples]


def render_clip(
    seed: int,
    index: int,
    *,
    sample_rate: int = 44100,
    channels: int = 2,
    clip_seconds: float | None = 10.0,
    collections: Sequence[str] | None = None,
    synth: str = "tinysoundfont",
    max_attempts: int = 8,
) -> Clip:
    """Renders clip ``index`` of corpus ``seed`` (a pure function of both).

    A piece that fails to parse or has no notes in the drawn excerpt is replaced by
    another draw from the same generator, up to ``max_attempts`` times.
    """
    pieces = catalogue()
    wanted = sorted(set(collections or COLLECTIONS))
    unknown = [c for c in wanted if c not in COLLECTIONS]
    if unknown:
        raise ValueError(f"unknown collection(s) {unknown}; choose from {sorted(COLLECTIONS)}")
    by_collection = {c: [p for p in pieces if p.collection == c] for c in wanted}
    by_collection = {c: ps for c, ps in by_collection.items() if ps}
    names = sorted(by_collection)
    rng = np.random.default_rng([seed, index])
    errors = []
    for _ in range(max_attempts):
        collection = names[int(rng.integers(len(names)))]
        piece = by_collection[collection][int(rng.integers(len(by_collection[collection])))]
        tempo = int(rng.integers(TEMPO_RANGE[0], TEMPO_RANGE[1] + 1))
        transpose = int(rng.choice(TRANSPOSITIONS))
        try:
            score = parse_piece(piece)
            programs = choose_ensemble(score, rng)
            measures = choose_excerpt(score, tempo, clip_seconds, rng)
            audio, facts = render.render_piece(
                score,
                programs=programs,
                tempo=tempo,
                transpose=transpose,
                measures=measures,
                sample_rate=sample_rate,
                channels=channels,
                max_seconds=clip_seconds,
                synth=synth,
            )
        except Exception as e:  # noqa: BLE001 - corpus files vary; a bad one is replaced by another draw
            errors.append(f"{piece.source}: {type(e).__name__}: {e}")
            continue
        if not np.any(audio):
            errors.append(f"{piece.source}: silent render")
            continue
        clip_id = f"score-{seed}-{index:06d}"
        entry = Entry(
            id=clip_id,
            audio=f"audio/{clip_id}.wav",
            caption=caption_for(piece, facts, rng),
            labels=labels_for(piece, facts, transpose, measures),
            seconds_start=round(facts.seconds_start, 6),
            seconds_total=round(max(facts.seconds_total, facts.seconds_start + facts.seconds), 6),
        )
        return Clip(entry, audio)
    raise RuntimeError(f"clip {index} of seed {seed}: {max_attempts} draws failed: " + " | ".join(errors))


def _render_and_write(args: tuple) -> Entry:
    """One job of :func:`render_corpus`: renders clip ``index`` and writes its WAV atomically."""
    import soundfile as sf

    render_fn, out_dir, seed, index, kwargs = args
    clip = render_fn(seed, index, **kwargs)
    buf = io.BytesIO()
    sf.write(buf, clip.audio.T, kwargs.get("sample_rate", 44100), subtype="PCM_16", format="WAV")
    # A crash never leaves a half-written file under the final name.
    paths.atomic_write(os.path.join(out_dir, clip.entry.audio), buf.getvalue())
    return clip.entry


def render_corpus(
    render_fn,
    out_dir: str,
    num_clips: int,
    *,
    seed: int,
    kwargs: dict,
    workers: int,
    progress: bool,
    desc: str,
) -> str:
    """Renders clips ``0..num_clips-1`` with ``render_fn(seed, index, **kwargs)`` (a
    module-level function returning an object with ``entry`` and ``audio``, picklable
    for worker processes) to ``out_dir/audio/*.wav`` plus the manifest; returns its path.
    Shared by the score and groove corpora."""
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips} must be >= 1")
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    jobs = [(render_fn, out_dir, seed, i, kwargs) for i in range(num_clips)]
    entries = _run_jobs(_render_and_write, jobs, workers, progress, desc)
    return write_manifest(os.path.join(out_dir, MANIFEST_FILE), entries)


def render_clips(
    out_dir: str,
    num_clips: int,
    *,
    seed: int = 0,
    sample_rate: int = 44100,
    channels: int = 2,
    clip_seconds: float | None = 10.0,
    collections: Sequence[str] | None = None,
    synth: str = "tinysoundfont",
    workers: int = 1,
    progress: bool = False,
) -> str:
    """Renders ``num_clips`` varied clips to ``out_dir/audio/*.wav`` plus ``out_dir/manifest.jsonl``.

    Args:
      out_dir: corpus folder (created).
      num_clips: clips to render; clip i is a pure function of (seed, i).
      seed: corpus seed.
      sample_rate / channels: of the WAV files.
      clip_seconds: length of each excerpt (None: whole pieces).
      collections: corpus folders to draw from (keys of :data:`COLLECTIONS`); None = all.
      synth: ``"tinysoundfont"`` or ``"fluidsynth"``.
      workers: processes rendering in parallel (1 = in this process).
      progress: show a tqdm bar.

    Returns:
      Path of the manifest.
    """
    kwargs = dict(
        sample_rate=sample_rate,
        channels=channels,
        clip_seconds=clip_seconds,
        collections=tuple(collections) if collections else None,
        synth=synth,
    )
    return render_corpus(
        render_clip,
        out_dir,
        num_clips,
        seed=seed,
        kwargs=kwargs,
        workers=workers,
        progress=progress,
        desc="render scores",
    )


def _run_jobs(fn, jobs: list, workers: int, progress: bool, desc: str) -> list:
    """Maps ``fn`` over jobs in order, in this process or a process pool (results in job order)."""
    from tqdm import tqdm

    if workers <= 1:
        return [fn(job) for job in tqdm(jobs, desc=desc, disable=not progress)]
    import concurrent.futures
    import multiprocessing

    # spawn: the parent may hold threads (tqdm, JAX) that fork would copy in a broken state.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=4), total=len(jobs), desc=desc, disable=not progress))
