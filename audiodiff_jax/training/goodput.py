"""Goodput: where a run's wall time went, across restarts.

Wall time of a run = time in productive training steps + time lost to

- ``startup``: process start to the first step (imports, jax.distributed, data
  pipeline, building the trainer), checkpoint restore not included;
- ``restore``: restoring the checkpoint;
- ``compile``: the first step call (tracing, lowering, XLA compilation);
- ``checkpoint``: the part of checkpoint saves the loop waits for (the copy to host
  memory of an async save, and the final wait for the last write);
- ``eval``: evaluation during training;
- ``profile``: starting the profiler and writing its traces
  (``audiodiff_jax/training/profiling.py``); the traced steps themselves train and
  count as productive;
- ``restart``: the gap between one incarnation of the job and the next (the job was
  dead or being rescheduled, or a launcher waited before starting it again), plus the
  steps a dead incarnation ran after its last checkpoint, which the next one has to run
  again.

An incarnation that a launcher started again by itself (``launch/local.py
--restarts``) records why, from the :data:`RESTART_ENV` variable the launcher sets.

Each incarnation appends its own record to ``WORKDIR/goodput.json`` (process 0 writes
it, atomically, at every log step and checkpoint), so a restarted job accounts for
the ones before it. The summary goes to the absl log as one line and to
TensorBoard / ``metrics.jsonl`` as the ``goodput/*`` scalars.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from etils import epath

from audiodiff_jax.core import paths

FILENAME = "goodput.json"
# Set by a launcher that started the job again after a failure: "restart K of N after ...".
RESTART_ENV = "AUDIODIFF_RESTART"
CATEGORIES = ("startup", "restore", "compile", "checkpoint", "eval", "profile", "restart")
# What the loop reports through GoodputRecorder.add (startup and restart are derived).
ADDED = ("restore", "compile", "checkpoint", "eval", "profile")

# Metric names (TensorBoard / metrics.jsonl).
GOODPUT_FRACTION = "goodput/productive_fraction"
GOODPUT_WALL = "goodput/wall_s"
GOODPUT_PRODUCTIVE = "goodput/productive_s"
GOODPUT_LOST = {c: f"goodput/lost_{c}_s" for c in CATEGORIES}


@dataclasses.dataclass
class Incarnation:
    """One run of the program: from process start to its last record."""

    start: float  # unix time the process started
    last_update: float  # unix time of the last record written
    first_step: int  # step the incarnation started from
    last_step: int  # last step it finished (as of last_update)
    last_checkpoint: int  # last step it saved (-1: none)
    startup_s: float = 0.0
    restore_s: float = 0.0
    compile_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0  # evaluation during training (audiodiff_jax/evaluators/train_eval.py)
    profile_s: float = 0.0  # tracer start and trace writing (audiodiff_jax/training/profiling.py)
    productive_s: float = 0.0
    finished: bool = False  # reached its end (num_steps or a preemption save)
    restarted: str = ""  # why a launcher started this incarnation again by itself ("" = not)

    @property
    def step_time_s(self) -> float:
        steps = self.last_step - self.first_step
        return self.productive_s / steps if steps > 0 else 0.0


@dataclasses.dataclass
class Summary:
    wall_s: float
    productive_s: float
    lost_s: dict[str, float]
    restarts: int
    automatic_restarts: int = 0  # restarts a launcher made by itself (launch.local --restarts)

    @property
    def fraction(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def scalars(self) -> dict[str, float]:
        out = {
            GOODPUT_FRACTION: self.fraction,
            GOODPUT_WALL: self.wall_s,
            GOODPUT_PRODUCTIVE: self.productive_s,
        }
        out.update({GOODPUT_LOST[c]: self.lost_s[c] for c in CATEGORIES})
        return out

    def line(self) -> str:
        lost = ", ".join(f"{c} {_fmt(self.lost_s[c])}" for c in CATEGORIES)
        return (
            f"goodput {100 * self.fraction:.1f}%: {_fmt(self.productive_s)} in productive steps of "
            f"{_fmt(self.wall_s)} wall over {self.restarts + 1} incarnation(s)"
            + (f" ({self.automatic_restarts} restarted by the launcher)" if self.automatic_restarts else "")
            + f"; lost to {lost}"
        )


def _fmt(s: float) -> str:
    if s < 120:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def summarize(incarnations: list[Incarnation]) -> Summary:
    """Adds up the incarnations of a run (oldest first)."""
    lost = dict.fromkeys(CATEGORIES, 0.0)
    productive = 0.0
    wall = 0.0
    for i, inc in enumerate(incarnations):
        wall += max(inc.last_update - inc.start, 0.0)
        lost["startup"] += inc.startup_s
        for c in ADDED:
            lost[c] += getattr(inc, f"{c}_s")
        productive += inc.productive_s
        if i + 1 < len(incarnations):
            nxt = incarnations[i + 1]
            gap = max(nxt.start - inc.last_update, 0.0)
            wall += gap
            lost["restart"] += gap
            # Steps past the last checkpoint were run again by the next incarnation.
            redone = max(inc.last_step - max(inc.last_checkpoint, nxt.first_step), 0)
            redo_s = min(redone * inc.step_time_s, inc.productive_s)
            productive -= redo_s
            lost["restart"] += redo_s
    return Summary(
        wall_s=wall,
        productive_s=productive,
        lost_s=lost,
        restarts=len(incarnations) - 1,
        automatic_restarts=sum(1 for inc in incarnations[1:] if inc.restarted),
    )


def load(workdir: str) -> list[Incarnation]:
    """The incarnations recorded in ``WORKDIR/goodput.json`` (empty if none)."""
    path = epath.Path(workdir) / FILENAME
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())["incarnations"]
        return [Incarnation(**row) for row in rows]
    except (ValueError, KeyError, TypeError):
        # A damaged file must not stop training; the history before it is lost.
        return []


class GoodputRecorder:
    """Accounts the time of this incarnation and writes it beside the earlier ones.

    The loop calls :meth:`add` for time lost (``ADDED``: restore, compile, checkpoint...),
    :meth:`loop_started` once before the first step and :meth:`update` at log steps
    and checkpoints. Productive time is the loop's wall time minus what was lost in it.
    """

    def __init__(self, workdir: str, *, process_start: float, first_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / FILENAME
        self.previous = load(workdir) if enabled else []
        now = time.time()
        self.current = Incarnation(
            start=process_start,
            last_update=now,
            first_step=first_step,
            last_step=first_step,
            last_checkpoint=-1,
            restarted=os.environ.get(RESTART_ENV, ""),
        )
        self._loop_start: float | None = None
        self._lost_in_loop = 0.0

    def add(self, category: str, seconds: float) -> None:
        """Counts ``seconds`` lost to ``category`` (one of ``CATEGORIES`` except restart)."""
        if category not in ADDED:
            raise ValueError(f"unknown goodput category {category!r}")
        setattr(self.current, f"{category}_s", getattr(self.current, f"{category}_s") + seconds)
        if self._loop_start is not None:
            self._lost_in_loop += seconds

    def loop_started(self) -> None:
        now = time.time()
        self._loop_start = now
        self.current.startup_s = max(now - self.current.start - self.current.restore_s, 0.0)

    def update(self, step: int, *, last_checkpoint: int | None = None, finished: bool = False) -> Summary:
        """Records progress up to ``step``; writes the file (process 0). Returns the run's summary."""
        now = time.time()
        inc = self.current
        inc.last_update = now
        inc.last_step = step
        if last_checkpoint is not None:
            inc.last_checkpoint = last_checkpoint
        inc.finished = finished
        if self._loop_start is not None:
            inc.productive_s = max(now - self._loop_start - self._lost_in_loop, 0.0)
        if self.enabled:
            self._write()
        return self.summary()

    def set_first_step(self, step: int) -> None:
        self.current.first_step = self.current.last_step = step

    def summary(self) -> Summary:
        return summarize([*self.previous, self.current])

    def _write(self) -> None:
        data = {"incarnations": [dataclasses.asdict(i) for i in (*self.previous, self.current)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        paths.atomic_write(self.path, json.dumps(data, indent=1).encode("utf-8"))  # never half a file
