"""Musical facts as the model takes them: tempo, key and time signature.

One spelling for the whole project, used where labels come in (dataset records and
cards, ``data/loader.py``), where they are asked for (``audiodiff-sample --bpm --key
--time_signature``, prompt rows), by the model's control embedder
(``model/dit.py``) and by the evaluation's adherence (``evaluation/adherence.py``).

- **Tempo**: beats per minute, a float in [:data:`TEMPO_MIN`, :data:`TEMPO_MAX`];
  the model sees :func:`tempo_unit` (log-bpm mapped to [0, 1]), so 80 -> 160 is the
  same step as 60 -> 120.
- **Key**: tonic and mode, ``"F# minor"``, ``"Bb major"`` (enharmonic spellings are one
  key); an index in [0, 24): pitch class + 12 for minor.
- **Time signature**: one of :data:`METERS` (``"4/4"``, ``"3/4"``...); its index there.

A missing value is :data:`MISSING` (-1) for key and meter and 0 bpm for tempo.
"""

from __future__ import annotations

import math
import re

import numpy as np

TEMPO_MIN, TEMPO_MAX = 30.0, 300.0
METERS = ("4/4", "3/4", "6/8", "2/4", "2/2", "5/4", "7/8", "12/8", "9/8", "6/4")
MISSING = -1
NUM_KEYS = 24
MODES = ("major", "minor")
CONTROLS = ("tempo", "key", "meter")  # model.controls: the attributes a model takes

_NOTE_PC = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
KEY_RE = re.compile(r"\b([A-G])([#b\u266f\u266d]{0,2})[ -]?(major|minor|maj|min)\b")
TEMPO_RE = re.compile(r"\b(\d{2,3}(?:\.\d+)?)\s*(?:bpm|BPM|beats per minute)\b")


def pitch_class(tonic: str) -> int | None:
    """``"F#"`` -> 6, ``"Bb"`` -> 10, ``"B-"`` (music21) -> 10; None if not a note name."""
    tonic = tonic.strip()
    if not tonic or tonic[0].upper() not in _NOTE_PC:
        return None
    pc = _NOTE_PC[tonic[0].upper()]
    for ch in tonic[1:]:
        if ch in "#\u266f":
            pc += 1
        elif ch in "b-\u266d":
            pc -= 1
        else:
            return None
    return pc % 12


def parse_key(text: str) -> tuple[int, str] | None:
    """(tonic pitch class, mode) of ``"F# minor"``-like text; None when there is none."""
    m = KEY_RE.search(text)
    if m is None:
        return None
    pc = pitch_class(m.group(1) + m.group(2))
    mode = "major" if m.group(3).startswith("maj") else "minor"
    return None if pc is None else (pc, mode)


def key_index(pc: int, mode: str) -> int:
    return pc % 12 + (12 if mode == "minor" else 0)


def key_name(index: int) -> str:
    """20 -> ``"Ab minor"``."""
    return f"{_NAMES[index % 12]} {MODES[index // 12]}"


def key_from_text(text: str) -> int:
    """The index of a key written ``"F# minor"`` (:data:`MISSING` for ``""``).

    Raises:
      ValueError: text that names no key, with what would.
    """
    if not text.strip():
        return MISSING
    parsed = parse_key(text.strip())
    if parsed is None or KEY_RE.fullmatch(text.strip()) is None:
        raise ValueError(f"{text!r} is not a key; write a tonic and a mode, e.g. 'F# minor' or 'Bb major'")
    return key_index(*parsed)


def meter_index(text: str) -> int:
    """The index of a time signature in :data:`METERS` (:data:`MISSING` for ``""``).

    Raises:
      ValueError: one the project has no place for.
    """
    text = text.strip().replace(" ", "")
    if not text:
        return MISSING
    if text not in METERS:
        raise ValueError(f"{text!r} is not a time signature this project knows; one of {', '.join(METERS)}")
    return METERS.index(text)


def check_tempo(bpm: float) -> float:
    """``bpm`` if 0 (none) or in [TEMPO_MIN, TEMPO_MAX]; raises ValueError otherwise."""
    if not (isinstance(bpm, int | float) and math.isfinite(bpm)) or not (
        bpm == 0 or TEMPO_MIN <= bpm <= TEMPO_MAX
    ):
        raise ValueError(f"{bpm!r} bpm is outside [{TEMPO_MIN:g}, {TEMPO_MAX:g}] (0 = none)")
    return float(bpm)


def tempo_unit(bpm, xp=np):
    """log-bpm mapped to [0, 1] over [TEMPO_MIN, TEMPO_MAX]; ``xp`` is numpy or jax.numpy.
    A missing tempo (0) gives a finite value the model never uses."""
    lo, hi = math.log(TEMPO_MIN), math.log(TEMPO_MAX)
    return (xp.log(xp.maximum(bpm, TEMPO_MIN)) - lo) / (hi - lo)


def controls_from_labels(labels: dict | None) -> tuple[float, int, int]:
    """``(bpm, key index, meter index)`` of a record's labels, each missing when absent
    or unreadable: ``tempo`` (a number), ``key`` (``"F# minor"``, or a tonic with
    ``mode``), ``time_signature`` (or ``meter``)."""
    labels = labels or {}
    bpm = 0.0
    tempo = labels.get("tempo", labels.get("bpm"))
    try:
        bpm = check_tempo(float(tempo)) if tempo not in (None, "") else 0.0
    except (TypeError, ValueError):
        bpm = 0.0
    key = MISSING
    tonic, mode = labels.get("key"), labels.get("mode")
    if isinstance(tonic, str) and tonic:
        if isinstance(mode, str) and mode in MODES:
            pc = pitch_class(tonic)
            key = MISSING if pc is None else key_index(pc, mode)
        else:
            parsed = parse_key(tonic)
            key = MISSING if parsed is None else key_index(*parsed)
    meter = MISSING
    ts = labels.get("time_signature", labels.get("meter"))
    if isinstance(ts, str):
        try:
            meter = meter_index(ts)
        except ValueError:
            meter = MISSING
    return bpm, key, meter


def new_tally() -> dict:
    """What a dataset's labels hold, for its card (``metadata["labels"]``): how many
    records carry each control, the tempo range, and counts per key and meter."""
    return {"records": 0, "tempo": {"count": 0, "min": 0.0, "max": 0.0}, "key": {}, "meter": {}}


def add_to_tally(tally: dict, labels: dict | None) -> None:
    bpm, key, meter = controls_from_labels(labels)
    tally["records"] += 1
    if bpm > 0:
        t = tally["tempo"]
        t["min"] = bpm if t["count"] == 0 else min(t["min"], bpm)
        t["max"] = bpm if t["count"] == 0 else max(t["max"], bpm)
        t["count"] += 1
    if key != MISSING:
        tally["key"][key_name(key)] = tally["key"].get(key_name(key), 0) + 1
    if meter != MISSING:
        tally["meter"][METERS[meter]] = tally["meter"].get(METERS[meter], 0) + 1


def merge_tallies(tallies) -> dict:
    out = new_tally()
    for t in tallies:
        out["records"] += t["records"]
        a, b = out["tempo"], t["tempo"]
        if b["count"]:
            a["min"] = b["min"] if a["count"] == 0 else min(a["min"], b["min"])
            a["max"] = b["max"] if a["count"] == 0 else max(a["max"], b["max"])
            a["count"] += b["count"]
        for field in ("key", "meter"):
            for name, n in t[field].items():
                out[field][name] = out[field].get(name, 0) + n
    for field in ("key", "meter"):
        out[field] = dict(sorted(out[field].items()))
    return out
