"""Orbax checkpoints of a training run (docs/DESIGN.md, contract 4).

A run's checkpoints live in ``WORKDIR/checkpoints``, one Orbax step directory per
saved step, each holding these items:

- ``state``: the train state (params, optimizer state, EMA params, step, RNG), saved
  sharded from every process. Its weight sets are restorable by name, without the
  optimizer state (:func:`restore_weight_sets`): ``raw`` (``params``), ``ema`` and
  ``ema<optim.ema_decay>`` (``ema_params``), and ``ema<decay>`` for each of
  ``optim.extra_ema_decays`` (``extra_ema/<name>``; absent in checkpoints written
  before there were several EMAs, which restore as before);
- ``data_iter``: the Grain iterator state of every process (one JSON file each);
- ``config``: the resolved config as JSON;
- ``dataset_card``: the dataset card of the latents the run trained on;
- ``tokenizer``: the run's sentencepiece model (base64 in JSON, with its sha256), so
  sampling needs only the checkpoint, not the shards folder it was trained from;
- ``hashes``: the SHA-256 of every part of every array of ``state``, one file per
  process (``integrity.py``). Every restore checks what it read against them; steps
  written before they existed restore unchecked, with one log line.

Saves are asynchronous: ``save`` returns once device arrays are copied to host memory
and the write goes on in the background. Orbax writes each step into a temporary
directory and renames it when every process has finished, so a step that was being
written when a job died is never listed as complete. The hashes are written by a
commit future of the same save, so a complete step always has them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from audiodiff_jax.checkpoints import integrity
from audiodiff_jax.core import optim, paths
from audiodiff_jax.core.errors import UserError

ITEMS = ("state", "data_iter", "config", "dataset_card", "tokenizer", integrity.ITEM)


def _absolute(path: str | os.PathLike) -> epath.Path:
    """``path`` made absolute when local: Orbax (TensorStore) reads and writes arrays only
    under absolute paths, and a run given ``--workdir=runs/x`` must work."""
    return epath.Path(path if paths.is_remote(path) else os.path.abspath(path))


def checkpoint_dir(workdir: str) -> epath.Path:
    return _absolute(workdir) / "checkpoints"


class RunCheckpointer:
    """Saves and restores one run's checkpoints: the train state, optionally every
    process's Grain iterator (item ``data_iter``), and JSON items (config, cards)."""

    def __init__(
        self,
        workdir: str,
        *,
        keep_last: int,
        keep_every: int,
        async_save: bool,
        item_names: tuple[str, ...] = ITEMS,
        content_hashes: bool = True,
    ):
        """``content_hashes=False`` writes steps without the ``hashes`` item, as before
        they existed (``benchmarks/integrity_bench.py`` compares the two)."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.content_hashes = content_hashes
        self.async_save = async_save
        if content_hashes and integrity.ITEM not in item_names:
            item_names = (*item_names, integrity.ITEM)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=item_names)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter: grain.DatasetIterator | None = None,
        json_items: dict[str, dict] | None = None,
    ) -> bool:
        """Starts saving ``step``; returns whether a save was started.

        ``json_items`` maps item names to JSON objects (e.g. ``config``, ``dataset_card``,
        ``tokenizer`` = ``audiodiff_jax.data.tokenizer.Tokenizer.to_json()``). The
        hashes of ``state`` are computed in the background from Orbax's host copy and
        written with the step (``integrity.py``)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        for name, value in (json_items or {}).items():
            items[name] = ocp.args.JsonSave(value)
        # Asynchronous saves hash once the call returned, beside the training steps.
        collector = integrity.begin(state, defer=self.async_save) if self.content_hashes else None
        if collector is not None:
            items[integrity.ITEM] = integrity.HashesSave(collector)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except BaseException as e:
            if collector is not None:
                integrity.end(collector, started=False, error=e)
            raise
        if collector is not None:
            integrity.end(collector, started=saved)
        if saved:
            logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator | None = None) -> Any:
        """Restores the train state onto the shardings of ``abstract_state`` (the
        state's fields or a subset of them), and the iterator (if given) in place.
        Returns the state, checked against the step's hashes.

        Raises:
          integrity.IntegrityError: an array differs from its hash (named).
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
        integrity.verify_step(
            self.directory / str(step), state, where=f"checkpoint step {step} in {self.directory}"
        )
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CheckpointNotFound(UserError, FileNotFoundError):
    """A checkpoint path that is missing, empty, lacks the step, or is incomplete."""


class WeightsUnusable(CheckpointNotFound):
    """Weights that are there but cannot be used: an export whose names or shapes differ
    from the model's. A :class:`CheckpointNotFound`, so that a caller that names the
    field it came from (``train.init_from``) reports it the same way."""


def find_step(
    path: str, step: int | None = None, *, required_items: tuple[str, ...] = ("state",)
) -> tuple[epath.Path, int]:
    """Resolves ``path`` (a run workdir, its ``checkpoints`` folder or one step folder).

    Returns:
      (step folder, step): the latest complete step unless ``step`` is given.

    Raises:
      CheckpointNotFound: the path is missing, holds no complete checkpoint (naming
        unfinished saves), lacks ``step``, or the step folder lacks a required item.
    """
    p = _absolute(path)
    if not p.exists():
        raise CheckpointNotFound(f"checkpoint path {path!r} does not exist")
    if p.name.isdigit() and (p / "state").exists():
        root, steps = p.parent, [int(p.name)]
        if step is not None and step != int(p.name):
            raise CheckpointNotFound(f"{path!r} is the step folder of step {p.name}, not step {step}")
    else:
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        steps = sorted(ocp.utils.checkpoint_steps(root)) if root.is_dir() else []
        if not steps:
            partial = sorted(d.name for d in root.iterdir() if "tmp" in d.name) if root.is_dir() else []
            hint = f" (unfinished saves: {', '.join(partial)})" if partial else ""
            raise CheckpointNotFound(f"no complete checkpoint in {root}{hint}")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise CheckpointNotFound(f"checkpoint step {step} is not in {root}; complete steps: {steps}")
    step_dir = root / str(chosen)
    missing = [item for item in required_items if not (step_dir / item).is_dir()]
    if missing:
        raise CheckpointNotFound(
            f"checkpoint {step_dir} is incomplete (half-written or damaged): missing item(s) {missing}"
        )
    return step_dir, chosen


class WeightsNotFound(UserError, KeyError):
    """A weight set the checkpoint does not hold; the message lists those it does."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _state_tree(step_dir: epath.Path) -> dict:
    """The tree of the ``state`` item's metadata (no array is read)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(step_dir / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    return dict(tree)


def saved_state_fields(directory: epath.Path, step: int) -> set[str]:
    """Top-level fields of the ``state`` item saved at ``step`` in a checkpoints folder."""
    return set(_state_tree(epath.Path(directory) / str(step)))


def weight_paths(step_dir: epath.Path) -> dict[str, tuple[str, ...]]:
    """Every weight set a checkpoint step holds: name -> path in its ``state`` tree.

    ``raw`` -> ``params``; ``ema`` and ``ema<optim.ema_decay>`` (from the config saved
    with the step, when it has one) -> ``ema_params``; each extra EMA's name ->
    ``extra_ema/<name>``.
    """
    tree = _state_tree(step_dir)
    out: dict[str, tuple[str, ...]] = {}
    if "params" in tree:
        out[optim.RAW] = ("params",)
    if "ema_params" in tree:
        out[optim.EMA] = ("ema_params",)
        decay = None
        if (step_dir / "config").is_dir():
            try:
                decay = read_json_item(step_dir / "config").get("optim", {}).get("ema_decay")
            except CheckpointNotFound:
                decay = None
        if isinstance(decay, int | float):
            out[optim.ema_name(decay)] = ("ema_params",)
    for name in tree.get("extra_ema") or {}:
        out[name] = ("extra_ema", name)
    return out


def restore_weight_sets(
    step_dir: epath.Path, names: list[str] | tuple[str, ...], abstract_params: Any | None
) -> dict[str, Any]:
    """Restores weight sets of one checkpoint step by name in one read, and nothing else
    (no optimizer state, no step, no RNG), onto the shardings of ``abstract_params``.

    Args:
      step_dir: a complete step folder (:func:`find_step`).
      names: weight set names (``raw``, ``ema``, ``ema0.9999``...; see :func:`weight_paths`).
      abstract_params: params pytree of jax.ShapeDtypeStruct (with shardings: any mesh;
        without: single-device arrays); None: host numpy arrays in the saved shapes.

    Returns:
      name -> params (names of one set, e.g. ``ema`` and ``ema0.999``, share the arrays).

    Raises:
      WeightsNotFound: a name the step does not hold, listing those it does.
      integrity.IntegrityError: restored weights differ from the step's hashes (named).
    """
    paths = weight_paths(step_dir)
    wanted = {}
    for name in names:
        key = optim.canonical_weights(name)
        if key not in paths:
            raise WeightsNotFound(
                f"checkpoint {step_dir} holds no weights {name!r}; it holds {', '.join(paths)}"
            )
        wanted[name] = paths[key]
    item: dict[str, Any] = {}
    args: dict[str, Any] = {}
    if abstract_params is None:
        tree = _state_tree(step_dir)
    for path in dict.fromkeys(wanted.values()):
        if abstract_params is None:
            sub = tree
            for k in path:
                sub = sub[k]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
            rargs = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub)
        else:
            target, rargs = abstract_params, ocp.checkpoint_utils.construct_restore_args(abstract_params)
        _put(item, path, target)
        _put(args, path, rargs)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
        )
    integrity.verify_step(step_dir, restored, where=f"checkpoint {step_dir}")
    out = {}
    for name, path in wanted.items():
        sub = restored
        for k in path:
            sub = sub[k]
        out[name] = sub
    logging.info("restored weights %s of %s (no optimizer state)", ", ".join(wanted), step_dir)
    return out


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def restore_params(
    path: str,
    abstract_params: Any,
    *,
    use_ema: bool = False,
    weights: str | None = None,
    required_items: tuple[str, ...] = ("state",),
) -> tuple[Any, int]:
    """Restores one set of weights (no optimizer state) of a run's checkpoint; any
    trainer's state with ``params`` and ``ema_params`` (the DiT's, the codec's). Exports
    are read by ``source.restore_params``, which also takes runs.

    Args:
      path: a run workdir, its checkpoints folder or a step folder.
      abstract_params: params pytree of jax.ShapeDtypeStruct (with or without shardings).
      use_ema: restore the EMA weights (``ema``) instead of the raw ones.
      weights: the weight set by name (overrides ``use_ema``).
      required_items: items the step must have (see :func:`find_step`).

    Returns:
      (params, step of the checkpoint they came from).

    Raises:
      CheckpointNotFound: no checkpoint at ``path``, or it lacks the weights;
        :class:`WeightsUnusable` when they differ from the step's hashes.
    """
    step_dir, step = find_step(path, required_items=required_items)
    name = weights or (optim.EMA if use_ema else optim.RAW)
    try:
        params = restore_weight_sets(step_dir, [name], abstract_params)[name]
    except WeightsNotFound as e:
        raise CheckpointNotFound(str(e)) from e
    except integrity.IntegrityError as e:
        raise WeightsUnusable(str(e)) from e
    return params, step


def read_json_item(item_dir: epath.Path) -> dict:
    """The JSON object a ``JsonSave`` item folder holds (skipping Orbax's own files).

    Raises:
      CheckpointNotFound: the folder holds no readable JSON object (half-written?).
    """
    files = sorted(f for f in item_dir.iterdir() if f.is_file() and not f.name.startswith("_"))
    for f in files:
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    raise CheckpointNotFound(f"checkpoint item {item_dir} holds no readable JSON (half-written?)")


def read_config_json(path: str) -> dict:
    """Reads the resolved config saved with the latest (or given) checkpoint."""
    step_dir, _ = find_step(path, required_items=("config",))
    return read_json_item(step_dir / "config")


def process_info() -> str:
    return f"process {jax.process_index()}/{jax.process_count()} pid {os.getpid()}"
