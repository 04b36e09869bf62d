"""``make demo`` (``python -m launch.demo``): the main job end to end on the embedded
default, on a CPU. It drives every stage (pipeline, training, sampling), so it lives
with the launchers, outside the library.

1. Renders a small corpus of real music (music21 scores through a General MIDI
   soundfont, ``data_pipeline/corpus_scores.py``) with exact captions.
2. Encodes it with the codec shipped in the package (``audiodiff_jax.codec``) into
   ArrayRecord latent shards plus a dataset card and tokenizer
   (``data_pipeline/precompute.py``).
3. Trains the ``configs/demo.py`` DiT with the real loop: Grain loader, sharded jitted
   step, async Orbax checkpoints, TensorBoard metrics.
4. Samples a 3-minute song for a few prompts from the EMA weights
   (``audiodiff_jax/generation.py``), decodes them with the codec, and writes WAVs,
   spectrograms, a manifest and ``songs/report.html``.
5. Writes ``OUT/report.html``: the loss curve (``OUT/loss.png``), the run's facts, links
   to the songs.

Every stage skips what is already done, so running it again resumes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import flags, logging

from audiodiff_jax import cli, generation, report, seams, sweep, train
from audiodiff_jax import config as config_lib
from audiodiff_jax.codec import load_codec
from audiodiff_jax.logs import quiet_library_logs
from audiodiff_jax.metrics import read_loss_history
from configs import demo as demo_config
from data_pipeline import corpus_scores, precompute

# Flag holders, set by define_flags() when the program runs (importing the module, as
# the report tests do, must not add --out/--steps beside another program's).
_OUT = _STEPS = _NUM_CLIPS = _CLIP_SECONDS = _SONG_SECONDS = _NUM_SONGS = _SAMPLE_STEPS = None


def define_flags() -> None:
    global _OUT, _STEPS, _NUM_CLIPS, _CLIP_SECONDS, _SONG_SECONDS, _NUM_SONGS, _SAMPLE_STEPS
    _OUT = flags.DEFINE_string("out", "demo_out", "Output folder.")
    _STEPS = flags.DEFINE_integer("steps", 0, "Override the demo config's train.num_steps (0 = keep).")
    _NUM_CLIPS = flags.DEFINE_integer("num_clips", 96, "Clips of rendered music in the demo corpus.")
    _CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 8.0, "Length of each rendered clip.")
    _SONG_SECONDS = flags.DEFINE_float("song_seconds", 180.0, "Length of each sampled song.")
    _NUM_SONGS = flags.DEFINE_integer(
        "num_songs", 3, "Songs to sample (prompts taken from the corpus captions)."
    )
    _SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "Sampler steps per window.")


LOSS_PNG = "loss.png"


def loss_curve_figure(history: dict[int, float]):
    """The training loss per step on a log scale (a matplotlib ``Figure``, no pyplot),
    or None with fewer than two steps."""
    from matplotlib.figure import Figure

    steps = sorted(history)
    if len(steps) < 2:
        return None
    fig = Figure(figsize=(6.4, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, [max(history[s], 1e-12) for s in steps], color="#1f6feb", linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlim(steps[0], steps[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def write_report(out: str, workdir: str, cfg, facts: dict, songs_report: str = "") -> str:
    """Writes ``out/report.html`` (and ``out/loss.png``, the loss curve); returns its path."""
    del cfg  # the resolved config is in ``facts["config"]``
    fig = loss_curve_figure(read_loss_history(workdir))
    if fig is not None:
        report.save_figure_png(fig, os.path.join(out, LOSS_PNG))
    return report.render_page(
        "demo_report.html",
        os.path.join(out, "report.html"),
        songs_report=songs_report,
        loss_png=LOSS_PNG if fig is not None else "",
        facts=facts,
        tensorboard_dir=os.path.join(workdir, "tensorboard"),
        config_text=json.dumps(facts.get("config", {}), indent=1),
    )


def main(argv):
    del argv
    quiet_library_logs()
    out = os.path.abspath(_OUT.value)
    corpus_dir = os.path.join(out, "corpus")
    shards_dir = os.path.join(out, "shards")
    workdir = os.path.join(out, "run")
    songs_dir = os.path.join(out, "songs")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    timings = {}

    codec = load_codec("default")
    card = codec.card
    if not os.path.exists(os.path.join(corpus_dir, "manifest.jsonl")):
        logging.info("[1/5] rendering %d clips of music21 scores into %s", _NUM_CLIPS.value, corpus_dir)
        corpus_scores.render_clips(
            corpus_dir,
            _NUM_CLIPS.value,
            seed=0,
            sample_rate=card.sample_rate,
            channels=card.audio_channels,
            clip_seconds=_CLIP_SECONDS.value,
            workers=max(1, min(4, os.cpu_count() or 1)),
            progress=True,
        )
    else:
        logging.info("[1/5] corpus already in %s", corpus_dir)
    timings["render"] = time.time() - t0

    t = time.time()
    if not os.path.exists(os.path.join(shards_dir, "dataset_card.json")):
        logging.info("[2/5] encoding the corpus with the shipped codec %r into %s", card.name, shards_dir)
        summary = precompute.precompute(
            precompute.FolderCorpus(corpus_dir),
            shards_dir,
            codec,
            files_per_shard=32,
            tokenizer_vocab_size=256,
        )
        print(precompute.format_summary(summary))
    else:
        logging.info("[2/5] latent shards already in %s", shards_dir)
    timings["encode"] = time.time() - t

    cd = demo_config.get_config()
    cd.data.shards_dir = shards_dir
    cd.model.latent_channels = card.latent_channels
    if _STEPS.value:
        cd.train.num_steps = _STEPS.value
    cfg = config_lib.from_configdict(cd)
    t = time.time()
    logging.info("[3/5] training configs/demo.py for %d steps in %s", cfg.train.num_steps, workdir)
    result = train.train(cfg, workdir)
    timings["train"] = time.time() - t

    t = time.time()
    prompts = _demo_prompts(corpus_dir, _NUM_SONGS.value)
    logging.info("[4/5] sampling %d songs of %.0f s: %s", len(prompts), _SONG_SECONDS.value, prompts)
    songs = sweep.generate_songs(
        workdir,
        prompts,
        songs_dir,
        seconds=_SONG_SECONDS.value,
        seeds=(0,),
        guidance=4.0,
        steps=_SAMPLE_STEPS.value,
        sampler="dpmpp_2m",
        codec=codec,
        title="audiodiff-jax demo songs",
    )
    timings["sample"] = time.time() - t
    t = time.time()
    seam_facts = seam_comparison(workdir, codec, songs.rows)
    timings["seams"] = time.time() - t
    logging.info("[5/5] writing the report")
    facts = {
        "final step": result.final_step,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "DiT parameters": sum(x.size for x in jax.tree.leaves(result.state.params)),
        "codec": f"{card.name}: {card.sample_rate} Hz, {card.audio_channels} ch, "
        f"{card.latent_channels} latent channels at {card.latent_rate:.2f} Hz",
        "corpus": corpus_dir,
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "songs": f"{len(songs.rows)} written, {len(songs.issues)} issues: {songs.report}",
        **seam_facts,
        "timings (s)": {k: round(v, 1) for k, v in timings.items()},
        "wall time (s)": round(time.time() - t0, 1),
        "config": json.loads(config_lib.to_json(cfg)),
    }
    path = write_report(out, workdir, cfg, facts, songs_report=os.path.relpath(songs.report, out))
    print(
        f"demo done in {time.time() - t0:.0f}s: report {path}, songs {songs.report}, "
        f"checkpoints in {workdir}/checkpoints"
    )
    if songs.issues:
        raise SystemExit(f"some songs failed: {songs.issues}")


def seam_comparison(workdir: str, codec, rows: list[dict]) -> dict[str, str]:
    """The windowed songs' seam ratio (``audiodiff_jax/seams.py``) next to the first song's
    prompt and seed made in one pass (no seams: the ratio at the same frames is the
    yardstick). The one-pass song is cut to its first minute: one pass costs the square of
    the length in attention, and a minute already holds a dozen seam positions."""
    ratios = [r["seam_ratio"] for r in rows if "seam_ratio" in r]
    if not ratios:
        return {}
    row = next(r for r in rows if "seam_ratio" in r)
    one_pass = generation.Generator(workdir, codec, window_frames=0)
    params = generation.SampleParams(
        prompt=row["prompt"],
        seconds=min(row["seconds"], 60.0),
        seed=row["seed"],
        guidance=row["guidance"],
        steps=row["steps"],
        sampler=row["sampler"],
        schedule=row["schedule"],
    )
    lat = one_pass.generate_latents([params]).latents[0]
    windowed = generation.Generator(workdir, codec)
    cuts = generation.window_seams(lat.shape[0], windowed.window, windowed.overlap)
    audio = one_pass.decode(lat, seconds=params.seconds)
    one = seams.latent_seam_ratio(one_pass.card.normalize(lat), cuts)
    one_audio = seams.audio_seam_ratio(audio, codec.card.hop, cuts)
    audio_ratios = [r["audio_seam_ratio"] for r in rows if "audio_seam_ratio" in r]
    song_seams = len(generation.window_seams(row["frames"], windowed.window, windowed.overlap))
    return {
        "seam ratio, windowed songs (latents / audio)": (
            f"{np.mean(ratios):.3f} / {np.mean(audio_ratios):.3f} over {len(ratios)} songs, "
            f"{song_seams} seams each (1.0 = seams like any other frame)"
        ),
        f"seam ratio, the first prompt and seed in one pass, {params.seconds:g} s (latents / audio)": (
            f"{one:.3f} / {one_audio:.3f} at the same {len(cuts)} seam positions"
        ),
    }


def _demo_prompts(corpus_dir: str, n: int) -> list[str]:
    """Captions of the demo corpus itself: prompts the demo model has a chance to follow."""
    rows = [json.loads(line) for line in open(os.path.join(corpus_dir, "manifest.jsonl")) if line.strip()]
    step = max(1, len(rows) // max(n, 1))
    return [rows[i]["caption"] for i in range(0, len(rows), step)][:n]


def run():
    define_flags()
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
