"""Evaluation during training: bucketed validation loss and demo samples (``eval`` config section).

Every ``eval.every_steps`` steps (and at the last step) the training loop calls
:class:`Evaluator`, which writes to the run's TensorBoard, ``metrics.jsonl`` and the page
``WORKDIR/eval/index.html``:

* **Validation loss in time buckets.** ``eval.num_examples`` held-out windows (the first
  records of ``eval.shards_dir``, cropped from their start, normalized with the training
  dataset card) are each scored once per bucket: bucket ``k`` of ``K`` draws the time
  ``t = (k + u) / K`` with ``u`` fixed by ``eval.seed``, and the noise is fixed by the
  seed too. The same examples, noise and times at every evaluation make the numbers
  comparable across steps, and across runs with the same ``eval`` section and shards.
  The v-prediction loss of each set of weights (``raw`` and each EMA) is logged as
  ``eval/loss[_WEIGHTS]`` (mean over buckets) and ``eval/loss[_WEIGHTS]/t0.0-0.2`` etc.
  The loss is the training objective itself (``dit_trainer.v_loss``), row by row.
* **Demo samples.** For each caption of ``eval.prompts`` and each guidance scale of the
  ``sample`` section, one song of the section's first duration (one training window at
  most) sampled with the EMA weights from its first seed (the same noise at every
  evaluation) by the sampler of ``audiodiff-sample`` (``audiodiff_jax/sampling/generation.py``)
  over the weights in memory, decoded with the codec the dataset card names (or
  ``eval.codec``), written to TensorBoard as audio and a spectrogram image and to the
  page. For the same weights, prompt, seed and settings the song is the one
  ``audiodiff-sample`` makes from the checkpoint of that step, bit for bit.

Everything runs on the training mesh with the current state (no checkpoint round trip);
every process computes, process 0 writes. The training program builds this evaluator
(:func:`from_config`) and hands it to the loop: the trainer imports no sampling.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from audiodiff_jax.codec import lookup as codec_lookup
from audiodiff_jax.core import music, names, paths, report, sharding
from audiodiff_jax.core.config import Config, ConfigError
from audiodiff_jax.core.metrics import MetricWriter
from audiodiff_jax.data import batch as batch_lib
from audiodiff_jax.data import loader as loader_lib
from audiodiff_jax.data.batch import Batch, Conditioning
from audiodiff_jax.data.cards import DatasetCard, latent_scale
from audiodiff_jax.data.records import ShardSource
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.sampling import generation
from audiodiff_jax.training import dit_trainer

_LATENTS = (names.BATCH, names.LENGTH, None)


class ValidationSet(NamedTuple):
    """Fixed validation rows: every example once per time bucket (padding rows have bucket -1)."""

    batch: Batch  # [R, T, C] etc.; R padded to a multiple of the mesh's batch shards
    noise: np.ndarray  # float32 [R, T, C]
    t: np.ndarray  # float32 [R]
    bucket: np.ndarray  # int32 [R]
    record_names: list[str]


def bucket_edges(buckets: int) -> list[tuple[float, float]]:
    return [(k / buckets, (k + 1) / buckets) for k in range(buckets)]


def bucket_tag(lo: float, hi: float) -> str:
    return f"t{lo:.2f}-{hi:.2f}"


def make_validation_set(
    cfg: Config, train_card: DatasetCard, tokenizer: Tokenizer, rows_multiple: int
) -> ValidationSet:
    """Reads ``eval.shards_dir`` and builds the fixed rows (deterministic from the config)."""
    e, window = cfg.eval, cfg.data.window_frames
    source = ShardSource(e.shards_dir)
    held = source.card.codec
    if (
        held.latent_channels != train_card.codec.latent_channels
        or held.latent_rate != train_card.codec.latent_rate
    ):
        raise ConfigError(
            f"eval.shards_dir={e.shards_dir!r} holds latents of codec {held.name!r} "
            f"({held.latent_channels} channels at {held.latent_rate:g} Hz) but data.shards_dir="
            f"{cfg.data.shards_dir!r} has {train_card.codec.name!r} ({train_card.codec.latent_channels} "
            f"at {train_card.codec.latent_rate:g} Hz); give held-out shards made with the same codec"
        )
    n = min(e.num_examples, len(source))
    if n < e.num_examples:
        logging.warning(
            "eval.shards_dir has %d records; evaluating on all of them (eval.num_examples=%d)",
            n,
            e.num_examples,
        )
    mean, inv_std = latent_scale(train_card)
    channels = train_card.codec.latent_channels
    lat = np.zeros((n, window, channels), np.float32)
    mask = np.zeros((n, window), np.float32)
    tokens = np.zeros((n, cfg.model.text.max_len), np.int32)
    start = np.zeros((n,), np.float32)
    total = np.zeros((n,), np.float32)
    controls = np.zeros((3, n), np.float32)  # bpm, key, meter: the records' labels
    record_names = []
    for i in range(n):
        rec = source[i]
        frames = min(rec["latents"].shape[0], window)
        lat[i, :frames] = (rec["latents"][:frames].astype(np.float32) - mean) * inv_std
        mask[i, :frames] = 1.0
        tokens[i] = tokenizer.encode(rec["caption"], cfg.model.text.max_len)
        start[i], total[i] = rec["seconds_start"], rec["seconds_total"]
        controls[:, i] = music.controls_from_labels(rec.get("labels"))
        record_names.append(str(rec.get("id", i)))
    k = e.buckets
    rng = np.random.default_rng(e.seed)
    u = rng.random((k, n), dtype=np.float64)
    noise = rng.standard_normal((k * n, window, channels), dtype=np.float32)
    t = ((np.arange(k)[:, None] + u) / k).astype(np.float32).reshape(-1)
    rows = k * n
    padded = -(-rows // rows_multiple) * rows_multiple

    def tile(a):
        out = np.zeros((padded,) + a.shape[1:], a.dtype)
        out[:rows] = np.tile(a, (k,) + (1,) * (a.ndim - 1))
        return out

    def pad(a):
        out = np.zeros((padded,) + a.shape[1:], a.dtype)
        out[:rows] = a
        return out

    bucket = np.full((padded,), -1, np.int32)
    bucket[:rows] = np.repeat(np.arange(k, dtype=np.int32), n)
    batch = Batch(
        latents=tile(lat),
        loss_mask=tile(mask),
        cond=Conditioning(
            tokens=tile(tokens),
            seconds_start=tile(start),
            seconds_total=tile(total),
            num_frames=tile(mask.sum(axis=1).astype(np.int32)),
            bpm=tile(controls[0]),
            key=tile(controls[1].astype(np.int32)),
            meter=tile(controls[2].astype(np.int32)),
        ),
    )
    return ValidationSet(batch, pad(noise), pad(t), bucket, record_names)


def per_row_loss(apply_fn, params, batch: Batch, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The training objective (``dit_trainer.v_loss``) of each row alone ``[R]``."""
    return dit_trainer.v_loss(
        apply_fn, params, batch.latents, noise, t, batch.cond, batch.loss_mask, per_row=True
    )


def bucket_means(losses: np.ndarray, bucket: np.ndarray, buckets: int) -> list[float]:
    return [float(np.mean(losses[bucket == k])) for k in range(buckets)]


def _put_global(mesh, value: np.ndarray, shard: NamedSharding) -> jax.Array:
    """Every process holds the whole (small, deterministic) array: place it by index."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, shard, lambda idx: value[idx])


@dataclasses.dataclass
class DemoSample:
    prompt_index: int  # in eval.prompts
    prompt: str
    guidance: float
    audio: np.ndarray | None  # [channels, samples], None without a codec
    latents: np.ndarray  # raw (denormalized) [frames, C]


class Evaluator:
    """Runs the ``eval`` section on a trainer's state; called by the loop with ``(state, step)``.

    Args:
      cfg: the run's config.
      mesh: the training mesh.
      apply_fn: ``apply(params, x, t, cond) -> v``.
      weights_of: ``state -> {name: params}``: the sets of weights to score (``raw``,
        ``ema``, ...); the demo samples use ``sample_weights``.
      card: the training dataset card (normalization, codec).
      tokenizer: the training tokenizer.
      workdir: where the page goes (``WORKDIR/eval``).
      codec: decodes the demo samples; None = look up the codec the card names (no
        audio, with one warning, if it cannot be loaded).
    """

    def __init__(
        self,
        cfg: Config,
        mesh: jax.sharding.Mesh,
        apply_fn: Callable[..., jax.Array],
        weights_of: Callable[[Any], dict[str, Any]],
        card: DatasetCard,
        tokenizer: Tokenizer,
        workdir: str,
        *,
        sample_weights: str = "ema",
        codec: Any = None,
    ):
        self.cfg, self.mesh, self.apply_fn, self.weights_of = cfg, mesh, apply_fn, weights_of
        self.card, self.tokenizer, self.workdir = card, tokenizer, workdir
        self.sample_weights = sample_weights
        e = cfg.eval
        self.every = e.every_steps
        self.rows_multiple = sharding.batch_shards(mesh)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.val = make_validation_set(cfg, card, tokenizer, self.rows_multiple) if e.shards_dir else None
        self._val_device = None
        self._loss_fn = None
        self._gen: generation.Generator | None = None
        self._codec = codec
        self._codec_tried = codec is not None
        self.history: list[dict[str, Any]] = []
        self._load_history()

    # -- when -------------------------------------------------------------------------

    def due(self, step: int, num_steps: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == num_steps)

    # -- validation loss ------------------------------------------------------------------

    def _device_val(self):
        if self._val_device is None:
            shard_b = batch_lib.batch_shardings(self.mesh)
            rows_shard = sharding.named_shardings((names.BATCH,), self.mesh)
            lat_shard = sharding.named_shardings(_LATENTS, self.mesh)
            v = self.val
            batch = jax.tree.map(
                lambda sh, a: _put_global(self.mesh, a, sh), shard_b, v.batch._replace(record_index=None)
            )
            self._val_device = (
                batch,
                _put_global(self.mesh, v.noise, lat_shard),
                _put_global(self.mesh, v.t, rows_shard),
            )
            with jax.set_mesh(self.mesh):
                self._loss_fn = jax.jit(
                    lambda p, b, n, t: per_row_loss(self.apply_fn, p, b, n, t), out_shardings=self.replicated
                )
        return self._val_device

    def validation_losses(self, state) -> dict[str, float]:
        """``{tag: loss}`` for every set of weights: the mean over buckets and each bucket."""
        if self.val is None:
            return {}
        batch, noise, t = self._device_val()
        k = self.cfg.eval.buckets
        edges = bucket_edges(k)
        out = {}
        for name, params in self.weights_of(state).items():
            with jax.set_mesh(self.mesh):
                losses = np.asarray(jax.device_get(self._loss_fn(params, batch, noise, t)))
            means = bucket_means(losses, self.val.bucket, k)
            base = names.EVAL_LOSS if name == self.sample_weights else f"{names.EVAL_LOSS}_{name}"
            out[base] = float(np.mean(means))
            for (lo, hi), m in zip(edges, means, strict=True):
                out[f"{base}/{bucket_tag(lo, hi)}"] = m
        return out

    # -- demo samples -----------------------------------------------------------------------

    def _codec_or_none(self):
        if not self._codec_tried:
            self._codec_tried = True
            given = self.cfg.eval.codec  # a config value may name code; the card's name is data
            name = given or self.card.codec.name
            try:
                codec = codec_lookup.codec_by_name(name, allow_code=bool(given), option="--config.eval.codec")
                want = self.card.codec.latent_channels
                if codec.card.latent_channels != want:
                    raise ValueError(f"it has {codec.card.latent_channels} latent channels, the data {want}")
                self._codec = codec
            except Exception as e:  # noqa: BLE001 (any codec failure only drops the audio)
                logging.warning(
                    "eval: demo samples without audio: codec %r cannot decode them (%s); set eval.codec",
                    name,
                    _first_line(e),
                )
        return self._codec

    def demo_params(self) -> list[generation.SampleParams]:
        """One output per caption of ``eval.prompts`` and guidance scale of the ``sample``
        section, with that section's other settings (first value of each axis), one
        training window long at most."""
        sample = self.cfg.sample
        window_s = self.cfg.data.window_frames / float(self.card.codec.latent_rate)
        seconds = min(sample.seconds[0], window_s)
        return [
            generation.SampleParams.from_section(prompt, sample, seconds=seconds, guidance=g)
            for prompt in self.cfg.eval.prompts
            for g in sample.guidance
        ]

    def _generator(self) -> generation.Generator:
        """The sampler of ``audiodiff-sample`` over this run's weights in memory (built once:
        its compiled programs are kept across evaluations)."""
        if self._gen is None:
            shortest = min((p.seconds for p in self.demo_params()), default=self.cfg.sample.min_seconds)
            self._gen = generation.Generator(
                self.cfg,
                self.card,
                self.tokenizer,
                self._codec_or_none(),
                weights=self.sample_weights,
                mesh=self.mesh,
                min_seconds=min(self.cfg.sample.min_seconds, shortest),
            )
        return self._gen

    def demo_samples(self, state, step: int = 0) -> list[DemoSample]:
        requests = self.demo_params()
        if not requests:
            return []
        gen = self._generator()
        gen.use_weights(step, self.sample_weights, self.weights_of(state)[self.sample_weights])
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(requests):
            groups.setdefault(gen.group_key(p, gen.frames_for(p.seconds)), []).append(i)
        latents: dict[int, np.ndarray] = {}
        for rows in groups.values():
            out = gen.generate_latents([requests[i] for i in rows])
            latents.update(zip(rows, out.latents, strict=True))
        prompts = list(self.cfg.eval.prompts)
        samples = []
        for i, p in enumerate(requests):
            audio = gen.decode(latents[i], seconds=p.seconds) if gen.codec is not None else None
            samples.append(DemoSample(prompts.index(p.prompt), p.prompt, p.guidance, audio, latents[i]))
        return samples

    # -- the hook the loop calls ----------------------------------------------------------

    def __call__(self, state, step: int, writer: MetricWriter) -> dict[str, float]:
        t0 = time.perf_counter()
        scalars = self.validation_losses(state)
        samples = self.demo_samples(state, step)
        scalars[names.EVAL_TIME] = time.perf_counter() - t0
        writer.write_scalars(step, scalars)
        if jax.process_index() == 0:
            self._write(step, scalars, samples, writer)
        shown = {k: v for k, v in scalars.items() if "/t" not in k}
        logging.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        return scalars

    # -- outputs (process 0) ------------------------------------------------------------------

    @property
    def page_dir(self) -> str:
        return os.path.join(self.workdir, "eval")

    def _load_history(self) -> None:
        path = os.path.join(self.page_dir, "history.json")
        if epath.Path(path).exists():  # local or gs://
            self.history = json.loads(epath.Path(path).read_text())

    def _write(
        self, step: int, scalars: dict[str, float], samples: list[DemoSample], writer: MetricWriter
    ) -> None:
        step_dir = os.path.join(self.page_dir, f"step_{step:08d}")
        epath.Path(step_dir).mkdir(parents=True, exist_ok=True)
        entries = []
        for s in samples:
            name = f"{s.prompt_index:02d}_g{s.guidance:g}"
            tag = f"eval/sample_{name}"
            entry = {"prompt": s.prompt, "guidance": s.guidance, "tag": tag}
            if s.audio is not None:
                rate = self._codec.card.sample_rate
                wav, png = f"{name}.wav", f"{name}.png"
                generation.write_wav(os.path.join(step_dir, wav), s.audio, rate)
                report.write_spectrogram_png(os.path.join(step_dir, png), s.audio, rate)
                writer.write_audio(tag, s.audio, step, rate)
                writer.write_figure(tag + "/spectrogram", report.spectrogram_figure(s.audio, rate), step)
                entry.update(wav=os.path.relpath(os.path.join(step_dir, wav), self.page_dir))
                entry.update(png=os.path.relpath(os.path.join(step_dir, png), self.page_dir))
            else:
                entry["latent_rms"] = float(np.sqrt(np.mean(np.square(s.latents))))
            entries.append(entry)
        self.history = [h for h in self.history if h["step"] != step]
        self.history.append({"step": step, "scalars": scalars, "samples": entries})
        self.history.sort(key=lambda h: h["step"])
        paths.atomic_write(
            os.path.join(self.page_dir, "history.json"), json.dumps(self.history, indent=1).encode("utf-8")
        )
        if self.val is not None:
            report.save_figure_png(self._loss_figure(), os.path.join(self.page_dir, "loss_by_bucket.png"))
        report.render_page(
            "train_eval.html",
            os.path.join(self.page_dir, "index.html"),
            workdir=self.workdir,
            history=list(reversed(self.history)),
            has_loss=self.val is not None,
            eval_cfg=dataclasses.asdict(self.cfg.eval),
        )
        writer.flush()

    def _loss_figure(self):
        from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib only where a picture is drawn)

        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        edges = bucket_edges(self.cfg.eval.buckets)
        steps = [h["step"] for h in self.history]
        for lo, hi in edges:
            key = f"{names.EVAL_LOSS}/{bucket_tag(lo, hi)}"
            ax.plot(
                steps,
                [h["scalars"].get(key, np.nan) for h in self.history],
                marker="o",
                label=f"t in [{lo:.2f}, {hi:.2f})",
            )
        ax.plot(
            steps,
            [h["scalars"].get(names.EVAL_LOSS, np.nan) for h in self.history],
            "k--",
            lw=2,
            label="mean",
        )
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation v-loss ({self.sample_weights} weights)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def from_config(
    cfg: Config, trainer: dit_trainer.Trainer, card: DatasetCard, workdir: str
) -> Evaluator | None:
    """The ``eval`` section's evaluation of a DiT run (None when ``eval.every_steps`` is 0).

    The factory ``audiodiff-train`` hands to ``dit_trainer.train(make_evaluator=...)``,
    which calls it once the trainer exists, with the run's dataset card and workdir.
    """
    if not cfg.eval.every_steps:
        return None
    return Evaluator(
        cfg,
        trainer.mesh,
        trainer.model.apply,
        trainer.weight_sets,
        card,
        Tokenizer(loader_lib.resolve_tokenizer_path(cfg.data, card)),
        workdir,
        sample_weights="ema",
    )
