"""Peak host memory of decoding long songs with the shipped codec: linear in length.

Each length runs in a fresh process (peak RSS is per process); latents are drawn from
the codec card's latent statistics. Reports the process's peak RSS before and after
the decode, the output's own size, and the decode time (after a warm-up call that
compiles the chunk program).

    JAX_PLATFORMS=cpu python benchmarks/codec_decode_memory.py --minutes=1,5,10,30
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from absl import app, flags

_MINUTES = flags.DEFINE_list("minutes", ["1", "5", "10", "30"], "song lengths in minutes")
_OUT = flags.DEFINE_string("out", "benchmarks/results/codec_decode_memory.json", "JSON output")
_ONE = flags.DEFINE_float("one", 0.0, "internal: measure one length (minutes) in this process")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(minutes: float) -> dict:
    import numpy as np  # noqa: PLC0415 (the child process only)

    from audiodiff_jax.codec import load_codec  # noqa: PLC0415

    codec = load_codec("default")
    card = codec.card_dict()
    rate = codec.card.latent_rate
    frames = int(minutes * 60 * rate)
    rng = np.random.default_rng(0)
    mean = np.asarray(card.get("latent_mean", 0.0), np.float32)
    std = np.asarray(card.get("latent_std", 1.0), np.float32)
    codec.decode((rng.standard_normal((600, codec.card.latent_channels)) * std + mean).astype(np.float32))
    z = (rng.standard_normal((frames, codec.card.latent_channels)) * std + mean).astype(np.float32)
    before = _rss_mb()
    t0 = time.perf_counter()
    audio = codec.decode(z)
    seconds = time.perf_counter() - t0
    return {
        "minutes": minutes,
        "frames": frames,
        "output_mb": audio.nbytes / 1e6,
        "peak_rss_before_mb": before,
        "peak_rss_after_mb": _rss_mb(),
        "decode_s": seconds,
        "realtime_factor": minutes * 60 / seconds,
    }


def main(argv):
    del argv
    if _ONE.value:
        print(json.dumps(measure(_ONE.value)))
        return
    rows = []
    for m in _MINUTES.value:
        out = subprocess.run(
            [sys.executable, __file__, f"--one={m}"], capture_output=True, text=True, check=True
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        before, after = row["peak_rss_before_mb"], row["peak_rss_after_mb"]
        print(
            f"{row['minutes']:>5g} min: output {row['output_mb']:7.1f} MB, peak RSS {before:7.0f}"
            f" -> {after:7.0f} MB (+{after - before:.0f}),"
            f" decode {row['decode_s']:.1f} s ({row['realtime_factor']:.0f}x real time)",
            flush=True,
        )
    with open(_OUT.value, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
