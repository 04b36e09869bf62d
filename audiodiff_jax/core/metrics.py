"""Metric sinks of a run: TensorBoard event files, an absl log line, a JSONL history.

Only process 0 writes. The JSONL file ``WORKDIR/metrics.jsonl`` holds one row per
step with the per-step loss (so runs can be compared step by step) and one row per
log step with every metric. A ``gs://`` workdir works too (etils.epath; TensorBoard
writes there through google-cloud-storage).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from audiodiff_jax.core import paths


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            path = epath.Path(workdir) / "metrics.jsonl"
            self._jsonl = _Rewritten(path) if paths.is_remote(workdir) else open(path, "a")

    def write_step_losses(self, steps_losses: list[tuple[int, float]]) -> None:
        if not self.enabled:
            return
        for step, loss in steps_losses:
            self._jsonl.write(json.dumps({"step": step, "loss": loss}) + "\n")

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), step)
        self._jsonl.write(
            json.dumps({"step": step, "scalars": {k: float(v) for k, v in scalars.items()}}) + "\n"
        )
        self.flush()

    def write_audio(self, tag: str, audio, step: int, sample_rate: int) -> None:
        """``audio [channels, samples]`` (1 or 2 channels) in [-1, 1]."""
        if self.enabled:
            self._tb.add_audio(tag, np.clip(np.asarray(audio, np.float32).T, -1.0, 1.0), step, sample_rate)

    def write_figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure as an image."""
        if self.enabled:
            self._tb.add_figure(tag, figure, step, close=False)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def read_loss_history(workdir: str) -> dict[int, float]:
    """Per-step losses of a run, the last row winning where a restart repeated steps."""
    out: dict[int, float] = {}
    with (epath.Path(workdir) / "metrics.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


class _Rewritten:
    """An append-only text file in a bucket, whose objects cannot be appended to: holds
    the whole text and replaces the object at each flush (once per log step; a reader
    sees the old object or the new one, never half of one)."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.text = path.read_text() if path.exists() else ""
        self.written = self.text

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        if self.text != self.written:
            self.path.write_text(self.text)
            self.written = self.text

    def close(self) -> None:
        self.flush()


def log_line(step: int, num_steps: int, scalars: dict[str, float], steps_per_s: float) -> None:
    eta_s = (num_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
    parts = [f"step {step}/{num_steps}"]
    for k, v in scalars.items():
        parts.append(f"{k.split('/')[-1]}={v:.4g}")
    parts.append(f"{steps_per_s:.2f} steps/s")
    parts.append(f"ETA {_fmt_seconds(eta_s)}")
    logging.info(" ".join(parts))


def _fmt_seconds(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
