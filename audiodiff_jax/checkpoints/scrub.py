"""Scrubbing: read back everything a run's checkpoints or an export hold and check it
against the hashes written with it (``audiodiff-scrub``; hashes: ``integrity.py``).

A restore checks only what it reads, when it reads it; a scrub finds damage before
anyone needs the weights: every step of a run (local or ``gs://``), every array of each
step's ``state`` and its JSON items, or every tensor of an export.
"""

from __future__ import annotations

import dataclasses

import orbax.checkpoint as ocp
from etils import epath

from audiodiff_jax.checkpoints import checkpointing, export, integrity
from audiodiff_jax.core.errors import UserError

JSON_ITEMS = ("config", "dataset_card", "tokenizer")


class ScrubError(UserError):
    """A path that holds no checkpoint or export to scrub."""


@dataclasses.dataclass
class Report:
    """What a scrub checked and what it found."""

    path: str
    checked: list[str]  # the step folders, or the export folder
    findings: list[integrity.Finding]

    @property
    def damaged(self) -> list[integrity.Finding]:
        return [f for f in self.findings if f.damaged]


def _scrub_export(path: str) -> Report:
    try:
        meta = export.read_meta(path)
        problems = export.check_hashes(path, meta)
    except export.ExportError as e:
        return Report(path, [path], [integrity.Finding(path, str(e).removeprefix(path + ": "))])
    findings = [integrity.Finding(path, p) for p in problems]
    if not any(isinstance(v, dict) and "hash" in v for v in meta.get("params", {}).values()):
        findings.append(
            integrity.Finding(path, "no hashes (written before they existed): not checked", False)
        )
    for name in export.JSON_ITEMS:
        try:
            export.read_json_item(path, name)
        except export.ExportError as e:
            findings.append(integrity.Finding(path, str(e)))
    return Report(path, [path], findings)


def _steps(path: str) -> list[epath.Path]:
    p = epath.Path(path)
    if p.name.isdigit() and (p / "state").exists():
        return [p]
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(ocp.utils.checkpoint_steps(root)) if root.is_dir() else []
    if not steps:
        raise ScrubError(f"{path} holds no complete checkpoint step and is not an export")
    return [root / str(s) for s in steps]


def scrub(path: str, budget_bytes: int = 1 << 30) -> Report:
    """Checks every step of a run (its workdir, checkpoints folder or one step folder)
    or an export, local or ``gs://``.

    Raises:
      ScrubError: ``path`` is missing or holds neither checkpoints nor an export.
    """
    if not epath.Path(path).exists():
        raise ScrubError(f"{path} does not exist")
    if export.is_export(path):
        return _scrub_export(path)
    steps = _steps(path)
    findings: list[integrity.Finding] = []
    for step_dir in steps:
        findings += integrity.scrub_step(step_dir, budget_bytes=budget_bytes)
        for name in JSON_ITEMS:
            if (step_dir / name).is_dir():
                try:
                    checkpointing.read_json_item(step_dir / name)
                except checkpointing.CheckpointNotFound as e:
                    findings.append(integrity.Finding(str(step_dir), str(e)))
    return Report(path, [str(s) for s in steps], findings)
