"""Training audio for the codec: step-seeded random crops of a folder of WAVs.

:class:`CropSource` loads a folder of WAVs into memory and serves the crops of a
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
from absl import logging

from audiodiff_jax.codec import inputs


def load_wav(path: str, sample_rate: int, channels: int) -> np.ndarray:
    """A WAV file as float32 ``[channels, samples]`` at ``sample_rate`` (resampled, mixed)."""
    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    return inputs.prepare_audio(audio.T, sr, sample_rate=sample_rate, channels=channels, where=path)


class CropSource:
    """All WAVs of a folder in memory; ``batch(step)`` gives that step's crops.

    Args:
      audio_dir: folder searched recursively for ``*.wav``.
      sample_rate, channels: the codec's; files are resampled / mixed to them.
      crop_samples: crop length.
      seed: with the step, determines every crop.
      min_rms: crops quieter than this are redrawn (up to 8 times).
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
    ):
        files = sorted(glob.glob(os.path.join(audio_dir, "**", "*.wav"), recursive=True))
        if not files:
            raise FileNotFoundError(f"data.audio_dir={audio_dir!r} holds no .wav files")
        self.clips = []
        for f in files:
            audio = load_wav(f, sample_rate, channels)
            if audio.shape[1] < crop_samples:
                audio = np.pad(audio, ((0, 0), (0, crop_samples - audio.shape[1])))
            self.clips.append(audio)
        self.files = files
        self.crop_samples, self.seed, self.min_rms = crop_samples, seed, min_rms
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
                clip = self.clips[int(rng.integers(len(self.clips)))]
                start = int(rng.integers(clip.shape[1] - self.crop_samples + 1))
                crop = clip[:, start : start + self.crop_samples]
                if float(np.sqrt(np.mean(crop**2))) >= self.min_rms:
                    break
            out.append(crop.T)
        return np.stack(out).astype(np.float32)
