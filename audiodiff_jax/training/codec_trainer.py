"""Training the codec: one jitted, sharded, donated step; the loop is ``audiodiff_jax/training/loop.py``.

One batch, in order: :class:`audiodiff_jax.codec.data.CropSource` (crops chosen by
seed and step) -> global array sharded over (data, fsdp) -> :func:`make_train_step`
(encode, reparameterized sample, decode, :mod:`audiodiff_jax.codec.losses`; the
discriminator's hinge step when enabled) -> AdamW (``audiodiff_jax/core/optim.py``) + EMA.

The train state is a dict: ``step``, ``params``, ``opt_state``, ``ema_params``,
``rng``, and with a discriminator ``disc_params``, ``disc_opt_state``. Checkpoints are
an Orbax CheckpointManager in ``WORKDIR/checkpoints`` with the items ``state``,
``config`` (the resolved config as JSON) and ``codec_card``. No data iterator state is
needed: crops are a pure function of (seed, step). The shared loop gives the codec the
DiT's resume order, SIGTERM save, step watchdog, NaN checks and goodput.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from absl import logging

from audiodiff_jax.codec import codec as codec_lib
from audiodiff_jax.codec import losses
from audiodiff_jax.codec import model as model_lib
from audiodiff_jax.codec.config import MEMORY_FIELDS, CodecConfig, card_dict, validate
from audiodiff_jax.codec.data import CropSource
from audiodiff_jax.core import memory, names, optim, sharding
from audiodiff_jax.core.config import ConfigError
from audiodiff_jax.training import loop

# Metric names of the codec run (the DiT's are in audiodiff_jax/core/names.py).
LOSS = names.TRAIN_LOSS
STFT = "codec/stft"
L1 = "codec/waveform_l1"
KL = "codec/kl"
ADV = "codec/adversarial"
FEAT = "codec/feature_matching"
DISC_LOSS = "codec/discriminator"
PERF_AUDIO_SECONDS = "perf/audio_seconds_per_s"


def freeze_encoder(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for the decoder's params; zero updates (and no optimizer state) for the encoder's."""

    def labels(params):
        return {
            part: jax.tree.map(lambda _, label="frozen" if part == "encoder" else "train": label, sub)
            for part, sub in params.items()
        }

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def uses_discriminator(cfg: CodecConfig) -> bool:
    return cfg.discriminator.adversarial_weight > 0 or cfg.discriminator.feature_weight > 0


def make_train_step(cfg: CodecConfig, vae: model_lib.ModuleFns, disc, tx, disc_tx, schedule):
    """Builds the pure ``train_step(state, audio_btc) -> (state, metrics)``."""
    lc, dc = cfg.loss, cfg.discriminator
    use_disc = disc is not None
    frozen_encoder = cfg.train.trainable == "decoder"
    ema_decay = cfg.optim.ema_decay

    def train_step(state: dict, audio_btc: jax.Array):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        x = audio_btc
        adv_on = (state["step"] >= dc.start_step).astype(jnp.float32)

        def gen_loss(params):
            net = vae.merge(params)
            mean, scale = model_lib.posterior(net.encode(x))
            if frozen_encoder:  # no backward pass through the encoder
                mean, scale = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(scale)
            z = mean + lc.posterior_noise * scale * jax.random.normal(rng, mean.shape, mean.dtype)
            y = net.decode(z)
            parts = {
                STFT: losses.multi_resolution_stft_loss(y, x, lc.stft_fft_sizes),
                L1: losses.waveform_l1(y, x),
                KL: model_lib.kl_divergence(mean, scale),
            }
            total = (
                lc.stft_weight * parts[STFT] + lc.waveform_l1_weight * parts[L1] + lc.kl_weight * parts[KL]
            )
            if use_disc:
                d = disc.merge(state["disc_params"])
                fake = d(y)
                real = jax.lax.stop_gradient(d(x))
                parts[ADV] = sum(losses.hinge_generator_loss(lf) for lf, _ in fake) / len(fake)
                parts[FEAT] = sum(
                    losses.feature_matching_loss(fr, ff) for (_, fr), (_, ff) in zip(real, fake, strict=True)
                ) / len(fake)
                total = total + adv_on * (
                    dc.adversarial_weight * parts[ADV] + dc.feature_weight * parts[FEAT]
                )
            return total, (parts, y)

        (loss, (parts, y)), grads = jax.value_and_grad(gen_loss, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = optim.ema_decay_at(state["step"], ema_decay)
        ema = jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, state["ema_params"], params)
        if frozen_encoder:  # e*d + p*(1-d) with e == p is not always p in float: keep it exact
            ema = dict(ema, encoder=params["encoder"])
        new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, ema_params=ema)
        metrics = {LOSS: loss, **parts}
        if use_disc:
            y_sg = jax.lax.stop_gradient(y)

            def disc_loss(dp):
                d = disc.merge(dp)
                real, fake = d(x), d(y_sg)
                return sum(
                    losses.hinge_discriminator_loss(lr, lf)
                    for (lr, _), (lf, _) in zip(real, fake, strict=True)
                ) / len(real)

            dl, dgrads = jax.value_and_grad(disc_loss)(state["disc_params"])
            dupd, dopt = disc_tx.update(dgrads, state["disc_opt_state"], state["disc_params"])
            new["disc_params"] = optax.apply_updates(state["disc_params"], dupd)
            new["disc_opt_state"] = dopt
            metrics[DISC_LOSS] = dl
        metrics[names.TRAIN_GRAD_NORM] = optax.global_norm(grads)
        metrics[names.TRAIN_PARAM_NORM] = optax.global_norm(params)
        metrics[names.TRAIN_UPDATE_NORM] = optax.global_norm(updates)
        metrics[names.TRAIN_LR] = schedule(state["step"])
        return new, metrics

    return train_step


class CodecTrainer:
    """Holds the mesh, the shardings and the jitted init and step of one codec config."""

    def __init__(self, cfg: CodecConfig, mesh: jax.sharding.Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.vae = model_lib.make_vae(cfg.model)
        self.disc = (
            model_lib.make_discriminator(cfg.model.audio_channels, cfg.discriminator)
            if uses_discriminator(cfg)
            else None
        )
        self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
        if cfg.train.trainable == "decoder":
            self.tx = freeze_encoder(self.tx)
        self.disc_tx = optim.make_optimizer(cfg.optim, cfg.train.num_steps)[0] if self.disc else None
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.param_shardings = sharding.named_shardings(self.vae.logical_axes(), mesh)
        abstract = self.vae.abstract_params()
        opt_shapes = jax.eval_shape(self.tx.init, abstract)
        shardings = {
            "step": replicated,
            "params": self.param_shardings,
            "opt_state": loop.opt_state_shardings(opt_shapes, abstract, self.param_shardings, replicated),
            "ema_params": self.param_shardings,
            "rng": replicated,
        }
        if self.disc:
            d_sh = sharding.named_shardings(self.disc.logical_axes(), mesh)
            d_abs = self.disc.abstract_params()
            shardings["disc_params"] = d_sh
            shardings["disc_opt_state"] = loop.opt_state_shardings(
                jax.eval_shape(self.disc_tx.init, d_abs), d_abs, d_sh, replicated
            )
        self.state_shardings = shardings
        self.batch_sharding = sharding.batch_sharding(mesh)
        with jax.set_mesh(mesh):
            self._init = jax.jit(self._init_fn, out_shardings=shardings)
            self.train_step = jax.jit(
                make_train_step(cfg, self.vae, self.disc, self.tx, self.disc_tx, self.schedule),
                in_shardings=(shardings, self.batch_sharding),
                out_shardings=(shardings, replicated),
                donate_argnums=(0,),
            )

    def _init_fn(self, key_data, params=None):
        key = jax.random.wrap_key_data(key_data)
        k_init, k_disc, k_state = jax.random.split(key, 3)
        if params is None:
            params = self.vae.init(k_init)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self.tx.init(params),
            "ema_params": jax.tree.map(jnp.copy, params),
            "rng": jax.random.key_data(k_state),
        }
        if self.disc:
            dp = self.disc.init(k_disc)
            state["disc_params"] = dp
            state["disc_opt_state"] = self.disc_tx.init(dp)
        return state

    def init_state(self, seed: int, params=None) -> dict:
        key_data = jax.random.key_data(jax.random.key(seed))
        with jax.set_mesh(self.mesh):
            if params is None:
                return self._init(key_data)
            return jax.jit(self._init_fn, out_shardings=self.state_shardings)(key_data, params)

    def abstract_state(self) -> dict:
        shapes = jax.eval_shape(self._init_fn, jax.random.key_data(jax.random.key(0)))
        return sharding.with_shardings(shapes, self.state_shardings)

    def step(self, state: dict, audio_btc: jax.Array):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, audio_btc)

    def compile(self, state: dict, audio_btc: jax.Array) -> jax.stages.Compiled:
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(state, audio_btc).compile()

    def memory_advice(self) -> str:
        return memory.config_advice(self.cfg, MEMORY_FIELDS)

    # -- the loop's Trainer protocol (audiodiff_jax/training/loop.py) -------------------------

    def abstract_params(self) -> dict:
        return sharding.with_shardings(self.vae.abstract_params(), self.param_shardings)

    def initial_state(self) -> dict:
        """``train.init_from`` weights (another codec run's raw params, an exported codec
        folder or ``"default"``), or a fresh state."""
        init_from = self.cfg.train.init_from
        if init_from and codec_lib.is_codec_folder(init_from):
            params = codec_lib.load_codec(init_from).params
            mismatch = model_lib.param_mismatch(params, self.vae.abstract_params())
            if mismatch:
                raise ConfigError(
                    f"train.init_from={init_from!r}: its weights do not fit this config's model ({mismatch})"
                )
            logging.info("starting from the weights of the codec %s", init_from)
            return self.init_state(self.cfg.train.seed, params=jax.device_put(params, self.param_shardings))
        return loop.start_state(
            self.init_state, self.abstract_params, self.cfg.train, required_items=("state", "config")
        )

    @staticmethod
    def state_step(state: dict) -> int:
        return int(jax.device_get(state["step"]))

    def perf_scalars(self, seconds_per_step: float) -> dict[str, float]:
        d = self.cfg.data
        return {
            PERF_AUDIO_SECONDS: d.global_batch_size
            * d.crop_samples
            / self.cfg.model.sample_rate
            / seconds_per_step
        }


def train(
    cfg: CodecConfig,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    source=None,
    trainer: CodecTrainer | None = None,
    process_start: float | None = None,
    step_timeout_s: float = 0.0,
) -> loop.TrainResult:
    """Trains the codec ``cfg`` in ``workdir``, resuming as ``audiodiff_jax/training/loop.py`` says.

    Args:
      source: a :class:`~audiodiff_jax.codec.data.CropSource` (default: one over
        ``cfg.data.audio_dir``); tests pass synthetic audio here.
      trainer: a :class:`CodecTrainer` of ``cfg`` to reuse (its jitted step is
        compiled once; tests run several short runs with one).
      process_start, step_timeout_s: as ``audiodiff_jax.training.dit_trainer.train``.
    """
    validate(cfg, num_devices=jax.device_count())
    if trainer is not None and trainer.cfg != cfg:
        raise ValueError("trainer was built for another config")
    mesh = trainer.mesh if trainer is not None else (mesh or sharding.make_mesh(cfg.mesh))
    if source is None:
        source = CropSource(
            cfg.data.audio_dir,
            sample_rate=cfg.model.sample_rate,
            channels=cfg.model.audio_channels,
            crop_samples=cfg.data.crop_samples,
            seed=cfg.data.seed,
            min_rms=cfg.data.min_rms,
            balance_subfolders=cfg.data.balance_subfolders,
        )
    trainer = trainer or CodecTrainer(cfg, mesh)
    n_params = model_lib.count_params(trainer.vae.abstract_params())
    logging.info("codec: %.2fM params; %d steps", n_params / 1e6, cfg.train.num_steps)

    def next_batch(step: int) -> jax.Array:
        # Crops are a pure function of (seed, step): no iterator state to checkpoint.
        local = source.batch(step, cfg.data.global_batch_size, jax.process_index(), jax.process_count())
        return jax.make_array_from_process_local_data(trainer.batch_sharding, local)

    return loop.run(
        trainer,
        next_batch,
        workdir,
        loop.LoopConfig.from_config(cfg, step_timeout_s),
        json_items={"config": dataclasses.asdict(cfg), "codec_card": card_dict(cfg)},
        process_start=process_start,
    )
