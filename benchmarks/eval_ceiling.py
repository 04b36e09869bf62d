r"""The estimators' ceilings: tempo and key accuracy on real renders whose labels are exact.

    python benchmarks/eval_ceiling.py --out=/tmp/eval_ceiling --clips=30 --seconds=20

Renders ``--clips`` clips of the score corpus (music21 scores, ``corpus_scores.py``)
and of the groove corpus (MMA grooves with drums, ``corpus_grooves.py``; skipped when
MMA is missing), with their manifests, then runs :func:`evaluate_folder` on each
folder: the labels come from the manifests, as they would for any corpus. Prints the
accuracies (tempo within 4%, octave errors wrong; tempo with octave errors allowed; key
exact; MIREX key score) per corpus and overall: the numbers in ``adherence.CEILINGS``
and BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import time

from absl import app, flags

from audiodiff_jax.evaluation import folder
from data_pipeline import corpus_grooves, corpus_scores

_OUT = flags.DEFINE_string("out", "/tmp/eval_ceiling", "Work folder (renders and metrics).")
_CLIPS = flags.DEFINE_integer("clips", 30, "Clips per corpus.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Seconds per clip.")
_SEED = flags.DEFINE_integer("seed", 1, "Corpus seed.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Render processes.")


def main(argv):
    del argv
    kw = dict(
        seed=_SEED.value,
        sample_rate=22050,
        channels=1,
        clip_seconds=_SECONDS.value,
        workers=_WORKERS.value,
        progress=True,
    )
    corpora = {"scores": corpus_scores.render_clips}
    if shutil.which("mma"):
        corpora["grooves"] = corpus_grooves.render_grooves
    rows = {}
    for name, render in corpora.items():
        out = os.path.join(_OUT.value, name)
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(out, "manifest.jsonl")):
            render(out, _CLIPS.value, **kw)
        t1 = time.perf_counter()
        result = folder.evaluate_folder(out, transcribe=False, progress=True)
        rows[name] = result.rows
        print(f"{name}: rendered in {t1 - t0:.0f}s, evaluated in {time.perf_counter() - t1:.0f}s", flush=True)
    rows["all"] = [r for name in corpora for r in rows[name]]
    print("\n| corpus | clips | tempo (4%, octave wrong) | tempo (octave allowed) | key exact | key MIREX |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        s = folder.summarize(rs)["adherence"]
        print(
            f"| {name} | {len(rs)} | {s['tempo_accuracy']:.1%} | {s['tempo_accuracy_octave']:.1%} | "
            f"{s['key_accuracy']:.1%} | {s['key_mirex_score']:.3f} |"
        )
    for r in rows["all"]:
        print(r["file"], r.get("tempo_label"), r["tempo_bpm"], r.get("key_label"), r["key"])


if __name__ == "__main__":
    app.run(main)
