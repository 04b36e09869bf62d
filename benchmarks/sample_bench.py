"""Benchmark of sampling through ``generation.Generator`` (the path ``audiodiff-sample`` runs).

    python benchmarks/sample_bench.py --config=configs/dit.py:1B --seconds=300 --steps=50 \
        --guidance=5 --codec=random:stable --paths=one_pass
    # Cost curves: seconds per song-second against song length, one pass and windowed.
    python benchmarks/sample_bench.py --config=configs/tiny.py --seconds=30,60,120,180,300 \
        --steps=10 --paths=one_pass,windowed --window_frames=1024 --codec=default \
        --plot=benchmarks/results/sampling_curves.png

Builds the model of ``--config`` with random weights (the loop's cost does not depend
on them) directly sharded on a mesh of all devices (``--config.mesh.*``), hands them to
a ``Generator`` in memory (no checkpoint: the dataset card and tokenizer come from tiny
demo shards), and generates one batch of ``--batch`` songs per song length and path:

- ``one_pass``: the whole song in one window (``window_frames=0``);
- ``windowed``: windows of ``--window_frames`` sharing a quarter with the previous one.

The first call of each shape compiles (``Generated.compile_s``, reported apart); the
median of ``--repeats`` further calls is the sampling time. With ``--codec`` each
song is also decoded (``Generator.decode``), giving the real-time factor with and
without the decode. ``--codec``: ``default`` (the shipped codec), a codec folder or
run, or ``random:PRESET`` (``configs/codec.py`` preset at random weights, e.g.
``random:stable``, 64 channels at 21.5 Hz; fine for timing). Without a codec the
latent rate is the demo codec's (21.53 Hz). The model's latent channels are set to
the codec's. Prints one JSON line; ``--plot`` draws the curves (matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from audiodiff_jax.checkpoints import source
from audiodiff_jax.codec import lookup
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import sharding
from audiodiff_jax.core.config import Config
from audiodiff_jax.data.cards import CodecCard
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.diffusion import samplers
from audiodiff_jax.model import count_params, make_model
from audiodiff_jax.sampling import generation
from audiodiff_jax.sampling.generation import SampleParams
from benchmarks import codec_bench
from data_pipeline import demo_shards

PATHS = ("one_pass", "windowed")
PROMPT = "an energetic rock song with electric guitar and drums"


def standin_data(cfg: Config, codec_card: CodecCard, workdir: str):
    """The dataset card and tokenizer a real run would hand the sampler: tiny demo shards
    written to ``workdir`` give both; returns (config with those shards, card, tokenizer)."""
    shards = os.path.join(workdir, "shards")
    card = demo_shards.write_demo_shards(
        shards, num_clips=4, latent_channels=cfg.model.latent_channels, num_shards=1, max_frames=64
    )
    card = dataclasses.replace(card, codec=codec_card)
    cfg = config_lib.replace(cfg, **{"data.shards_dir": shards})
    return cfg, card, Tokenizer(os.path.join(shards, card.tokenizer))


def open_codec(spec: str, latent_channels: int | None = None):
    """``--codec``: empty (None), ``random:PRESET`` or a ``load_codec`` name or path."""
    if not spec:
        return None
    if spec.startswith("random:"):
        return codec_bench.random_codec(spec.split(":", 1)[1], latent_channels=latent_channels)
    return codec_bench.open_codec(spec)


def run(
    cfg: Config,
    *,
    seconds: list[float],
    paths: list[str],
    steps: int = 50,
    sampler: str = "dpmpp_2m",
    guidance: float = 5.0,
    batch: int = 1,
    window_frames: int = 1024,
    repeats: int = 2,
    codec=None,
    deadline: float | None = None,
) -> dict:
    """Times generation for every (path, seconds); returns the figures.

    ``deadline`` (a ``time.monotonic()`` value): lengths not started by then are
    skipped (listed in ``skipped``), so a time-boxed suite still reports what it has.
    """
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise ValueError(f"--paths: unknown {bad}; choose from {PATHS}")
    if codec is not None:
        cfg = config_lib.replace(cfg, **{"model.latent_channels": codec.card.latent_channels})
        codec_card = codec.card
    else:
        codec_card = CodecCard(**demo_shards.demo_codec_card(cfg.model.latent_channels))
    config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    model = make_model(cfg.model)
    shardings = sharding.named_shardings(model.logical_axes(), mesh)
    params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
    workdir = tempfile.mkdtemp(prefix="sample_bench_")
    rows, skipped = [], []
    try:
        cfg, card, tokenizer = standin_data(cfg, codec_card, workdir)
        longest = max(seconds)
        gens = {}
        for path in paths:
            # The weights in memory, as training's evaluation or a notebook holds them.
            gens[path] = generation.Generator(
                cfg,
                card,
                tokenizer,
                codec,
                params=params,
                weights="raw",
                mesh=mesh,
                window_frames=0 if path == "one_pass" else window_frames,
                min_seconds=min(1.0, min(seconds)),
                max_seconds=max(longest, 1.0),
            )
        p0 = SampleParams(PROMPT, seconds[0], steps=steps, sampler=sampler, guidance=guidance)
        for sec in seconds:
            for path in paths:
                if deadline is not None and time.monotonic() > deadline:
                    skipped.append({"path": path, "seconds": sec})
                    continue
                gen = gens[path]
                requests = [dataclasses.replace(p0, seconds=sec, seed=i) for i in range(batch)]
                first = gen.generate_latents(requests)
                times = [gen.generate_latents(requests).denoise_s for _ in range(repeats)]
                loop_s = statistics.median(times) if times else first.denoise_s
                row = {
                    "path": path,
                    "seconds": sec,
                    "frames": gen.frames_for(sec),
                    "windows": first.windows,
                    "window_frames": gen.window if path == "windowed" else 0,
                    "compile_s": round(first.compile_s, 3),
                    "first_call_s": round(first.denoise_s, 4),
                    "loop_s": round(loop_s, 4),
                    "s_per_song_s": round(loop_s / (sec * batch), 6),
                    "loop_realtime_factor": round(sec * batch / loop_s, 3),
                }
                if codec is not None:
                    gen.decode(first.latents[0], sec)  # warm-up: compiles the chunk shapes
                    t0 = time.perf_counter()
                    for lat in first.latents:
                        gen.decode(lat, sec)
                    decode_s = time.perf_counter() - t0
                    row.update(
                        decode_s=round(decode_s, 4),
                        decode_realtime_factor=round(sec * batch / decode_s, 3),
                        realtime_factor_with_decode=round(sec * batch / (loop_s + decode_s), 3),
                    )
                print(f"[sample_bench] {json.dumps(row)}", flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    device = jax.devices()[0]
    return {
        "preset": cfg.model.preset,
        "params_M": round(count_params(params) / 1e6, 2),
        "steps": steps,
        "sampler": sampler,
        "cfg": guidance != 1.0,
        "model_evals_per_window": steps * samplers.EVALS_PER_STEP[sampler] * (2 if guidance != 1.0 else 1),
        "batch": batch,
        "codec": codec.card.name if codec is not None else None,
        "latent_rate": codec_card.latent_rate,
        "devices": f"{jax.device_count()} x {device.device_kind}",
        "mesh": dict(mesh.shape),
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        "rows": rows,
        "skipped": skipped,
    }


def run_weights(
    path: str,
    *,
    seconds: float = 300.0,
    paths: tuple[str, ...] | list[str] = ("shipped",),
    repeats: int = 2,
    deadline: float | None = None,
) -> dict:
    """Times one song of a run or an export (a distilled student: ``audiodiff_jax/demo_student``)
    as ``audiodiff-sample`` makes it: its weights, the codec of its dataset card, its saved
    sample section (sampler, steps, guidance, windows), decoding included; compilation apart.

    ``paths``: ``shipped`` (the section's windows) and/or ``one_pass`` (the whole song in
    one window). ``deadline``: as :func:`run`. Returns the figures, one row per path, with
    ``song_s_with_decode``: sampling plus decoding of the song, compilation apart.
    """
    bad = [p for p in paths if p not in ("shipped", "one_pass")]
    if bad:
        raise ValueError(f"paths: unknown {bad}; shipped or one_pass")
    src = source.WeightsSource(path)
    sample = src.sample_section()
    codec = lookup.codec_by_name(src.card.codec.name, allow_code=False)
    p = SampleParams.from_section(PROMPT, sample, seconds=seconds, seed=0)
    rows, skipped = [], []
    for name in paths:
        if deadline is not None and time.monotonic() > deadline:
            skipped.append({"path": name, "seconds": seconds})
            continue
        kwargs = generation.section_kwargs(sample)
        kwargs["max_seconds"] = max(kwargs["max_seconds"], seconds)
        if name == "one_pass":
            kwargs["window_frames"] = 0
        gen, _ = generation.open_generator(src, codec, weights=sample.weights[0], **kwargs)
        gen.check(p)
        first = gen.generate_latents([p])
        times = [gen.generate_latents([p]).denoise_s for _ in range(repeats)]
        loop_s = statistics.median(times) if times else first.denoise_s
        gen.decode(first.latents[0], seconds)  # warm-up: compiles the chunk shapes
        decode_times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            gen.decode(first.latents[0], seconds)
            decode_times.append(time.perf_counter() - t0)
        decode_s = statistics.median(decode_times)
        row = {
            "path": name,
            "seconds": seconds,
            "frames": gen.frames_for(seconds),
            "windows": first.windows,
            "window_frames": gen.window if name == "shipped" else 0,
            "model_evals": gen.model_evals(p, first.windows),
            "compile_s": round(first.compile_s, 3),
            "first_call_s": round(first.denoise_s, 4),
            "loop_s": round(loop_s, 4),
            "decode_s": round(decode_s, 4),
            "song_s_with_decode": round(loop_s + decode_s, 4),
            "realtime_factor_with_decode": round(seconds / (loop_s + decode_s), 3),
        }
        print(f"[sample_bench] {json.dumps(row)}", flush=True)
        rows.append(row)
    device = jax.devices()[0]
    return {
        "path": path,
        "student": bool(src.cfg.model.guidance_input),
        "distill": (
            {"steps": src.cfg.distill.steps, "method": src.cfg.distill.method}
            if src.cfg.model.guidance_input
            else None
        ),
        "preset": src.cfg.model.preset,
        "sampler": p.sampler,
        "steps": p.steps,
        "guidance": p.guidance,
        "codec": src.card.codec.name,
        "devices": f"{jax.device_count()} x {device.device_kind}",
        "dtype": src.cfg.model.dtype,
        "attention": src.cfg.model.attention,
        "rows": rows,
        "skipped": skipped,
    }


def plot_curves(result: dict, path: str) -> None:
    """Seconds per song-second against song length, one line per path (PNG)."""
    import matplotlib  # plotting only here; the bench runs without a display

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in PATHS:
        rows = [r for r in result["rows"] if r["path"] == name]
        if rows:
            label = name if name == "one_pass" else f"{name} ({rows[0]['window_frames']} frames)"
            ax.plot([r["seconds"] for r in rows], [r["s_per_song_s"] for r in rows], "o-", label=label)
    ax.set_xlabel("song length (s)")
    ax.set_ylabel("sampling seconds per song-second")
    ax.set_title(
        f"{result['preset']} DiT, {result['steps']} {result['sampler']} steps"
        f"{', CFG' if result['cfg'] else ''}, {result['devices']}",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    cfg = config_lib.from_configdict(_CONFIG.value)
    codec = open_codec(_CODEC.value, cfg.model.latent_channels)
    result = run(
        cfg,
        seconds=[float(s) for s in _SECONDS.value],
        paths=list(_PATHS.value),
        steps=_STEPS.value,
        sampler=_SAMPLER.value,
        guidance=_GUIDANCE.value,
        batch=_BATCH.value,
        window_frames=_WINDOW.value,
        repeats=_REPEATS.value,
        codec=codec,
    )
    print(json.dumps(result))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2)
    if _PLOT.value:
        plot_curves(result, _PLOT.value)


if __name__ == "__main__":
    # Flags are defined here, not at import, so benchmarks/suite.py can import every bench.
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
    _SECONDS = flags.DEFINE_list("seconds", ["300"], "Song lengths (seconds).")
    _PATHS = flags.DEFINE_list("paths", ["one_pass"], f"Which of {PATHS}.")
    _WINDOW = flags.DEFINE_integer("window_frames", 1024, "Window of the windowed path (latent frames).")
    _STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
    _SAMPLER = flags.DEFINE_string("sampler", "dpmpp_2m", "Sampler.")
    _GUIDANCE = flags.DEFINE_float("guidance", 5.0, "CFG scale (1 = no guidance: half the model calls).")
    _BATCH = flags.DEFINE_integer("batch", 1, "Songs per batch (rounded up to the mesh's data x fsdp).")
    _REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls after the compiling one (median).")
    _CODEC = flags.DEFINE_string("codec", "", "default | PATH | random:PRESET; empty = no decode timing.")
    _OUT = flags.DEFINE_string("out_json", "", "Also write the figures here.")
    _PLOT = flags.DEFINE_string("plot", "", "Write the cost curves here (PNG).")
    app.run(main)
