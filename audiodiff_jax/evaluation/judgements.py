"""Blind A/B listening judgements: the file format, and win rates with confidence intervals.

``audiodiff-serve --ab=SOURCE_A --ab=SOURCE_B`` plays listeners pairs of songs, one from
each source, in random order and without labels, and appends every judgement to
``JUDGEMENTS_DIR/judgements.jsonl`` (:func:`append`); ``audiodiff-eval --judgements=FILE``
turns the file into win rates (:func:`win_rates`, :func:`format_table`). The format is a
contract between the two, so it lives here, with the reader.

One line per judgement (:func:`record`)::

    {"time": "2026-...Z", "listener": "ana", "session": "...", "pair": "3f2a...", "pair_index": 2,
     "choice": "left" | "right" | "same", "winner": "<source name>" | "same",
     "left": {"source": NAME, "source_spec": {...}, "params": {...SampleParams}, "edit": "", ...},
     "right": {...}}

A song's side holds everything needed to make it again: its source (``source_spec``:
the checkpoint or export, step, weight set, adapter stack, or the sweep folder and the
manifest row it came from) and every sampling parameter (``params``: prompt, seed,
seconds, guidance, steps, sampler...).

Win rates count decisive judgements: a source's win rate is wins / (wins + losses)
against every other source, with the Wilson score interval of that binomial proportion
and the two-sided binomial test against 0.5 (``scipy.stats.binomtest``); "same" counts
apart (``ties``), and ``score`` counts a tie as half a win.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import scipy.stats

from audiodiff_jax.core.errors import UserError

JUDGEMENTS_FILE = "judgements.jsonl"
WIN_RATES_FILE = "win_rates.json"
LEFT, RIGHT, SAME = "left", "right", "same"
CHOICES = (LEFT, RIGHT, SAME)
CONFIDENCE = 0.95

_APPEND_LOCK = threading.Lock()


class JudgementError(UserError):
    """A judgements file that cannot be read, or a judgement that cannot be recorded."""


def record(
    *,
    choice: str,
    left: Mapping[str, Any],
    right: Mapping[str, Any],
    pair: str,
    pair_index: int,
    listener: str,
    session: str,
    when: datetime.datetime | None = None,
) -> dict[str, Any]:
    """One judgement as a line of the file.

    Args:
      choice: ``left``, ``right`` or ``same``: what the listener chose.
      left, right: the song shown on each side: ``source`` (the source's name) and
        whatever else makes it again (``source_spec``, ``params``, ``edit``, ``file``).
      pair: the pair's id; pair_index: its number in the listener's session.
      listener: the name the listener gave ("" if none); session: the browser session.
      when: the time of the judgement (default: now, UTC).
    """
    if choice not in CHOICES:
        raise JudgementError(f"choice={choice!r}: must be one of {', '.join(CHOICES)}")
    for side, song in ((LEFT, left), (RIGHT, right)):
        if not song.get("source"):
            raise JudgementError(f"the {side} song names no source")
    winner = SAME if choice == SAME else (left if choice == LEFT else right)["source"]
    when = when or datetime.datetime.now(datetime.UTC)
    return {
        "time": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "listener": listener,
        "session": session,
        "pair": pair,
        "pair_index": int(pair_index),
        "choice": choice,
        "winner": winner,
        LEFT: dict(left),
        RIGHT: dict(right),
    }


def append(folder: str, row: Mapping[str, Any]) -> str:
    """Appends one judgement to ``folder/judgements.jsonl`` (created with the folder) as
    one write of one line, flushed to disk; returns the file's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, JUDGEMENTS_FILE)
    line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    with _APPEND_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def read(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The judgements of a file, and one message per line that is not one (named by line).

    A folder is read as its ``judgements.jsonl``.
    """
    if os.path.isdir(path):
        path = os.path.join(path, JUDGEMENTS_FILE)
    if not os.path.isfile(path):
        raise JudgementError(f"no judgements file {path!r}")
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                sources = (row[LEFT]["source"], row[RIGHT]["source"])
                if row["choice"] not in CHOICES or not all(isinstance(s, str) and s for s in sources):
                    raise ValueError(f"choice {row['choice']!r} or sources {sources!r}")
            except (ValueError, KeyError, TypeError) as e:
                bad.append(f"{path}:{n}: not a judgement ({type(e).__name__}: {e})")
                continue
            rows.append(row)
    return rows, bad


def _ci(wins: int, decisive: int, confidence: float) -> tuple[float | None, float | None, float | None]:
    """(Wilson interval low, high, two-sided binomial p against 0.5); Nones without data."""
    if decisive == 0:
        return None, None, None
    test = scipy.stats.binomtest(wins, decisive, 0.5)
    ci = test.proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high), float(test.pvalue)


def _rates(wins: int, losses: int, ties: int, confidence: float) -> dict[str, Any]:
    decisive = wins + losses
    low, high, p = _ci(wins, decisive, confidence)
    n = decisive + ties
    return {
        "judgements": n,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": wins / decisive if decisive else None,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "score": (wins + 0.5 * ties) / n if n else None,
    }


def win_rates(rows: Sequence[Mapping[str, Any]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Win rates per source, and head to head per pair of sources.

    Returns:
      ``{"confidence": c, "judgements": n, "sources": {name: rates}, "pairs": [rates of
      a against b, with "a" and "b"]}``, where rates are ``judgements, wins, losses,
      ties, win_rate`` (wins / decisive judgements), ``ci_low, ci_high`` (Wilson),
      ``p_value`` (two-sided binomial test against 0.5) and ``score`` (ties as half).
      A pair of songs from one source (a mistake, or a sanity check) counts for no
      source and is reported as ``same_source``.
    """
    if not 0 < confidence < 1:
        raise JudgementError(f"confidence={confidence} must be in (0, 1)")
    tally: dict[str, list[int]] = {}  # name -> [wins, losses, ties]
    heads: dict[tuple[str, str], list[int]] = {}  # (a, b) sorted -> [a wins, b wins, ties]
    same_source = 0
    for row in rows:
        a, b = row[LEFT]["source"], row[RIGHT]["source"]
        if a == b:
            same_source += 1
            continue
        for name in (a, b):
            tally.setdefault(name, [0, 0, 0])
        key = tuple(sorted((a, b)))
        head = heads.setdefault(key, [0, 0, 0])
        if row["choice"] == SAME:
            tally[a][2] += 1
            tally[b][2] += 1
            head[2] += 1
            continue
        winner, loser = (a, b) if row["choice"] == LEFT else (b, a)
        tally[winner][0] += 1
        tally[loser][1] += 1
        head[0 if winner == key[0] else 1] += 1
    return {
        "confidence": confidence,
        "judgements": len(rows),
        "same_source": same_source,
        "sources": {name: _rates(*tally[name], confidence) for name in sorted(tally)},
        "pairs": [
            {"a": a, "b": b, **_rates(*heads[a, b], confidence)}
            for a, b in sorted(heads, key=lambda k: (k[0], k[1]))
        ],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def format_table(result: Mapping[str, Any]) -> str:
    """The win rates as a plain-text table (what ``audiodiff-eval --judgements`` prints)."""
    c = round(100 * result["confidence"])
    head = ("source", "n", "wins", "losses", "ties", "win rate", f"{c}% CI (Wilson)", "p vs 50%")
    lines = []
    for name, r in result["sources"].items():
        ci = "-" if r["ci_low"] is None else f"{_pct(r['ci_low'])} - {_pct(r['ci_high'])}"
        p = "-" if r["p_value"] is None else f"{r['p_value']:.3g}"
        lines.append((name, r["judgements"], r["wins"], r["losses"], r["ties"], _pct(r["win_rate"]), ci, p))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]
    fmt = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths, strict=True)).rstrip()
    out = [fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)]
    for pr in result["pairs"]:
        out.append(
            f"{pr['a']} vs {pr['b']}: {pr['wins']} - {pr['losses']} ({pr['ties']} same)"
            + ("" if pr["p_value"] is None else f", p = {pr['p_value']:.3g}")
        )
    if result["same_source"]:
        out.append(f"{result['same_source']} pair(s) of songs from one source, not counted")
    return "\n".join(out) + "\n"


def sources_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each source's name -> its description (``source_spec``) as the first row gives it."""
    out: dict[str, dict[str, Any]] = {}
    for row, side in itertools.product(rows, (LEFT, RIGHT)):
        out.setdefault(row[side]["source"], dict(row[side].get("source_spec") or {}))
    return out


def write_win_rates(path: str, confidence: float = CONFIDENCE) -> tuple[dict[str, Any], str, list[str]]:
    """Reads a judgements file (or folder) and writes ``win_rates.json`` beside it.

    Returns:
      (the win rates with the sources' descriptions, the path written, the bad lines).
    """
    rows, bad = read(path)
    result = {**win_rates(rows, confidence), "source_specs": sources_of(rows), "file": path}
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    out = os.path.join(folder, WIN_RATES_FILE)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    return result, out, bad
