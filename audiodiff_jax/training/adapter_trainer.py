"""Training low-rank adapters on a frozen base model: a trainer on the shared loop.

An adapter run is a DiT run whose config names a base (``adapters.base``: a run's
checkpoint or an export; ``configs/adapter.py:BASE`` copies the model from it). It trains
only the adapters of ``audiodiff_jax/model/adapters.py`` on the same loop as any run
(``loop.py``: resume, SIGTERM save, checkpoints, goodput), with the DiT's step
(``dit_trainer.make_train_step``: the same time, noise and context draws, the same
v-loss), whose model parameters are the base's weights with the adapters merged in.

- **The train state** is the DiT's :class:`~audiodiff_jax.training.dit_trainer.TrainState`
  over the adapter's factors: ``params`` (the factors), their AdamW moments, their EMAs
  (``ema``, ``optim.extra_ema_decays``), step and RNG. Nothing of the base is in it.
- **The base** is read once (``checkpoints/source.py``), placed on the mesh with the
  model's shardings and handed to every step as an input that is neither differentiated,
  updated nor donated: its weights stay bit for bit what was read.
- **Checkpoints** hold that state and, as the JSON item ``adapter``, the spec (rank,
  alpha, targets) and the base's identity (a name and the content hash of its weights,
  ``export.content_hash``), never a copy of the base. A resumed run re-reads the base and
  refuses it if its hash differs from the one the run started on.
- **The adapters' factors** take their logical axes from the kernels they adapt, so
  they shard on any mesh, as the base does.

Refused before anything is written (a ``ConfigError``: one line, exit 2 through the
program): a rank larger than a targeted kernel can hold; a model section that differs
from the base's; shards whose codec, latent statistics or tokenizer are not the base's
(``audiodiff-precompute --like=BASE`` makes shards that fit).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from audiodiff_jax.checkpoints import checkpointing, export, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import flops, memory, names, optim, sharding
from audiodiff_jax.core.config import Config, ConfigError
from audiodiff_jax.core.errors import GenerationError
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.data import loader as loader_lib
from audiodiff_jax.data.batch import Batch
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.model import adapters, make_model
from audiodiff_jax.training import dit_trainer, loop
from audiodiff_jax.training.dit_trainer import TrainState

# Model fields that change how the model runs, not its weights: an adapter run may set them
# its own way (another attention kernel, remat, compute dtype on another machine).
EXECUTION_FIELDS = ("model.preset", "model.attention", "model.remat", "model.scan_layers", "model.dtype")


class Base:
    """The base model of an adapter run (or the teacher of a distillation, ``field``): its
    weights (host arrays), identity, config, dataset card and tokenizer, read through the
    weights source."""

    def __init__(self, path: str, weights: str = "", field: str = "adapters.base"):
        try:
            src = source.WeightsSource(path)
            name = src.canonical_weights(weights or src.default_weights())
            src.check_weights(src.step, [name], what=f"{field}_weights")
            self.params = src.host_params(src.step, name)
            self.identity = src.identity(src.step, name, self.params)
            self.tokenizer = src.tokenizer()
        except GenerationError as e:
            raise ConfigError(f"{field}={path!r}: {e}") from e
        self.path, self.cfg, self.card = path, src.cfg, src.card


def check_against_base(
    cfg: Config,
    card: DatasetCard,
    base: Base,
    *,
    where: str = "",
    model_may_differ: tuple[str, ...] = EXECUTION_FIELDS,
    why: str = "an adapter's model is its base's (configs/adapter.py:BASE copies it)",
) -> None:
    """Raises ConfigError when the run's model or data differ from what the base was
    trained with (module docstring); ``where``, ``model_may_differ`` and ``why`` say it
    for a distillation's teacher."""
    where = where or f"the base adapters.base={base.path!r}"
    diff = config_lib.first_difference(cfg.model, base.cfg.model, "model", model_may_differ)
    if diff:
        field, mine, theirs = diff
        raise ConfigError(f"{field}={mine!r} but {where} has {field}={theirs!r}: {why}")
    hint = f"encode the audio with audiodiff-precompute --like={base.path}"
    shards = f"data.shards_dir={cfg.data.shards_dir!r}"
    mine, theirs = card.codec, base.card.codec
    if mine != theirs:
        raise ConfigError(
            f"{shards} holds latents of codec {mine.name!r} ({mine.latent_channels} channels at "
            f"{mine.latent_rate:.4g}/s), {where} was trained on codec {theirs.name!r} "
            f"({theirs.latent_channels} channels at {theirs.latent_rate:.4g}/s); {hint}"
        )
    same_stats = np.array_equal(
        np.asarray(card.latent_mean, np.float64), np.asarray(base.card.latent_mean, np.float64)
    ) and np.array_equal(
        np.asarray(card.latent_std, np.float64), np.asarray(base.card.latent_std, np.float64)
    )
    if not same_stats:
        raise ConfigError(
            f"{shards} normalizes its latents with other statistics than {where} (its dataset card's "
            f"latent_mean/latent_std); {hint}"
        )
    tokenizer = Tokenizer(loader_lib.resolve_tokenizer_path(cfg.data, card))
    if tokenizer.model_bytes != base.tokenizer.model_bytes:
        raise ConfigError(
            f"the tokenizer of {shards} ({tokenizer.path}) is not the one of {where}: captions would "
            f"become other tokens; {hint}"
        )


def check_started_on(workdir: str, item: str, role: str, weights: Base, field: str) -> None:
    """Raises ConfigError when ``workdir``'s newest checkpoint names (``item[role]``) other
    frozen weights (a base, a teacher) than ``weights``: a resumed run keeps its own."""
    saved = source.saved_identity(workdir, item, role)
    if saved is not None and saved.get("hash") != weights.identity["hash"]:
        raise ConfigError(
            f"{field} holds other weights ({export.short_hash(weights.identity['hash'])}) than the "
            f"{role} this run started on, {saved.get('name')} ({export.short_hash(str(saved.get('hash')))}); "
            f"give that {role}, or another workdir"
        )


def _place(host_params: Any, shardings: Any) -> Any:
    """Host arrays onto their shardings (each process gives its devices their slices)."""

    def put(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(put, host_params, shardings)


class AdapterTrainer:
    """Holds the mesh, the base on it, the shardings and the jitted functions of an adapter run."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh, base_params: Any = None):
        """``base_params``: the base's weights as host arrays, placed on ``mesh`` here;
        None builds the jitted functions only (ahead-of-time compiles: :meth:`abstract_base`)."""
        self.cfg = cfg
        self.mesh = mesh
        self.model = make_model(cfg.model)
        self.spec = adapters.AdapterSpec.from_config(cfg.adapters)
        self.adapter = adapters.make_adapter(cfg.model, self.spec)
        # Merged in the step, the base gets a full-size weight gradient like a full
        # fine-tune's, then projected onto the factors: the model FLOPs are the DiT's.
        self.step_flops = flops.train_flops_per_step(
            cfg.model, cfg.data.global_batch_size, cfg.data.window_frames, cfg.model.text.max_len
        )
        self.peak_flops = cfg.train.peak_tflops_per_device * 1e12 or flops.peak_flops_per_device(
            mesh.devices.flat[0]
        )
        self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
        self.extra_ema_names = list(optim.ema_decays(cfg.optim))[1:]
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.param_shardings = sharding.named_shardings(self.adapter.logical_axes(), mesh)
        self.base_shardings = sharding.named_shardings(self.model.logical_axes(), mesh)
        self.base = None if base_params is None else _place(base_params, self.base_shardings)
        abstract = self.adapter.abstract_params()
        opt_shardings = loop.opt_state_shardings(
            jax.eval_shape(self.tx.init, abstract), abstract, self.param_shardings, replicated
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
        factor, dropout = self.spec.factor, cfg.adapters.dropout

        def model_params(params, base, key):
            keep = adapters.rank_keep(key, params, dropout) if dropout > 0 else None
            return adapters.merge(base, [(params, factor)], keep=keep)

        step = dit_trainer.make_train_step(cfg, self.model, self.tx, self.schedule, model_params)
        with jax.set_mesh(mesh):
            self._init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
            # The base is an input like the batch: never donated, never updated.
            self.train_step = jax.jit(
                lambda state, base, batch: step(state, batch, base),
                in_shardings=(self.state_shardings, self.base_shardings, self.batch_shardings),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=(0,),
            )
            self._merge = jax.jit(
                lambda base, params: adapters.merge(base, [(params, factor)]),
                out_shardings=self.base_shardings,
            )

    def _init_fn(self, seed_key_data):
        key = jax.random.wrap_key_data(seed_key_data)
        init_key, state_key = jax.random.split(key)
        params = self.adapter.init(init_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params),
            rng=jax.random.key_data(state_key),
            extra_ema={name: jax.tree.map(jnp.copy, params) for name in self.extra_ema_names},
        )

    # -- the loop's Trainer protocol (audiodiff_jax/training/loop.py) -------------------------

    def initial_state(self) -> TrainState:
        """Fresh adapters from ``train.seed`` (``b`` = 0: the run starts at the base model)."""
        logging.info("starting fresh adapters from seed %d", self.cfg.train.seed)
        with jax.set_mesh(self.mesh):
            return self._init(jax.random.key_data(jax.random.key(self.cfg.train.seed)))

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(self._init_fn, jax.random.key_data(jax.random.key(0)))
        return sharding.with_shardings(shapes, self.state_shardings)

    def abstract_base(self) -> Any:
        """The base's weights as sharded ShapeDtypeStructs: the step's second argument."""
        return sharding.with_shardings(self.model.abstract_params(), self.base_shardings)

    @staticmethod
    def state_step(state: TrainState) -> int:
        return int(jax.device_get(state.step))

    def step(self, state: TrainState, batch: Batch):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, self.base, batch)

    def compile(self, state: TrainState, batch: Batch) -> jax.stages.Compiled:
        """The step lowered and compiled for these arguments, the frozen base included."""
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(state, self.base, batch).compile()

    def memory_advice(self) -> str:
        return memory.config_advice(self.cfg, config_lib.MEMORY_FIELDS)

    def weight_sets(self, state: TrainState) -> dict[str, Any]:
        """The model's weight sets: the base with each of the state's adapter sets merged in."""
        with jax.set_mesh(self.mesh):
            return {name: self._merge(self.base, p) for name, p in dit_trainer.weight_sets(state).items()}

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


def train(
    cfg: Config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    process_start: float | None = None,
    step_timeout_s: float = 0.0,
    make_evaluator: dit_trainer.EvaluatorFactory | None = None,
) -> loop.TrainResult:
    """Trains the adapters of ``cfg`` on its base in ``workdir`` (arguments as
    ``dit_trainer.train``); everything in the module docstring is checked before the
    workdir is touched."""
    config_lib.validate(cfg, num_devices=jax.device_count() if mesh is None else mesh.size)
    if not cfg.adapters.base:
        raise ConfigError("adapters.base is empty: an adapter run needs the checkpoint or export it adapts")
    spec = adapters.AdapterSpec.from_config(cfg.adapters)
    adapters.check_rank(cfg.model, spec)
    base = Base(cfg.adapters.base, cfg.adapters.base_weights)
    card = dit_trainer.check_dataset(cfg)
    check_against_base(cfg, card, base)
    check_started_on(workdir, source.ADAPTER_ITEM, "base", base, f"adapters.base={cfg.adapters.base!r}")
    if mesh is None:
        mesh = sharding.make_mesh(cfg.mesh)
    logging.info("mesh %s over %d devices, %s", dict(mesh.shape), mesh.size, checkpointing.process_info())
    trainer = AdapterTrainer(cfg, mesh, base.params)
    del base.params  # on the mesh now
    data_iter, json_items = dit_trainer.data_and_items(cfg, card)
    json_items[source.ADAPTER_ITEM] = {"spec": spec.to_dict(), "base": base.identity}
    logging.info(
        "adapters: rank %d on %s of %d blocks, %.3fM parameters on the base %s (%s, %.2fM frozen); %d steps",
        spec.rank,
        ", ".join(spec.targets),
        cfg.model.depth,
        adapters.count_params(trainer.adapter.abstract_params()) / 1e6,
        base.identity["name"],
        export.short_hash(base.identity["hash"]),
        sum(x.size for x in jax.tree.leaves(trainer.model.abstract_params())) / 1e6,
        cfg.train.num_steps,
    )
    return dit_trainer.run_loop(
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
