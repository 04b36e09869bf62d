"""The weights source: where sampling's weights come from (docs/DESIGN.md, contract 4).

One place turns a run's checkpoint step or an export folder (``export.py``), local or
``gs://``, into what a sampler needs in memory: the resolved config, the dataset card,
the tokenizer, and weight sets by name (``raw``, ``ema``, ``ema0.9999``...), restored
onto whatever shardings the caller asks for. Every "checkpoint or export?" question of
the project is asked here, and nowhere else:

- :func:`find_checkpoint` resolves a path (run workdir, checkpoints folder, step folder
  or export) to a step;
- :class:`WeightsSource` reads a step's config, card and tokenizer, says which weight
  sets each step holds, and restores them (sweeps restore several steps of one run);
- :func:`restore_params` restores one weight set of a run or an export for training's
  ``train.init_from``;
- :meth:`WeightsSource.identity` names a weight set by its content hash: what an
  adapter records of its base, and what sampling checks an adapter against;
- :func:`open_adapter` reads an adapter from its exported folder
  (``adapter_export.py``) or from an adapter run's checkpoint;
- :func:`configdict_like` starts the config of a run built on saved weights (an
  adapter run on its base, a distillation on its teacher).

The sampler itself (``audiodiff_jax/sampling/generation.py``) takes the result as
arrays and objects and never reads a path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections
from absl import logging
from etils import epath

from audiodiff_jax.checkpoints import adapter_export, checkpointing, export, integrity
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import optim
from audiodiff_jax.core.errors import GenerationError
from audiodiff_jax.data import loader
from audiodiff_jax.data.cards import DatasetCard, ShardError
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.model import make_model
from audiodiff_jax.model.adapters import Adapter, AdapterSpec

LATEST = "latest"
# Weights shipped in the package, by name (README commands use them from any folder).
SHIPPED = {
    "demo": str(epath.Path(__file__).parent.parent / "demo_weights"),
    # The 8-step student distilled from them (training/distill_trainer.py).
    "demo_student": str(epath.Path(__file__).parent.parent / "demo_student"),
}
# The JSON item of an adapter run's checkpoints: {"spec": ..., "base": identity}.
ADAPTER_ITEM = "adapter"
DISTILL_ITEM = "distill"  # a distilled student's checkpoints: method, steps, teacher identity


def _export_meta(path) -> dict:
    try:
        return export.read_meta(str(path))
    except export.ExportError as e:
        raise GenerationError(str(e)) from e


def resolve(path: str) -> str:
    """``path``, or the shipped weights it names when no such path exists (``demo``: the
    DiT of ``audiodiff_jax/demo_weights``, an export; ``demo_student``: its few-step student)."""
    path = str(path)
    return SHIPPED[path] if path in SHIPPED and not epath.Path(path).exists() else path


def find_checkpoint(path: str, step: int | None = None) -> tuple[epath.Path, int]:
    """Resolves ``path`` (a run workdir, its ``checkpoints`` folder, one step folder, or
    an export folder).

    Returns:
      (step folder, step). The latest complete step unless ``step`` is given. For an
      export: (the export folder, the step its weights came from).

    Raises:
      GenerationError: the path is missing, holds no complete checkpoint, lacks the
        step, or the step folder lacks an item sampling needs.
    """
    path = resolve(path)
    if export.is_export(path):
        meta = _export_meta(path)
        if step is not None and step != meta["step"]:
            raise GenerationError(
                f"{path} is an export of step {meta['step']}, not step {step}; give no step for an export"
            )
        return epath.Path(path), int(meta["step"])
    try:
        return checkpointing.find_step(path, step, required_items=("state", "config", "dataset_card"))
    except checkpointing.CheckpointNotFound as e:
        hint = "; train a few steps first" if "no complete checkpoint" in str(e) else ""
        raise GenerationError(f"{e}{hint}") from e


def _item(step_dir: epath.Path, name: str) -> dict:
    """JSON item ``name`` of a checkpoint step, or ``name.json`` of an export."""
    try:
        if export.is_export(step_dir):
            return export.read_json_item(str(step_dir), name)
        return checkpointing.read_json_item(step_dir / name)
    except (export.ExportError, checkpointing.CheckpointNotFound) as e:
        raise GenerationError(str(e)) from e


def _has_item(step_dir: epath.Path, name: str) -> bool:
    return (step_dir / (f"{name}.json" if export.is_export(step_dir) else name)).exists()


def json_items(step_dir: epath.Path) -> dict[str, dict]:
    """The JSON items an export carries (``export.JSON_ITEMS``) of a checkpoint step or an export."""
    return {name: _item(step_dir, name) for name in export.JSON_ITEMS}


def read_checkpoint_meta(step_dir: epath.Path) -> tuple[config_lib.Config, DatasetCard]:
    """The resolved config and the dataset card saved with a checkpoint step (or an export)."""
    try:
        cfg = config_lib.from_configdict(_item(step_dir, "config"))
    except config_lib.ConfigError as e:
        raise GenerationError(f"config saved in {step_dir / 'config'}: {e}") from e
    try:
        card = DatasetCard.from_dict(_item(step_dir, "dataset_card"), where=str(step_dir))
    except ShardError as e:
        raise GenerationError(f"dataset card saved in {step_dir / 'dataset_card'}: {e}") from e
    return cfg, card


def resolve_steps(path: str, wanted: Sequence[int | str | None]) -> list[int]:
    """Checkpoint steps by number or ``latest`` (None too), in order, without repeats.

    Raises:
      GenerationError: a step that is not a complete checkpoint of ``path``, listing those that are.
    """
    steps = []
    for w in wanted or [None]:
        step = None if w in (None, LATEST) else int(w)
        _, s = find_checkpoint(path, step)
        if s not in steps:
            steps.append(s)
    return steps


class WeightsSource:
    """The checkpoints of one run, or one export, opened for sampling.

    Args:
      path: run workdir, its checkpoints folder, a step folder, or an export folder
        (local or ``gs://``); or the name of shipped weights (:func:`resolve`: ``demo``).
      step: the step whose config and card describe the model (default: the latest
        complete one; an export has one step).

    Attributes:
      path: ``path`` as given (what manifests record as the checkpoint).
      step, step_dir: the step opened and its folder (the export folder for an export).
      cfg, card: the config and dataset card saved with it.
      export_meta: ``export.json`` of an export, None for a run's checkpoints.
    """

    def __init__(self, path: str, step: int | None = None):
        self.path = resolve(path)
        if adapter_export.is_adapter_folder(self.path):
            raise GenerationError(
                f"{self.path} is an adapter, not a model: give its base as the weights and the "
                f"adapter with --adapters={self.path}"
            )
        self.step_dir, self.step = find_checkpoint(self.path, step)
        self.export_meta = _export_meta(self.path) if export.is_export(self.path) else None
        self.cfg, self.card = read_checkpoint_meta(self.step_dir)
        if self.cfg.adapters.base:
            raise GenerationError(
                f"{self.path} is an adapter run (base {self.cfg.adapters.base}): give its base as the "
                f"weights and the run with --adapters={self.path}"
            )
        self._hashes: dict[tuple[int, str], str] = {}

    @property
    def is_export(self) -> bool:
        return self.export_meta is not None

    def describe(self, step: int | None = None) -> str:
        """How errors name what holds the weights of ``step``."""
        if self.is_export:
            return f"export {self.path}"
        return f"checkpoint step {self.step if step is None else step}"

    # -- what it holds --------------------------------------------------------------

    def canonical_weights(self, name: str) -> str:
        """``ema`` -> ``ema<optim.ema_decay>`` of the saved config; ``ema0.99990`` ->
        ``ema0.9999``; ``raw`` stays."""
        if name == optim.EMA:
            return optim.ema_name(self.cfg.optim.ema_decay)
        return optim.canonical_weights(name)

    def default_weights(self) -> str:
        """An export's own weight set, else the first of the saved config's ``sample.weights``."""
        return self.export_meta["weights"] if self.is_export else self.cfg.sample.weights[0]

    def sample_section(self) -> config_lib.SampleConfig:
        """The saved ``sample`` section; an export's weights replace its ``weights`` axis
        (an export holds one set: that one, whatever its config's section says)."""
        sample = self.cfg.sample
        if self.is_export:
            sample = config_lib.replace(sample, weights=(self.export_meta["weights"],))
        return sample

    def step_dir_of(self, step: int) -> epath.Path:
        """The folder of checkpoint ``step`` of the same run (same model and codec)."""
        if step == self.step:
            return self.step_dir
        step_dir, _ = find_checkpoint(self.path, step)
        cfg, card = read_checkpoint_meta(step_dir)
        if cfg.model != self.cfg.model or card.codec != self.card.codec:
            raise GenerationError(
                f"checkpoint {step_dir} has another model or codec than {self.step_dir}: "
                "one sweep samples the checkpoints of one run"
            )
        return step_dir

    def available_weights(self, step: int | None = None) -> list[str]:
        """The weight sets checkpoint ``step`` holds, by canonical name."""
        if self.is_export:
            return [self.canonical_weights(n) for n in export.answers_to(self.export_meta)]
        step_dir = self.step_dir_of(self.step if step is None else step)
        try:
            paths = checkpointing.weight_paths(step_dir)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
            raise GenerationError(
                f"could not read the weights of {step_dir} "
                f"(half-written or damaged checkpoint?): {type(e).__name__}: {e}"
            ) from e
        return list(dict.fromkeys(self.canonical_weights(n) for n in paths))

    def check_weights(self, step: int | None, names: Sequence[str], what: str = "weights") -> None:
        """Raises GenerationError when checkpoint ``step`` lacks one of ``names`` (before
        anything is restored), naming it and the sets the step holds."""
        have = self.available_weights(step)
        for name in names:
            if self.canonical_weights(name) not in have:
                raise GenerationError(
                    f"{what}={name}: {self.describe(step)} holds no such weights; it holds {', '.join(have)}"
                )

    # -- reading --------------------------------------------------------------------

    def tokenizer(self, path: str | None = None) -> Tokenizer:
        """``path`` if given, else the copy saved with the weights, else (checkpoints
        written before the tokenizer item existed) the one the training data used."""
        if path:
            tokenizer = Tokenizer(path)
        elif _has_item(self.step_dir, "tokenizer"):
            try:
                tokenizer = Tokenizer.from_json(
                    _item(self.step_dir, "tokenizer"), where=str(self.step_dir / "tokenizer")
                )
            except ValueError as e:
                raise GenerationError(str(e)) from e
        else:
            try:
                tokenizer = Tokenizer(loader.resolve_tokenizer_path(self.cfg.data, self.card))
            except config_lib.ConfigError as e:
                raise GenerationError(f"{e}; pass the tokenizer file explicitly (--tokenizer)") from e
        if tokenizer.vocab_size > self.cfg.model.text.vocab_size:
            raise GenerationError(
                f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than the "
                f"model's model.text.vocab_size={self.cfg.model.text.vocab_size}: not the run's tokenizer"
            )
        return tokenizer

    def host_params(self, step: int | None, name: str) -> Any:
        """One weight set as host numpy arrays (no mesh), checked against the saved model."""
        step = self.step if step is None else step
        abstract = make_model(self.cfg.model).abstract_params() if self.is_export else None
        return self.restore(step, [name], abstract)[self.canonical_weights(name)]

    def identity(self, step: int | None, name: str, params: Any = None) -> dict[str, Any]:
        """What an adapter records of the base it is trained on, and what sampling checks
        it against: the weight set's content hash (``export.content_hash``) and a name.
        The hash comes from an export's description, or from ``params`` (host arrays of
        this set) when given, else from reading the set once (cached)."""
        step = self.step if step is None else step
        canonical = self.canonical_weights(name)
        key = (step, canonical)
        if key not in self._hashes:
            if self.is_export and self.export_meta.get("content_hash"):
                self._hashes[key] = self.export_meta["content_hash"]
            else:
                self._hashes[key] = export.content_hash(
                    params if params is not None else self.host_params(step, canonical)
                )
        where = f"export {self.path}" if self.is_export else f"{self.path} step {step}"
        return {
            "name": f"{where}, weights {canonical}",
            "hash": self._hashes[key],
            "path": self.path,
            "step": int(step),
            "weights": canonical,
        }

    def check_adapter(self, adapter: Adapter, step: int | None, name: str) -> None:
        """Raises GenerationError when ``adapter`` was trained on other weights than the
        set ``name`` of ``step``, naming both."""
        mine = self.identity(step, name)
        if adapter.base.get("hash") != mine["hash"]:
            raise GenerationError(
                f"adapter {adapter.name} was trained on {adapter.base.get('name')} "
                f"({export.short_hash(str(adapter.base.get('hash')))}), not on {mine['name']} "
                f"({export.short_hash(mine['hash'])}): an adapter works only on its own base"
            )

    def restore(self, step: int | None, names: Sequence[str], abstract_params: Any) -> dict[str, Any]:
        """Restores weight sets of checkpoint ``step`` in one read (no optimizer state) onto
        the shardings of ``abstract_params`` (None: host arrays), checked against the
        hashes written with them; returns canonical name -> params.

        Raises:
          GenerationError: weights the step lacks, or that differ from their hashes (named).
        """
        wanted = list(dict.fromkeys(self.canonical_weights(n) for n in names))
        step_dir = self.step_dir_of(self.step if step is None else step)
        try:
            if self.is_export:
                params = export.load_params(self.path, abstract_params)
                return dict.fromkeys(wanted, params)
            return checkpointing.restore_weight_sets(step_dir, wanted, abstract_params)
        except (checkpointing.WeightsNotFound, export.ExportError, integrity.IntegrityError) as e:
            raise GenerationError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
            raise GenerationError(
                f"could not restore the weights {', '.join(wanted)} of {step_dir} "
                f"(half-written or damaged checkpoint?): {type(e).__name__}: {e}"
            ) from e


def restore_params(
    path: str,
    abstract_params: Any,
    *,
    use_ema: bool = False,
    weights: str | None = None,
    required_items: tuple[str, ...] = ("state",),
) -> tuple[Any, int]:
    """One weight set (no optimizer state) of a run's checkpoint (any trainer's: the
    DiT's, the codec's) or of an export, for ``train.init_from``.

    Returns:
      (params, step they came from).

    Raises:
      checkpointing.CheckpointNotFound: no checkpoint at ``path``, it lacks the weights,
        or an export's names or shapes differ from ``abstract_params``
        (:class:`checkpointing.WeightsUnusable`).
    """
    path = resolve(path)
    if export.is_export(path):
        try:
            meta = export.read_meta(path)
            params = export.load_params(path, abstract_params)
        except export.ExportError as e:
            raise checkpointing.WeightsUnusable(str(e)) from e
        logging.info("restored weights %s of step %d from the export %s", meta["weights"], meta["step"], path)
        return params, int(meta["step"])
    return checkpointing.restore_params(
        path, abstract_params, use_ema=use_ema, weights=weights, required_items=required_items
    )


def configdict_like(path: str):
    """The default config with what a run on the weights at ``path`` must share with them:
    the model, diffusion and sampling sections and the training window and batch (a
    run's workdir or step, an export, or shipped weights' name). Returns the
    ``ml_collections.ConfigDict`` and the saved :class:`config_lib.Config`."""
    saved = WeightsSource(path).cfg
    config = config_lib.default_configdict()
    for section in ("model", "diffusion", "sample"):
        config[section] = ml_collections.ConfigDict(dataclasses.asdict(getattr(saved, section)))
    config.data.window_frames = saved.data.window_frames
    config.data.global_batch_size = saved.data.global_batch_size
    return config, saved


def _is_adapter_run(path: str) -> tuple[epath.Path, int, config_lib.Config] | None:
    """(step folder, step, config) of an adapter run's latest checkpoint; None for anything else."""
    if export.is_export(path) or adapter_export.is_adapter_folder(path):
        return None
    try:
        step_dir, step = find_checkpoint(path)
        cfg, _ = read_checkpoint_meta(step_dir)
    except GenerationError:
        return None
    return (step_dir, step, cfg) if cfg.adapters.base else None


def is_adapter(path: str) -> bool:
    """Whether ``path`` is an adapter: an exported adapter folder or an adapter run."""
    return adapter_export.is_adapter_folder(path) or _is_adapter_run(path) is not None


def open_adapter(path: str, weights: str | None = None, step: int | None = None) -> tuple[Adapter, dict]:
    """An adapter as host arrays, from its exported folder or from an adapter run's
    checkpoint (``step``, default the latest; ``weights``, default the run's
    ``sample.weights[0]``, i.e. the EMA).

    Returns:
      (the adapter, where it came from: ``weights``, ``step``, ``source``).

    Raises:
      GenerationError: not an adapter, a truncated or damaged file, a missing weight set.
    """
    try:
        if adapter_export.is_adapter_folder(path):
            meta = adapter_export.read_meta(path)
            return adapter_export.read(path), {
                "weights": meta["weights"],
                "step": meta["step"],
                "source": meta["source"],
            }
    except adapter_export.AdapterError as e:
        raise GenerationError(str(e)) from e
    if export.is_export(path):
        raise GenerationError(f"{path} is an export of a whole model, not an adapter")
    step_dir, step = find_checkpoint(path, step)
    cfg, _ = read_checkpoint_meta(step_dir)
    if not cfg.adapters.base:
        raise GenerationError(f"{path} is neither an adapter folder nor an adapter run")
    if not _has_item(step_dir, ADAPTER_ITEM):
        raise GenerationError(f"checkpoint {step_dir} of an adapter run lacks its '{ADAPTER_ITEM}' item")
    item = _item(step_dir, ADAPTER_ITEM)
    wanted = weights or cfg.sample.weights[0]
    name = optim.ema_name(cfg.optim.ema_decay) if wanted == optim.EMA else optim.canonical_weights(wanted)
    try:
        params = checkpointing.restore_weight_sets(step_dir, [name], None)[name]
    except checkpointing.WeightsNotFound as e:
        raise GenerationError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
        raise GenerationError(
            f"could not restore the adapter {name} of {step_dir} (half-written or damaged checkpoint?): "
            f"{type(e).__name__}: {e}"
        ) from e
    s = item["spec"]
    spec = AdapterSpec(int(s["rank"]), float(s["alpha"]), tuple(s["targets"]))
    label = f"{epath.Path(path).name} step {step}"
    adapter = Adapter(params, spec, dict(item["base"]), label)
    try:
        adapter_export.check_factors(params, spec, str(step_dir))
    except adapter_export.AdapterError as e:
        raise GenerationError(str(e)) from e
    return adapter, {"weights": name, "step": step, "source": str(step_dir)}


def saved_identity(workdir: str, item: str, key: str) -> dict | None:
    """``item[key]`` (a weights identity) of the newest checkpoint in ``workdir`` that has
    the JSON item ``item``; None when there is none yet."""
    try:
        step_dir, _ = checkpointing.find_step(workdir, required_items=(item,))
        return dict(_item(step_dir, item)[key])
    except (checkpointing.CheckpointNotFound, GenerationError, KeyError, TypeError):
        return None


class AdapterStack(NamedTuple):
    """Adapters stacked on a model's weights, each at its scale (one value of sampling's
    ``--adapters``)."""

    text: str  # "PATH@SCALE,PATH@SCALE" as manifests record it; "" = no adapter
    layers: tuple[tuple[Adapter, float], ...] = ()

    def describe(self) -> list[dict[str, Any]]:
        """What a manifest row records of each adapter."""
        return [
            {"name": a.name, "scale": scale, "rank": a.spec.rank, "base_hash": a.base.get("hash")}
            for a, scale in self.layers
        ]


NO_ADAPTERS = AdapterStack("")
NONE_WORD = "none"


def parse_adapter_stack(text: str) -> list[tuple[str, float]]:
    """``PATH[@SCALE],...`` -> ``[(path, scale)]`` (scale 1 when not given); ``none`` or
    "" -> []. Raises GenerationError naming a bad scale."""
    text = text.strip()
    if text in ("", NONE_WORD):
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        path, sep, scale_text = item.rpartition("@")
        if not sep:
            path, scale_text = item, "1"
        try:
            scale = float(scale_text)
        except ValueError:
            raise GenerationError(
                f"--adapters={text}: {item!r}: the scale after @ must be a number (PATH[@SCALE])"
            ) from None
        if not path or not math.isfinite(scale):
            raise GenerationError(f"--adapters={text}: {item!r} is not PATH[@SCALE] with a finite scale")
        out.append((path, scale))
    return out


def open_adapter_stacks(texts: Sequence[str]) -> list[AdapterStack]:
    """The stacks of several ``--adapters`` values (each adapter read once), in order,
    without repeats; none given -> ``[NO_ADAPTERS]``."""
    cache: dict[str, Adapter] = {}
    stacks: dict[str, AdapterStack] = {}
    for text in texts or [""]:
        layers = []
        for path, scale in parse_adapter_stack(text):
            if path not in cache:
                cache[path] = open_adapter(path)[0]
            layers.append((cache[path], scale))
        key = ",".join(f"{path}@{scale:g}" for path, scale in parse_adapter_stack(text))
        stacks.setdefault(key, AdapterStack(key, tuple(layers)))
    return list(stacks.values())
