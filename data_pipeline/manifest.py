"""The caption manifest: what every corpus builder writes beside its audio files.

``manifest.jsonl`` holds one JSON object per line::

    {"id": "score-0-000003", "audio": "audio/score-0-000003.wav",
     "caption": "...", "labels": {"key": "F#", "mode": "minor", "tempo": 96, ...},
     "seconds_start": 0.6, "seconds_total": 21.6}

``audio`` is relative to the manifest's folder; ``labels`` maps str to str/int/
float/bool (they go unchanged into the latent records); ``seconds_start`` /
``seconds_total`` place a clip in its song (0 and the file's length for whole songs,
which is also what a missing value means). Precompute reads any such manifest; the
audio-folder reader (``audio_folder.py``) also accepts looser JSONL/CSV caption files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

from audiodiff_jax.core import paths

MANIFEST_FILE = "manifest.jsonl"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One audio file of a corpus and what is known about it."""

    id: str
    audio: str  # path relative to the manifest's folder (or absolute)
    caption: str
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds_start: float = 0.0
    seconds_total: float | None = None  # None: the length of the audio file

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["seconds_total"] is None:
            del out["seconds_total"]
        return out


def write_manifest(path: str, entries: Iterable[Entry]) -> str:
    """Writes a manifest atomically (temporary file + rename), so readers never see half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = "".join(json.dumps(e.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for e in entries)
    paths.atomic_write(path, text.encode("utf-8"))
    return path
