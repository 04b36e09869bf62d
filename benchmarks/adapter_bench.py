r"""Adapters on the demo model, measured: material the demo corpus never had, end to end
through the programs, with the commands of the README ("Your own music: adapters").

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/adapter_bench.py \
        --out=/tmp/adapter_bench [--instrument=marimba] [--steps=400] [--stages=all]

Stages (each skipped when its output is there, so a rerun continues):

1. ``render``: the new material, as a user's folder of audio would be: the demo corpus's
   four-bar loops (``data_pipeline/corpus_prompts.py``: chords, melody, bass, drums; key,
   tempo and instrument in the caption) played by an instrument outside its five
   (``--instrument``, a General MIDI program of TimGM6mb). ``OUT/mine/train``: 32 renders
   for the adapter; ``OUT/mine/heldout``: 24 others (other seeds, keys and tempos), the
   reference of the Fréchet distance, with ``prompts.jsonl`` of their captions. WAVs
   plus ``captions.csv`` (file, caption, key, mode, tempo, instrument).
2. ``precompute``: ``audiodiff-precompute --like=BASE`` (the base's codec, statistics, tokenizer).
3. ``train``: ``audiodiff-train --config=configs/adapter.py:BASE``, timed (wall, CPU, peak RSS).
4. ``export``: ``audiodiff-export`` of the adapter run: the adapter folder.
5. ``sample``: ``audiodiff-sample`` of the base with ``--adapters=none --adapters=ADAPTER``
   for the held-out captions of the new material, and with ``--adapters=none
   --adapters=ADAPTER@0 --adapters=ADAPTER@1`` for the demo's 24 held-out pairings
   (``launch/demo_prompts.py``), at the demo's settings (12 s, seed 0, guidance 4,
   DPM++(2M) 50 steps).
6. ``measure``: the Fréchet distance of each stack's songs to the held-out renders (the
   evaluation's default ``spectral`` embedding, and the ``codec`` one), with the
   renders' own yardsticks (the training renders, and the held-out renders through the
   codec, against the held-out renders); key, tempo and onset adherence of each stack on
   the demo's pairings; whether the songs at scale 0 are the base's, byte for byte.
   Everything goes to ``OUT/results.json`` and is printed.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import soundfile as sf
from absl import app, flags

import audiodiff_jax
from audiodiff_jax.codec import load_codec
from audiodiff_jax.evaluation import evaluate_folder, set_distance
from audiodiff_jax.sampling import generation
from data_pipeline import corpus_prompts as cp
from data_pipeline import render
from launch import demo_prompts

DEMO = os.path.join(os.path.dirname(audiodiff_jax.__file__), "demo_weights")
STAGES = ("render", "precompute", "train", "export", "sample", "measure")

_OUT = flags.DEFINE_string("out", "/tmp/adapter_bench", "Output folder.")
_BASE = flags.DEFINE_string("base", DEMO, "The base model (run, checkpoint step or export).")
_INSTRUMENT = flags.DEFINE_integer("program", 12, "General MIDI program of the new instrument (12: marimba).")
_TRAIN = flags.DEFINE_integer("train_clips", 32, "Renders to train the adapter on.")
_HELDOUT = flags.DEFINE_integer("heldout_clips", 24, "Held-out renders (the reference).")
_SECONDS = flags.DEFINE_float("seconds", 12.0, "Seconds per render and per song.")
_STEPS = flags.DEFINE_integer("steps", 400, "Adapter training steps.")
_STAGES = flags.DEFINE_list("stages", ["all"], f"Stages to run: all or some of {', '.join(STAGES)}.")
_TRAIN_FLAGS = flags.DEFINE_list("train_flags", [], "More --config.X=Y flags for the adapter run.")


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _run(cmd: list[str]) -> dict[str, float]:
    """Runs a program as the README shows it; returns its wall and CPU seconds and peak RSS."""
    print("$ " + " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": after.ru_maxrss / 1024,
    }


def _choices(
    seed: int, count: int, instrument: str, program: int
) -> list[tuple[cp.Choice, np.random.Generator]]:
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        choice = cp.Choice(
            int(rng.integers(12)),
            cp.MODES[int(rng.integers(2))],
            cp.TEMPOS[int(rng.integers(len(cp.TEMPOS)))],
            program,
            instrument,
        )
        out.append((choice, rng))
    return out


def render_folder(folder: str, seed: int, count: int, program: int, sample_rate: int, channels: int) -> None:
    """``count`` renders of the new material as a plain audio folder (WAVs + captions.csv)."""
    if os.path.exists(os.path.join(folder, "captions.csv")):
        return
    os.makedirs(folder, exist_ok=True)
    instrument = render.program_name(program)
    rows = []
    for i, (choice, rng) in enumerate(_choices(seed, count, instrument, program)):
        clip = cp.render_choice(
            choice,
            rng,
            f"{instrument}-{seed}-{i:03d}",
            sample_rate=sample_rate,
            channels=channels,
            clip_seconds=_SECONDS.value,
        )
        name = f"{clip.entry.id}.wav"
        generation.write_wav(os.path.join(folder, name), clip.audio, sample_rate)
        rows.append({"file": name, "caption": choice.caption(), **choice.labels()})
    with open(os.path.join(folder, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": r["caption"]}) + "\n" for r in rows)
    with open(os.path.join(folder, "captions.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.rename(os.path.join(folder, "captions.csv.tmp"), os.path.join(folder, "captions.csv"))


def _manifest(folder: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(folder, generation.MANIFEST))]


def measure(out: str, timings: dict) -> dict:
    mine, heldout = os.path.join(out, "mine"), os.path.join(out, "mine", "heldout")
    result: dict = {"timings": timings}
    codec = load_codec("default")
    # The yardsticks: the training renders, and the held-out renders through the codec.
    coded = os.path.join(out, "heldout_codec")
    if not os.path.exists(os.path.join(coded, "done")):
        os.makedirs(coded, exist_ok=True)
        for name in sorted(f for f in os.listdir(heldout) if f.endswith(".wav")):
            audio, sr = sf.read(os.path.join(heldout, name), dtype="float32", always_2d=True)
            audio = audio.T
            back = codec.decode(codec.encode(audio, sr))[:, : audio.shape[1]]
            generation.write_wav(os.path.join(coded, name), back, sr)
        open(os.path.join(coded, "done"), "w").close()
    fd = {}
    for embedding in ("spectral", "codec"):
        row = {
            "train renders": set_distance(os.path.join(mine, "train"), heldout, embedding)[
                "frechet_distance"
            ],
            "held-out renders through the codec": set_distance(coded, heldout, embedding)["frechet_distance"],
        }
        samples = os.path.join(out, "samples_new")
        rows = _manifest(samples)
        for stack in dict.fromkeys(r["adapters"] for r in rows):
            files = [r["file"] for r in rows if r["adapters"] == stack]
            row[stack or "base"] = set_distance(samples, heldout, embedding, files=files)["frechet_distance"]
        fd[embedding] = row
    result["frechet_distance"] = fd
    # Adherence on the demo's held-out pairings, per stack.
    demo = os.path.join(out, "samples_demo")
    rows = _manifest(demo)
    metrics = {m["file"]: m for m in evaluate_folder(demo, transcribe=False, progress=False).rows}
    adherence, identical = {}, {}
    by_stack: dict[str, list[dict]] = {}
    for r in rows:
        by_stack.setdefault(r["adapters"], []).append(r)
    base_audio = {r["prompt"]: open(os.path.join(demo, r["file"]), "rb").read() for r in by_stack[""]}
    for stack, srows in by_stack.items():
        prompt_rows = demo_prompts.prompt_rows([metrics[r["file"]] for r in srows])
        adherence[stack or "base"] = demo_prompts.accuracies(prompt_rows)
        identical[stack or "base"] = sum(
            open(os.path.join(demo, r["file"]), "rb").read() == base_audio[r["prompt"]] for r in srows
        )
    result["demo_heldout_adherence"] = adherence
    result["songs_identical_to_base"] = {
        k: f"{v}/{len(by_stack[k if k != 'base' else ''])}" for k, v in identical.items()
    }
    return result


def main(argv):
    del argv
    out = os.path.abspath(_OUT.value)
    stages = STAGES if _STAGES.value == ["all"] else tuple(_STAGES.value)
    mine = os.path.join(out, "mine")
    latents, run, adapter = (os.path.join(out, d) for d in ("latents", "run", "adapter"))
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    os.makedirs(out, exist_ok=True)
    card = load_codec("default").card
    if "render" in stages:
        t0 = time.time()
        for sub, seed, count in (("train", 1000, _TRAIN.value), ("heldout", 2000, _HELDOUT.value)):
            render_folder(
                os.path.join(mine, sub), seed, count, _INSTRUMENT.value, card.sample_rate, card.audio_channels
            )
        timings.setdefault("render", {"wall_s": round(time.time() - t0, 1)})
    if "precompute" in stages and not os.path.exists(os.path.join(latents, "dataset_card.json")):
        timings["precompute"] = _run(
            [
                _bin("audiodiff-precompute"),
                f"--corpus={mine}/train",
                f"--out_dir={latents}",
                f"--like={_BASE.value}",
                "--progress=false",
            ]
        )
    if "train" in stages:
        timings["train"] = _run(
            [
                _bin("audiodiff-train"),
                f"--config=configs/adapter.py:{_BASE.value}",
                f"--workdir={run}",
                f"--config.data.shards_dir={latents}",
                f"--config.train.num_steps={_STEPS.value}",
                *(f"--config.{f}" for f in _TRAIN_FLAGS.value),
            ]
        )
    if "export" in stages and not os.path.exists(adapter):
        timings["export"] = _run([_bin("audiodiff-export"), f"--checkpoint={run}", f"--out={adapter}"])
    common = [
        "--seconds=12",
        "--seeds=0",
        "--guidance=4",
        "--steps=50",
        "--sampler=dpmpp_2m",
        "--batch_size=8",
        "--eval=false",
    ]
    if "sample" in stages:
        timings["sample new material"] = _run(
            [
                _bin("audiodiff-sample"),
                f"--checkpoint={_BASE.value}",
                f"--out={out}/samples_new",
                f"--prompts_file={mine}/heldout/prompts.jsonl",
                "--adapters=none",
                f"--adapters={adapter}",
                *common,
            ]
        )
        prompts = os.path.join(out, "demo_prompts.jsonl")
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"prompt": c.caption()}) + "\n" for c in cp.held_out_prompts())
        timings["sample demo pairings"] = _run(
            [
                _bin("audiodiff-sample"),
                f"--checkpoint={_BASE.value}",
                f"--out={out}/samples_demo",
                f"--prompts_file={prompts}",
                "--adapters=none",
                f"--adapters={adapter}@0",
                f"--adapters={adapter}@1",
                *common,
            ]
        )
    with open(timings_path, "w") as f:
        json.dump(timings, f, indent=1)
    if "measure" in stages:
        result = measure(out, timings)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
