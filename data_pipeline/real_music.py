r"""Real produced music for the codec: named songs from Debian's game-music packages.

    apt-get install -y warzone2100-music singularity-music asc-music
    python -m data_pipeline.real_music --out=/tmp/real_music

The packages are full-length produced soundtracks (orchestral, electronic, rock; mixed,
mastered, with reverb), free to redistribute and to train on:

- ``warzone2100-music``: the Warzone 2100 soundtracks (original, legacy, aftermath),
  GPL-2+, 30 pieces of 3 to 14 minutes. Training only.
- ``singularity-music``: Max McCracken's music for Endgame: Singularity, CC BY-SA 3.0,
  16 pieces. Three are held out (:data:`HELDOUT`), the rest are training audio.
- ``asc-music``: Michael Kievernagel's music for Advanced Strategic Command, GPL-2+,
  three pieces. All held out: a composer the codec never hears in training.

``--out`` gets ``train/`` and ``heldout/`` folders of links to the packages' files
(the codec's loaders follow links and read Ogg, Opus and MP3 as they are) and
``songs.json`` (package, licence, split and length of each song). A package that is
not installed is named with the command that installs it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import soundfile as sf
from absl import app, flags, logging

from audiodiff_jax.core import paths
from audiodiff_jax.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    pattern: str  # glob of its music files (recursive)
    licence: str
    author: str


PACKAGES = (
    Package(
        "warzone2100-music", "/usr/share/games/warzone2100/music/**/*.opus", "GPL-2+", "Warzone 2100 Project"
    ),
    Package(
        "singularity-music", "/usr/share/games/singularity/music/**/*.ogg", "CC-BY-SA-3.0", "Max McCracken"
    ),
    Package("asc-music", "/usr/share/games/asc/music/*.mp3", "GPL-2+", "Michael Kievernagel"),
)

# Songs no codec of this project trains on: the whole of asc-music, three of singularity-music.
HELDOUT = (
    "asc-music/frontiers.mp3",
    "asc-music/machine_wars.mp3",
    "asc-music/time_to_strike.mp3",
    "singularity-music/Awakening.ogg",
    "singularity-music/Coherence.ogg",
    "singularity-music/Through Space.ogg",
)

INSTALL = "apt-get install -y " + " ".join(p.name for p in PACKAGES)


@dataclasses.dataclass(frozen=True)
class Song:
    key: str  # "PACKAGE/FILE NAME", as in HELDOUT
    path: str
    package: str
    licence: str
    author: str
    seconds: float
    split: str  # "train" or "heldout"
    file: str  # its link's name: package and path inside the package, without spaces


def find_songs(packages=PACKAGES, heldout=HELDOUT) -> list[Song]:
    """Every song of the packages, sorted, split by ``heldout``; a missing package raises
    UserError naming the install command."""
    songs, missing = [], []
    for pkg in packages:
        root = os.path.dirname(pkg.pattern.split("*", 1)[0])
        files = sorted(glob.glob(pkg.pattern, recursive=True))
        if not files:
            missing.append(pkg.name)
            continue
        for f in files:
            info = sf.info(f)
            key = f"{pkg.name}/{os.path.basename(f)}"
            split = "heldout" if key in heldout else "train"
            link = re.sub(
                r"[^A-Za-z0-9._-]+", "_", f"{pkg.name}-{os.path.relpath(f, root).replace(os.sep, '-')}"
            )
            songs.append(
                Song(key, f, pkg.name, pkg.licence, pkg.author, round(info.duration, 2), split, link)
            )
    if missing:
        install = "apt-get install -y " + " ".join(p.name for p in packages)
        raise UserError(f"real music: package(s) {', '.join(missing)} not installed; run: {install}")
    absent = sorted(set(heldout) - {s.key for s in songs})
    if absent:
        raise UserError(f"real music: held-out songs {absent} are not in the installed packages")
    return songs


def write_folders(out: str, songs: list[Song]) -> dict:
    """``out/train`` and ``out/heldout`` (links) and ``out/songs.json``; returns the summary."""
    for split in ("train", "heldout"):
        os.makedirs(os.path.join(out, split), exist_ok=True)
    for s in songs:
        link = os.path.join(out, s.split, s.file)
        if os.path.islink(link) or os.path.exists(link):
            os.remove(link)
        os.symlink(s.path, link)
    summary = {
        "install": INSTALL,
        "songs": [dataclasses.asdict(s) for s in songs],
        "minutes": {
            split: round(sum(s.seconds for s in songs if s.split == split) / 60, 1)
            for split in ("train", "heldout")
        },
    }
    paths.atomic_write(os.path.join(out, "songs.json"), json.dumps(summary, indent=2).encode())
    return summary


def main(argv):
    del argv
    summary = write_folders(flags.FLAGS.out, find_songs())
    n = {k: sum(1 for s in summary["songs"] if s["split"] == k) for k in ("train", "heldout")}
    logging.info(
        "real music in %s: %d training songs (%.1f min), %d held out (%.1f min)",
        flags.FLAGS.out,
        n["train"],
        summary["minutes"]["train"],
        n["heldout"],
        summary["minutes"]["heldout"],
    )


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "Output folder (gets train/, heldout/ and songs.json).")
    flags.mark_flag_as_required("out")
    app.run(main)
