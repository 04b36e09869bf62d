"""A folder of planted inputs, good and bad, and the outcome each must have on every corpus path.

``plant(folder)`` writes short files (0.3 s unless the kind is about length) and a
``captions.jsonl`` with planted bad lines, and returns a :class:`Planted` that says,
for each kind, what must happen to it: ``KEPT`` files become records with a given id
(some with a warning), ``SKIPPED`` files and caption lines are named with a reason,
``WARNED`` paths get a warning. Every outcome is checked on the folder path, the TFDS
path and ``--kind=check`` (tests/test_planted.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import soundfile as sf

SECONDS = 0.3
LONG_SECONDS = 120.0  # "very long" for a test: 400 times the others, 2 MB of PCM
LONG_NAME = "a_very_long_file_name_" + "x" * 190 + ".wav"  # 216 bytes; file systems allow 255
CAPTIONS = "captions.jsonl"


@dataclasses.dataclass
class Planted:
    folder: str
    kept: dict[str, str]  # relative path -> id of its record
    skipped: dict[str, str]  # path (relative, or "captions.jsonl:LINE") -> text in the reason
    warned: list[tuple[str, str]]  # (path, text in the reason)
    not_planted: list[str]  # kinds this machine cannot plant, and why

    def path(self, rel: str) -> str:
        return os.path.join(self.folder, rel)


def _tone(seconds: float, sr: int, channels: int = 1, freq: float = 330.0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1)


def plant(folder: str) -> Planted:
    os.makedirs(folder, exist_ok=True)
    j = lambda *parts: os.path.join(folder, *parts)  # noqa: E731
    kept: dict[str, str] = {}
    skipped: dict[str, str] = {}
    warned: list[tuple[str, str]] = []
    not_planted: list[str] = []

    def good(rel: str, sr: int = 16000, channels: int = 1, seconds: float = SECONDS, **kw) -> None:
        sf.write(j(rel), _tone(seconds, sr, channels, freq=200.0 + 37 * len(kept)), sr, **kw)
        kept[rel] = rel

    # --- good files, some of them odd -------------------------------------------------
    good("good.wav")
    good("ok.flac")  # names that clash without their extension: both kept, ids keep it
    good("ok.ogg")
    good("rate8k.wav", sr=8000)
    good("stereo48k.flac", sr=48000, channels=2)
    good("surround96k.wav", sr=96000, channels=6)
    warned.append(("surround96k.wav", "6 channels mixed down to 1"))
    good("odd_rate.wav", sr=12345)
    warned.append(("odd_rate.wav", "unusual sample rate 12345 Hz"))
    good("song.mp3", sr=16000)
    good("voice.opus", sr=48000, format="OGG", subtype="OPUS")
    good("LOUD.WAV")
    os.makedirs(j("sub"))
    good("sub/deep.wav")
    good("long.wav", sr=8000, seconds=LONG_SECONDS)
    good(LONG_NAME)
    os.symlink("good.wav", j("link.wav"))  # a file symlink is read through
    kept["link.wav"] = "link.wav"
    # A file name that is not UTF-8: kept, its id writes the bad byte as \xe9.
    sf.write(os.path.join(os.fsencode(folder), b"caf\xe9.wav"), _tone(SECONDS, 16000), 16000)
    kept[os.fsdecode(b"caf\xe9.wav")] = "caf\\xe9.wav"
    warned.append((os.fsdecode(b"caf\xe9.wav"), "file name is not UTF-8"))
    # Caption rows give both files the id "same": the first keeps it, the second takes its path.
    good("a_id.wav")
    kept["a_id.wav"] = "same"
    good("b_id.wav")
    warned.append(("b_id.wav", "id 'same' is also the id of"))
    good("typo.wav")
    warned.append(("typo.wav", "unknown field 'captoin'"))
    good("wrongtype.wav")
    warned.append(("wrongtype.wav", "is a list, not text"))
    warned.append(("wrongtype.wav", "labels (captions.jsonl:7) is a string, not an object"))
    good("badline.wav")  # its caption line is not JSON: kept with a caption from its name
    warned.append(("badline.wav", "no caption in captions.jsonl"))
    good("latin1.wav")  # its caption line is not UTF-8: the same
    warned.append(("latin1.wav", "no caption in captions.jsonl"))
    good("nocaption.wav")
    warned.append(("nocaption.wav", "no caption in captions.jsonl"))
    warned.append(("good.wav", "2 identical caption rows (lines 1, 2)"))

    # --- bad audio --------------------------------------------------------------------
    sf.write(j("nan.wav"), np.full((800, 1), np.nan, np.float32), 16000, subtype="FLOAT")
    skipped["nan.wav"] = "800 NaN/Inf samples"
    with open(j("junk.mp3"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    skipped["junk.mp3"] = "unreadable: not a recognised audio format"
    with open(j("text.mp3"), "w") as f:
        f.write("these are the lyrics, not the song\n")
    skipped["text.mp3"] = "a text file, not audio"
    open(j("empty.ogg"), "wb").close()
    skipped["empty.ogg"] = "zero-length file (0 bytes)"
    sf.write(j("silent0.wav"), np.zeros((0, 1), np.float32), 16000)
    skipped["silent0.wav"] = "zero-length audio (0 samples)"
    for name in ("cut.wav", "cut.flac"):
        sf.write(j(name), _tone(1.0, 16000), 16000)
        with open(j(name), "rb") as f:
            data = f.read()
        with open(j(name), "wb") as f:
            f.write(data[: len(data) // 2])
    skipped["cut.wav"] = "truncated: WAV header says"
    skipped["cut.flac"] = "unreadable or truncated"
    sf.write(j("low_rate.wav"), _tone(SECONDS, 2000), 2000)
    skipped["low_rate.wav"] = "sample rate 2000 Hz is below 4000 Hz"
    os.symlink("loop.wav", j("loop.wav"))
    skipped["loop.wav"] = "symlink loop"
    os.symlink("nowhere.wav", j("dangling.wav"))
    skipped["dangling.wav"] = "broken symlink (points to 'nowhere.wav'"
    os.mkfifo(j("fifo.wav"))  # opening it would wait forever for a writer
    skipped["fifo.wav"] = "not a regular file (a named pipe)"
    with open(j("song.m4a"), "wb") as f:
        f.write(b"\x00\x00\x00\x20ftypM4A ")
    skipped["song.m4a"] = ".m4a is not a format libsndfile decodes"
    os.symlink(".", j("loopdir"))  # a folder symlink back up: not followed, no file twice
    warned.append(("loopdir", "symlink to a folder already scanned"))
    if os.geteuid() == 0:
        not_planted.append("unreadable permissions: running as root, where chmod 000 does not block reads")
    else:
        good("locked.wav")
        del kept["locked.wav"]
        os.chmod(j("locked.wav"), 0)
        skipped["locked.wav"] = "permission denied"
        os.makedirs(j("closed"))
        good("closed/inside.wav")
        del kept["closed/inside.wav"]
        os.chmod(j("closed"), 0)
        skipped["closed"] = "folder unreadable (Permission denied)"

    # --- captions.jsonl: a good row per kept file, then the planted bad lines ---------
    lines: list[bytes] = [
        json.dumps({"file": "good.wav", "caption": "a good tone", "tempo": 90}).encode(),  # 1
        json.dumps({"file": "good.wav", "caption": "a good tone", "tempo": 90}).encode(),  # 2: duplicate row
        json.dumps({"file": "missing.wav", "caption": "gone"}).encode(),  # 3: no such file
        b'{"file": "badline.wav", "caption": "oops"',  # 4: not JSON
        b'{"file": "latin1.wav", "caption": "caf\xe9"}',  # 5: not UTF-8
        json.dumps({"file": "typo.wav", "captoin": "misspelt"}).encode(),  # 6: unknown field
        json.dumps({"file": "wrongtype.wav", "caption": ["a", "list"], "labels": "x"}).encode(),  # 7
        json.dumps({"file": 42, "caption": "a number for a file"}).encode(),  # 8: wrong type
        b"[1, 2]",  # 9: not an object
        json.dumps({"file": "a_id.wav", "caption": "first of two", "id": "same"}).encode(),  # 10
        json.dumps({"file": "b_id.wav", "caption": "second of two", "id": "same"}).encode(),  # 11
    ]
    skipped["missing.wav"] = "listed in captions.jsonl (line 3) but not found"
    skipped[f"{CAPTIONS}:4"] = "not JSON (Expecting ',' delimiter at column 42)"
    skipped[f"{CAPTIONS}:5"] = "not UTF-8 (byte 0xe9 at column 39)"
    skipped[f"{CAPTIONS}:8"] = "file 42 is a number, not a path"
    skipped[f"{CAPTIONS}:9"] = "caption row is a list, not an object"
    described = {"good.wav", "badline.wav", "latin1.wav", "typo.wav", "wrongtype.wav", "a_id.wav", "b_id.wav"}
    for rel in sorted(kept):
        if rel not in described and rel != "nocaption.wav" and not rel.startswith("caf"):
            lines.append(json.dumps({"file": rel, "caption": f"planted {rel}"}).encode())
    with open(j(CAPTIONS), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return Planted(folder, kept, skipped, warned, not_planted)


def restore_permissions(folder: str) -> None:
    """Undoes the chmod 000 of the planted folder, so it can be deleted."""
    for rel in ("locked.wav", "closed"):
        if os.path.lexists(os.path.join(folder, rel)):
            os.chmod(os.path.join(folder, rel), 0o755)
