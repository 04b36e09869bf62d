"""A TFDS dataset builder over an audio folder, so a corpus can be versioned and built with tfds.

The folder is read by ``data_pipeline/audio_folder.py`` (captions from
``manifest.jsonl``, a caption JSONL/CSV, or file names). Each example holds the
audio (float32 ``[samples, channels]``; a Tensor feature, since TFDS's Audio
feature needs TensorFlow) and its ``sample_rate``, the
caption, the id, and the labels as one JSON string. Files that ``audio_folder``
rejects, or whose rate/channel count differs from the first good file's, are left
out (with a log line); precompute reports such files in detail.

Build, then precompute from it by name (random access over ArrayRecord; TensorFlow
is not needed)::

    builder = AudioFolder(config=AudioFolderConfig(name="scores", folder="/data/scores"),
                          data_dir="/data/tfds")
    builder.download_and_prepare(file_format="array_record")
    audiodiff-precompute --tfds=audio_folder/scores --tfds_data_dir=/data/tfds --out_dir=...
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_pipeline import audio_folder


@dataclasses.dataclass
class AudioFolderConfig(tfds.core.BuilderConfig):
    """``name`` names the corpus version in the TFDS catalogue; ``folder`` is where its audio is."""

    folder: str = ""
    captions: str | None = None


class AudioFolder(tfds.core.GeneratorBasedBuilder):
    """Audio files + captions of one folder as a TFDS dataset (a single ``train`` split)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _probe(self) -> tuple[list, int, int]:
        entries, problems = audio_folder.scan_folder(self.builder_config.folder, self.builder_config.captions)
        for p in problems:
            logging.warning("%s: %s (%s)", p.path, p.reason, p.severity)
        for entry in entries:
            try:
                audio, sr = audio_folder.read_audio(self._path(entry))
            except audio_folder.AudioError:
                continue
            return entries, sr, audio.shape[0]
        raise ValueError(f"{self.builder_config.folder}: no readable audio file")

    def _path(self, entry) -> str:
        import os

        return os.path.join(self.builder_config.folder, entry.audio)

    def _info(self) -> tfds.core.DatasetInfo:
        _, sr, channels = self._probe()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # A float32 Tensor, not tfds.features.Audio: the Audio feature needs
                    # TensorFlow even to be declared, and this stack runs without it.
                    "audio": tfds.features.Tensor(shape=(None, channels), dtype=np.float32),
                    "sample_rate": tfds.features.Scalar(dtype=np.int32),
                    "caption": tfds.features.Text(),
                    "id": tfds.features.Text(),
                    "labels_json": tfds.features.Text(),
                }
            ),
            description=f"Audio folder {self.builder_config.folder}",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the audio is local
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        entries, sr, channels = self._probe()
        for entry in entries:
            try:
                audio, rate = audio_folder.read_audio(self._path(entry))
            except audio_folder.AudioError as e:
                logging.warning("%s: skipped (%s)", self._path(entry), e)
                continue
            if rate != sr or audio.shape[0] != channels:
                logging.warning(
                    "%s: skipped (%d Hz x %d channels; this dataset is %d Hz x %d)",
                    self._path(entry),
                    rate,
                    audio.shape[0],
                    sr,
                    channels,
                )
                continue
            yield (
                entry.id,
                {
                    "audio": np.ascontiguousarray(audio.T),
                    "sample_rate": np.int32(rate),
                    "caption": entry.caption,
                    "id": entry.id,
                    "labels_json": json.dumps(entry.labels, sort_keys=True, ensure_ascii=False),
                },
            )
