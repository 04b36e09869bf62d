"""``audiodiff-corpus``: builds a corpus folder (audio + manifest.jsonl), or a TFDS dataset from one.

    audiodiff-corpus --kind=scores  --out_dir=/data/scores  --num_clips=2000 --clip_seconds=20 --workers=8
    audiodiff-corpus --kind=grooves --out_dir=/data/grooves --num_clips=2000   # needs: apt-get install -y mma
    audiodiff-corpus --kind=prompts --out_dir=/data/prompted --num_clips=768 --clip_seconds=12 \
        --sample_rate=22050 --channels=1   # the demo's corpus (key, tempo, instrument in every caption)
    audiodiff-corpus --kind=check   --folder=/data/my_songs      # decodes every file: precompute's verdicts
    audiodiff-corpus --kind=tfds    --folder=/data/my_songs --name=my_songs --data_dir=/data/tfds

``--kind=check`` reads the captions and decodes every file (in parallel) with the
checks precompute uses, for the codec it will use (``--codec``, for its sample rate and
channels), and prints what precompute would skip and warn about, with reasons.
``--kind=tfds`` prints the files the build left out, which precompute reports too.

Then ``audiodiff-precompute --corpus=/data/scores --out_dir=/data/latents/scores``
(or ``--tfds=audio_folder/my_songs --tfds_data_dir=/data/tfds``).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from audiodiff_jax.programs import cli
from data_pipeline import audio_folder, corpus_grooves, corpus_prompts, corpus_scores

flags.DEFINE_enum(
    "kind", None, ["scores", "grooves", "prompts", "check", "tfds"], "what to build", required=True
)
flags.DEFINE_string("out_dir", None, "corpus folder to write (scores, grooves, prompts)")
flags.DEFINE_integer("num_clips", 100, "clips to render")
flags.DEFINE_integer("seed", 0, "clip i is a pure function of (seed, i)")
flags.DEFINE_integer("sample_rate", 44100, "sample rate of the rendered WAV files")
flags.DEFINE_integer("channels", 2, "1 or 2")
flags.DEFINE_float("clip_seconds", 10.0, "length of each clip (scores: <= 0 renders whole pieces)")
flags.DEFINE_list("collections", [], "scores: music21 corpus folders to draw from (default all)")
flags.DEFINE_list("grooves", [], "grooves: MMA grooves to draw from (default all)")
flags.DEFINE_enum("synth", "tinysoundfont", ["tinysoundfont", "fluidsynth"], "MIDI synthesizer")
flags.DEFINE_integer("workers", 1, "rendering processes")
flags.DEFINE_string("folder", None, "audio folder (check, tfds)")
flags.DEFINE_string("captions", None, "caption file if not in --folder")
flags.DEFINE_string("name", None, "tfds: config name of the dataset (audio_folder/NAME)")
flags.DEFINE_string("data_dir", None, "tfds: data_dir to build into")
flags.DEFINE_string("codec", "default", "check: the codec precompute will use (name, or module:factory)")
flags.DEFINE_integer("check_threads", 0, "check/tfds: files decoded in parallel (0: one per CPU)")
flags.DEFINE_integer("max_lines", 200, "check/tfds: problems printed (all are counted)")

FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    f = FLAGS
    if f.kind in ("scores", "grooves", "prompts") and not f.out_dir:
        raise app.UsageError(f"--kind={f.kind} needs --out_dir")
    if f.kind in ("check", "tfds") and not f.folder:
        raise app.UsageError(f"--kind={f.kind} needs --folder")
    if f.kind == "scores":
        path = corpus_scores.render_clips(
            f.out_dir,
            f.num_clips,
            seed=f.seed,
            sample_rate=f.sample_rate,
            channels=f.channels,
            clip_seconds=f.clip_seconds if f.clip_seconds > 0 else None,
            collections=f.collections or None,
            synth=f.synth,
            workers=f.workers,
            progress=True,
        )
        print(f"wrote {f.num_clips} clips and {path}")
    elif f.kind == "grooves":
        try:
            path = corpus_grooves.render_grooves(
                f.out_dir,
                f.num_clips,
                seed=f.seed,
                sample_rate=f.sample_rate,
                channels=f.channels,
                clip_seconds=f.clip_seconds,
                grooves=f.grooves or None,
                synth=f.synth,
                workers=f.workers,
                progress=True,
            )
        except corpus_grooves.MmaMissing as e:
            raise app.UsageError(str(e)) from e
        print(f"wrote {f.num_clips} clips and {path}")
    elif f.kind == "prompts":
        path = corpus_prompts.render_clips(
            f.out_dir,
            f.num_clips,
            seed=f.seed,
            sample_rate=f.sample_rate,
            channels=f.channels,
            clip_seconds=f.clip_seconds,
            synth=f.synth,
            workers=f.workers,
            progress=True,
        )
        print(f"wrote {f.num_clips} clips and {path}")
    elif f.kind == "check":
        check(f.folder, f.captions, f.codec, f.check_threads, f.max_lines)
    else:
        build_tfds(f.folder, f.captions, f.name, f.data_dir, f.check_threads, f.max_lines)


def _print_problems(problems, max_lines: int) -> None:
    for p in problems[:max_lines]:
        print(f"  {p.severity:8s} {p.path}: {p.reason}")
    if len(problems) > max_lines:
        print(f"  ... {len(problems) - max_lines} more (--max_lines)")


def check(folder: str, captions: str | None, codec_spec: str, threads: int, max_lines: int) -> list:
    """Prints the verdicts precompute will give each file of ``folder``; returns the problems."""
    # Here, not at the top: precompute loads the codec (JAX), which only this kind needs.
    from data_pipeline import precompute

    card = precompute.codec_card(precompute.load_codec(codec_spec))
    folder = os.path.abspath(folder)
    entries, problems = audio_folder.scan_folder(folder, captions)
    start = time.time()
    problems += audio_folder.check_entries(folder, entries, card.sample_rate, card.audio_channels, threads)
    bad = {p.path for p in problems if p.severity == "skipped"}
    good = [e for e in entries if audio_folder.printable(os.path.join(folder, e.audio)) not in bad]
    skipped = [p for p in problems if p.severity == "skipped"]
    warnings = [p for p in problems if p.severity == "warning"]
    print(
        f"{len(entries)} audio files in {folder} (decoded in {time.time() - start:.1f} s) for codec "
        f"{card.name!r} ({card.sample_rate} Hz, {card.audio_channels} ch): {len(good)} good, "
        f"skipped {len(skipped)}, warnings {len(warnings)}"
    )
    for e in good[:10]:
        print(f"  {e.id}: {e.caption}")
    _print_problems(skipped + warnings, max_lines)
    return problems


def build_tfds(
    folder: str, captions: str | None, name: str | None, data_dir: str | None, threads: int, max_lines: int
) -> None:
    """Builds ``audio_folder/NAME`` in ``data_dir`` and prints what the build left out."""
    # Here, not at the top: tensorflow_datasets is a heavy import the other kinds never need.
    from data_pipeline.tfds_audio_folder import PROBLEMS_KEY, AudioFolder, AudioFolderConfig

    if not name or not data_dir:
        raise app.UsageError("--kind=tfds needs --name and --data_dir")
    config = AudioFolderConfig(name=name, folder=folder, captions=captions, read_threads=threads)
    builder = AudioFolder(config=config, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    problems = [audio_folder.Problem(**p) for p in (builder.info.metadata or {}).get(PROBLEMS_KEY, [])]
    skipped = [p for p in problems if p.severity == "skipped"]
    print(
        f"built audio_folder/{name} in {data_dir}: {builder.info.splits['train'].num_examples} examples; "
        f"skipped {len(skipped)}, warnings {len(problems) - len(skipped)} (precompute reports them too)"
    )
    _print_problems(problems, max_lines)


def run() -> None:
    """Console entry point ``audiodiff-corpus``."""
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
