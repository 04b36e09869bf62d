"""The training loop: one jitted, sharded, donated ``train_step`` and the loop around it.

Follow one batch from the shard to the loss:
``data_pipeline/loader.py`` (crop, tokenize, batch) -> ``make_global_batch`` (per-host
arrays into one global jax.Array) -> :func:`make_train_step` (noise, v target,
``audiodiff_jax/model``, ``audiodiff_jax/diffusion.masked_mse``) -> AdamW + EMA.

The loop owns everything that is not math: logging, checkpoints, NaN checks,
preemption. Resume order (the only place it is written down):

1. the latest complete checkpoint in ``WORKDIR/checkpoints`` (state, EMA, optimizer,
   RNG and every process's data iterator; the run continues bit for bit);
2. else ``train.init_from``: weights (params, copied into the EMA) of another run,
   with a fresh optimizer, step 0 and a fresh data iterator;
3. else a fresh initialization from ``train.seed``.

A checkpoint restores onto whatever mesh the job has now (other device count, other
mesh shape): Orbax reads every array onto the shardings of ``Trainer.abstract_state``.
The data iterator continues from the same global position: with the same process
count each process restores its own saved state; with another process count the new
processes are set to the saved position (``grain.experimental.set_next_index``), which
gives the same global batches because a batch is a pure function of the global step
(``data_pipeline/loader.py``). Where Grain cannot map it, the iterator restarts its
epoch and the log says so. Orbax writes a step into a temporary directory that is
renamed once complete, so a save cut short by a crash is never resumed from.

Failures: a step watchdog (``step_timeout_s``) ends a process whose loop makes no
progress (a hung peer blocks every collective), and ``audiodiff_jax/goodput.py``
records where wall time went, across restarts.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from audiodiff_jax import checkpointing, diffusion, flops, goodput, names, optim, sharding
from audiodiff_jax import config as config_lib
from audiodiff_jax.config import Config
from audiodiff_jax.metrics import MetricWriter, log_line
from audiodiff_jax.model import make_model


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient or parameter norm) became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32 key data; per-step randomness is fold_in(rng, step)


# Batch keys and their logical axes (leading axis is the global batch).
BATCH_KEYS = ("latents", "loss_mask", "num_frames", "tokens", "seconds_start", "seconds_total")


def make_train_step(cfg: Config, model_fns, tx: optax.GradientTransformation, schedule):
    """Builds the pure ``train_step(state, batch) -> (state, metrics)``."""
    dcfg = cfg.diffusion
    ema_decay = cfg.optim.ema_decay

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        t_rng, noise_rng = jax.random.split(rng)
        x0 = batch["latents"]
        batch_size = x0.shape[0]
        t = diffusion.sample_time(
            t_rng,
            batch_size,
            method=dcfg.timestep_sampling,
            mean=dcfg.logit_normal_mean,
            std=dcfg.logit_normal_std,
            shift=dcfg.schedule_shift,
        )
        noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32)
        noise = sharding.constrain(noise, (names.BATCH, names.LENGTH, None))
        z, v_target = diffusion.add_noise(x0, noise, t)

        def loss_fn(params):
            v_pred = model_fns.apply(
                params,
                z,
                t,
                batch["tokens"],
                batch["seconds_start"],
                batch["seconds_total"],
                batch["num_frames"],
            )
            return diffusion.masked_mse(v_pred, v_target, batch["loss_mask"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = optim.ema_decay_at(state.step, ema_decay)
        ema_params = jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, state.ema_params, params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
        )
        metrics = {
            names.TRAIN_LOSS: loss,
            names.TRAIN_GRAD_NORM: optax.global_norm(grads),
            names.TRAIN_PARAM_NORM: optax.global_norm(params),
            names.TRAIN_UPDATE_NORM: optax.global_norm(updates),
            names.TRAIN_LR: schedule(state.step),
        }
        return new_state, metrics

    return train_step


class Trainer:
    """Holds the mesh, the shardings and the jitted functions of one config."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg = cfg
        self.mesh = mesh
        self.model = make_model(cfg.model)
        self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.param_shardings = sharding.named_shardings(self.model.logical_axes(), mesh)
        abstract_params = self.model.abstract_params()
        opt_shapes = jax.eval_shape(self.tx.init, abstract_params)
        # Optimizer moments mirror the params they belong to; scalars (counts) are replicated.
        opt_shardings = opt_state_shardings(opt_shapes, abstract_params, self.param_shardings, replicated)
        self.state_shardings = TrainState(
            step=replicated,
            params=self.param_shardings,
            opt_state=opt_shardings,
            ema_params=self.param_shardings,
            rng=replicated,
        )
        self.batch_sharding = sharding.batch_sharding(mesh)
        with jax.set_mesh(mesh):
            self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
            self.train_step = jax.jit(
                make_train_step(cfg, self.model, self.tx, self.schedule),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=(0,),
            )

    def _init_fn(self, seed_key_data, params=None):
        key = jax.random.wrap_key_data(seed_key_data)
        init_key, state_key = jax.random.split(key)
        if params is None:
            params = self.model.init(init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            rng=jax.random.key_data(state_key),
        )

    def init_state(self, seed: int, params=None) -> TrainState:
        """A fresh state, created directly sharded (no full copy on any one device)."""
        key_data = jax.random.key_data(jax.random.key(seed))
        with jax.set_mesh(self.mesh):
            if params is None:
                return self._init(key_data)
            init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
            return init(key_data, params)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        shapes = jax.eval_shape(self._init_fn, jax.random.key_data(jax.random.key(0)))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )

    def abstract_params(self):
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            self.model.abstract_params(),
            self.param_shardings,
        )

    def step(self, state: TrainState, batch: dict[str, jax.Array]):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, batch)


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


# ---------------------------------------------------------------------------
# The loop


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


def restore_for_mesh(
    ckpt: checkpointing.RunCheckpointer, step: int, trainer: Trainer, data_iter
) -> TrainState:
    """Restores ``step`` onto ``trainer``'s mesh, and positions ``data_iter`` (see module docstring)."""
    import grain
    import orbax.checkpoint as ocp

    saved = _saved_iterator_states(ckpt, step)
    count = jax.process_count()
    if saved["count"] == count:
        return ckpt.restore(step, trainer.abstract_state(), data_iter)
    restored = ckpt.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(trainer.abstract_state()))
    )
    state = restored.state
    step_now = int(jax.device_get(state.step))
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


@dataclasses.dataclass
class TrainResult:
    state: TrainState
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


def train(
    cfg: Config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    process_start: float | None = None,
    step_timeout_s: float = 0.0,
) -> TrainResult:
    """Trains ``cfg`` in ``workdir``, resuming as the module docstring says.

    Args:
      cfg: the config.
      workdir: run directory (local or gs://).
      mesh: the device mesh; ``sharding.make_mesh(cfg.mesh)`` by default.
      process_start: unix time the process started, for the goodput account of
        start-up time (default: now).
      step_timeout_s: exit (status ``StepWatchdog.EXIT_CODE``) when no step finishes
        for this long after the first one; 0 = never.
    """
    process_start = time.time() if process_start is None else process_start
    from data_pipeline import loader as loader_lib
    from data_pipeline import shards as shards_lib
    from data_pipeline.tokenizer import Tokenizer

    # Shapes are checked against the mesh that will run them (a given mesh may use
    # fewer devices than the process sees, e.g. resuming on one device).
    config_lib.validate(cfg, num_devices=jax.device_count() if mesh is None else mesh.size)
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh)
    card = shards_lib.DatasetCard.load(cfg.data.shards_dir)
    card_channels = card.codec.latent_channels
    if card_channels != cfg.model.latent_channels:
        raise config_lib.ConfigError(
            f"model.latent_channels={cfg.model.latent_channels} but the dataset card in "
            f"data.shards_dir={cfg.data.shards_dir!r} has latent_channels={card_channels}"
        )
    if card.tokenizer_vocab_size > cfg.model.text.vocab_size:
        raise config_lib.ConfigError(
            f"model.text.vocab_size={cfg.model.text.vocab_size} is smaller than the tokenizer's "
            f"{card.tokenizer_vocab_size} pieces (dataset card in {cfg.data.shards_dir!r})"
        )
    logging.info("mesh %s over %d devices, %s", dict(mesh.shape), mesh.size, checkpointing.process_info())

    trainer = Trainer(cfg, mesh)
    dataset = loader_lib.make_dataset(
        cfg.data,
        text_max_len=cfg.model.text.max_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data_iter = iter(dataset)
    ckpt = checkpointing.RunCheckpointer(
        workdir,
        keep_last=cfg.checkpoint.keep_last,
        keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save,
    )
    config_json = dataclasses.asdict(cfg)
    card_json = card.to_dict()
    tokenizer_json = Tokenizer(loader_lib.resolve_tokenizer_path(cfg.data, card)).to_json()

    _warn_incomplete_checkpoints(ckpt)
    latest = ckpt.latest_step()
    restore_s = 0.0
    if latest is not None:
        logging.info("resuming from checkpoint step %d in %s", latest, ckpt.directory)
        t0 = time.perf_counter()
        state = restore_for_mesh(ckpt, latest, trainer, data_iter)
        jax.block_until_ready(state)
        restore_s = time.perf_counter() - t0
    elif cfg.train.init_from:
        try:
            params, src_step = checkpointing.restore_params(cfg.train.init_from, trainer.abstract_params())
        except checkpointing.CheckpointNotFound as e:
            raise config_lib.ConfigError(f"train.init_from: {e}") from e
        logging.info("starting from the weights of %s (step %d)", cfg.train.init_from, src_step)
        state = trainer.init_state(cfg.train.seed, params=params)
    else:
        logging.info("starting fresh from seed %d", cfg.train.seed)
        state = trainer.init_state(cfg.train.seed)

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step = int(jax.device_get(state.step))
    num_steps = cfg.train.num_steps
    batch_frames = cfg.data.global_batch_size * cfg.data.window_frames
    step_flops = flops.train_flops_per_step(
        cfg.model, cfg.data.global_batch_size, cfg.data.window_frames, cfg.model.text.max_len
    )
    peak = cfg.train.peak_tflops_per_device * 1e12 or flops.peak_flops_per_device(jax.devices()[0])
    logging.info(
        "model: %.2fM params, %.3g TFLOP per step; training steps %d -> %d",
        n_params / 1e6,
        step_flops / 1e12,
        step,
        num_steps,
    )

    writer = MetricWriter(workdir)
    gp = goodput.GoodputRecorder(
        workdir, process_start=process_start, first_step=step, enabled=jax.process_index() == 0
    )
    if restore_s:
        gp.add("restore", restore_s)
    watchdog = StepWatchdog(step_timeout_s)
    if step == 0 and jax.process_index() == 0:
        writer.write_text("config", "```\n" + config_lib.to_json(cfg) + "\n```")
    watcher = PreemptionWatcher()
    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (no sync per step)
    last_saved = latest
    preempted = False
    t_last, step_last = time.perf_counter(), step
    first_call = True

    def flush(check_step: int):
        nonlocal pending
        fetched = jax.device_get([m for _, m in pending])
        rows = [(s, {k: float(v) for k, v in m.items()}) for (s, _), m in zip(pending, fetched, strict=True)]
        pending = []
        for s, m in rows:
            check_finite(s, m, last_saved, workdir)
        writer.write_step_losses([(s, m[names.TRAIN_LOSS]) for s, m in rows])
        return rows

    gp.loop_started()
    try:
        while step < num_steps:
            local = next(data_iter)
            batch = loader_lib.make_global_batch({k: local[k] for k in BATCH_KEYS}, mesh)
            if first_call:
                # The first call traces and compiles before it dispatches (execution stays async).
                t0 = time.perf_counter()
                state, metrics = trainer.step(state, batch)
                gp.add("compile", time.perf_counter() - t0)
                first_call = False
                t_last = time.perf_counter()
            else:
                state, metrics = trainer.step(state, batch)
            watchdog.pet()
            step += 1
            pending.append((step, metrics))
            is_log = step % cfg.train.log_every == 0 or step == num_steps
            is_save = step % cfg.checkpoint.every_steps == 0 or step == num_steps
            stop = watcher.should_stop(step)
            if is_log or is_save or stop:
                rows = flush(step)
                if is_log and rows:
                    now = time.perf_counter()
                    dt = (now - t_last) / max(step - step_last, 1)
                    t_last, step_last = now, step
                    last = rows[-1][1]
                    scalars = dict(last)
                    scalars[names.TRAIN_LOSS] = float(np.mean([m[names.TRAIN_LOSS] for _, m in rows]))
                    scalars[names.PERF_STEP_TIME] = dt
                    scalars[names.PERF_FRAMES_PER_SEC] = batch_frames / dt
                    tflops = step_flops / dt / jax.device_count() / 1e12
                    scalars[names.PERF_TFLOPS] = tflops
                    if peak:
                        scalars[names.PERF_MFU] = tflops * 1e12 / peak
                    summary = gp.update(step)
                    scalars.update(summary.scalars())
                    writer.write_scalars(step, scalars)
                    log_line(step, num_steps, scalars, 1.0 / dt)
                    logging.info("%s", summary.line())
            if is_save or stop:
                watchdog.pause(True)
                t0 = time.perf_counter()
                ckpt.save(step, state, data_iter, config_json, card_json, tokenizer_json)
                gp.add("checkpoint", time.perf_counter() - t0)
                watchdog.pause(False)
                last_saved = step
                gp.update(step, last_checkpoint=last_saved)
            if stop:
                logging.warning("preemption: saved step %d, exiting", step)
                preempted = True
                break
        watchdog.pause(True)
        t0 = time.perf_counter()
        ckpt.wait()  # the last save must be complete before the run counts as done
        gp.add("checkpoint", time.perf_counter() - t0)
        summary = gp.update(step, last_checkpoint=last_saved, finished=True)
        logging.info("%s", summary.line())
        writer.write_scalars(step, summary.scalars())
    finally:
        watchdog.close()
        ckpt.close()
        writer.close()
        watcher.close()
    return TrainResult(state=state, final_step=step, preempted=preempted)
