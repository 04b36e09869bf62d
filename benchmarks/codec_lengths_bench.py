"""Encoding clips of many lengths: compiled programs and throughput, with and without length buckets.

Precompute encodes clips of whatever length the corpus has. A clip shorter than one
chunk used to run at its own length, compiling one program per distinct length; now it
is padded to one of a few bucket lengths (``audiodiff_jax/codec/chunked.py``). This
encodes ``--clips`` clips of distinct random lengths (``--min_s`` to ``--max_s``) with the
shipped codec, both ways, each in a fresh codec (no shared compile cache), and compares
with the codec's own warm encode speed on one fixed length.

    JAX_PLATFORMS=cpu python benchmarks/codec_lengths_bench.py
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from audiodiff_jax.codec import chunked, load_codec

_CLIPS = flags.DEFINE_integer("clips", 24, "clips of distinct lengths")
_MIN_S = flags.DEFINE_float("min_s", 2.0, "shortest clip, seconds")
_MAX_S = flags.DEFINE_float("max_s", 11.0, "longest clip, seconds (below one 256-frame chunk)")
_OUT = flags.DEFINE_string("out", "benchmarks/results/codec_lengths.json", "JSON output")


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    base = load_codec("default")
    sr = base.card.sample_rate
    lengths = np.linspace(_MIN_S.value, _MAX_S.value, _CLIPS.value)
    clips = [rng.uniform(-0.3, 0.3, (1, int(s * sr))).astype(np.float32) for s in lengths]
    audio_s = float(sum(c.shape[1] for c in clips) / sr)
    result = {"clips": len(clips), "audio_s": audio_s, "machine": "2-core CPU, no GPU"}
    original = chunked.chunked_apply
    for name, bucket in (("own_length", False), ("buckets", True)):
        codec = load_codec("default")

        def apply(*a, bucket_flag=bucket, **kw):
            kw["bucket"] = bucket_flag
            return original(*a, **kw)

        chunked.chunked_apply = apply
        try:
            t0 = time.perf_counter()
            for c in clips:
                codec.encode(c, sr)
            seconds = time.perf_counter() - t0
        finally:
            chunked.chunked_apply = original
        result[name] = {
            "seconds": seconds,
            "programs": codec._encode._cache_size(),
            "audio_s_per_s": audio_s / seconds,
        }
        programs = codec._encode._cache_size()
        print(f"{name:10s}: {seconds:6.1f} s, {programs} programs, {audio_s / seconds:6.1f} audio s/s")
    x = clips[-1]
    base.encode(x, sr)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        base.encode(x, sr)
    warm = reps * x.shape[1] / sr / (time.perf_counter() - t0)
    result["warm_encode_audio_s_per_s"] = warm
    print(f"warm encode of one length: {warm:6.1f} audio s/s")
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
