r"""Which embedding for the set distance: the sanity ordering, measured per candidate.

    python benchmarks/eval_embeddings.py --clips=16 --seconds=8 --seeds=0,1

For each seed: R = renders of train-split scores, H = renders of held-out scores,
S = R's excerpts played by other instruments (the stand-in for another soundfont,
``data_pipeline/eval_sets.py``), N = drones and noise. Prints, per embedding, the
Fréchet distances d(R,H) < d(R,S) < d(R,N), the two margins d(R,S)/d(R,H) and
d(R,N)/d(R,S) (both must be > 1), and seconds of embedding per minute of audio. The
default embedding (``evaluation/embeddings.py``) is the one with the largest smaller
margin over the seeds.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from audiodiff_jax.evaluation import embeddings
from data_pipeline import eval_sets

_CLIPS = flags.DEFINE_integer("clips", 16, "Clips per set.")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "Seconds per clip.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Draws of the sets.")
_EMBEDDINGS = flags.DEFINE_list("embeddings", list(embeddings.BUILTIN), "Candidates.")
_RATE = 22050


def main(argv):
    del argv
    results: dict[str, list] = {e: [] for e in _EMBEDDINGS.value}
    for seed in (int(s) for s in _SEEDS.value):
        kw = dict(seconds=_SECONDS.value, sample_rate=_RATE, seed=seed)
        t0 = time.perf_counter()
        sets = {
            "R": eval_sets.render_scores("train", _CLIPS.value, **kw),
            "H": eval_sets.render_scores("heldout", _CLIPS.value, **kw),
            "S": eval_sets.render_scores("train", _CLIPS.value, other_timbres=True, **kw),
            "N": eval_sets.drones_and_noise(_CLIPS.value, **kw),
        }
        print(
            f"seed {seed}: rendered 4 x {_CLIPS.value} clips in {time.perf_counter() - t0:.1f}s", flush=True
        )
        minutes = 4 * _CLIPS.value * _SECONDS.value / 60
        for name in _EMBEDDINGS.value:
            embed = embeddings.get_embedder(name)
            embed(sets["R"][0], _RATE)  # warm-up (compiles the codec once)
            t0 = time.perf_counter()
            g = {
                k: embeddings.Gaussian.of(np.concatenate([embed(a, _RATE) for a in v]))
                for k, v in sets.items()
            }
            cost = (time.perf_counter() - t0) / minutes
            d = {k: embeddings.frechet_distance(g["R"], g[k]) for k in "HSN"}
            results[name].append((d, cost))
            print(
                f"  {name:12s} d(R,H)={d['H']:10.4g} d(R,S)={d['S']:10.4g} d(R,N)={d['N']:10.4g} "
                f"margins {d['S'] / d['H']:.2f} {d['N'] / d['S']:.2f}  {cost:.2f} s/min",
                flush=True,
            )
    print("\n| embedding | dims | d(R,H) | d(R,S) | d(R,N) | d(R,S)/d(R,H) | d(R,N)/d(R,S) | s/audio min |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        dims = embeddings.get_embedder(name)(eval_sets.drones_and_noise(1, seconds=2.0)[0], _RATE).shape[1]
        cells = [
            " / ".join(f"{v:.4g}" for v in values)
            for values in (
                [d["H"] for d, _ in runs],
                [d["S"] for d, _ in runs],
                [d["N"] for d, _ in runs],
            )
        ]
        margins = [
            " / ".join(f"{v:.2f}" for v in values)
            for values in ([d["S"] / d["H"] for d, _ in runs], [d["N"] / d["S"] for d, _ in runs])
        ]
        cost = np.mean([c for _, c in runs])
        print(f"| {name} | {dims} | {' | '.join(cells)} | {' | '.join(margins)} | {cost:.2f} |")


if __name__ == "__main__":
    app.run(main)
