"""The sweep report page: audio players, spectrogram images and parameters, per output.

``report.html`` is a static page beside the WAVs (relative links, so the folder can be
copied anywhere and opened from disk), rendered from the Jinja2 template
``templates/report.html`` with HTML autoescaping. Spectrograms are PNGs drawn with
matplotlib (Agg, no pyplot) from a ``scipy.signal.ShortTimeFFT`` magnitude: time in
seconds, frequency in kHz, a dB colour bar.

When the rows come from more than one checkpoint step, the page also plots numeric
manifest columns (any of them: timings, evaluation metrics merged into the rows)
against the step, one line per weight set (:func:`step_figure`).

When the page has loaded, a small script writes into ``<body>`` how many images
decoded and how many audio players read their WAV header (``data-images-ok``,
``data-audio-ok``): the headless-browser test reads those back.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
from collections.abc import Sequence

import jinja2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.signal import ShortTimeFFT
from scipy.signal.windows import hann

from audiodiff_jax.core import paths


@functools.cache
def template_env() -> jinja2.Environment:
    """The package's page templates (``audiodiff_jax/templates``), HTML autoescaped."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("audiodiff_jax", "templates"),
        autoescape=jinja2.select_autoescape(),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def render_page(template: str, path: str, **context) -> str:
    """Renders ``templates/<template>`` with ``context`` into ``path`` atomically; returns ``path``."""
    page = template_env().get_template(template).render(**context)
    paths.atomic_write(path, page.encode("utf-8"))
    return path


def figure_png(fig: Figure) -> bytes:
    """A matplotlib figure as PNG bytes (Agg canvas, no pyplot). The PNG carries no
    timestamp or version, so the same figure gives the same bytes (a resumed sweep
    rewrites identical files)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def save_figure_png(fig: Figure, path: str) -> None:
    """Writes a matplotlib figure as a PNG, atomically."""
    paths.atomic_write(path, figure_png(fig))


def spectrogram_db(
    audio: np.ndarray, sample_rate: int, *, n_fft: int = 1024, max_columns: int = 1200
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Power spectrogram in dB re. its maximum, ``[freq, time]``, of mono-mixed audio,
    and its ``(t0, t1, f0, f1)`` extent in seconds and Hz (for ``imshow``).

    ``audio`` is ``[samples]`` or ``[channels, samples]``. A Hann window of ``n_fft``
    samples; the hop grows with the length so a 5-minute song still gives about
    ``max_columns`` frames. Silence gives -120 dB everywhere.
    """
    x = np.asarray(audio, np.float32)
    x = x.mean(axis=0) if x.ndim == 2 else x
    if x.shape[0] < n_fft:
        x = np.pad(x, (0, n_fft - x.shape[0]))
    hop = int(max(n_fft // 4, -(-(x.shape[0] - n_fft) // max_columns)))
    sft = ShortTimeFFT(hann(n_fft, sym=False), hop=hop, fs=sample_rate, scale_to="magnitude")
    power = sft.spectrogram(x)
    ref = float(power.max())
    if ref <= 0.0:
        return np.full(power.shape, -120.0, np.float32), sft.extent(x.shape[0])
    db = 10.0 * np.log10(np.maximum(power, ref * 1e-12) / ref)
    return db.astype(np.float32), sft.extent(x.shape[0])


def spectrogram_figure(audio: np.ndarray, sample_rate: int, *, floor_db: float = -80.0) -> Figure:
    """A labelled spectrogram picture (1000 x 260 px): low frequencies at the bottom."""
    db, (t0, t1, f0, f1) = spectrogram_db(audio, sample_rate)
    fig = Figure(figsize=(10, 2.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(
        db,
        origin="lower",
        aspect="auto",
        extent=(t0, t1, f0 / 1000, f1 / 1000),
        cmap="magma",
        vmin=floor_db,
        vmax=0.0,
        interpolation="antialiased",
    )
    ax.set_xlim(0.0, max(np.shape(audio)[-1] / sample_rate, 1e-3))  # frames overhang both ends
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (kHz)")
    fig.colorbar(im, ax=ax, label="dB", pad=0.01, aspect=12)
    return fig


def spectrogram_png(audio: np.ndarray, sample_rate: int) -> bytes:
    return figure_png(spectrogram_figure(audio, sample_rate))


def write_spectrogram_png(path: str, audio: np.ndarray, sample_rate: int) -> None:
    save_figure_png(spectrogram_figure(audio, sample_rate), path)


_SHOWN = (
    "prompt",
    "negative_prompt",
    "seconds",
    "seed",
    "guidance",
    "guidance_rescale",
    "sampler",
    "steps",
    "schedule",
    "eta",
    "strength",
    "windows",
    "checkpoint_step",
    "weights",
)


def _card(row: dict) -> dict:
    t = row.get("timings", {})
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "file": row["file"],
        "spectrogram": row["spectrogram"],
        "params": [(k, row[k]) for k in _SHOWN if k in row and row[k] != ""],
        "timing": (
            f"denoise {t.get('denoise_s_per_output', '?')} s/output, decode {t.get('decode_s', '?')} s, "
            f"{t.get('realtime_factor', '?')}x real time"
        ),
    }


# Manifest columns plotted against the checkpoint step by default (dotted: nested keys).
STEP_PLOT_COLUMNS = ("timings.realtime_factor", "timings.denoise_s_per_output")


def column_value(row: dict, column: str) -> float | None:
    """The number at ``column`` of a manifest row (``a.b`` looks into nested dicts), or
    None when it is missing or not a finite number."""
    value = row
    for key in column.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def step_series(rows: Sequence[dict], column: str) -> dict[str, list[tuple[int, float]]]:
    """Weight set -> ``[(checkpoint step, mean of column over its rows)]``, by step."""
    sums: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        v = column_value(row, column)
        if v is None or not isinstance(row.get("checkpoint_step"), int):
            continue
        sums.setdefault(str(row.get("weights", "")), {}).setdefault(row["checkpoint_step"], []).append(v)
    return {w: [(s, sum(v) / len(v)) for s, v in sorted(by.items())] for w, by in sums.items()}


def step_figure(rows: Sequence[dict], column: str) -> Figure | None:
    """Any numeric manifest column against the checkpoint step, one line per weight set
    (the mean over the rows of each step); None when no row has the column."""
    series = step_series(rows, column)
    if not series:
        return None
    fig = Figure(figsize=(7, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for weights, points in sorted(series.items()):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=weights or "?")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
    ax.legend(title="weights")
    return fig


def write_step_plots(out_dir: str, rows: Sequence[dict], columns: Sequence[str]) -> list[dict]:
    """Writes ``step-<column>.png`` for each column some row has; returns ``[{column, file}]``."""
    plots = []
    for column in columns:
        fig = step_figure(rows, column)
        if fig is None:
            continue
        name = "step-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", column) + ".png"
        save_figure_png(fig, os.path.join(out_dir, name))
        plots.append({"column": column, "file": name})
    return plots


def write_report(
    out_dir: str,
    rows: Sequence[dict],
    issues: Sequence,
    *,
    title: str,
    facts: dict | None = None,
    step_columns: Sequence[str] = STEP_PLOT_COLUMNS,
    evaluation: dict | None = None,
) -> str:
    """Writes ``out_dir/report.html``; returns its path.

    Args:
      rows: manifest rows (``file``, ``spectrogram`` relative to ``out_dir``, params, timings).
      issues: objects with ``where`` and ``message`` (bad rows, failed batches).
      title: page heading.
      facts: key -> value shown at the top (checkpoint, model, devices...).
      step_columns: numeric manifest columns plotted against the checkpoint step when
        the rows come from more than one step.
      evaluation: the evaluation section (``evaluation.page.section_context``: metrics
        per song, summary, plots against the grid axes), or None.
    """
    steps = {r.get("checkpoint_step") for r in rows if isinstance(r.get("checkpoint_step"), int)}
    plots = write_step_plots(out_dir, rows, step_columns) if len(steps) > 1 else []
    return render_page(
        "report.html",
        os.path.join(out_dir, "report.html"),
        title=title,
        facts=facts or {},
        cards=[_card(r) for r in rows],
        ids=[r["id"] for r in rows],
        issues=list(issues),
        step_plots=plots,
        evaluation=evaluation,
    )
