"""The training loop shared by every trainer (the DiT's and the codec's).

A trainer (:class:`Trainer`) owns the math: its state, its jitted step, how a fresh
state is made. :func:`run` owns everything else, the same for every model: resume,
checkpoints, logging (device memory included), NaN checks, preemption, the step
watchdog, profiles on request (``audiodiff_jax/training/profiling.py``) and goodput.

Resume order (the only place it is written down):

1. the latest complete checkpoint in ``WORKDIR/checkpoints`` (state, EMA, optimizer,
   RNG and, where the batches come from a Grain iterator, every process's iterator;
   the run continues bit for bit);
2. else the trainer's :meth:`Trainer.initial_state`: ``train.init_from`` (weights of
   another run, copied into the EMA, with a fresh optimizer and step 0), or a fresh
   initialization from ``train.seed``.

A checkpoint restores onto whatever mesh the job has now (other device count, other
mesh shape): Orbax reads every array onto the shardings of
:meth:`Trainer.abstract_state`. A Grain iterator continues from the same global
position: with the same process count each process restores its own saved state; with
another process count the new processes are set to the saved position
(``grain.experimental.set_next_index``), which gives the same global batches because a
batch is a pure function of the global step (``audiodiff_jax/data/loader.py``). Where
Grain cannot map it, the iterator restarts its epoch and the log says so. Batches that
are a pure function of the step (the codec's crops) need no iterator state at all.
Orbax writes a step into a temporary directory that is renamed once complete, so a save
cut short by a crash is never resumed from.

Memory: the step is compiled ahead of its first call and its memory analysis
(arguments, outputs, temporaries per device) logged once; every log step writes each
local device's bytes in use and peak where the backend reports them
(``audiodiff_jax/core/memory.py``). A step or compilation that runs out of device memory
ends in one line (:class:`~audiodiff_jax.core.memory.OutOfMemory`, exit 2 through the
program) naming what it wanted, what the device has and the config fields to change.

Failures: SIGTERM (preemption) saves the current step and returns; a step watchdog
(``step_timeout_s``) ends a process whose loop makes no progress (a hung peer blocks
every collective); a NaN or Inf in the metrics stops the run without saving
(:class:`TrainingDiverged`); ``audiodiff_jax/training/goodput.py`` records where wall time went,
across restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from audiodiff_jax.checkpoints import checkpointing, source
from audiodiff_jax.core import memory, names
from audiodiff_jax.core.config import ConfigError, ProfileConfig
from audiodiff_jax.core.errors import EXIT_PEER_LOST, UserError
from audiodiff_jax.core.metrics import MetricWriter, log_line
from audiodiff_jax.training import goodput, profiling


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient or parameter norm) became NaN or Inf."""


class Trainer(Protocol):
    """What :func:`run` needs from a model's trainer."""

    mesh: jax.sharding.Mesh

    def abstract_state(self) -> Any:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""

    def initial_state(self) -> Any:
        """The state of a run without a checkpoint (``train.init_from`` or a fresh init)."""

    def state_step(self, state: Any) -> int:
        """The number of steps ``state`` has taken."""

    def step(self, state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
        """One jitted, donated training step."""

    def compile(self, state: Any, batch: Any) -> jax.stages.Compiled:
        """The step lowered and compiled for these arguments (the loop calls it once,
        before the first step, for its memory analysis; the jitted step reuses it)."""

    def memory_advice(self) -> str:
        """The config fields that change the step's device memory, with their values
        (``memory.config_advice``), for an out-of-memory error."""

    def perf_scalars(self, seconds_per_step: float) -> dict[str, float]:
        """Throughput figures logged with every log step (e.g. frames/s, MFU)."""


class Evaluator(Protocol):
    """Evaluation during training (``audiodiff_jax/evaluators/train_eval.py`` for the DiT)."""

    def due(self, step: int, num_steps: int) -> bool:
        """Whether to evaluate after ``step``."""

    def __call__(self, state: Any, step: int, writer: MetricWriter) -> dict[str, float]:
        """Evaluates ``state`` (read only), writes what it measured; returns the scalars."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_steps: int
    log_every: int
    save_every: int
    keep_last: int
    keep_every: int = 0
    async_save: bool = True
    step_timeout_s: float = 0.0  # exit (StepWatchdog.EXIT_CODE) when no step finishes this long; 0 = never
    profile: ProfileConfig = ProfileConfig()  # steps to trace (profiling.py)

    @classmethod
    def from_config(cls, cfg, step_timeout_s: float = 0.0) -> LoopConfig:
        """From a config with ``train``, ``checkpoint`` and ``profile`` sections (DiT's or codec's)."""
        return cls(
            num_steps=cfg.train.num_steps,
            log_every=cfg.train.log_every,
            save_every=cfg.checkpoint.every_steps,
            keep_last=cfg.checkpoint.keep_last,
            keep_every=cfg.checkpoint.keep_every,
            async_save=cfg.checkpoint.async_save,
            step_timeout_s=step_timeout_s,
            profile=cfg.profile,
        )


@dataclasses.dataclass
class TrainResult:
    state: Any
    final_step: int
    preempted: bool


def check_finite(step: int, values: dict[str, float], last_ckpt: int | None, workdir: str):
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
        where = f"checkpoint step {last_ckpt}" if last_ckpt is not None else "no checkpoint yet"
        raise TrainingDiverged(
            f"training diverged at step {step}: "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f". Stopped without saving this state; the last good checkpoint is {where} "
            f"in {checkpointing.checkpoint_dir(workdir)}. Lower optim.learning_rate or check the data."
        )


def start_state(
    init_state: Callable[..., Any],
    abstract_params: Callable[[], Any],
    train_cfg,
    *,
    required_items: tuple[str, ...] = ("state",),
) -> Any:
    """Resume order 2, for any trainer: the raw params of the run ``train_cfg.init_from``
    names (restored onto ``abstract_params()``), or a fresh state from ``train_cfg.seed``.

    ``init_state(seed, params=None)`` builds the trainer's state (params copied into the EMA).
    """
    if train_cfg.init_from:
        try:
            params, src_step = source.restore_params(
                train_cfg.init_from, abstract_params(), required_items=required_items
            )
        except checkpointing.CheckpointNotFound as e:
            raise ConfigError(f"train.init_from: {e}") from e
        logging.info("starting from the weights of %s (step %d)", train_cfg.init_from, src_step)
        return init_state(train_cfg.seed, params=params)
    logging.info("starting fresh from seed %d", train_cfg.seed)
    return init_state(train_cfg.seed)


def opt_state_shardings(opt_shapes, abstract_params, param_shardings, replicated):
    """Shards every optimizer leaf that has a param's shape like that param.

    optax states hold copies of the param tree (Adam's mu and nu); we match them by
    tree path suffix, falling back to replication for scalars such as step counts.
    """
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[jax.tree_util.keystr(path)] = sh
    shapes_by_path = {
        jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for pkey, sh in by_path.items():
            if key.endswith(pkey) and shapes_by_path[pkey] == leaf.shape:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


class PreemptionWatcher:
    """Tells the loop when to save and stop because the job is being preempted.

    One process: a SIGTERM handler sets a flag. Several processes: every process must
    stop at the same step, so we use JAX's preemption sync point, which the
    coordination service raises on all processes when any of them got SIGTERM.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        logging.warning("received signal %d: will save a checkpoint and exit", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


class StepWatchdog:
    """Ends the process when the loop stops making progress.

    A host that hangs (or dies without its heartbeats being missed) leaves every other
    process blocked inside a collective; without this they would wait forever. The
    loop calls :meth:`pet` once per step; the clock starts at the first pet (after the
    first step's compilation) and is paused around checkpoint saves.
    """

    EXIT_CODE = 4

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._last = None
        self._paused = False
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
            self._thread.start()

    def pet(self) -> None:
        self._last = time.monotonic()

    def pause(self, paused: bool) -> None:
        self._paused = paused
        self.pet()

    def _run(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if self._last is None or self._paused:
                continue
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                msg = (
                    f"step watchdog: no training step finished for {idle:.0f}s "
                    f"(step_timeout_s={self.timeout_s:g}) on {checkpointing.process_info()}; a peer process "
                    "probably hung or died. Exiting so the job can be restarted from the last checkpoint. "
                    "Stacks of every thread follow."
                )
                logging.error("%s", msg)
                print(msg, file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(self.EXIT_CODE)

    def close(self):
        self._stop.set()


_ITER_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def _saved_iterator_states(ckpt: checkpointing.RunCheckpointer, step: int) -> dict[int, dict]:
    """The data-iterator files of a checkpoint: process index -> state, and their process count."""
    folder = ckpt.directory / str(step) / "data_iter"
    states, counts = {}, set()
    if folder.exists():
        for f in folder.iterdir():
            m = _ITER_FILE.search(f.name)
            if m:
                counts.add(int(m.group(2)))
                try:
                    states[int(m.group(1))] = json.loads(f.read_text())
                except ValueError:
                    states[int(m.group(1))] = None
    return {"count": counts.pop() if len(counts) == 1 else None, "states": states}


def _warn_incomplete_checkpoints(ckpt: checkpointing.RunCheckpointer) -> None:
    if not ckpt.directory.exists():
        return
    for p in ckpt.directory.iterdir():
        if ".orbax-checkpoint-tmp" in p.name:
            logging.warning(
                "checkpoint: ignoring %s, a save that never finished (the job died while writing it)", p
            )


def _restore_target(ckpt: checkpointing.RunCheckpointer, step: int, trainer: Trainer):
    """``(restore target, finish)``: the trainer's abstract state, or, for a checkpoint
    written before the state gained fields (e.g. the DiT's extra EMAs), the fields it has
    and the trainer's ``upgrade_state(restored fields, missing names) -> state``."""
    abstract = trainer.abstract_state()
    upgrade = getattr(trainer, "upgrade_state", None)
    if upgrade is None or not dataclasses.is_dataclass(abstract):
        return abstract, lambda state: state
    fields = {f.name for f in dataclasses.fields(abstract)}
    missing = fields - checkpointing.saved_state_fields(ckpt.directory, step)
    if not missing:
        return abstract, lambda state: state
    target = {f: getattr(abstract, f) for f in fields - missing}
    return target, lambda restored: upgrade(dict(restored), missing)


def restore_for_mesh(ckpt: checkpointing.RunCheckpointer, step: int, trainer: Trainer, data_iter) -> Any:
    """Restores ``step`` onto ``trainer``'s mesh, and positions ``data_iter`` (see module docstring)."""
    saved = _saved_iterator_states(ckpt, step)
    count = jax.process_count()
    target, finish = _restore_target(ckpt, step, trainer)
    if saved["count"] == count:
        return finish(ckpt.restore(step, target, data_iter))
    state = finish(ckpt.restore(step, target))
    step_now = trainer.state_step(state)
    positions = {s.get("next_index") for s in saved["states"].values() if isinstance(s, dict)}
    # Every process consumed one local batch per step: the saved positions agree with
    # each other and with the step unless the run's data history is unusual (init_from).
    position = positions.pop() if len(positions) == 1 else step_now
    try:
        grain.experimental.set_next_index(data_iter, int(position))
        logging.warning(
            "data iterator: checkpoint step %d was saved by %s process(es), this job has %d; "
            "continuing from the same global position (batch %d) with the batches re-split "
            "over the new processes",
            step,
            saved["count"],
            count,
            position,
        )
    except Exception as e:  # noqa: BLE001 - any failure means Grain cannot map the state
        logging.warning(
            "data iterator: checkpoint step %d was saved by %s process(es), this job has %d, and "
            "Grain cannot map the saved position onto the new processes (%s: %s); the data "
            "iterator RESTARTS ITS EPOCH from the beginning (same shuffle seed). Model, optimizer "
            "and EMA state are restored exactly.",
            step,
            saved["count"],
            count,
            type(e).__name__,
            e,
        )
    return state


class PeerLost(RuntimeError):
    """Another process of the job failed or went away (multi-process runs)."""

    EXIT_CODE = EXIT_PEER_LOST


class WorkdirError(UserError):
    """The run folder cannot be used."""


class CheckpointUnreadable(UserError):
    """Checkpoints exist but none of them can be read."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _set_aside(ckpt: checkpointing.RunCheckpointer, steps: list[int]) -> None:
    """Moves unreadable steps to ``checkpoints.unreadable/`` (kept for inspection, never
    deleted) so the run can save those step numbers again."""
    aside = ckpt.directory.parent / (ckpt.directory.name + ".unreadable")
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{int(time.time())}"
            (ckpt.directory / str(step)).rename(target)
            logging.warning("checkpoint: moved unreadable step %d to %s", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("audiodiff_set_aside_unreadable_checkpoints")
    ckpt.manager.reload()


def restore_newest_readable(
    ckpt: checkpointing.RunCheckpointer, trainer: Trainer, data_iter: grain.DatasetIterator | None
) -> tuple[int, Any]:
    """Restores the newest complete step that can be read, falling back step by step.

    A step whose files are damaged (truncated, corrupt) is named in one warning line and
    the next older one is tried; every process takes the same decision. Never a silent
    fresh start: when no step can be read this raises :class:`CheckpointUnreadable`.
    """
    failures, unreadable = [], []
    for step in sorted(ckpt.all_steps(), reverse=True):
        logging.info("resuming from checkpoint step %d in %s", step, ckpt.directory)
        error = None
        try:
            if data_iter is not None:
                state = restore_for_mesh(ckpt, step, trainer, data_iter)
            else:
                state = ckpt.restore(step, trainer.abstract_state())
            jax.block_until_ready(state)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for damaged files
            if memory.is_out_of_memory(e):
                raise  # the state does not fit the devices: the files are fine, keep them
            error = e
        ok = error is None
        if jax.process_count() > 1:  # every process moves on if any one could not read the step
            ok = bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
        if ok:
            if unreadable:
                _set_aside(ckpt, unreadable)
                logging.warning("checkpoint: resumed from step %d, the newest readable one", step)
            return step, state
        reason = _first_line(error) if error is not None else "another process could not read it"
        logging.warning(
            "checkpoint: step %d in %s cannot be read (%s); trying the previous one",
            step,
            ckpt.directory,
            reason,
        )
        failures.append(f"step {step}: {reason}")
        unreadable.append(step)
    raise CheckpointUnreadable(
        f"no checkpoint in {ckpt.directory} can be read ({'; '.join(failures)}); "
        "move the folder away to start fresh"
    )


def _out_of_memory(
    trainer: Trainer, error: Exception, where: str, compiled: memory.CompiledMemory | None = None
) -> memory.OutOfMemory:
    return memory.out_of_memory(
        error,
        where=where,
        advice=trainer.memory_advice(),
        compiled=compiled,
        capacity=memory.device_capacity(),
    )


@contextlib.contextmanager
def out_of_memory_as_error(trainer: Trainer, where: str):
    """Turns XLA running out of device memory inside the block into one
    :class:`~audiodiff_jax.core.memory.OutOfMemory` line (the backend's text stays chained)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not memory.is_out_of_memory(e):
            raise
        raise _out_of_memory(trainer, e, where) from e


def compile_step(trainer: Trainer, state: Any, batch: Any, writer: MetricWriter, step: int):
    """Compiles the step before its first call; logs (and writes at ``step``) its memory analysis."""
    with out_of_memory_as_error(trainer, "compiling the train step"):
        compiled = trainer.compile(state, batch)
    analysis = memory.CompiledMemory.of(compiled)
    if analysis is not None:
        logging.info("compiled train step: %s", analysis.describe(memory.device_capacity()))
        writer.write_scalars(step, analysis.scalars())
    return analysis


# Per-device memory figures go to TensorBoard and metrics.jsonl, not into the log line.
_PER_DEVICE = (names.MEMORY_IN_USE.format(""), names.MEMORY_PEAK.format(""))


def run(
    trainer: Trainer,
    next_batch: Callable[[int], Any],
    workdir: str,
    loop: LoopConfig,
    *,
    json_items: dict[str, dict],
    data_iter: grain.DatasetIterator | None = None,
    process_start: float | None = None,
    evaluator: Evaluator | None = None,
) -> TrainResult:
    """Trains until ``loop.num_steps``, resuming as the module docstring says.

    Args:
      trainer: the model's :class:`Trainer`.
      next_batch: ``step -> global batch`` for the step about to run (0-based).
      workdir: run directory (local or gs://); checkpoints in ``WORKDIR/checkpoints``.
      loop: steps, log and save intervals, checkpoint retention, watchdog.
      json_items: JSON items saved with every checkpoint (e.g. ``config``,
        ``dataset_card``, ``tokenizer``); ``config`` is also written to TensorBoard.
      data_iter: the Grain iterator ``next_batch`` reads from, if any: saved with every
        checkpoint and restored before the first step.
      process_start: unix time the process started, for goodput (default: now).
      evaluator: evaluation during training (validation loss, samples), run after the
        steps it says are due; its time counts as ``eval`` in goodput. It only reads
        the state, so a run with and without it trains the same weights.
    """
    process_start = time.time() if process_start is None else process_start
    if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
        raise WorkdirError(f"workdir {workdir} is a file, not a folder; give a folder for the run")
    item_names = ("state",) + (("data_iter",) if data_iter is not None else ()) + tuple(json_items)
    ckpt = checkpointing.RunCheckpointer(
        workdir,
        item_names=item_names,
        keep_last=loop.keep_last,
        keep_every=loop.keep_every,
        async_save=loop.async_save,
    )
    _warn_incomplete_checkpoints(ckpt)
    restore_s = 0.0
    with out_of_memory_as_error(trainer, "creating the train state"):
        if ckpt.all_steps():
            t0 = time.perf_counter()
            latest, state = restore_newest_readable(ckpt, trainer, data_iter)
            restore_s = time.perf_counter() - t0
        else:
            latest = None
            state = trainer.initial_state()

    step = trainer.state_step(state)
    num_steps = loop.num_steps
    writer = MetricWriter(workdir)
    gp = goodput.GoodputRecorder(
        workdir, process_start=process_start, first_step=step, enabled=jax.process_index() == 0
    )
    if restore_s:
        gp.add("restore", restore_s)
    watchdog = StepWatchdog(loop.step_timeout_s)
    if step == 0 and jax.process_index() == 0 and "config" in json_items:
        writer.write_text("config", "```\n" + json.dumps(json_items["config"], indent=2) + "\n```")
    watcher = PreemptionWatcher()
    profiles = profiling.StepProfiler(loop.profile, workdir, first_step=step)
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (no sync per step)
    last_saved = latest
    preempted = False
    t_last, step_last = time.perf_counter(), step
    profile_s = 0.0  # profiler time since t_last, left out of the step time
    first_call = True
    compiled = None

    def flush():
        nonlocal pending
        fetched = jax.device_get([m for _, m in pending])
        rows = [(s, {k: float(v) for k, v in m.items()}) for (s, _), m in zip(pending, fetched, strict=True)]
        pending = []
        for s, m in rows:
            check_finite(s, m, last_saved, workdir)
        writer.write_step_losses([(s, m[names.TRAIN_LOSS]) for s, m in rows])
        return rows

    gp.loop_started()
    peer_lost = False
    try:
        while step < num_steps:
            batch = next_batch(step)
            if first_call:
                # Compiled before the first call, which then dispatches (execution stays async).
                t0 = time.perf_counter()
                compiled = compile_step(trainer, state, batch, writer, step)
                state, metrics = trainer.step(state, batch)
                gp.add("compile", time.perf_counter() - t0)
                first_call = False
                t_last = time.perf_counter()
            else:
                seconds = profiles.before_step(step + 1, state)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, metrics = trainer.step(state, batch)
                seconds += profiles.after_step(step + 1, (state, metrics))
                if seconds:
                    gp.add("profile", seconds)
                    profile_s += seconds
            watchdog.pet()
            step += 1
            pending.append((step, metrics))
            is_log = step % loop.log_every == 0 or step == num_steps
            is_save = step % loop.save_every == 0 or step == num_steps
            stop = watcher.should_stop(step)
            if is_log or is_save or stop:
                rows = flush()
                if is_log and rows:
                    now = time.perf_counter()
                    dt = max(now - t_last - profile_s, 1e-9) / max(step - step_last, 1)
                    t_last, step_last, profile_s = now, step, 0.0
                    scalars = dict(rows[-1][1])
                    scalars[names.TRAIN_LOSS] = float(np.mean([m[names.TRAIN_LOSS] for _, m in rows]))
                    scalars[names.PERF_STEP_TIME] = dt
                    scalars.update(trainer.perf_scalars(dt))
                    scalars.update(memory.device_scalars())
                    summary = gp.update(step)
                    scalars.update(summary.scalars())
                    writer.write_scalars(step, scalars)
                    shown = {k: v for k, v in scalars.items() if not k.startswith(_PER_DEVICE)}
                    log_line(step, num_steps, shown, 1.0 / dt)
                    logging.info("%s", summary.line())
            if is_log and not stop:
                profiles.poll(step)
            if evaluator is not None and evaluator.due(step, num_steps) and not stop:
                watchdog.pause(True)
                t0 = time.perf_counter()
                evaluator(state, step, writer)
                gp.add("eval", time.perf_counter() - t0)
                watchdog.pause(False)
            if is_save or stop:
                watchdog.pause(True)
                t0 = time.perf_counter()
                ckpt.save(step, state, data_iter=data_iter, json_items=json_items)
                gp.add("checkpoint", time.perf_counter() - t0)
                watchdog.pause(False)
                last_saved = step
                gp.update(step, last_checkpoint=last_saved)
            if stop:
                logging.warning("preemption: saved step %d, exiting", step)
                preempted = True
                break
        gp.add("profile", profiles.close())  # a window past the last step
        watchdog.pause(True)
        t0 = time.perf_counter()
        ckpt.wait()  # the last save must be complete before the run counts as done
        gp.add("checkpoint", time.perf_counter() - t0)
        summary = gp.update(step, last_checkpoint=last_saved, finished=True)
        logging.info("%s", summary.line())
        writer.write_scalars(step, summary.scalars())
    except jax.errors.JaxRuntimeError as e:
        if memory.is_out_of_memory(e):  # a step (or its save, or evaluation) ran out: say what to change
            raise _out_of_memory(trainer, e, f"running the train step near step {step}", compiled) from e
        if jax.process_count() == 1:
            raise
        # A collective failed: a peer process died or its host went away. Closing the
        # checkpointer would wait on that peer; the last complete checkpoint is on disk.
        peer_lost = True
        raise PeerLost(
            f"step {step + 1}: a collective with the other processes failed ({_first_line(e)}); "
            f"a peer process died or was cut off. The last complete checkpoint is step {last_saved}."
        ) from e
    finally:
        profiles.close()
        watchdog.close()
        watcher.close()
        if not peer_lost:
            ckpt.close()
            writer.close()
    return TrainResult(state=state, final_step=step, preempted=preempted)
