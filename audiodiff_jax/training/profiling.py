"""Profiles of training steps on request: the steps the ``profile`` config section
chooses, and, while a job runs, whenever a file ``WORKDIR/PROFILE`` appears.

Which steps. Steps are numbered as the log numbers them (step N is the call that
takes the state from N-1 to N optimizer steps). A window is ``profile.num_steps``
consecutive steps; the first step of a process compiles and is never traced (a window
that starts there starts one step later). The state is waited for before the first
traced step and the last traced step's outputs before the trace stops, so a trace holds
exactly its steps, each marked ``train`` with its step number (the loop wraps every
step in ``jax.profiler.StepTraceAnnotation``) for the plugin's step views.

Asking a running job. Write ``WORKDIR/PROFILE`` (empty, or a number of steps):
``echo 5 > WORKDIR/PROFILE`` or ``gcloud storage cp`` of such a file to a bucket
workdir. Process 0 looks for it at every log step (``train.log_every``), deletes it and
traces the steps from the next one on. With ``profile.hosts=all`` in a multi-process
job every process traces the same steps: process 0's answer reaches the others
through a collective at the log step (``multihost_utils.process_allgather``, one
integer), so the file needs to be visible to process 0 only. A file that appears while a
trace is under way waits for it to finish.

Where. ``WORKDIR/tensorboard/plugins/profile/train_steps_A-B/HOST.xplane.pb``, beside
the scalars: ``tensorboard --logdir=WORKDIR/tensorboard`` (or ``xprof``) shows both.
The time the tracer takes to start and to write its files counts as ``profile`` in
goodput (``audiodiff_jax/training/goodput.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from audiodiff_jax.core import profiler
from audiodiff_jax.core.config import ProfileConfig

REQUEST_FILE = "PROFILE"


def logdir_of(workdir: str) -> str:
    """Where a run's traces go: its TensorBoard folder (``core/metrics.py`` writes there too)."""
    return os.path.join(workdir, "tensorboard")


def run_name(first: int, last: int) -> str:
    return f"train_steps_{first}-{last}"


def _allgather_max(value: int) -> int:
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


@dataclasses.dataclass(frozen=True)
class Window:
    first: int
    last: int
    why: str


class StepProfiler:
    """Decides which steps to trace and traces them; the loop calls it around each step.

    Args:
      cfg: the ``profile`` section.
      workdir: the run folder (local or gs://): the request file and the traces.
      first_step: the state's step when the loop starts (the next step compiles).
      process_index, process_count: this process and the job's size (default: jax's).
      agree: ``value -> the largest value over every process``, a collective that every
        process calls at the same log step (default: ``process_allgather``); used only
        when every process traces (``hosts=all``) in a multi-process job.
    """

    def __init__(
        self,
        cfg: ProfileConfig,
        workdir: str,
        *,
        first_step: int,
        process_index: int | None = None,
        process_count: int | None = None,
        agree: Callable[[int], int] = _allgather_max,
    ):
        self.cfg = cfg
        self.workdir = workdir
        self.request_path = epath.Path(workdir) / REQUEST_FILE
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.traces_here = cfg.hosts == "all" or self.process_index == 0
        self._agree = agree
        self.window: Window | None = None
        self._trace: profiler.Trace | None = None
        self.written: list[epath.Path] = []  # trace files this process wrote
        start = cfg.start_step
        if start and start > first_step:
            first = max(start, first_step + 2)  # step first_step + 1 compiles
            last = first + cfg.num_steps - 1
            if first != start:
                logging.info("profile: step %d compiles; tracing steps %d-%d instead", start, first, last)
            self.window = Window(first, last, "profile.start_step")
        elif start:
            logging.info(
                "profile: profile.start_step=%d is behind this run (at step %d): not traced",
                start,
                first_step,
            )

    def _read_request(self) -> int:
        """Steps asked for by the request file (0: none); the file is removed."""
        try:
            if not self.request_path.exists():
                return 0
            text = self.request_path.read_text().strip()
            self.request_path.unlink(missing_ok=True)
        except OSError as e:
            logging.warning("profile: cannot read %s (%s)", self.request_path, e)
            return 0
        try:
            steps = int(text) if text else self.cfg.num_steps
        except ValueError:
            logging.warning(
                "profile: %s holds %r, not a number of steps; tracing %d",
                self.request_path,
                text,
                self.cfg.num_steps,
            )
            steps = self.cfg.num_steps
        return max(steps, 1)

    def poll(self, step: int) -> None:
        """At a log step (every process, the same steps): a request becomes a window from ``step + 1``."""
        if self.window is not None:
            return  # a request waits for the trace under way
        wanted = self._read_request() if self.process_index == 0 else 0
        if self.cfg.hosts == "all" and self.process_count > 1:
            wanted = self._agree(wanted)
        if wanted:
            self.window = Window(step + 1, step + wanted, str(self.request_path))
            if self.process_index == 0:
                logging.info(
                    "profile: asked for by %s at step %d: tracing steps %d-%d",
                    self.request_path,
                    step,
                    step + 1,
                    step + wanted,
                )

    def before_step(self, step: int, state: Any) -> float:
        """Before the call that makes ``step``: starts the trace of a window that begins
        there. Returns the seconds spent (tracer start)."""
        w = self.window
        if w is None or step != w.first or not self.traces_here:
            return 0.0
        jax.block_until_ready(state)  # earlier steps' device work stays out of the trace
        self._trace = profiler.Trace(logdir_of(self.workdir), run_name(w.first, w.last))
        return self._trace.start()

    def after_step(self, step: int, outputs: Any) -> float:
        """After the call that made ``step``: ends a window that ends there. Returns the
        seconds spent (stopping the tracer and writing the trace)."""
        w = self.window
        if w is None or step < w.last:
            return 0.0
        self.window = None
        if self._trace is None:
            return 0.0
        jax.block_until_ready(outputs)  # the last step's device work, in the trace
        return self._finish()

    def _finish(self) -> float:
        trace, self._trace = self._trace, None
        seconds = trace.stop()
        if trace.path is not None:
            self.written.append(trace.path)
        return seconds

    def close(self) -> float:
        """Ends a trace still running (the run stopped inside its window)."""
        self.window = None
        return self._finish() if self._trace is not None else 0.0
