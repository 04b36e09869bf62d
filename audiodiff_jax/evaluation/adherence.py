"""Prompt adherence: the labels a prompt asks for (tempo, key), read from structured
labels or from the caption text, against what the estimators hear.

The rendered corpora state exact facts in their captions ("... in F# minor, 3/4 time,
96 bpm") and in their manifest ``labels`` (``key``, ``mode``, ``tempo``). Tempo
counts as right within :data:`song.TEMPO_TOLERANCE` (4%) of the label; twice or half
the tempo is wrong. Key is right when tonic pitch class and mode both match
(enharmonic spellings agree: F# minor = Gb minor); the MIREX key score (1 right,
0.5 a fifth away, 0.3 relative, 0.2 parallel) is reported beside it.

Instruments in a prompt are read and kept with the row, but not scored: no instrument
classifier installs offline (the candidates download weights at run time).

:data:`CEILINGS` are the estimators' own accuracies on real renders with exact
labels (``benchmarks/eval_ceiling.py``, BENCHMARKS.md): the best a perfect model can
score here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from audiodiff_jax.core import music
from audiodiff_jax.evaluation import song

# Measured by benchmarks/eval_ceiling.py (BENCHMARKS.md "Evaluation"): accuracy of the
# estimators on rendered scores and grooves whose tempo and key labels are exact.
CEILINGS: dict[str, Any] = {
    "tempo_accuracy": 0.633,  # scores 0.40 (slow pieces read at double time), grooves 0.867
    "tempo_accuracy_octave": 0.883,
    "key_accuracy": 0.695,  # scores 0.655, grooves 0.733; errors mostly a fifth away
    "key_mirex_score": 0.802,
    "measured_on": "60 renders of 20 s, 30 music21 scores + 30 MMA grooves, corpus seed 2",
}

# The spelling of keys and tempi is the project's one (core/music.py); kept here by name.
pitch_class = music.pitch_class
parse_key = music.parse_key
_TEMPO_RE = music.TEMPO_RE


def labels_from(row: Mapping[str, Any]) -> dict[str, Any]:
    """Tempo and key a row asks for: its ``labels`` (corpus manifests), else its own
    ``tempo``/``key``/``mode`` fields, else what its ``prompt`` or ``caption`` says.

    Returns ``{"tempo": float, "key": (pc, mode)}`` with the labels found (maybe none).
    """
    labels = row.get("labels") if isinstance(row.get("labels"), Mapping) else row
    out: dict[str, Any] = {}
    tempo = labels.get("tempo", labels.get("bpm"))  # sampled rows: bpm (0 = none asked)
    if isinstance(tempo, int | float) and not isinstance(tempo, bool) and tempo > 0:
        out["tempo"] = float(tempo)
    key = labels.get("key")
    if isinstance(key, str) and key:
        mode = labels.get("mode")
        if isinstance(mode, str):  # corpus labels: tonic ("F#", "B-") and mode apart
            pc = pitch_class(key)
            parsed = (pc, mode) if pc is not None and mode in ("major", "minor") else None
        else:
            parsed = parse_key(key)
        if parsed is not None:
            out["key"] = parsed
    text = " ".join(str(row.get(f, "")) for f in ("prompt", "caption"))
    if "tempo" not in out:
        m = _TEMPO_RE.search(text)
        if m:
            out["tempo"] = float(m.group(1))
    if "key" not in out:
        parsed = parse_key(text)
        if parsed is not None:
            out["key"] = parsed
    return out


def mirex_key_score(estimate: tuple[int, str], truth: tuple[int, str]) -> float:
    """MIREX key score: 1 same key, 0.5 a fifth (either way, same mode), 0.3 relative
    major/minor, 0.2 parallel major/minor, else 0."""
    (e_pc, e_mode), (t_pc, t_mode) = estimate, truth
    if estimate == truth:
        return 1.0
    if e_mode == t_mode and (e_pc - t_pc) % 12 in (5, 7):
        return 0.5
    if e_mode != t_mode:
        relative = (t_pc + 9) % 12 if t_mode == "major" else (t_pc + 3) % 12
        if e_pc == relative:
            return 0.3
        if e_pc == t_pc:
            return 0.2
    return 0.0


def adherence(metrics: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, Any]:
    """Columns comparing a song's metrics with its labels (only for labels present)."""
    out: dict[str, Any] = {}
    if "tempo" in labels:
        out["tempo_label"] = labels["tempo"]
        est = metrics.get("tempo_bpm") or 0.0
        out["tempo_ok"] = song.tempo_agrees(est, labels["tempo"])
        out["tempo_ok_octave"] = any(song.tempo_agrees(est * f, labels["tempo"]) for f in (0.5, 1, 2))
    if "key" in labels:
        pc, mode = labels["key"]
        out["key_label"] = song.key_name(pc, mode)
        est = parse_key(metrics["key"]) if metrics.get("key") else None
        out["key_ok"] = est == (pc, mode)
        out["key_score"] = mirex_key_score(est, (pc, mode)) if est else 0.0
    return out


def summarize(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracies over the rows that carry labels, with the tolerance stated and the
    estimators' ceilings beside them."""
    out: dict[str, Any] = {}
    tempo = [r["tempo_ok"] for r in rows if "tempo_ok" in r]
    if tempo:
        out["tempo_accuracy"] = round(sum(tempo) / len(tempo), 4)
        out["tempo_accuracy_octave"] = round(
            sum(r["tempo_ok_octave"] for r in rows if "tempo_ok" in r) / len(tempo), 4
        )
        out["tempo_rows"] = len(tempo)
        out["tempo_tolerance"] = f"within {song.TEMPO_TOLERANCE:.0%} of the label; octave errors wrong"
    keys = [r for r in rows if "key_ok" in r]
    if keys:
        out["key_accuracy"] = round(sum(r["key_ok"] for r in keys) / len(keys), 4)
        out["key_mirex_score"] = round(sum(r["key_score"] for r in keys) / len(keys), 4)
        out["key_rows"] = len(keys)
        out["key_tolerance"] = "tonic pitch class and mode both right (enharmonics agree)"
    if out:
        out["estimator_ceilings"] = dict(CEILINGS)
    return out
