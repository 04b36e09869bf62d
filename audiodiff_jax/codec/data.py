"""Training audio for the codec: step-seeded random crops of a folder of audio files.

:class:`CropSource` loads a folder of audio files into memory and serves the crops of a
training step as a pure function of ``(seed, step)``: a resumed run sees exactly the
batches of an uninterrupted one, with no iterator state to checkpoint. Each process
takes its own rows of the global batch. The training corpus itself (rendered music21
pieces) is made by ``python -m data_pipeline.codec_corpus``.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import soundfile as sf
import tqdm
from absl import logging

from audiodiff_jax.codec import inputs


def audio_files(folder: str) -> list[str]:
    """Every audio file (``inputs.AUDIO_EXTENSIONS``) under ``folder``, at any depth, sorted."""
    found = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return sorted(f for f in found if f.lower().endswith(inputs.AUDIO_EXTENSIONS) and os.path.isfile(f))


def load_wav(path: str, sample_rate: int, channels: int) -> np.ndarray:
    """An audio file (WAV, FLAC, Ogg, Opus, MP3, AIFF) as float32 ``[channels, samples]`` at
    ``sample_rate`` (resampled, mixed)."""
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    return inputs.prepare_audio(audio.T, sr, sample_rate=sample_rate, channels=channels, where=path)


class CropSource:
    """All audio files of a folder in memory; ``batch(step)`` gives that step's crops.

    Args:
      audio_dir: folder searched recursively for audio files (``inputs.AUDIO_EXTENSIONS``;
        links are followed, so a folder of links selects files kept elsewhere).
      sample_rate, channels: the codec's; files are resampled / mixed to them.
      crop_samples: crop length.
      seed: with the step, determines every crop.
      min_rms: crops quieter than this are redrawn (up to 8 times).
      balance_subfolders: each top-level subfolder of ``audio_dir`` (files directly in
        it form one more group) gets an equal share of the crops, and within a group
        every second of audio is equally likely: 320 short renders and 40 long songs
        then give half the batch each. Off: every file is equally likely.
    """

    def __init__(
        self,
        audio_dir: str,
        *,
        sample_rate: int,
        channels: int,
        crop_samples: int,
        seed: int,
        min_rms: float = 1e-3,
        balance_subfolders: bool = False,
    ):
        files = audio_files(audio_dir)
        if not files:
            raise FileNotFoundError(
                f"data.audio_dir={audio_dir!r} holds no audio files ({' '.join(inputs.AUDIO_EXTENSIONS)})"
            )
        self.clips = []
        for f in tqdm.tqdm(files, desc="codec data: loading", unit="file", disable=len(files) < 50):
            audio = load_wav(f, sample_rate, channels)
            if audio.shape[1] < crop_samples:
                audio = np.pad(audio, ((0, 0), (0, crop_samples - audio.shape[1])))
            self.clips.append(audio)
        self.files = files
        self.crop_samples, self.seed, self.min_rms = crop_samples, seed, min_rms
        self.groups = None  # [(clip indices, their probabilities)] when balancing subfolders
        if balance_subfolders:
            by_group: dict[str, list[int]] = {}
            for i, f in enumerate(files):
                rel = os.path.relpath(f, audio_dir).split(os.sep)
                by_group.setdefault(rel[0] if len(rel) > 1 else ".", []).append(i)
            self.groups = []
            for name, idx in sorted(by_group.items()):
                lengths = np.array([self.clips[i].shape[1] for i in idx], np.float64)
                self.groups.append((np.array(idx), lengths / lengths.sum()))
                logging.info(
                    "codec data: group %r: %d files, %.1f minutes (1/%d of the crops)",
                    name,
                    len(idx),
                    lengths.sum() / sample_rate / 60,
                    len(by_group),
                )
        self.seconds = sum(c.shape[1] for c in self.clips) / sample_rate
        logging.info("codec data: %d files, %.1f minutes of audio", len(files), self.seconds / 60)

    def batch(
        self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1
    ) -> np.ndarray:
        """This process's rows of step ``step``'s global batch: float32 ``[b, crop, channels]``."""
        per = global_batch // process_count
        out = []
        for row in range(process_index * per, (process_index + 1) * per):
            rng = np.random.default_rng([self.seed, step, row])
            for _ in range(8):
                if self.groups is None:
                    clip = self.clips[int(rng.integers(len(self.clips)))]
                else:
                    idx, p = self.groups[int(rng.integers(len(self.groups)))]
                    clip = self.clips[int(rng.choice(idx, p=p))]
                start = int(rng.integers(clip.shape[1] - self.crop_samples + 1))
                crop = clip[:, start : start + self.crop_samples]
                if float(np.sqrt(np.mean(crop**2))) >= self.min_rms:
                    break
            out.append(crop.T)
        return np.stack(out).astype(np.float32)
