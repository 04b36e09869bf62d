"""Orbax checkpoints of a training run (DESIGN.md contract 4).

A run's checkpoints live in ``WORKDIR/checkpoints``, one Orbax step directory per
saved step, each holding these items:

- ``state``: the train state (params, optimizer state, EMA params, step, RNG), saved
  sharded from every process;
- ``data_iter``: the Grain iterator state of every process (one JSON file each);
- ``config``: the resolved config as JSON;
- ``dataset_card``: the dataset card of the latents the run trained on;
- ``tokenizer``: the run's sentencepiece model (base64 in JSON, with its sha256), so
  sampling needs only the checkpoint, not the shards folder it was trained from.

Saves are asynchronous: ``save`` returns once device arrays are copied to host memory
and the write goes on in the background. Orbax writes each step into a temporary
directory and renames it when every process has finished, so a step that was being
written when a job died is never listed as complete.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEMS = ("state", "data_iter", "config", "dataset_card", "tokenizer")


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


class RunCheckpointer:
    """Saves and restores one run's checkpoints."""

    def __init__(self, workdir: str, *, keep_last: int, keep_every: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator,
        config: dict,
        dataset_card: dict,
        tokenizer: dict,
    ) -> bool:
        """Starts saving ``step``; returns whether a save was started.

        ``tokenizer`` is ``data_pipeline.tokenizer.Tokenizer.to_json()``."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config),
            dataset_card=ocp.args.JsonSave(dataset_card),
            tokenizer=ocp.args.JsonSave(tokenizer),
        )
        saved = self.manager.save(step, args=args, force=True)
        if saved:
            logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator) -> Any:
        """Restores the train state onto the shardings of ``abstract_state``, and the
        iterator in place. Returns the state."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
        )
        restored = self.manager.restore(step, args=args)
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint path that is missing, empty, lacks the step, or is incomplete."""


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
    p = epath.Path(path)
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


def restore_params(path: str, abstract_params: Any, *, use_ema: bool = False) -> tuple[Any, int]:
    """Restores only the weights of another run's checkpoint (no optimizer state).

    Args:
      path: a run workdir, its checkpoints folder, or a step folder.
      abstract_params: params pytree of jax.ShapeDtypeStruct with shardings.
      use_ema: restore the EMA weights instead of the raw ones.

    Returns:
      (params, step of the checkpoint they came from).
    """
    step_dir, step = find_step(path)
    key = "ema_params" if use_ema else "params"
    item_dir = step_dir / "state"
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            item_dir,
            args=ocp.args.PyTreeRestore(
                item={key: abstract_params},
                restore_args={key: restore_args},
                partial_restore=True,
            ),
        )
    logging.info("init_from: restored %s of step %d from %s", key, step, item_dir)
    return restored[key], step


def read_json_item(item_dir: epath.Path) -> dict:
    """The JSON object a ``JsonSave`` item folder holds (skipping Orbax's own files).

    Raises:
      CheckpointNotFound: the folder holds no readable JSON object (half-written?).
    """
    import json

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
