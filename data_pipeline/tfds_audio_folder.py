"""A TFDS dataset builder over an audio folder, so a corpus can be versioned and built with tfds.

The folder is read by ``data_pipeline/audio_folder.py`` (captions from
``manifest.jsonl``, a caption JSONL/CSV, or file names; the same ids, checks and
reasons as the folder path of precompute). Each example holds the audio as the file
has it (float32 ``[samples, channels]`` at its own ``sample_rate``: any rate, any
channel count; precompute resamples and mixes down for its codec exactly as it does
for a folder), the caption, the id, the file's path, and the labels as one JSON
string. The audio is a Tensor feature, since TFDS's Audio feature needs TensorFlow.

Nothing is left out silently: every file the folder reader rejects (unreadable,
truncated, NaN, a rate below ``audio_folder.MIN_RATE``...) and every caption problem
is stored in the dataset's metadata (``metadata.json``, key ``problems``, as
``{path, reason, severity}``), and precompute reports them in its summary as it does
for a folder.

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
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import audio_folder
from data_pipeline.audio_folder import AudioError, Problem
from data_pipeline.manifest import Entry

PROBLEMS_KEY = "problems"  # in the dataset metadata: what the build left out or converted, and why


@dataclasses.dataclass
class AudioFolderConfig(tfds.core.BuilderConfig):
    """``name`` names the corpus version in the TFDS catalogue; ``folder`` is where its audio is."""

    folder: str = ""
    captions: str | None = None
    read_threads: int = 0  # files decoded in parallel; 0 = one per CPU


class AudioFolder(tfds.core.GeneratorBasedBuilder):
    """Audio files + captions of one folder as a TFDS dataset (a single ``train`` split)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "1.1.0": "Any sample rate and channel count per example; ids keep the file extension; "
        "the file's path in 'file'; files left out are listed in the metadata ('problems').",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # A float32 Tensor, not tfds.features.Audio: the Audio feature needs
                    # TensorFlow even to be declared, and this stack runs without it.
                    # Two unknown dimensions (samples, channels) need an explicit encoding.
                    "audio": tfds.features.Tensor(
                        shape=(None, None), dtype=np.float32, encoding=tfds.features.Encoding.BYTES
                    ),
                    "sample_rate": tfds.features.Scalar(dtype=np.int32),
                    "caption": tfds.features.Text(),
                    "id": tfds.features.Text(),
                    "file": tfds.features.Text(),
                    "labels_json": tfds.features.Text(),
                }
            ),
            description=f"Audio folder {self.builder_config.folder}",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the audio is local
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        folder = os.path.abspath(self.builder_config.folder)
        entries, problems = audio_folder.scan_folder(folder, self.builder_config.captions)

        def read(entry: Entry):
            path = os.path.join(folder, entry.audio)
            try:
                audio, rate = audio_folder.read_audio(path)
                # Any rate and channel count is stored as is; this only rejects what precompute
                # would (a rate below MIN_RATE), so that the file is named here by its path.
                audio_folder.conversion_notes(rate, audio.shape[0], rate, audio.shape[0])
                return entry, audio, rate
            except AudioError as e:
                return entry, e, 0
            except Exception as e:  # noqa: BLE001 - as precompute: an unexpected failure is one bad file
                return entry, AudioError(f"unreadable: {type(e).__name__}: {e}"), 0

        for entry, audio, rate in audio_folder.map_ahead(
            read, entries, self.builder_config.read_threads or os.cpu_count() or 1
        ):
            path = os.path.join(folder, entry.audio)
            if isinstance(audio, AudioError):
                problems.append(Problem(path, str(audio), "skipped"))
                continue
            yield (
                entry.id,
                {
                    "audio": np.ascontiguousarray(audio.T),
                    "sample_rate": np.int32(rate),
                    "caption": entry.caption,
                    "id": entry.id,
                    "file": audio_folder.printable(path),
                    "labels_json": json.dumps(entry.labels, sort_keys=True, ensure_ascii=False),
                },
            )
        # Written with the dataset info once every example is out (DatasetBuilder.download_and_prepare).
        self.info.metadata[PROBLEMS_KEY] = [p.to_json() for p in problems]
        self.info.metadata["folder"] = folder
