"""Training the DiT: one jitted, sharded, donated ``train_step``; the loop is ``loop.py``.

Follow one batch from the shard to the loss (README, "Architecture"):
``audiodiff_jax/data/records.py`` (read a record) -> ``audiodiff_jax/data/loader.py``
(crop, normalize, tokenize, batch) -> ``audiodiff_jax/data/batch.py`` (the typed
:class:`~audiodiff_jax.data.batch.Batch`, per-host arrays into one global jax.Array)
-> :func:`make_train_step` here (noise, v target, ``audiodiff_jax/model/dit.py``,
``audiodiff_jax/objective.masked_mse``) -> AdamW + EMA.

Resume, checkpoints, logging, NaN checks, preemption, the watchdog and goodput are
the shared loop's (``audiodiff_jax/training/loop.py``, which also says the resume order). The
checkpoint items of a DiT run: ``state``, ``data_iter``, ``config``, ``dataset_card``
and ``tokenizer`` (``audiodiff_jax/checkpoints/checkpointing.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from audiodiff_jax.checkpoints import checkpointing, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import flops, memory, names, optim, sharding
from audiodiff_jax.core.config import Config
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.data import loader as loader_lib
from audiodiff_jax.data.batch import Batch
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.diffusion import objective
from audiodiff_jax.model import make_model
from audiodiff_jax.training import loop

CONTROLS = "control_embedder"  # model/dit.py: the musical controls' parameters


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any  # the EMA of optim.ema_decay (weights "ema")
    rng: jax.Array  # uint32 key data; per-step randomness is fold_in(rng, step)
    # The EMAs of optim.extra_ema_decays, by name (optim.ema_name: "ema0.9999"); {} when none.
    extra_ema: dict[str, Any] = flax.struct.field(default_factory=dict)


def weight_sets(state: TrainState) -> dict[str, Any]:
    """Every set of weights a state holds, by name: ``raw``, ``ema`` and the extra EMAs."""
    return {optim.RAW: state.params, optim.EMA: state.ema_params, **state.extra_ema}


CONTEXT_STREAM = 7  # fold_in index of the masked-context draws within a step's key


def v_loss(apply_fn, params, x0, noise, t, cond, loss_mask, *, per_row: bool = False) -> jax.Array:
    """The DiT's objective: ``x0`` noised to time ``t`` with ``noise``, the v prediction's
    masked MSE (``objective.masked_mse``). The train step minimizes it; the validation
    loss (``audiodiff_jax/evaluators/train_eval.py``) scores each row with ``per_row=True``."""
    z, v_target = objective.add_noise(x0, noise, t)
    v_pred = apply_fn(params, z, t, cond)
    return objective.masked_mse(v_pred, v_target, loss_mask, per_row=per_row)


def context_draw(cfg: Config, rng: jax.Array, batch: Batch) -> tuple[Any, jax.Array, jax.Array | None]:
    """``(cond, loss_mask, known_mask)`` of a step: with ``model.masked_context``, random
    known frames (``objective.context_mask``, from the step key's own stream so the time
    and noise draws stay those of a run without), given clean to the model and left out
    of the loss; else the batch's own and None."""
    cond, loss_mask = batch.cond, batch.loss_mask
    if not cfg.model.masked_context:
        return cond, loss_mask, None
    x0 = batch.latents
    known_mask = objective.context_mask(
        jax.random.fold_in(rng, CONTEXT_STREAM),
        batch.cond.num_frames,
        x0.shape[1],
        none_prob=cfg.diffusion.context_none_prob,
    )
    known_mask = sharding.constrain(known_mask, (names.BATCH, names.LENGTH))
    cond = cond._replace(known=x0, known_mask=known_mask)
    return cond, loss_mask * (1.0 - known_mask), known_mask  # known frames are given, not learned


def apply_gradients(cfg: Config, tx, schedule, state: TrainState, loss, grads) -> tuple[TrainState, dict]:
    """The optimizer update, the EMAs and the step's metrics: the end of every DiT-like
    step (training, adapters, distillation)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optim.update_ema(state.ema_params, params, state.step, cfg.optim.ema_decay)
    extra_decays = dict(list(optim.ema_decays(cfg.optim).items())[1:])
    extra_ema = {
        name: optim.update_ema(state.extra_ema[name], params, state.step, decay)
        for name, decay in extra_decays.items()
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema_params,
        extra_ema=extra_ema,
    )
    metrics = {
        names.TRAIN_LOSS: loss,
        names.TRAIN_GRAD_NORM: optax.global_norm(grads),
        names.TRAIN_PARAM_NORM: optax.global_norm(params),
        names.TRAIN_UPDATE_NORM: optax.global_norm(updates),
        names.TRAIN_LR: schedule(state.step),
    }
    return new_state, metrics


# fold_in index of the draws of ``model_params`` (an adapter run's rank dropout) within a step's key
MODEL_PARAMS_STREAM = 11

# (trained params, frozen params, key) -> the params the model is called with.
ModelParams = Callable[[Any, Any, jax.Array], Any]


def make_train_step(
    cfg: Config,
    model_fns,
    tx: optax.GradientTransformation,
    schedule,
    model_params: ModelParams | None = None,
):
    """Builds the pure ``train_step(state, batch, frozen=None) -> (state, metrics)``.

    ``model_params(params, frozen, key)`` gives the parameters the model is called with
    from the trained ones (``state.params``) and ``frozen``, an input of the step that
    no gradient or update reaches: the adapter trainer merges its adapters into the
    base's weights there (``adapter_trainer.py``). Default: the trained params
    themselves. Its key is its own stream (``fold_in``), so the time and noise draws are
    those of a run without it."""
    dcfg = cfg.diffusion

    def train_step(state: TrainState, batch: Batch, frozen: Any = None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        t_rng, noise_rng = jax.random.split(rng)
        x0 = batch.latents
        batch_size = x0.shape[0]
        t = objective.sample_time(
            t_rng,
            batch_size,
            method=dcfg.timestep_sampling,
            mean=dcfg.logit_normal_mean,
            std=dcfg.logit_normal_std,
            shift=dcfg.schedule_shift,
        )
        noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32)
        noise = sharding.constrain(noise, (names.BATCH, names.LENGTH, None))
        cond, loss_mask, _ = context_draw(cfg, rng, batch)

        def loss_fn(params):
            if model_params is not None:
                params = model_params(params, frozen, jax.random.fold_in(rng, MODEL_PARAMS_STREAM))
            return v_loss(model_fns.apply, params, x0, noise, t, cond, loss_mask)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return apply_gradients(cfg, tx, schedule, state, loss, grads)

    return train_step


class Trainer:
    """Holds the mesh, the shardings and the jitted functions of one config."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
        self.cfg = cfg
        self.mesh = mesh
        self.model = make_model(cfg.model)
        self.step_flops = flops.train_flops_per_step(
            cfg.model, cfg.data.global_batch_size, cfg.data.window_frames, cfg.model.text.max_len
        )
        self.peak_flops = cfg.train.peak_tflops_per_device * 1e12 or flops.peak_flops_per_device(
            mesh.devices.flat[0]
        )
        self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
        self.extra_ema_names = list(optim.ema_decays(cfg.optim))[1:]
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.param_shardings = sharding.named_shardings(self.model.logical_axes(), mesh)
        abstract_params = self.model.abstract_params()
        opt_shapes = jax.eval_shape(self.tx.init, abstract_params)
        # Optimizer moments mirror the params they belong to; scalars (counts) are replicated.
        opt_shardings = loop.opt_state_shardings(
            opt_shapes, abstract_params, self.param_shardings, replicated
        )
        self.state_shardings = TrainState(
            step=replicated,
            params=self.param_shardings,
            opt_state=opt_shardings,
            ema_params=self.param_shardings,
            rng=replicated,
            extra_ema={name: self.param_shardings for name in self.extra_ema_names},
        )
        self.batch_shardings = batch_lib.batch_shardings(mesh)
        with jax.set_mesh(mesh):
            self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
            self.train_step = jax.jit(
                make_train_step(cfg, self.model, self.tx, self.schedule),
                in_shardings=(self.state_shardings, self.batch_shardings),
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
            extra_ema={name: jax.tree.map(jnp.copy, params) for name in self.extra_ema_names},
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
        return sharding.with_shardings(shapes, self.state_shardings)

    def abstract_params(self):
        return sharding.with_shardings(self.model.abstract_params(), self.param_shardings)

    def step(self, state: TrainState, batch: Batch):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, batch)

    def compile(self, state: TrainState, batch: Batch) -> jax.stages.Compiled:
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(state, batch).compile()

    def memory_advice(self) -> str:
        return memory.config_advice(self.cfg, config_lib.MEMORY_FIELDS)

    # -- the loop's Trainer protocol (audiodiff_jax/training/loop.py) -------------------------

    def initial_state(self) -> TrainState:
        """``train.init_from`` weights, or a fresh state from ``train.seed``.

        Weights of a model without musical controls may start a model with them
        (``model.controls``): the controls' parameters start fresh, at zero output, so
        the run starts from exactly the model it was given.
        """
        cfg = self.cfg
        if cfg.train.init_from and cfg.model.controls:
            try:
                had = source.WeightsSource(cfg.train.init_from).cfg.model.controls
            except Exception:  # noqa: BLE001 - start_state below names what is wrong with it
                had = cfg.model.controls
            if not had:
                return self._add_controls_to(cfg.train.init_from)
        return loop.start_state(self.init_state, self.abstract_params, cfg.train)

    def _add_controls_to(self, path: str) -> TrainState:
        logging.info(
            "train.init_from %s has no musical controls: %s start at zero output "
            "(the model starts as it was)",
            path,
            ",".join(self.cfg.model.controls),
        )
        abstract = dict(self.abstract_params())
        abstract.pop(CONTROLS)
        try:
            params, step = source.restore_params(path, abstract)
        except checkpointing.CheckpointNotFound as e:
            raise config_lib.ConfigError(f"train.init_from: {e}") from e
        fresh = self.init_state(self.cfg.train.seed).params[CONTROLS]
        logging.info("starting from the weights of %s (step %d)", path, step)
        return self.init_state(self.cfg.train.seed, params={**params, CONTROLS: fresh})

    def upgrade_state(self, restored: dict[str, Any], missing: set[str]) -> TrainState:
        """A state from a checkpoint written before ``extra_ema`` existed: each extra EMA
        starts from the main EMA (the loop calls this; see ``loop._restore_target``)."""
        if missing != {"extra_ema"}:
            raise ValueError(f"the checkpoint's train state lacks {sorted(missing)}")
        if self.extra_ema_names:
            logging.warning(
                "checkpoint has no extra EMAs (written before optim.extra_ema_decays); %s start from "
                "the main EMA",
                ", ".join(self.extra_ema_names),
            )
        extra = {name: jax.tree.map(jnp.copy, restored["ema_params"]) for name in self.extra_ema_names}
        return TrainState(**restored, extra_ema=extra)

    @staticmethod
    def weight_sets(state: TrainState) -> dict[str, Any]:
        """The model's weight sets of ``state`` by name (what evaluation samples)."""
        return weight_sets(state)

    @staticmethod
    def state_step(state: TrainState) -> int:
        return int(jax.device_get(state.step))

    def perf_scalars(self, seconds_per_step: float) -> dict[str, float]:
        cfg, dt = self.cfg, seconds_per_step
        tflops = self.step_flops / dt / jax.device_count() / 1e12
        out = {
            names.PERF_FRAMES_PER_SEC: cfg.data.global_batch_size * cfg.data.window_frames / dt,
            names.PERF_TFLOPS: tflops,
        }
        if self.peak_flops:
            out[names.PERF_MFU] = tflops * 1e12 / self.peak_flops
        return out


# Builds the evaluation during training from (config, trainer, dataset card, workdir);
# the program hands it to ``train`` (``audiodiff_jax/evaluators/train_eval.py:from_config``).
EvaluatorFactory = Callable[[Config, Trainer, DatasetCard, str], loop.Evaluator | None]


def train(
    cfg: Config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    process_start: float | None = None,
    step_timeout_s: float = 0.0,
    make_evaluator: EvaluatorFactory | None = None,
) -> loop.TrainResult:
    """Trains ``cfg`` in ``workdir``, resuming as ``audiodiff_jax/training/loop.py`` says.

    Args:
      cfg: the config.
      workdir: run directory (local or gs://).
      mesh: the device mesh; ``sharding.make_mesh(cfg.mesh)`` by default.
      process_start: unix time the process started, for the goodput account of
        start-up time (default: now).
      step_timeout_s: exit (status ``loop.StepWatchdog.EXIT_CODE``) when no step finishes
        for this long after the first one; 0 = never.
      make_evaluator: builds the evaluation during training once the trainer exists,
        called as ``make_evaluator(cfg, trainer, dataset_card, workdir)`` (None: no
        evaluation). The trainer imports no evaluator: the program hands one in, e.g.
        ``audiodiff_jax.evaluators.train_eval.from_config``.
    """
    # Shapes are checked against the mesh that will run them (a given mesh may use
    # fewer devices than the process sees, e.g. resuming on one device).
    config_lib.validate(cfg, num_devices=jax.device_count() if mesh is None else mesh.size)
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh)
    card = check_dataset(cfg)
    cfg = with_latent_rate(cfg, card)
    logging.info("mesh %s over %d devices, %s", dict(mesh.shape), mesh.size, checkpointing.process_info())

    trainer = Trainer(cfg, mesh)
    data_iter, json_items = data_and_items(cfg, card)
    n_params = sum(x.size for x in jax.tree.leaves(trainer.model.abstract_params()))
    logging.info(
        "model: %.2fM params, %.3g TFLOP per step; %d steps",
        n_params / 1e6,
        trainer.step_flops / 1e12,
        cfg.train.num_steps,
    )
    return run_loop(
        cfg,
        trainer,
        mesh,
        card,
        workdir,
        data_iter,
        json_items,
        step_timeout_s,
        process_start,
        make_evaluator,
    )


def run_loop(
    cfg: Config,
    trainer,
    mesh: jax.sharding.Mesh,
    card: DatasetCard,
    workdir: str,
    data_iter,
    json_items: dict[str, dict],
    step_timeout_s: float,
    process_start: float | None,
    make_evaluator: EvaluatorFactory | None,
) -> loop.TrainResult:
    """The shared loop over ``data_iter``'s batches, for any DiT-like trainer (training,
    adapters, distillation): checkpoints with ``json_items``, evaluation by ``make_evaluator``."""
    return loop.run(
        trainer,
        lambda step: batch_lib.make_global_batch(next(data_iter), mesh),
        workdir,
        loop.LoopConfig.from_config(cfg, step_timeout_s),
        json_items=json_items,
        data_iter=data_iter,
        process_start=process_start,
        evaluator=evaluator_of(cfg, trainer, card, workdir, make_evaluator),
    )


def with_latent_rate(cfg: Config, card: DatasetCard) -> Config:
    """``model.latent_rate`` filled in from the dataset card when 0 (the tempo control's
    beat grid needs seconds per frame); a different value set by hand is refused."""
    rate = float(card.codec.latent_rate)
    if cfg.model.latent_rate == 0:
        if "tempo" not in cfg.model.controls:
            return cfg  # nothing reads it: the config stays what it was
        return config_lib.replace(cfg, **{"model.latent_rate": rate})
    if abs(cfg.model.latent_rate - rate) > 1e-6 * rate:
        raise config_lib.ConfigError(
            f"model.latent_rate={cfg.model.latent_rate} but the dataset card in "
            f"data.shards_dir={cfg.data.shards_dir!r} has latent_rate={rate} (0 takes the card's)"
        )
    return cfg


def check_dataset(cfg: Config) -> DatasetCard:
    """The dataset card of ``data.shards_dir``, checked against the model's latent
    channels and vocabulary (ConfigError naming the field)."""
    card = DatasetCard.load(cfg.data.shards_dir)
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
    longest = card.metadata.get("caption_tokens_max")
    if isinstance(longest, int) and longest > cfg.model.text.max_len:
        logging.warning(
            "model.text.max_len=%d cuts captions: the longest in data.shards_dir=%r takes %d tokens "
            "with EOS (dataset card, caption_tokens_max); what is cut is never seen by the model",
            cfg.model.text.max_len,
            cfg.data.shards_dir,
            longest,
        )
    return card


def data_and_items(cfg: Config, card: DatasetCard) -> tuple[Any, dict[str, dict]]:
    """This process's Grain iterator of training batches, and the JSON items every
    checkpoint of the run saves (config, dataset card, tokenizer)."""
    dataset = loader_lib.make_dataset(
        cfg.data,
        text_max_len=cfg.model.text.max_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        controls=cfg.model.controls,
    )
    json_items = {
        "config": dataclasses.asdict(cfg),
        "dataset_card": card.to_dict(),
        "tokenizer": Tokenizer(loader_lib.resolve_tokenizer_path(cfg.data, card)).to_json(),
    }
    return iter(dataset), json_items


def evaluator_of(
    cfg: Config,
    trainer: Trainer,
    card: DatasetCard,
    workdir: str,
    make_evaluator: EvaluatorFactory | None,
) -> loop.Evaluator | None:
    """``make_evaluator``'s evaluator; None, with a warning when the ``eval`` section asks
    for evaluation, when no factory was handed in."""
    if make_evaluator is None:
        if cfg.eval.every_steps > 0:
            logging.warning(
                "eval.every_steps=%d but no evaluator was handed to the trainer: no evaluation "
                "during this run (audiodiff-train builds one from the eval section)",
                cfg.eval.every_steps,
            )
        return None
    return make_evaluator(cfg, trainer, card, workdir)
