"""Corpus benchmark: render speed (scores, grooves) and precompute speed, in audio seconds per second.

    python benchmarks/corpus_bench.py --num_clips=16 --clip_seconds=10 --sample_rate=44100 \\
        [--codec=default | --codec=tests.precompute_codec:make_codec] [--workdir=/tmp/corpus_bench]

Rendering runs in one process (``--workers`` for more); precompute uses the given
codec (the JAX codec by default; the test pooling codec measures the pipeline
alone: reading, resampling, shard writing). Prints one JSON line per stage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("num_clips", 16, "clips per corpus")
flags.DEFINE_float("clip_seconds", 10.0, "seconds per clip")
flags.DEFINE_integer("sample_rate", 44100, "render sample rate")
flags.DEFINE_integer("workers", 1, "render processes")
flags.DEFINE_string("codec", "default", "codec for precompute (see audiodiff-precompute --codec)")
flags.DEFINE_integer("files_per_shard", 8, "precompute files per shard")
flags.DEFINE_integer("batch_size", 1, "precompute files per codec call")
flags.DEFINE_string("workdir", None, "where to write (default: a temporary folder, removed)")
flags.DEFINE_bool("grooves", True, "also time the MMA groove corpus (needs mma)")

FLAGS = flags.FLAGS


def _audio_seconds(corpus_dir: str) -> float:
    import soundfile as sf

    total = 0.0
    for name in os.listdir(os.path.join(corpus_dir, "audio")):
        info = sf.info(os.path.join(corpus_dir, "audio", name))
        total += info.frames / info.samplerate
    return total


def main(argv) -> None:
    del argv
    from data_pipeline import corpus_grooves, corpus_scores, precompute

    f = FLAGS
    root = f.workdir or tempfile.mkdtemp(prefix="corpus_bench-")
    common = dict(sample_rate=f.sample_rate, clip_seconds=f.clip_seconds, workers=f.workers)
    try:
        corpus_scores.catalogue()  # one-off music21 index load, not part of the per-clip speed
        stages = [("render_scores", corpus_scores.render_clips)]
        if f.grooves and corpus_grooves.shutil.which("mma"):
            stages.append(("render_grooves", corpus_grooves.render_grooves))
        for name, fn in stages:
            out = os.path.join(root, name)
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            fn(out, f.num_clips, seed=0, **common)
            wall = time.perf_counter() - start
            seconds = _audio_seconds(out)
            print(
                json.dumps(
                    {
                        "stage": name,
                        "clips": f.num_clips,
                        "audio_s": round(seconds, 1),
                        "wall_s": round(wall, 2),
                        "audio_s_per_s": round(seconds / wall, 1),
                    }
                )
            )
        codec = precompute.load_codec(f.codec)
        corpus = precompute.FolderCorpus(os.path.join(root, "render_scores"))
        out = os.path.join(root, "latents")
        start = time.perf_counter()
        summary = precompute.precompute(
            corpus,
            out,
            codec,
            files_per_shard=f.files_per_shard,
            batch_size=f.batch_size,
            overwrite=True,
            progress=False,
        )
        wall = time.perf_counter() - start
        seconds = summary["audio_hours"] * 3600
        print(
            json.dumps(
                {
                    "stage": "precompute",
                    "codec": codec.card.name if hasattr(codec.card, "name") else str(codec.card),
                    "files": summary["num_records"],
                    "audio_s": round(seconds, 1),
                    "wall_s": round(wall, 2),
                    "audio_s_per_s": round(seconds / wall, 1),
                }
            )
        )
    finally:
        if not f.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
