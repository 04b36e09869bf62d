"""``audiodiff-corpus``: builds a corpus folder (audio + manifest.jsonl), or a TFDS dataset from one.

    audiodiff-corpus --kind=scores  --out_dir=/data/scores  --num_clips=2000 --clip_seconds=20 --workers=8
    audiodiff-corpus --kind=grooves --out_dir=/data/grooves --num_clips=2000   # needs: apt-get install -y mma
    audiodiff-corpus --kind=check   --folder=/data/my_songs      # lists files, captions and problems
    audiodiff-corpus --kind=tfds    --folder=/data/my_songs --name=my_songs --data_dir=/data/tfds

Then ``audiodiff-precompute --corpus=/data/scores --out_dir=/data/latents/scores``
(or ``--tfds=audio_folder/my_songs --tfds_data_dir=/data/tfds``).
"""

from __future__ import annotations

from absl import app, flags

from audiodiff_jax import cli
from data_pipeline import audio_folder, corpus_grooves, corpus_scores

flags.DEFINE_enum("kind", None, ["scores", "grooves", "check", "tfds"], "what to build", required=True)
flags.DEFINE_string("out_dir", None, "corpus folder to write (scores, grooves)")
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

FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    f = FLAGS
    if f.kind in ("scores", "grooves") and not f.out_dir:
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
    elif f.kind == "check":
        entries, problems = audio_folder.scan_folder(f.folder, f.captions)
        print(f"{len(entries)} files with captions in {f.folder}")
        for e in entries[:10]:
            print(f"  {e.id}: {e.caption}")
        for p in problems:
            print(f"  {p.severity:8s} {p.path}: {p.reason}")
    else:
        # Here, not at the top: tensorflow_datasets is a heavy import the other kinds never need.
        from data_pipeline.tfds_audio_folder import AudioFolder, AudioFolderConfig

        if not f.name or not f.data_dir:
            raise app.UsageError("--kind=tfds needs --name and --data_dir")
        builder = AudioFolder(
            config=AudioFolderConfig(name=f.name, folder=f.folder, captions=f.captions), data_dir=f.data_dir
        )
        builder.download_and_prepare(file_format="array_record")
        print(f"built audio_folder/{f.name} in {f.data_dir}")


def run() -> None:
    """Console entry point ``audiodiff-corpus``."""
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
