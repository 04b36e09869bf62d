r"""Adapters on the demo model, measured: material the demo corpus never had, taken end to
end through the commands of the README section "Your own music: adapters", as written.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/adapter_bench.py \
        --out=/tmp/adapter_bench [--program=12] [--stages=all]

Stages (each skipped when its output is there, so a rerun continues; ``--out`` is the
folder the README's commands run in):

1. ``render``: the new material, as a user's folder of audio would be: the demo corpus's
   four-bar loops (``data_pipeline/corpus_prompts.py``: chords, melody, bass, drums; key,
   tempo and instrument in the caption) played by an instrument outside its five
   (``--program``, a General MIDI program of TimGM6mb; 12 is the marimba). ``mine/``:
   32 renders (WAVs + ``captions.csv``: file, caption, key, mode, tempo, instrument);
   ``mine_heldout/``: 24 others (other seeds, keys and tempos), the reference of the
   Fréchet distance; ``prompts.jsonl``: their captions.
2. ``readme``: the README's commands, read from README.md and run in ``--out`` one by one
   (check, precompute ``--like=demo``, the adapter run, its export, a sweep of the
   held-out captions with no adapter and the adapter at 0.5 and 1, the merged export),
   each timed: wall and CPU seconds, peak RSS.
3. ``pairings``: the demo's 24 held-out pairings (``launch/demo_prompts.py``) sampled
   with no adapter and the adapter at 0 and 1 (12 s, DPM++(2M) 50 steps) at the guidance
   of ``--pairings_guidance`` (3, at which the README samples with adapters) and the seeds
   of ``--pairings_seeds`` (0, 1, 2: 72 songs a stack, as one seed's figure moves by 4
   points a song).
4. ``cost``: the adapter run against a full fine-tune (``configs/demo.py:continue`` from
   the same weights on the same latents), ``--cost_steps`` steps each: step time (mean
   of the logged steps after the first log) and peak RSS; the time to merge the adapter
   into the base for sampling, against the time to sample.
5. ``measure``: the Fréchet distance of each stack's songs to the held-out renders (the
   evaluation's default ``spectral`` embedding, and ``codec``), with yardsticks (the
   training renders, and the held-out renders through the codec, against the held-out
   renders); key, tempo and onset adherence of each stack on the demo's pairings; how
   many songs at scale 0 are the base's, byte for byte. Everything goes to
   ``OUT/results.json`` and is printed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time

import jax
import numpy as np
import soundfile as sf
from absl import app, flags

from audiodiff_jax.checkpoints import source
from audiodiff_jax.codec import load_codec
from audiodiff_jax.evaluation import evaluate_folder, set_distance
from audiodiff_jax.sampling import generation
from data_pipeline import corpus_prompts as cp
from data_pipeline import render
from launch import demo_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("render", "readme", "pairings", "cost", "measure")
README_SECTION = "## Your own music: adapters"

_OUT = flags.DEFINE_string("out", "/tmp/adapter_bench", "The folder the README's commands run in.")
_PROGRAM = flags.DEFINE_integer("program", 12, "General MIDI program of the new instrument (12: marimba).")
_TRAIN = flags.DEFINE_integer("train_clips", 32, "Renders to train the adapter on.")
_HELDOUT = flags.DEFINE_integer("heldout_clips", 24, "Held-out renders (the reference).")
_SECONDS = flags.DEFINE_float("seconds", 12.0, "Seconds per render.")
_COST_STEPS = flags.DEFINE_integer("cost_steps", 60, "Steps of each run of the cost stage.")
_PAIRINGS_GUIDANCE = flags.DEFINE_float(
    "pairings_guidance", 3.0, "Guidance of the pairings stage: the README's for sampling with adapters."
)
_PAIRINGS_SEEDS = flags.DEFINE_list(
    "pairings_seeds", ["0", "1", "2"], "Seeds of the pairings stage (24 songs each; one song is 4 points)."
)
_STAGES = flags.DEFINE_list("stages", ["all"], f"Stages to run: all or some of {', '.join(STAGES)}.")


def _env() -> dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": REPO}


def _run(cmd: list[str], cwd: str, log: str | None = None) -> dict[str, float]:
    """Runs a program; returns its wall and CPU seconds (user + system) and peak RSS."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log or os.devnull, "w") as f:
        subprocess.run(cmd, check=True, cwd=cwd, env=_env(), stderr=f if log else None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(after.ru_maxrss / 1024),
    }


def readme_commands() -> list[list[str]]:
    """The commands of the README's adapter section (its first code block), as argv lists."""
    text = open(os.path.join(REPO, "README.md")).read()
    block = text[text.index(README_SECTION) :].split("```")[1]
    commands, pending = [], ""
    for line in block.splitlines():
        line = line.split("  #")[0].rstrip()
        if not line.strip():
            continue
        pending += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            commands.append(shlex.split(pending))
            pending = ""
    return commands


def _choices(seed: int, count: int, instrument: str, program: int):
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        choice = cp.Choice(
            int(rng.integers(12)),
            cp.MODES[int(rng.integers(2))],
            cp.TEMPOS[int(rng.integers(len(cp.TEMPOS)))],
            program,
            instrument,
        )
        yield choice, rng


def render_folder(
    folder: str, seed: int, count: int, program: int, sample_rate: int, channels: int, controls: bool = False
) -> list[dict]:
    """``count`` renders of the new material as a plain audio folder (WAVs + captions.csv
    with key, mode, tempo and time-signature columns); returns their prompt rows (with
    the same tempo, key and meter as controls for a base that takes them)."""
    os.makedirs(folder, exist_ok=True)
    instrument = render.program_name(program)
    rows = []
    for i, (choice, rng) in enumerate(_choices(seed, count, instrument, program)):
        clip = cp.render_choice(
            choice,
            rng,
            f"{instrument.replace(' ', '_')}-{seed}-{i:03d}",
            sample_rate=sample_rate,
            channels=channels,
            clip_seconds=_SECONDS.value,
        )
        name = f"{clip.entry.id}.wav"
        generation.write_wav(os.path.join(folder, name), clip.audio, sample_rate)
        rows.append({"file": name, "caption": choice.caption(), **choice.labels()})
    with open(os.path.join(folder, "captions.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.rename(os.path.join(folder, "captions.csv.tmp"), os.path.join(folder, "captions.csv"))
    return [_prompt_row(r, controls) for r in rows]


def _prompt_row(row: dict, controls: bool) -> dict:
    out = {"prompt": row["caption"]}
    if controls:
        out |= demo_prompts.control_fields(row["key"], row["mode"], float(row["tempo"]))
    return out


def _manifest(folder: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(folder, generation.MANIFEST))]


_STEP_LINE = re.compile(r"step (\d+)/\d+ .*?step_time_s=([0-9.e+-]+)")


def _step_times(log: str) -> list[float]:
    """The step times the loop logged (one per log step), the first (compile) left out."""
    times = [float(m.group(2)) for m in map(_STEP_LINE.search, open(log)) if m]
    return times[1:]


def cost(out: str) -> dict:
    """Step time and host memory: the adapter run against a full fine-tune of the same
    model from the same weights on the same latents; the merge for sampling."""
    steps = _COST_STEPS.value
    common = [
        "--config.data.shards_dir=latents/mine",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=10",
        f"--config.checkpoint.every_steps={steps}",
    ]
    runs = {
        "adapters (configs/adapter.py:demo)": ["audiodiff-train", "--config=configs/adapter.py:demo"],
        "full fine-tune (configs/demo.py:continue)": [
            "audiodiff-train",
            "--config=configs/demo.py:continue",
            "--config.train.init_from=demo",
        ],
    }
    result = {}
    for n, (name, cmd) in enumerate(runs.items()):
        workdir, log = f"cost/run{n}", os.path.join(out, f"cost/run{n}.log")
        os.makedirs(os.path.join(out, "cost"), exist_ok=True)
        r = _run([*cmd, f"--workdir={workdir}", *common], out, log)
        times = _step_times(log)
        r["step_time_s"] = round(float(np.mean(times)), 3) if times else None
        result[name] = r
    # The merge that sampling does once per stack, against sampling with the merged weights.
    gen, _ = generation.open_generator("demo", None)
    stack = source.open_adapter_stacks([os.path.join(out, "adapters/mine")])[0]
    base = gen.base_params
    times = []
    for _ in range(3):
        gen.use_weights(gen.step, gen.weights, base)  # back to the base
        t0 = time.perf_counter()
        gen.use_weights(gen.step, gen.weights, base, adapters=stack)
        jax.block_until_ready(gen.params)
        times.append(time.perf_counter() - t0)
    p = generation.SampleParams(
        "marimba and drums in D minor at 114 bpm", seconds=12.0, guidance=4.0, steps=50
    )
    gen.generate_latents([p])  # compiles
    denoise = gen.generate_latents([p]).denoise_s
    result["merge for sampling"] = {
        "first (compiles the merge)_s": round(times[0], 3),
        "again_s": round(min(times[1:]), 3),
        "one 12 s song, 50 steps, CFG_s": round(denoise, 3),
    }
    return result


def measure(out: str, timings: dict) -> dict:
    heldout = os.path.join(out, "mine_heldout")
    result: dict = {"timings": timings}
    codec = load_codec("default")
    coded = os.path.join(out, "heldout_codec")
    if not os.path.exists(os.path.join(coded, "done")):
        os.makedirs(coded, exist_ok=True)
        for name in sorted(f for f in os.listdir(heldout) if f.endswith(".wav")):
            audio, sr = sf.read(os.path.join(heldout, name), dtype="float32", always_2d=True)
            back = codec.decode(codec.encode(audio.T, sr))[:, : audio.shape[0]]
            generation.write_wav(os.path.join(coded, name), back, sr)
        open(os.path.join(coded, "done"), "w").close()
    fd = {}
    samples = os.path.join(out, "samples/mine")
    rows = _manifest(samples)
    for embedding in ("spectral", "codec"):
        # Against the renders, and against the renders as the codec gives them back (what
        # a latent model can reach at best).
        for ref_name, ref in (("renders", heldout), ("renders through the codec", coded)):
            row = {
                "train renders": set_distance(os.path.join(out, "mine"), ref, embedding)["frechet_distance"]
            }
            if ref is heldout:
                row["held-out renders through the codec"] = set_distance(coded, ref, embedding)[
                    "frechet_distance"
                ]
            for stack in dict.fromkeys(r["adapters"] for r in rows):
                files = [r["file"] for r in rows if r["adapters"] == stack]
                row[stack or "base"] = set_distance(samples, ref, embedding, files=files)["frechet_distance"]
            fd[f"{embedding}, to the held-out {ref_name}"] = row
    result["frechet_distance"] = fd
    demo = os.path.join(out, "samples_pairings")
    rows = _manifest(demo)
    metrics = {m["file"]: m for m in evaluate_folder(demo, transcribe=False, progress=False).rows}
    by_stack: dict[str, list[dict]] = {}
    for r in rows:
        by_stack.setdefault(r["adapters"], []).append(r)
    base_audio = {
        (r["prompt"], r["seed"]): open(os.path.join(demo, r["file"]), "rb").read() for r in by_stack[""]
    }
    adherence, identical = {}, {}
    for stack, srows in by_stack.items():
        per_seed = {}
        for seed in sorted({r["seed"] for r in srows}):
            seed_rows = [metrics[r["file"]] for r in srows if r["seed"] == seed]
            per_seed[seed] = demo_prompts.accuracies(demo_prompts.prompt_rows(seed_rows))
        every = demo_prompts.accuracies(demo_prompts.prompt_rows([metrics[r["file"]] for r in srows]))
        adherence[stack or "base"] = {**every, "per_seed": per_seed}
        same = sum(
            open(os.path.join(demo, r["file"]), "rb").read() == base_audio[(r["prompt"], r["seed"])]
            for r in srows
        )
        identical[stack or "base"] = f"{same}/{len(srows)}"
    result["demo_heldout_adherence"] = adherence
    result["songs_identical_to_base"] = identical
    return result


def main(argv):
    del argv
    out = os.path.abspath(_OUT.value)
    stages = STAGES if _STAGES.value == ["all"] else tuple(_STAGES.value)
    os.makedirs(out, exist_ok=True)
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    card = load_codec("default").card
    # A base with musical controls is asked through them too, as the demo asks it.
    controls = bool(source.WeightsSource("demo").cfg.model.controls)
    if "render" in stages and not os.path.exists(os.path.join(out, "prompts.jsonl")):
        t0 = time.time()
        args = (_PROGRAM.value, card.sample_rate, card.audio_channels)
        render_folder(os.path.join(out, "mine"), 1000, _TRAIN.value, *args)
        prompts = render_folder(os.path.join(out, "mine_heldout"), 2000, _HELDOUT.value, *args, controls)
        with open(os.path.join(out, "prompts.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in prompts)
        timings["render"] = {"wall_s": round(time.time() - t0, 1)}
    if "readme" in stages:
        for n, cmd in enumerate(readme_commands()):
            key = f"readme {n + 1}: {cmd[0]}"
            if key not in timings:
                timings[key] = _run(cmd, out, os.path.join(out, f"readme_{n + 1}.log"))
                with open(timings_path, "w") as f:
                    json.dump(timings, f, indent=1)
    if "pairings" in stages and not os.path.exists(os.path.join(out, "samples_pairings", "report.html")):
        with open(os.path.join(out, "pairings.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in demo_prompts.held_out_rows(controls))
        timings["pairings"] = _run(
            [
                "audiodiff-sample",
                "--checkpoint=demo",
                "--out=samples_pairings",
                "--prompts_file=pairings.jsonl",
                "--seconds=12",
                f"--guidance={_PAIRINGS_GUIDANCE.value:g}",
                f"--seeds={','.join(_PAIRINGS_SEEDS.value)}",
                "--batch_size=8",
                "--eval=false",
                "--adapters=none",
                "--adapters=adapters/mine@0",
                "--adapters=adapters/mine",
            ],
            out,
            os.path.join(out, "pairings.log"),
        )
    if "cost" in stages and "cost" not in timings:
        timings["cost"] = cost(out)
    with open(timings_path, "w") as f:
        json.dump(timings, f, indent=1)
    if "measure" in stages:
        result = measure(out, timings)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
