"""The demo's measure of learning: songs for prompt combinations the model never trained
on, and what the estimators hear in them against what the prompts ask for.

The prompts are ``data_pipeline.corpus_prompts.held_out_prompts()`` (one per key, each
with a tempo that key never has in training). The songs are measured by the built-in
evaluation (``audiodiff_jax.evaluation``: librosa beats and onsets, Temperley key
profiles); so are renders of the same prompts (what a model that plays exactly what it
is told would score: the estimators' ceiling on this corpus).

Models with musical controls (``model.controls``) are asked for the key, tempo and time
signature through them as well as in the caption (:func:`held_out_rows`).

Targets (issue 25): key right >= 75% (chance 1 in 24), tempo within 8% >= 60%
(octave errors wrong; chance 1 in 5 for a model that plays one of the corpus's tempos
at random), onsets present in >= 90% of songs; and for the same prompt and seed asked
at 80 and at 162 bpm, the measured tempos in that order in >= 80% of the pairs
(:func:`tempo_order_rows`, :func:`tempo_order`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from audiodiff_jax.core import paths
from audiodiff_jax.evaluation import adherence, evaluate_folder, song
from audiodiff_jax.sampling import generation
from data_pipeline import corpus_prompts

TEMPO_TOLERANCE = 0.08  # the tolerance (the evaluation's own default is 4%)
MIN_ONSET_RATE = 0.5  # onsets per second: below this (or a drone), a song has no onsets to speak of
TARGETS = {"key": 0.75, "tempo": 0.6, "onsets": 0.9, "tempo_order": 0.8}
CHANCE = {"key": 1 / 24, "tempo": 1 / len(corpus_prompts.TEMPOS), "onsets": None, "tempo_order": 0.5}
ORDER_TEMPOS = (80, 162)  # the corpus's slowest and fastest


def control_fields(tonic: str, mode: str, tempo: float) -> dict[str, Any]:
    """The prompt-row fields that ask a model with controls for a corpus clip's tempo,
    key and meter (every prompted loop is 4/4)."""
    return {"bpm": float(tempo), "key": f"{tonic} {mode}", "time_signature": "4/4"}


def _row(choice: corpus_prompts.Choice, controls: bool, caption: str | None = None, bpm: float = 0) -> dict:
    row: dict[str, Any] = {"prompt": caption or choice.caption()}
    if controls:
        row |= control_fields(choice.key, choice.mode, bpm or choice.tempo)
    return row


def held_out_rows(controls: bool) -> list[dict]:
    """The 24 held-out pairings as prompt rows: the caption, and for a model with
    controls the same tempo, key and meter as controls."""
    return [_row(c, controls) for c in corpus_prompts.held_out_prompts()]


TRAINING_CLIPS = 768  # the prompted corpus the demo DiT trained on (seed 0, clips 0-767)


def training_rows(controls: bool, count: int = 48, seed: int = 0) -> list[dict]:
    """Prompt rows of ``count`` clips the demo DiT trained on, spread over its corpus: what
    its student's guidance input is calibrated on (``audiodiff-calibrate``), never the
    held-out pairings it is judged on."""
    every = TRAINING_CLIPS // count
    return [
        _row(corpus_prompts.training_choice(seed, i)[0], controls) for i in range(0, every * count, every)
    ]


def write_training_rows(path: str, count: int = 48) -> str:
    """:func:`training_rows` (with controls, as the demo DiT takes them) as a JSONL prompts file."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in training_rows(True, count))
    return path


def tempo_order_rows(count: int = 12) -> list[dict]:
    """``count`` held-out pairings without their tempo in the caption ("piano and drums
    in D minor"), each asked at 80 and at 162 bpm through the tempo control."""
    rows = []
    for c in corpus_prompts.held_out_prompts()[:count]:
        caption = f"{c.instrument} and drums in {c.key} {c.mode}"
        rows += [_row(c, True, caption, bpm) for bpm in ORDER_TEMPOS]
    return rows


def tempo_order(metrics: Sequence[Mapping[str, Any]]) -> tuple[float, list[tuple[str, float, float]]]:
    """Pairs of songs with the same prompt and seed at 80 and 162 bpm: the share whose
    measured tempos come out in that order, and ``(prompt, slow, fast)`` per pair."""
    by = {}
    for m in metrics:
        by.setdefault((m.get("prompt"), m.get("seed")), {})[float(m.get("bpm") or 0)] = float(
            m.get("tempo_bpm") or 0.0
        )
    pairs = [(p, t[ORDER_TEMPOS[0]], t[ORDER_TEMPOS[1]]) for (p, _), t in sorted(by.items()) if len(t) == 2]
    return (float(np.mean([fast > slow for _, slow, fast in pairs])) if pairs else 0.0), pairs


@dataclasses.dataclass
class PromptRow:
    prompt: str
    file: str
    key_prompted: str
    key_measured: str | None
    key_ok: bool
    tempo_prompted: float
    tempo_measured: float
    tempo_ok: bool
    onset_rate: float
    onsets_ok: bool


def prompt_rows(metrics: Sequence[Mapping[str, Any]]) -> list[PromptRow]:
    """One row per measured song: prompted and measured key and tempo, and the verdicts."""
    out = []
    for m in sorted(metrics, key=lambda r: r.get("file", "")):
        # What the prompt asks for (the row's own ``key`` is what was heard).
        labels = adherence.labels_from({f: m[f] for f in ("prompt", "caption") if f in m})
        if "key" not in labels or "tempo" not in labels:
            continue
        pc, mode = labels["key"]
        measured_key = adherence.parse_key(m["key"]) if m.get("key") else None
        tempo = float(m.get("tempo_bpm") or 0.0)
        onsets = float(m.get("onset_rate") or 0.0)
        out.append(
            PromptRow(
                prompt=str(m.get("prompt") or m.get("caption") or m.get("file")),
                file=str(m.get("file", "")),
                key_prompted=song.key_name(pc, mode),
                key_measured=m.get("key"),
                key_ok=measured_key == (pc, mode),
                tempo_prompted=labels["tempo"],
                tempo_measured=tempo,
                tempo_ok=song.tempo_agrees(tempo, labels["tempo"], TEMPO_TOLERANCE),
                onset_rate=onsets,
                onsets_ok=onsets >= MIN_ONSET_RATE and not m.get("drone"),
            )
        )
    return out


def accuracies(rows: Sequence[PromptRow]) -> dict[str, float]:
    if not rows:
        return {}
    return {
        "key": float(np.mean([r.key_ok for r in rows])),
        "tempo": float(np.mean([r.tempo_ok for r in rows])),
        "onsets": float(np.mean([r.onsets_ok for r in rows])),
    }


def write_renders(
    out_dir: str, *, seed: int, sample_rate: int, channels: int, seconds: float, codec: Any = None
) -> str:
    """Renders of the held-out prompts (``out_dir/*.wav`` and a manifest with their
    prompts), skipped when already there; returns ``out_dir``. With ``codec``, each render
    is encoded and decoded by it first: what a latent model that plays exactly the
    prompt would give, through this codec."""
    manifest = os.path.join(out_dir, "manifest.jsonl")
    if os.path.exists(manifest):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for clip in corpus_prompts.held_out_renders(
        seed, sample_rate=sample_rate, channels=channels, clip_seconds=seconds
    ):
        name = f"{clip.entry.id}.wav"
        audio = clip.audio
        if codec is not None:
            audio = codec.decode(codec.encode(audio, sample_rate))[:, : audio.shape[1]]
        generation.write_wav(
            os.path.join(out_dir, name), audio, sample_rate
        )  # 16-bit PCM, clipped at full scale
        rows.append({"id": clip.entry.id, "file": name, "prompt": clip.entry.caption})
    # The manifest last: its presence means every render is there.
    paths.atomic_write(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return out_dir


def measure(folder: str) -> tuple[list[PromptRow], dict[str, float]]:
    """Measures every song of ``folder`` (``metrics.jsonl`` beside them) -> rows and accuracies."""
    result = evaluate_folder(folder, transcribe=False, progress=True)
    rows = prompt_rows(result.rows)
    return rows, accuracies(rows)


def verdicts(acc: Mapping[str, float]) -> dict[str, str]:
    """``{"key": "62% (target 50%, chance 4%): met", ...}``."""
    out = {}
    for name, target in TARGETS.items():
        if name not in acc:
            continue
        chance = CHANCE[name]
        bits = [f"target {target:.0%}"] + ([f"chance {chance:.0%}"] if chance else [])
        out[name] = f"{acc[name]:.0%} ({', '.join(bits)}): {'met' if acc[name] >= target else 'NOT met'}"
    return out
