r"""Few-step students against their teacher, side by side in one process on one machine.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/distill_bench.py \
        --teacher=demo --student=demo_student --student=runs/student4_calibrated --out=/tmp/distill_bench

For the teacher (its 50 DPM++(2M) steps with classifier-free guidance, as the demo
samples) and each student (its own DDIM steps, one evaluation each; a calibrated one,
``audiodiff-calibrate``, given the scale plus its offset), on the demo's 24
held-out prompt pairings (``launch/demo_prompts.held_out_rows``: each key with the
tempo it never has in training, so never trained on), 12 s each, guidance 4:

- adherence: key, tempo within 8% and onsets, by the built-in evaluation, over the
  seeds of ``--seeds`` (24 songs each; one seed's figure moves by 4 points a song);
- the Fréchet distance (the built-in ``spectral`` embedding, and the codec's) from the
  student's songs (seed 0) to the teacher's (seed 0), beside the distance between two
  teacher runs with different seeds (1 against 0): the bound of issue 26 is 1.5 times it;
- cost: model evaluations per song (from the manifests) and wall seconds per song,
  sampling and decoding, compilation apart;
- the seam ratio of windowed songs (``--song_seconds``, several windows each).

Writes ``OUT/distill_bench.json`` and prints a Markdown table (BENCHMARKS.md, "Few-step
students").
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

_TEACHER = flags.DEFINE_string("teacher", "demo", "Teacher: run, checkpoint step or export.")
_STUDENTS = flags.DEFINE_multi_string("student", [], "Student (repeatable): run, checkpoint step or export.")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Guidance scale of every song.")
_SECONDS = flags.DEFINE_float("seconds", 12.0, "Seconds per held-out song.")
_SONG_SECONDS = flags.DEFINE_float("song_seconds", 60.0, "Seconds of each windowed song (seam ratio).")
_NUM_SONGS = flags.DEFINE_integer("num_songs", 2, "Windowed songs per model.")
_EMBEDDINGS = flags.DEFINE_list("embeddings", ["spectral", "codec"], "Embeddings of the Fréchet distance.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the held-out songs (adherence over all).")


def _rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _make(model: str, rows: list, out: str, seed: int, seconds: float, teacher: bool, codec) -> dict:
    """Songs of ``model`` into ``out``; the cost figures of its manifest."""
    from audiodiff_jax.sweeps import sweep

    kwargs = {"steps": 50, "sampler": "dpmpp_2m"} if teacher else {}
    t0 = time.perf_counter()
    sweep.generate_songs(
        model,
        rows,
        out,
        seconds=seconds,
        seeds=(seed,),
        guidance=_GUIDANCE.value,
        codec=codec,
        batch_size=8,
        **kwargs,
    )
    made = _rows(out)
    t = [r["timings"] for r in made]
    return {
        "songs": len(made),
        "steps": made[0]["steps"],
        "sampler": made[0]["sampler"],
        "model_evals_per_song": float(np.mean([r["model_evals"] for r in made])),
        "denoise_s_per_song": round(float(np.mean([x["denoise_s_per_output"] for x in t])), 4),
        "decode_s_per_song": round(float(np.mean([x["decode_s"] for x in t])), 4),
        "compile_s": round(float(sum(x["compile_s"] for x in t)), 2),
        "seam_ratio": round(float(np.mean([r.get("audio_seam_ratio", np.nan) for r in made])), 4),
        "latent_seam_ratio": round(float(np.mean([r.get("seam_ratio", np.nan) for r in made])), 4),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _name(student: str) -> str:
    """``student8``, or ``student8_offset+1.25`` for a calibrated one (``distill.guidance_offset``)."""
    from audiodiff_jax.checkpoints import source

    d = source.WeightsSource(source.resolve(student)).cfg.distill
    return f"student{d.steps}" + (f"_offset{d.guidance_offset:+g}" if d.guidance_offset else "")


def main(argv):
    del argv
    from audiodiff_jax.checkpoints import source
    from audiodiff_jax.codec import load_codec
    from audiodiff_jax.evaluation.folder import set_distance
    from launch import demo_prompts

    out = _OUT.value
    os.makedirs(out, exist_ok=True)
    codec = load_codec("default")
    teacher = source.resolve(_TEACHER.value)
    controls = bool(source.WeightsSource(teacher).cfg.model.controls)
    held = demo_prompts.held_out_rows(controls)
    songs = held[: _NUM_SONGS.value]
    models = [("teacher", teacher, True)] + [(_name(s), source.resolve(s), False) for s in _STUDENTS.value]
    if len({name for name, _, _ in models}) < len(models):
        raise app.UsageError(f"--student: two students of the same steps and calibration: {_STUDENTS.value}")
    result = {"guidance": _GUIDANCE.value, "seconds": _SECONDS.value, "models": {}}
    seeds = [int(x) for x in _SEEDS.value]
    if seeds[:2] != [0, 1]:
        raise app.UsageError(
            "--seeds must start with 0,1 (the Fréchet distance compares teacher seeds 1 and 0)"
        )
    for name, path, is_teacher in models:
        entry = {"path": path, "adherence_per_seed": {}}
        for seed in seeds:
            folder = os.path.join(out, f"{name}_s{seed}")
            made = _make(path, held, folder, seed, _SECONDS.value, is_teacher, codec)
            if seed == 0:
                entry["heldout"] = made  # the cost figures: seed 0 of every model
            _, acc = demo_prompts.measure(folder)
            entry["adherence_per_seed"][seed] = {k: round(v, 4) for k, v in acc.items()}
        per_seed = list(entry["adherence_per_seed"].values())
        entry["adherence"] = {
            k: round(float(np.mean([a[k] for a in per_seed])), 4) for k in ("key", "tempo", "onsets")
        }
        entry["songs"] = _make(
            path, songs, os.path.join(out, f"{name}_songs"), 0, _SONG_SECONDS.value, is_teacher, codec
        )
        result["models"][name] = entry
        print(name, json.dumps(entry), flush=True)
    ref = os.path.join(out, "teacher_s0")
    fd = {}
    for emb in _EMBEDDINGS.value:
        row = {"teacher seed 1": set_distance(os.path.join(out, "teacher_s1"), ref, emb)["frechet_distance"]}
        for name, _, is_teacher in models:
            if not is_teacher:
                row[name] = set_distance(os.path.join(out, f"{name}_s0"), ref, emb)["frechet_distance"]
        fd[emb] = row
    result["frechet_distance_to_teacher_seed0"] = fd
    with open(os.path.join(out, "distill_bench.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)

    t = result["models"]["teacher"]
    print("\n| | teacher | " + " | ".join(n for n, _, s in models if not s) + " |")
    print("|---|---" * len(models) + "|")
    students = [result["models"][n] for n, _, s in models if not s]
    every = [t] + students

    def line(label, get):
        print(f"| {label} | " + " | ".join(get(m) for m in every) + " |")

    line("steps x evaluations", lambda m: f"{m['heldout']['steps']} {m['heldout']['sampler']}")
    line("model evaluations per 12 s song", lambda m: f"{m['heldout']['model_evals_per_song']:.0f}")
    line("denoise s per song", lambda m: f"{m['heldout']['denoise_s_per_song']:.3f}")
    line("decode s per song", lambda m: f"{m['heldout']['decode_s_per_song']:.3f}")
    for k in ("key", "tempo", "onsets"):
        line(
            f"{k} adherence, seeds {', '.join(map(str, seeds))} ({len(held) * len(seeds)} songs)",
            lambda m, k=k: (
                f"{m['adherence'][k]:.1%} ("
                + " / ".join(f"{a[k]:.0%}" for a in m["adherence_per_seed"].values())
                + ")"
            ),
        )
    line(f"seam ratio ({_SONG_SECONDS.value:g} s songs)", lambda m: f"{m['songs']['seam_ratio']:.3f}")
    for emb, row in fd.items():
        print(
            f"| FD to teacher seed 0 ({emb}) | {row['teacher seed 1']:.1f} (seed 1) | "
            + " | ".join(
                f"{row[n]:.1f} ({row[n] / row['teacher seed 1']:.2f}x)" for n, _, s in models if not s
            )
            + " |"
        )


if __name__ == "__main__":
    app.run(main)
