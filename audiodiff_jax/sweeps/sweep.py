"""Sampling sweeps: the grid, prompt files, the manifest, WAVs and the report page.

A sweep (checkpoint steps x weight sets x prompts x durations x samplers x steps x
schedules x guidance x guidance rescale x seeds) runs in batches of equal shapes on
one :class:`~audiodiff_jax.sampling.generation.Generator`, each checkpoint step restored once
(all its weight sets in one read); each finished
output is appended to ``manifest.jsonl`` so a rerun skips it, and at the end the
manifest is rewritten in grid order. Bad rows and failed batches are reported
(``sweep_issues.jsonl`` and the page, ``report.py``) and the sweep goes on. Every
default comes from the config's ``sample`` section (``config.SampleConfig``).

:func:`generate_songs` is the one-call entry point (used by ``make demo``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath

from audiodiff_jax.checkpoints import source as source_lib
from audiodiff_jax.codec import lookup
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import paths, profiler, report
from audiodiff_jax.evaluation import folder as eval_folder
from audiodiff_jax.evaluation import page as eval_page
from audiodiff_jax.evaluation import song as eval_song
from audiodiff_jax.sampling import seams
from audiodiff_jax.sampling.generation import (
    ISSUES,
    MANIFEST,
    AudioEdit,
    GenerationError,
    Generator,
    SampleParams,
    open_generator,
    section_kwargs,
    window_seams,
    write_wav,
)

_SAMPLE = config_lib.SampleConfig()


@dataclasses.dataclass(frozen=True)
class Grid:
    """The axes of a sweep; each prompt row is crossed with all of them.

    The fields of :class:`config.SampleConfig` that decide an output (the values of
    :data:`config.SAMPLE_PARAM_FIELDS`), with its defaults.
    """

    guidance: tuple[float, ...] = _SAMPLE.guidance
    steps: tuple[int, ...] = _SAMPLE.steps
    samplers: tuple[str, ...] = _SAMPLE.samplers
    seeds: tuple[int, ...] = _SAMPLE.seeds
    seconds: tuple[float, ...] = _SAMPLE.seconds
    guidance_rescale: tuple[float, ...] = _SAMPLE.guidance_rescale
    schedule: tuple[str, ...] = _SAMPLE.schedule
    eta: float = _SAMPLE.eta
    negative_prompt: str = _SAMPLE.negative_prompt
    strength: float = _SAMPLE.strength
    bpm: tuple[float, ...] = _SAMPLE.bpm
    key: tuple[str, ...] = _SAMPLE.key
    time_signature: tuple[str, ...] = _SAMPLE.time_signature

    @classmethod
    def from_config(cls, sample: config_lib.SampleConfig, **changes) -> Grid:
        """The grid of a config's sample section, with ``changes`` to some fields."""
        values = {f.name: getattr(sample, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, **changes})


# Fields a prompt row may set; a set field replaces that axis of the grid for the row.
# The types of one value of the sample section's fields.
ROW_FIELDS: dict[str, type] = {
    "prompt": str,
    **{row: config_lib.sample_field_type(field) for row, field in config_lib.SAMPLE_PARAM_FIELDS.items()},
}


@dataclasses.dataclass(frozen=True)
class SweepItem:
    index: int  # position in the grid (manifest order)
    params: SampleParams
    where: str  # where the item came from, for error messages


@dataclasses.dataclass(frozen=True)
class SweepIssue:
    where: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def parse_prompt_row(row: Any, where: str) -> dict[str, Any]:
    """Checks one prompt row (a dict of :data:`ROW_FIELDS`); raises GenerationError."""
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise GenerationError(f"{where}: a row must be a JSON object with a 'prompt', got {row!r:.60}")
    unknown = sorted(set(row) - set(ROW_FIELDS))
    if unknown:
        raise GenerationError(f"{where}: unknown field(s) {unknown}; valid: {sorted(ROW_FIELDS)}")
    if "prompt" not in row:
        raise GenerationError(f"{where}: missing field 'prompt'")
    out = {}
    for key, value in row.items():
        tp = ROW_FIELDS[key]
        ok = isinstance(value, tp) and not isinstance(value, bool)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise GenerationError(f"{where}: field {key}={value!r:.60} must be of type {tp.__name__}")
        out[key] = value
    if not out["prompt"].strip():
        raise GenerationError(f"{where}: field prompt is empty")
    return out


def read_prompts_file(path: str) -> tuple[list[tuple[str, dict]], list[SweepIssue]]:
    """Reads a JSONL prompts file: one object per line (``{"prompt": ..., "seconds": ...}``).

    Returns:
      (good rows as (where, row), issues for the bad ones). Blank lines and lines
      starting with ``#`` are skipped.
    """
    rows, issues = [], []
    try:
        lines = epath.Path(path).read_text().splitlines()
    except FileNotFoundError as e:
        raise GenerationError(f"prompts file {path!r} does not exist") from e
    for n, line in enumerate(lines, start=1):
        where = f"{path}:{n}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rows.append((where, parse_prompt_row(json.loads(line), where)))
        except json.JSONDecodeError as e:
            issues.append(SweepIssue(where, f"not valid JSON ({e.msg} at column {e.colno})"))
        except GenerationError as e:
            issues.append(SweepIssue(where, str(e).removeprefix(where + ": ")))
    return rows, issues


# Nesting of the grid axes, outermost first: the order of a sweep's items.
GRID_ORDER = (
    "seconds",
    "sampler",
    "steps",
    "schedule",
    "guidance",
    "guidance_rescale",
    "bpm",
    "key",
    "time_signature",
    "seed",
)


def expand_grid(rows: Iterable[tuple[str, dict]], grid: Grid) -> list[SweepItem]:
    """Prompt rows x grid -> items, in a fixed order (rows, then :data:`GRID_ORDER`)."""
    fields = config_lib.SAMPLE_PARAM_FIELDS
    items = []
    for where, row in rows:
        # A field the row sets replaces the grid's value (or the whole axis).
        fixed = {n: row.get(n, getattr(grid, f)) for n, f in fields.items() if n not in GRID_ORDER}
        axes = [[row[n]] if n in row else list(getattr(grid, fields[n])) for n in GRID_ORDER]
        for combo in itertools.product(*axes):
            values = {**fixed, **dict(zip(GRID_ORDER, combo, strict=True))}
            p = SampleParams(prompt=row["prompt"], **{n: ROW_FIELDS[n](v) for n, v in values.items()})
            items.append(SweepItem(len(items), p, where))
    return items


def item_id(params: SampleParams, step: int, weights: str, adapters: str = "", *, edit_tag: str = "") -> str:
    """Stable id of one output: the same parameters on the same checkpoint step, weights
    and adapter stack (its text, ``source.AdapterStack.text``) -> same id."""
    params_dict = params.to_dict()
    for name in config_lib.SAMPLE_CONTROLS:  # ids of outputs that ask no control are what they were
        if params_dict.get(name) in (0, 0.0, ""):
            del params_dict[name]
    fields = {"params": params_dict, "step": step, "weights": weights, "edit": edit_tag}
    if adapters:  # ids of outputs without adapters are what they always were
        fields["adapters"] = adapters
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


Cell = tuple[int, str, str]  # (checkpoint step, weight set, adapter stack text): one set of weights


def cells(
    gen: Generator,
    checkpoint_steps: Sequence[int] | None = None,
    weights: Sequence[str] | None = None,
    adapters: Sequence[source_lib.AdapterStack] | None = None,
) -> list[Cell]:
    """The sets of weights a sweep samples, outermost first: checkpoint steps, weight
    sets, adapter stacks (defaults: the generator's own)."""
    steps = list(dict.fromkeys(checkpoint_steps or [gen.step]))
    names = list(dict.fromkeys(gen.canonical_weights(w) for w in (weights or [gen.weights])))
    stacks = list(dict.fromkeys(st.text for st in (adapters or [gen.adapters])))
    return [(s, w, a) for s in steps for w in names for a in stacks]


def _slug(text: str, n: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-") or "song"


def read_manifest(path: str) -> tuple[dict[str, dict], int]:
    """Rows by id; a torn last line (an interrupted write) is skipped. Returns (rows, skipped)."""
    rows, bad = {}, 0
    if not epath.Path(path).exists():  # local or gs://
        return rows, 0
    with epath.Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                bad += 1
    return rows, bad


def _append_text(path: str, text: str) -> None:
    """Appends to a file. A bucket's objects cannot be appended to: there the object is
    read and replaced whole (readers see the old or the new one)."""
    if paths.is_remote(path):
        p = epath.Path(path)
        p.write_text((p.read_text() if p.exists() else "") + text, encoding="utf-8")
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


class SweepResult(NamedTuple):
    rows: list[dict]  # manifest rows in grid order
    issues: list[SweepIssue]
    generated: int  # outputs made by this call (the rest were already done)
    report: str  # path of the report page ("" if not written)


def run_sweep(
    gen: Generator,
    items: Sequence[SweepItem],
    out_dir: str,
    *,
    source: source_lib.WeightsSource | None = None,
    checkpoint_steps: Sequence[int] | None = None,
    weights: Sequence[str] | None = None,
    adapters: Sequence[source_lib.AdapterStack] | None = None,
    issues: Sequence[SweepIssue] = (),
    batch_size: int | None = None,
    edit: AudioEdit | None = None,
    edit_tag: str = "",
    title: str = "audiodiff-jax samples",
    on_batch_done: Callable[[int], None] | None = None,
    write_report: bool = True,
    evaluate: bool = False,
    eval_reference: str | None = None,
    profile_songs: int = 0,
    profile_dir: str = "",
    profile_process: tuple[int, int] | None = None,
) -> SweepResult:
    """Generates every item not already in ``out_dir/manifest.jsonl``, for every
    checkpoint step, weight set and adapter stack.

    The checkpoint steps, the weight sets and the adapter stacks are the outermost axes
    of the sweep: for each step that has work left, every weight set it needs is
    restored in one read (once per sweep, not once per row; a step whose outputs are all
    done is never read), then the items are sampled with each set, and each adapter
    stack merged into it, in turn on the same compiled programs. Items are checked
    first (bad ones become issues); good ones are grouped by
    :meth:`Generator.group_key`, in grid order, and run ``batch_size`` at a time
    (every batch padded to that size, so all batches of a group share one program).
    After each batch its WAVs and spectrograms are written, then its manifest rows
    appended: an interrupted sweep loses at most the batch in flight. A batch that
    fails is reported and the sweep goes on.

    Args:
      gen: the generator (with a codec).
      items: from :func:`expand_grid`.
      out_dir: output folder (WAVs, PNGs, manifest, issues, report.html).
      source: where the weight sets and checkpoint steps come from; None: only the
        generator's own weights are sampled.
      checkpoint_steps: checkpoint steps to sample (default: the generator's step).
      weights: weight set names (default: the generator's).
      adapters: adapter stacks (``source.open_adapter_stacks``) merged into each weight
        set in turn (default: the generator's); each adapter is checked against the
        weights it is stacked on (through ``source``). Rows record the stack.
      issues: problems found before (bad prompt rows), reported with the rest.
      batch_size: rows per batch (default: the mesh's data x fsdp size).
      edit, edit_tag: audio edit shared by every item, and a name for it that goes
        into the ids (a different edit must not count as done).
      title: heading of the report page.
      on_batch_done: called with the number of batches done so far (progress, tests).
      evaluate: measure every song of ``out_dir`` at the end (:func:`evaluate_outputs`:
        ``metrics.jsonl``, ``metrics_summary.json``, the report's evaluation section).
      eval_reference: a folder of reference audio for the set distance.
      write_report: write ``report.html`` at the end.
      profile_songs: trace the batches that make the first this many songs (whole
        batches; a first batch's compilation is in the trace, marked
        ``compile_sampling_program``, beside each ``sample_window`` and ``decode``) into
        ``profile_dir/plugins/profile/sample_first_N_songs/`` for TensorBoard's profile
        plugin (default ``out_dir/profile``).
      profile_process: (index, count) of this share of a sweep split over processes
        (names each process's trace file); default jax's.
    """
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)  # local or gs://
    manifest_path = os.path.join(out_dir, MANIFEST)
    done, torn = read_manifest(manifest_path)
    if torn:
        logging.warning(
            "%s: skipped %d unreadable line(s) (interrupted write); redoing them", manifest_path, torn
        )
    issues = list(issues)
    batch_size = batch_size or gen.batch_shards
    primary = jax.process_index() == 0
    steps = list(dict.fromkeys(checkpoint_steps or [gen.step]))
    names = list(dict.fromkeys(gen.canonical_weights(w) for w in (weights or [gen.weights])))
    stacks = {st.text: st for st in (adapters or [gen.adapters])}

    good = []
    for it in items:
        try:
            gen.check(it.params)
        except GenerationError as e:
            issue = SweepIssue(it.where, str(e))
            if issue not in issues:  # a bad row expands to many items: say it once
                issues.append(issue)
            continue
        good.append(it)
    # One "cell" per (step, weights, adapters): its items, their ids and their place in the manifest.
    grid_cells = cells(gen, steps, names, list(stacks.values()))
    ids = {(c, it.index): item_id(it.params, *c, edit_tag=edit_tag) for c in grid_cells for it in items}
    order = {ids[c, it.index]: n * len(items) + it.index for n, c in enumerate(grid_cells) for it in items}
    todo: dict[Cell, list[SweepItem]] = {}
    already = 0
    for c in grid_cells:
        for it in good:
            row = done.get(ids[c, it.index])
            if row is not None and epath.Path(out_dir, row["file"]).exists():
                already += 1
            else:
                todo.setdefault(c, []).append(it)
    plan = {c: _batches(gen, todo[c], batch_size) for c in grid_cells if c in todo}
    num_batches = sum(len(b) for b in plan.values())
    logging.info(
        "sweep: %d outputs (%d checkpoint(s) x %d weight set(s) x %d adapter stack(s) x %d items), "
        "%d already done, %d to make in %d batches of <= %d; %d issue(s)",
        len(grid_cells) * len(items),
        len(steps),
        len(names),
        len(stacks),
        len(items),
        already,
        sum(len(v) for v in todo.values()),
        num_batches,
        batch_size,
        len(issues),
    )
    made = 0
    batches_done = 0
    songs_trace = _SongsTrace(profile_songs, profile_dir or os.path.join(out_dir, "profile"), profile_process)
    try:
        for step in steps:
            needed = [w for w in names if any((step, w, a) in plan for a in stacks)]
            if not needed:
                continue
            if step == gen.step and needed == [gen.weights] and gen.base_params is not None:
                restored = {gen.weights: gen.base_params}  # the generator holds them already
            else:
                if source is None:
                    raise GenerationError(
                        f"weights {', '.join(needed)} of step {step} asked for, but the generator holds only "
                        f"{gen.weights} of step {gen.step} and no weights source was given"
                    )
                t0 = time.perf_counter()
                restored = source.restore(step, needed, gen.abstract_params())
                logging.info(
                    "sweep: restored weights %s of checkpoint step %d in %.2fs",
                    ", ".join(needed),
                    step,
                    time.perf_counter() - t0,
                )
            for w in needed:
                base = restored.pop(w)
                for text, stack in stacks.items():
                    if (step, w, text) not in plan:
                        continue
                    if stack.layers:
                        if source is None:
                            raise GenerationError(
                                f"adapters {text} asked for without a weights source to check them against"
                            )
                        for adapter, _ in stack.layers:
                            source.check_adapter(adapter, step, w)
                    gen.use_weights(step, w, base, adapters=stack)
                    for batch in plan[step, w, text]:
                        songs_trace.before_batch()
                        made += _run_batch(
                            gen,
                            batch,
                            out_dir,
                            manifest_path,
                            done,
                            issues,
                            primary,
                            ids,
                            order,
                            (step, w, text),
                            batch_size,
                            edit,
                            edit_tag,
                        )
                        songs_trace.after_batch(len(batch))
                        batches_done += 1
                        logging.info("sweep: %d/%d batches done", batches_done, num_batches)
                        if on_batch_done is not None:
                            on_batch_done(batches_done)
                del base
            del restored
    finally:
        songs_trace.close()  # fewer songs than asked, or a failure

    rows = sorted((done[i] for i in order if i in done), key=lambda r: r["index"])
    # Rows of other grids sweeping into the same folder stay, after this grid's rows.
    mine = {r["id"] for r in rows}
    others = [r for r in done.values() if r["id"] not in mine]
    report_path = ""
    if primary:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows + others)
        paths.atomic_write(manifest_path, text.encode("utf-8"))
        paths.atomic_write(
            os.path.join(out_dir, ISSUES), "".join(json.dumps(i.to_dict()) + "\n" for i in issues).encode()
        )
        if write_report:
            m = gen.cfg.model
            card = gen.codec.card
            facts = {
                "checkpoint": gen.checkpoint,
                "checkpoint steps": ", ".join(str(s) for s in steps),
                "weights": ", ".join(names),
                **({"adapters": "; ".join(t or "none" for t in stacks)} if any(stacks) else {}),
                "model": f"{m.preset or 'custom'}: width {m.width}, depth {m.depth}",
                "codec": f"{card.name} ({card.sample_rate} Hz, {gen.latent_rate:.2f} latent frames/s)",
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
                f"mesh {dict(gen.mesh.shape)}",
            }
            # Nothing to measure when every item failed (their issues say why).
            section = evaluate_outputs(out_dir, eval_reference) if evaluate and rows + others else None
            report_path = report.write_report(
                out_dir, rows + others, issues, title=title, facts=facts, evaluation=section
            )
    for i in issues:
        logging.warning("sweep issue: %s: %s", i.where, i.message)
    return SweepResult(rows, issues, made, report_path)


class _SongsTrace:
    """Traces the batches that make a sweep's first ``songs`` songs (nothing when 0)."""

    def __init__(self, songs: int, logdir: str, process: tuple[int, int] | None):
        self.songs, self.made, self.started = songs, 0, False
        self.trace = (
            profiler.Trace(logdir, f"sample_first_{songs}_songs", process=process) if songs > 0 else None
        )

    def before_batch(self) -> None:
        if self.trace is not None and not self.started:
            self.started = True
            self.trace.start()

    def after_batch(self, rows: int) -> None:
        self.made += rows
        if self.made >= self.songs:
            self.close()

    def close(self) -> None:
        if self.trace is not None and self.trace.active:
            self.trace.stop()
            logging.info(
                "sweep: the sampling of the first %d song(s) is traced in %s", self.songs, self.trace.path
            )


def _batches(gen: Generator, items: Sequence[SweepItem], batch_size: int) -> list[list[SweepItem]]:
    """Items grouped by :meth:`Generator.group_key` (grid order kept), ``batch_size`` at a time."""
    groups: dict[tuple, list[SweepItem]] = {}
    for it in items:
        groups.setdefault(gen.group_key(it.params, gen.frames_for(it.params.seconds)), []).append(it)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def evaluate_outputs(out_dir: str, reference: str | None = None) -> dict | None:
    """Measures every song of a sweep's folder (``audiodiff_jax/evaluation``: per-song
    metrics into ``metrics.jsonl`` beside the manifest, a summary, plots against the grid
    axes); returns the report's evaluation section, or None (with a warning) where it
    cannot run: the ``eval`` extra is not installed, or the folder is in a bucket."""
    if paths.is_remote(out_dir):
        logging.warning("evaluation: %s is not a local folder; run audiodiff-eval on a copy", out_dir)
        return None
    try:
        result = eval_folder.evaluate_folder(out_dir, reference, progress=False)
    except eval_song.MissingExtra as e:
        logging.warning("evaluation skipped: %s", e)
        return None
    logging.info("evaluation: %d song(s) measured into %s", len(result.rows), result.metrics_path)
    return eval_page.section_context(out_dir, result.rows, result.summary)


def seam_ratios(gen: Generator, latents: np.ndarray, audio: np.ndarray) -> dict[str, float]:
    """The seam ratios of a windowed song (``audiodiff_jax/sampling/seams.py``): latents (normalized
    as the model sees them) and decoded audio; {} for a one-pass song."""
    cuts = window_seams(latents.shape[0], gen.window, gen.overlap)
    if not cuts:
        return {}
    out = {"seam_ratio": round(seams.latent_seam_ratio(gen.card.normalize(latents), cuts), 4)}
    if len(cuts) and audio.shape[-1] // gen.codec.card.hop > cuts[0] + 2:
        out["audio_seam_ratio"] = round(seams.audio_seam_ratio(audio, gen.codec.card.hop, cuts), 4)
    return out


def _run_batch(
    gen: Generator,
    batch: list[SweepItem],
    out_dir: str,
    manifest_path: str,
    done: dict[str, dict],
    issues: list[SweepIssue],
    primary: bool,
    ids: dict,
    order: dict[str, int],
    cell: Cell,
    batch_size: int,
    edit: AudioEdit | None,
    edit_tag: str,
) -> int:
    """Samples one batch with the generator's current weights, writes its outputs and
    manifest rows; returns how many it made (0 when it failed: reported in ``issues``)."""
    card = gen.codec.card
    made = 0
    try:
        res = gen.generate_latents([it.params for it in batch], edit=edit, batch_size=batch_size)
        for it, lat in zip(batch, res.latents, strict=True):
            t0 = time.perf_counter()
            with jax.profiler.TraceAnnotation("decode"):
                audio = gen.decode(lat, seconds=it.params.seconds)
            decode_s = time.perf_counter() - t0
            iid = ids[cell, it.index]
            stem = f"{_slug(it.params.prompt)}-s{it.params.seed}-{iid[:10]}"
            row = {
                "id": iid,
                "index": order[iid],
                "file": stem + ".wav",
                "spectrogram": stem + ".png",
                **it.params.to_dict(),
                "frames": int(lat.shape[0]),
                "latent_rate": gen.latent_rate,
                "windows": res.windows,
                # The song's cost in model evaluations, and how the model was made
                # ("progressive" for a distilled student, "" for a trained model).
                "model_evals": gen.model_evals(it.params, res.windows),
                "distillation": gen.distillation,
                "guidance_offset": gen.guidance_offset,  # a calibrated student's input: guidance + it
                **seam_ratios(gen, lat, audio),
                "audio_seconds": audio.shape[-1] / card.sample_rate,
                "sample_rate": card.sample_rate,
                "codec": card.name,
                "checkpoint": gen.checkpoint,
                "checkpoint_step": gen.step,
                "weights": gen.weights,
                "adapters": gen.adapters.text,
                "adapter_list": gen.adapters.describe(),
                "model_preset": gen.cfg.model.preset,
                "edit": edit_tag,
                "source": it.where,
                # Everything that differs between two runs of the same output lives here.
                "timings": {
                    "batch_denoise_s": round(res.denoise_s, 4),
                    "denoise_s_per_output": round(res.denoise_s / len(batch), 4),
                    "decode_s": round(decode_s, 4),
                    "batch_rows": len(batch),
                    "compiled": res.compiled,
                    "compile_s": round(res.compile_s, 4),  # apart: not in the real-time factor
                    "realtime_factor": round(it.params.seconds / max(res.denoise_s / len(batch), 1e-9), 2),
                },
            }
            if primary:
                write_wav(os.path.join(out_dir, row["file"]), audio, card.sample_rate)
                report.write_spectrogram_png(
                    os.path.join(out_dir, row["spectrogram"]), audio, card.sample_rate
                )
                _append_text(manifest_path, json.dumps(row, sort_keys=True) + "\n")
            done[iid] = row
            made += 1
        logging.info(
            "sweep: step %d, weights %s%s: batch of %d rows, %.2fs denoising, %d window(s)",
            gen.step,
            gen.weights,
            f", adapters {gen.adapters.text}" if gen.adapters.text else "",
            len(batch),
            res.denoise_s,
            res.windows,
        )
    except Exception as e:  # noqa: BLE001 - one failed batch must not stop the sweep
        logging.exception("sweep: a batch failed (step %d, weights %s)", gen.step, gen.weights)
        for it in batch:
            issues.append(SweepIssue(it.where, f"generation failed: {type(e).__name__}: {e}"))
    return made


# ---------------------------------------------------------------------------
# One call for the demo


def generate_songs(
    checkpoint: str,
    prompts: Sequence[str | dict],
    out_dir: str,
    *,
    seconds: float | None = None,
    seeds: Sequence[int] | None = None,
    guidance: float | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    codec: Any = None,
    codec_name: str = "",
    mesh: jax.sharding.Mesh | None = None,
    use_ema: bool | None = None,
    weights: Sequence[str] | None = None,
    checkpoint_steps: Sequence[int | str] | None = None,
    batch_size: int | None = None,
    title: str = "audiodiff-jax songs",
    **generator_kwargs,
) -> SweepResult:
    """Generates a song per prompt and seed from a run's latest checkpoint.

    Writes ``out_dir``: one WAV and spectrogram PNG per song, ``manifest.jsonl``,
    ``sweep_issues.jsonl`` and ``report.html``. Rerunning skips the songs already made.

    Args:
      checkpoint: run workdir (or checkpoints folder, or step folder).
      prompts: captions, or prompt rows (dicts of :data:`ROW_FIELDS`).
      out_dir: output folder.
      seconds, seeds, guidance, steps, sampler: the song parameters.
      codec: a codec object; None loads one with ``audiodiff_jax.codec.load_codec``
        (``codec_name``, or the name in the checkpoint's dataset card).
      mesh, batch_size: see :class:`Generator` and :func:`run_sweep`.
      weights: weight sets (``raw``, ``ema``, ``ema0.9999``...); ``use_ema`` is the
        older way to choose one (True: ``ema``, False: ``raw``).
      checkpoint_steps: checkpoint steps (numbers or ``latest``; default: the latest).
      generator_kwargs: more :class:`Generator` arguments (window_frames, ...).

    Arguments left at None take the ``sample`` section of the checkpoint's config
    (all values of a grid axis). The parameters are checked before the weights are
    restored; a bad one raises :class:`GenerationError`.
    """
    src = source_lib.WeightsSource(checkpoint)
    given = {
        "seconds": None if seconds is None else (seconds,),
        "seeds": None if seeds is None else tuple(seeds),
        "guidance": None if guidance is None else (guidance,),
        "steps": None if steps is None else (steps,),
        "samplers": None if sampler is None else (sampler,),
        "weights": tuple(weights) if weights is not None else None,
        "batch_size": batch_size,
    }
    given |= {k: generator_kwargs.pop(k) for k in list(generator_kwargs) if k in _SAMPLE_FIELDS}
    if use_ema is not None and weights is None:
        given["weights"] = ("ema",) if use_ema else ("raw",)
    sample = resolve_sample(src.sample_section(), {k: v for k, v in given.items() if v is not None})
    steps = source_lib.resolve_steps(checkpoint, checkpoint_steps or [None])
    if codec is None:
        codec = load_named_codec(codec_name or src.card.codec.name, allow_code=bool(codec_name))
    gen, src = open_generator(
        src,
        codec,
        step=steps[0],
        weights=sample.weights[0],
        restore=False,
        mesh=mesh,
        **section_kwargs(sample),
        **generator_kwargs,
    )
    rows, issues = [], []
    for n, prompt in enumerate(prompts):
        where = f"prompt {n}"
        try:
            rows.append((where, parse_prompt_row(prompt, where)))
        except GenerationError as e:
            issues.append(SweepIssue(where, str(e)))
    for step in steps:  # before anything is restored
        src.check_weights(step, sample.weights)
    return run_sweep(
        gen,
        expand_grid(rows, Grid.from_config(sample)),
        out_dir,
        source=src,
        checkpoint_steps=steps,
        weights=sample.weights,
        issues=issues,
        batch_size=sample.batch_size or None,
        title=title,
    )


_SAMPLE_FIELDS = {f.name for f in dataclasses.fields(config_lib.SampleConfig)}


def resolve_sample(
    saved: config_lib.SampleConfig, overrides: dict[str, Any], name: Callable[[str], str] = str
) -> config_lib.SampleConfig:
    """The sample section of a checkpoint's config with ``overrides``, validated.

    Run before the weights are restored.

    Args:
      saved: the ``sample`` section of the checkpoint's config.
      overrides: sample field -> value given by the caller (a flag, an argument).
      name: how an overridden field is named in an error (``--steps`` for a flag);
        the others are named as fields of the checkpoint's config.

    Raises:
      GenerationError: naming the field, its value and what would work.
    """
    try:
        config_lib.check_sample_values(overrides, name)
        sample = config_lib.replace(saved, **overrides)
        config_lib.validate_sample(
            sample, lambda f: name(f) if f in overrides else f"sample.{f} of the checkpoint's config"
        )
    except config_lib.ConfigError as e:
        raise GenerationError(str(e)) from e
    return sample


def load_named_codec(name: str, *, allow_code: bool = True):
    """The codec called ``name``: :func:`audiodiff_jax.codec.lookup.codec_by_name`.

    ``name`` may also be ``"package.module:factory"``, a callable returning a codec
    object (custom codecs, tests), but only with ``allow_code`` (the user gave the name);
    pass ``allow_code=False`` for a name read from a dataset card.
    """
    return lookup.codec_by_name(name, allow_code=allow_code)
