"""The evaluation page: a metrics table per song, the summary, and for a sweep grid
PNG plots of each metric against each grid axis (guidance, steps, sampler,
checkpoint step) that varies.

``eval.html`` is a static page beside the audio, rendered from
``templates/eval.html``; its body is ``templates/eval_section.html``, which another
page (the sweep report) can include with the context of :func:`section_context`.
Plots are matplotlib figures (Agg, no pyplot) written by ``report.save_figure_png``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from audiodiff_jax.core import report
from audiodiff_jax.evaluation import folder as folder_lib

PAGE = "eval.html"
# Grid axes of a sweep, as manifest columns; a numeric axis is drawn as a line, a
# named one (sampler) as points per category.
AXES = ("guidance", "steps", "sampler", "checkpoint_step")
# Columns of the per-song table, in order.
TABLE_COLUMNS = (
    "tempo_bpm",
    "tempo_label",
    "key",
    "key_label",
    "lufs",
    "true_peak_dbtp",
    "clipped_share",
    "silence_share",
    "onset_rate",
    "note_density",
    "pitch_class_entropy",
    "key_stability",
    "tempo_stability",
    "drone",
)


def _value(row: Mapping[str, Any], column: str) -> float | None:
    v = row.get(column)
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and np.isfinite(v):
        return float(v)
    return None


def metric_series(rows: Sequence[Mapping[str, Any]], axis: str, metric: str) -> dict[Any, list[float]]:
    """Axis value -> the metric's values over the rows with both, sorted by axis value."""
    by: dict[Any, list[float]] = {}
    for r in rows:
        x, y = r.get(axis), _value(r, metric)
        if x is None or y is None or isinstance(x, dict | list):
            continue
        by.setdefault(x, []).append(y)
    return dict(sorted(by.items(), key=lambda kv: (isinstance(kv[0], str), kv[0])))


def varying_axes(rows: Sequence[Mapping[str, Any]], axes: Sequence[str] = AXES) -> list[str]:
    """The grid axes that take two or more values over the rows."""
    return [a for a in axes if len({r[a] for r in rows if a in r and not isinstance(r[a], dict | list)}) > 1]


def metrics_figure(
    rows: Sequence[Mapping[str, Any]], axis: str, metrics: Sequence[str] = folder_lib.NUMERIC
) -> Figure | None:
    """One panel per metric present: every song as a dot, the mean per axis value as a
    line (numeric axis) or a bar tick (named axis). None when no metric has values."""
    panels = [(m, metric_series(rows, axis, m)) for m in metrics]
    panels = [(m, s) for m, s in panels if s]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * nrows), dpi=90, layout="constrained")
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for _, s in panels for x in s)
    for i, (metric, series) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        keys = list(series)
        pos = keys if numeric else list(range(len(keys)))
        for p, k in zip(pos, keys, strict=True):
            ax.scatter([p] * len(series[k]), series[k], s=12, alpha=0.5, color="tab:blue")
        means = [float(np.mean(series[k])) for k in keys]
        # Named values (samplers) have no order between them: means as markers, no line.
        ax.plot(pos, means, marker="o", color="tab:red", linestyle="-" if numeric else "none", label="mean")
        if not numeric:
            ax.set_xticks(pos, [str(k) for k in keys], rotation=20)
            ax.set_xlim(-0.5, len(keys) - 0.5)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"metrics against {axis}: every song (blue), mean (red)")
    return fig


def plot_metrics_against(
    rows: Sequence[Mapping[str, Any]], axis: str, out_png: str, metrics: Sequence[str] = folder_lib.NUMERIC
) -> str | None:
    """Writes a PNG of each metric against ``axis`` (a manifest column: guidance, steps,
    sampler, checkpoint_step...); returns its path, or None when nothing to plot."""
    fig = metrics_figure(rows, axis, metrics)
    if fig is None:
        return None
    report.save_figure_png(fig, out_png)
    return out_png


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def section_context(
    out_dir: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], axes: Sequence[str] = AXES
) -> dict[str, Any]:
    """What ``eval_section.html`` shows; writes the plots (``eval-<axis>.png``) into ``out_dir``."""
    plots = []
    for axis in varying_axes(rows, axes):
        name = "eval-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", axis) + ".png"
        if plot_metrics_against(rows, axis, os.path.join(out_dir, name)):
            plots.append({"axis": axis, "file": name})
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    adherence = dict(summary.get("adherence", {}))
    ceilings = adherence.pop("estimator_ceilings", {})
    return {
        "songs": len(rows),
        "means": [(k, _cell(v)) for k, v in summary.get("means", {}).items()],
        "counts": [(k, summary.get(k, 0)) for k in ("drones", "mostly_silent", "clipped")],
        "adherence": [(k, _cell(v)) for k, v in adherence.items()],
        "ceilings": [(k, _cell(v)) for k, v in ceilings.items()],
        "distance": summary.get("set_distance"),
        "columns": columns,
        "table": [
            {"id": r.get("id", ""), "file": r.get("file", ""), "cells": [_cell(r.get(c)) for c in columns]}
            for r in rows
        ],
        "plots": plots,
        "unreadable": summary.get("unreadable", []),
    }


def write_eval_page(
    out_dir: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *, title: str = "Evaluation"
) -> str:
    """Writes ``out_dir/eval.html`` (and its plots); returns its path."""
    return report.render_page(
        PAGE, os.path.join(out_dir, PAGE), title=title, evaluation=section_context(out_dir, rows, summary)
    )
