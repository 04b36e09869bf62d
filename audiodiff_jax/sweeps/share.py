"""One sampling sweep split across processes: each makes its share, process 0 merges.

The same ``audiodiff-sample`` command runs on every host (``launch.local``, SLURM, TPU
VMs). Each process takes its index and count from the launcher or scheduler
(:func:`audiodiff_jax.core.distributed.work_share`), samples on its own devices, and makes
the items of the grid whose index ``i`` has ``i % count == index``: a disjoint share
that depends only on the grid, not on timing. No collective runs between them.

Layout of ``OUT`` (local or ``gs://``)::

    parts/process-KKK-of-NNN/   one process's WAVs, spectrograms and manifest (a
                                plain sweep folder: a rerun with the same count
                                skips what it already made)
    parts/process-KKK-of-NNN/share_done.json   written last: the share's item ids
                                and issues, tagged with a digest of the share
    manifest.jsonl, sweep_issues.jsonl, report.html
                                written by process 0 once every process's
                                ``share_done.json`` for this grid is there; file
                                paths in the manifest are relative to ``OUT``

With one process the sweep runs straight into ``OUT``, as :func:`sweep.run_sweep` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence

import jax
from absl import logging
from etils import epath

from audiodiff_jax.core import paths, report
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.sampling.generation import ISSUES, MANIFEST, Generator
from audiodiff_jax.sweeps import sweep

PARTS = "parts"
DONE = "share_done.json"


class ShareTimeout(UserError, TimeoutError):
    """Process 0 waited too long for another process's share."""


def part_name(index: int, count: int) -> str:
    return f"process-{index:03d}-of-{count:03d}"


def share(items: Sequence[sweep.SweepItem], index: int, count: int) -> list[sweep.SweepItem]:
    """The items process ``index`` of ``count`` makes (their grid indices kept)."""
    return [it for it in items if it.index % count == index]


def _cells(gen: Generator, sweep_kwargs: dict) -> list[sweep.Cell]:
    """(checkpoint step, weight set, adapter stack) of the sweep, in :func:`sweep.run_sweep`'s order."""
    return sweep.cells(
        gen, sweep_kwargs.get("checkpoint_steps"), sweep_kwargs.get("weights"), sweep_kwargs.get("adapters")
    )


def _digest(items: Sequence[sweep.SweepItem], gen: Generator, sweep_kwargs: dict) -> str:
    """Names one share of one sweep: a marker left by another sweep never matches."""
    blob = json.dumps(
        [[it.index, it.params.to_dict()] for it in items]
        # (step, weights) for a cell without adapters: the digests of earlier versions
        + [
            gen.checkpoint,
            [c if c[2] else c[:2] for c in _cells(gen, sweep_kwargs)],
            sweep_kwargs.get("edit_tag", ""),
        ],
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()


def _read_json(path: epath.Path):
    """The JSON at ``path``, or None. A direct read (no ``exists``): gcsfs answers
    ``exists`` from its cache of folder listings, which misses files other processes wrote."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def run_share(
    gen: Generator,
    items: Sequence[sweep.SweepItem],
    out_dir: str,
    *,
    index: int,
    count: int,
    issues: Sequence[sweep.SweepIssue] = (),
    title: str = "audiodiff-jax samples",
    wait_timeout_s: float = 6 * 3600.0,
    **sweep_kwargs,
) -> sweep.SweepResult:
    """Makes this process's share of ``items``; on process 0, then merges every share.

    Args:
      gen, items, out_dir, issues, title: as for :func:`sweep.run_sweep`.
      index, count: this process and the number of processes.
      wait_timeout_s: how long process 0 waits for the others.
      sweep_kwargs: more :func:`sweep.run_sweep` arguments (batch_size, edit, edit_tag).

    Returns:
      process 0: the merged result (every share's rows, paths relative to ``out_dir``);
      the others: their own share's result (no report).

    Raises:
      ShareTimeout: process 0 waited ``wait_timeout_s`` for a share.
    """
    if count == 1:
        return sweep.run_sweep(gen, items, out_dir, issues=issues, title=title, **sweep_kwargs)
    mine = share(items, index, count)
    part = os.path.join(out_dir, PARTS, part_name(index, count))
    logging.info(
        "sweep: process %d of %d makes %d of %d items in %s", index, count, len(mine), len(items), part
    )
    # A marker of an earlier run of this same share goes first, so that process 0 waits
    # for this run's (process 0 reads markers only after making its own share).
    epath.Path(part, DONE).unlink(missing_ok=True)
    result = sweep.run_sweep(
        gen,
        mine,
        part,
        issues=issues,
        write_report=False,
        title=title,
        profile_process=(index, count),
        **sweep_kwargs,
    )
    done = {
        "digest": _digest(mine, gen, sweep_kwargs),
        "issues": [i.to_dict() for i in result.issues],
        "generated": result.generated,
    }
    paths.atomic_write(os.path.join(part, DONE), json.dumps(done).encode())
    if index != 0:
        return result
    return _merge(gen, items, out_dir, count, title, wait_timeout_s, sweep_kwargs)


def _merge(gen, items, out_dir, count, title, wait_timeout_s, sweep_kwargs) -> sweep.SweepResult:
    """Process 0: waits for every share, then writes the manifest (rows numbered as one
    process would number them), the issues and the report page into ``out_dir``."""
    deadline = time.monotonic() + wait_timeout_s
    cells = _cells(gen, sweep_kwargs)
    edit_tag = sweep_kwargs.get("edit_tag", "")
    order = {
        sweep.item_id(it.params, *c, edit_tag=edit_tag): n * len(items) + it.index
        for n, c in enumerate(cells)
        for it in items
    }
    rows, others, issues, generated = [], [], [], 0
    for k in range(count):
        name = part_name(k, count)
        marker = epath.Path(out_dir, PARTS, name, DONE)
        want = _digest(share(items, k, count), gen, sweep_kwargs)
        while (done := _read_json(marker)) is None or done.get("digest") != want:
            if time.monotonic() > deadline:
                raise ShareTimeout(
                    f"waited {wait_timeout_s:.0f} s for {marker} (process {k} of {count} has not finished "
                    "its share); rerun the same command on every process"
                )
            time.sleep(0.5)
        part_rows, _ = sweep.read_manifest(os.path.join(out_dir, PARTS, name, MANIFEST))
        for row in part_rows.values():
            row = {**row, "file": f"{PARTS}/{name}/{row['file']}"}
            if row.get("spectrogram"):
                row["spectrogram"] = f"{PARTS}/{name}/{row['spectrogram']}"
            if row["id"] in order:
                rows.append({**row, "index": order[row["id"]]})
            else:  # a row of another sweep into the same folder: kept, after this one's
                others.append(row)
        for i in done["issues"]:
            issue = sweep.SweepIssue(i["where"], i["message"])
            if issue not in issues:
                issues.append(issue)
        generated += done["generated"]
    rows.sort(key=lambda r: r["index"])
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows + others)
    paths.atomic_write(os.path.join(out_dir, MANIFEST), text.encode())
    paths.atomic_write(
        os.path.join(out_dir, ISSUES), "".join(json.dumps(i.to_dict()) + "\n" for i in issues).encode()
    )
    m = gen.cfg.model
    facts = {
        "checkpoint": gen.checkpoint,
        "checkpoint steps": ", ".join(str(s) for s in dict.fromkeys(s for s, *_ in cells)),
        "weights": ", ".join(dict.fromkeys(w for _, w, *_ in cells)),
        "model": f"{m.preset or 'custom'}: width {m.width}, depth {m.depth}",
        "processes": f"{count}, each on {jax.local_device_count()} x {jax.local_devices()[0].device_kind}",
    }
    section = (
        sweep.evaluate_outputs(out_dir, sweep_kwargs.get("eval_reference"))
        if sweep_kwargs.get("evaluate")
        else None
    )
    page = report.write_report(out_dir, rows + others, issues, title=title, facts=facts, evaluation=section)
    logging.info("sweep: merged %d outputs of %d processes into %s", len(rows), count, out_dir)
    return sweep.SweepResult(rows, issues, generated, page)
