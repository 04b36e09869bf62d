"""Blind A/B listening: pairs of songs from two sources, played in random order without
labels, and the listeners' judgements (``audiodiff-serve --ab=A --ab=B``).

A source (:func:`parse_source`) is a set of weights or a finished sweep:

    demo                                 the shipped demo weights
    runs/dit1b:4000@ema0.9999            a checkpoint step and weight set of a run
    exports/student                      an export (a distilled student, another run...)
    demo+adapters/mine@0.5               weights with an adapter stack (PATH[@SCALE],...)
    sweeps/guidance3                     a sweep folder (its manifest.jsonl and WAVs)

Grammar: ``PATH[:STEP][@WEIGHTS][+ADAPTERS]``; a folder holding ``manifest.jsonl`` is a
sweep. A pair holds one song of each source made for the same request:

- between sweeps, rows of both manifests with the same prompt, seed, duration, negative
  prompt, musical controls and edit (:data:`PAIR_KEY`), drawn at random; the other parameters are each
  sweep's own (comparing two guidance scales is comparing two sweeps);
- with weights, a prompt of the prompt list (a sweep's prompts file rows) and a random
  seed, or a row of the sweep on the other side; each set of weights samples with its
  own saved ``sample`` section (a student at its step count, a teacher at its), under
  the server's flags.

The sides are shuffled per pair and the files named at random (``pair-<hex>.wav``), so
neither order nor name tells the sources apart. A judgement (``evaluation/judgements.py``)
records both songs whole: each source's description (checkpoint, step, weight set,
adapters; or the sweep folder and manifest row), every sampling parameter, the edit,
which side each was shown on and the choice.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

from audiodiff_jax.checkpoints import source as source_lib
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.evaluation import judgements
from audiodiff_jax.sampling.generation import (
    MANIFEST,
    GenerationError,
    SampleParams,
    open_generator,
    section_kwargs,
)
from audiodiff_jax.sweeps import sweep
from audiodiff_jax.sweeps.warm import Limits, Progress, WarmModel

# Two songs of two sweeps make a pair when these fields agree (the request: what is
# asked; the rest is how, what the sweeps compare).
REQUEST = ("prompt", "seed", "seconds", "negative_prompt", *config_lib.SAMPLE_CONTROLS)
PAIR_KEY = (*REQUEST, "edit")
_WEIGHTS_RE = re.compile(r"^(raw|ema[0-9.]*)$")
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SampleParams))
_ROW_NEEDS = ("id", "file", "prompt", "seconds", "seed")  # what a manifest row needs to be played


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One side of an A/B test, as given (``text`` is its name in judgements)."""

    text: str
    path: str
    step: int | None = None
    weights: str | None = None
    adapters: str = ""  # an adapter stack: PATH[@SCALE],...

    @property
    def is_sweep(self) -> bool:
        return os.path.isfile(os.path.join(self.path, MANIFEST))


def parse_source(text: str) -> SourceSpec:
    """``PATH[:STEP][@WEIGHTS][+ADAPTERS]`` -> :class:`SourceSpec` (GenerationError names a bad one)."""
    text = text.strip()
    head, plus, adapters = text.partition("+")
    if plus and not adapters.strip():
        raise GenerationError(f"--ab={text}: nothing after '+' (give adapters: PATH[@SCALE],...)")
    path, at, weights = head.rpartition("@")
    if not at or not _WEIGHTS_RE.match(weights):
        path, weights = head, None
    step = None
    base, colon, tail = path.rpartition(":")
    if colon and (tail.isdigit() or tail == source_lib.LATEST):
        path, step = base, (int(tail) if tail.isdigit() else None)
    if not path:
        raise GenerationError(f"--ab={text}: no checkpoint, export or sweep folder before ':', '@' or '+'")
    spec = SourceSpec(text, path, step, weights, adapters.strip())
    if spec.is_sweep and (step is not None or weights or spec.adapters):
        raise GenerationError(f"--ab={text}: {path} is a sweep folder; its rows say their weights")
    return spec


class ModelPool:
    """Warm models by (checkpoint, step, weights, adapters): each restored once. Models of
    one architecture on one mesh share their compiled sampling programs.

    Args:
      out_dir: where their songs go.
      lock: the one lock of the device (songs run in turn).
      overrides: sample fields given as flags (``sample_flags.given``), over each
        checkpoint's own ``sample`` section.
      mesh: the sampling mesh.
      limits, measure: see :class:`WarmModel`.
    """

    def __init__(
        self,
        out_dir: str,
        *,
        lock: threading.Lock,
        overrides: Mapping[str, Any],
        mesh: jax.sharding.Mesh,
        limits: Limits,
        measure: bool,
    ):
        self.out_dir, self.lock, self.overrides, self.mesh = out_dir, lock, dict(overrides), mesh
        self.limits, self.measure = limits, measure
        self._models: dict[tuple, WarmModel] = {}

    def open(self, spec: SourceSpec) -> WarmModel:
        """The warm model of ``spec`` (restored, adapters checked and merged, on first use)."""
        src = source_lib.WeightsSource(spec.path, spec.step)
        sample = sweep.resolve_sample(src.sample_section(), self.overrides, lambda f: f"--{f}")
        weights = src.canonical_weights(spec.weights or sample.weights[0])
        stack = source_lib.open_adapter_stacks([spec.adapters] if spec.adapters else [])[0]
        key = (src.path, src.step, weights, stack.text)
        if key in self._models:
            return self._models[key]
        codec = sweep.load_named_codec(src.card.codec.name, allow_code=False)
        gen, _ = open_generator(
            src,
            codec,
            weights=weights,
            adapters=stack,
            mesh=self.mesh,
            **section_kwargs(sample),
        )
        for other in self._models.values():
            if other.gen.cfg.model == gen.cfg.model and other.gen.mesh == gen.mesh:
                gen.share_programs(other.gen)
                break
        warm = WarmModel(
            gen,
            self.out_dir,
            name=spec.text,
            lock=self.lock,
            limits=self.limits,
            measure=self.measure,
            sample=sample,
        )
        logging.info(
            "serve: %s: %s step %d, weights %s%s ready",
            spec.text,
            src.path,
            gen.step,
            gen.weights,
            f", adapters {stack.text}" if stack.text else "",
        )
        self._models[key] = warm
        return warm


class SweepSource:
    """The finished songs of a sweep folder (its manifest rows whose WAV exists)."""

    def __init__(self, spec: SourceSpec):
        self.spec, self.name = spec, spec.text
        rows, torn = sweep.read_manifest(os.path.join(spec.path, MANIFEST))
        if torn:
            logging.warning("serve: %s: %d unreadable manifest line(s) skipped", spec.path, torn)
        self.rows: dict[tuple, list[dict]] = {}
        for row in rows.values():
            if all(f in row for f in _ROW_NEEDS) and os.path.isfile(os.path.join(spec.path, row["file"])):
                self.rows.setdefault(pair_key(row), []).append(row)
        if not self.rows:
            raise GenerationError(f"--ab={spec.text}: the sweep folder {spec.path} holds no finished song")

    def describe(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "kind": "sweep",
            "folder": self.spec.path,
            "checkpoint": row.get("checkpoint"),
            "checkpoint_step": row.get("checkpoint_step"),
            "weights": row.get("weights"),
            "adapters": row.get("adapters", ""),
        }


def _params(row: Mapping[str, Any]) -> SampleParams:
    """The parameters of a manifest row (fields added since it was written at their defaults)."""
    return SampleParams(**{f: row[f] for f in _PARAM_FIELDS if f in row})


def pair_key(row: Mapping[str, Any]) -> tuple:
    params = _params(row).to_dict()
    return (*(params[f] for f in REQUEST), row.get("edit", ""))


@dataclasses.dataclass
class Pair:
    """Two songs of one request, one per source, shuffled: what a listener judges."""

    id: str
    left: dict[str, Any]  # source, source_spec, params, edit, file (the WAV played)
    right: dict[str, Any]


class ABTest:
    """Draws pairs from two sources and records the judgements of them.

    Args:
      sources: two of :class:`SweepSource` or :class:`WarmModel` (named by their ``--ab`` text).
      out_dir: where the pairs' WAVs go.
      judgements_dir: the folder of ``judgements.jsonl``.
      prompts: prompt rows (``sweep.parse_prompt_row``) for pairs between sets of weights.
      seed: seeds the draws (prompts, song seeds, sides); None: a random seed, logged.
    """

    def __init__(
        self,
        sources: Sequence[SweepSource | WarmModel],
        out_dir: str,
        judgements_dir: str,
        *,
        prompts: Sequence[Mapping[str, Any]] = (),
        seed: int | None = None,
    ):
        if len(sources) != 2:
            raise GenerationError(f"an A/B test has two sources (--ab twice), got {len(sources)}")
        names = [s.name for s in sources]
        if names[0] == names[1]:
            raise GenerationError(f"the two --ab sources are both {names[0]!r}")
        self.sources, self.out_dir, self.judgements_dir = list(sources), out_dir, judgements_dir
        self.prompts = [dict(p) for p in prompts]
        self.sweeps = [s for s in sources if isinstance(s, SweepSource)]
        self.keys: list[tuple] = []
        if self.sweeps:
            common = set.intersection(*(set(s.rows) for s in self.sweeps))
            if not common:
                raise GenerationError(
                    f"the sweeps {', '.join(s.name for s in self.sweeps)} have no song with the same "
                    f"{', '.join(PAIR_KEY)}: nothing to pair"
                )
            self.keys = sorted(common, key=repr)
        elif not self.prompts:
            raise GenerationError("pairs between sets of weights need prompts: --ab_prompts=FILE or --prompt")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            logging.info("serve: A/B draws seeded with --ab_seed=%d", seed)
        self._rng, self._rng_lock = random.Random(seed), threading.Lock()
        os.makedirs(out_dir, exist_ok=True)

    def _request(self) -> tuple[dict[str, Any], dict[int, dict]]:
        """What to ask of every source: (the request's fields, the sweep rows by source index)."""
        with self._rng_lock:
            if self.keys:
                key = self._rng.choice(self.keys)
                rows = {
                    n: self._rng.choice(s.rows[key]) for n, s in enumerate(self.sources) if s in self.sweeps
                }
                first = next(iter(rows.values()))
                request = {f: v for f, v in _params(first).to_dict().items() if f in REQUEST}
            else:
                rows = {}
                request = dict(self._rng.choice(self.prompts))
                request.setdefault("seed", self._rng.randrange(2**31))
            return request, rows

    def draw(self, progress: Progress | None = None) -> Pair:
        """Makes (or finds) one song per source for one request, and shuffles them."""
        report_progress = progress or (lambda fraction, what: None)
        request, rows = self._request()
        pair_id = uuid.uuid4().hex
        sides = []
        for n, s in enumerate(self.sources):
            stem = f"pair-{uuid.uuid4().hex}"
            if isinstance(s, SweepSource):
                row = rows[n]
                wav = os.path.join(self.out_dir, stem + ".wav")
                shutil.copyfile(os.path.join(s.spec.path, row["file"]), wav)
                side = {
                    "params": _params(row).to_dict(),
                    "edit": row.get("edit", ""),
                    "song_id": row["id"],
                    "sweep_file": row["file"],
                    "source_spec": s.describe(row),
                }
            else:
                params = SampleParams.from_section(request["prompt"], s.sample, **_request_fields(request))
                song = s.song(
                    params,
                    stem=stem,
                    progress=lambda f, what, n=n: report_progress((n + f) / len(self.sources), what),
                    measure=False,
                )
                wav = song.wav
                side = {
                    "params": params.to_dict(),
                    "edit": "",
                    "song_id": song.id,
                    "source_spec": {"kind": "weights", "spec": s.name, **song.source},
                }
            sides.append({"source": s.name, **side, "file": wav})
        with self._rng_lock:
            swap = self._rng.random() < 0.5
        left, right = (sides[1], sides[0]) if swap else (sides[0], sides[1])
        return Pair(pair_id, left, right)

    def judge(self, pair: Pair, choice: str, *, listener: str, session: str, index: int) -> dict[str, Any]:
        """Records the listener's ``choice`` (left, right, same) of ``pair``; returns the line."""
        row = judgements.record(
            choice=choice,
            left=pair.left,
            right=pair.right,
            pair=pair.id,
            pair_index=index,
            listener=listener,
            session=session,
        )
        path = judgements.append(self.judgements_dir, row)
        logging.info(
            "serve: judgement %d of session %s (%s) appended to %s", index, session[:8], choice, path
        )
        return row


def _request_fields(request: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt row's fields as SampleParams arguments (the prompt apart)."""
    out = {}
    for name, value in request.items():
        if name == "prompt":
            continue
        if name not in _PARAM_FIELDS:
            raise GenerationError(f"prompt row field {name!r} is not a sampling parameter")
        out[name] = sweep.ROW_FIELDS[name](value)
    return out


def open_sources(texts: Sequence[str], pool: ModelPool) -> list[SweepSource | WarmModel]:
    """The sources of ``--ab`` values: sweeps read, weights restored (through ``pool``)."""
    out: list[SweepSource | WarmModel] = []
    for text in texts:
        spec = parse_source(text)
        out.append(SweepSource(spec) if spec.is_sweep else pool.open(spec))
    return out
