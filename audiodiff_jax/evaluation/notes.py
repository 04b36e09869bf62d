"""Note transcription with basic-pitch's ONNX model (the wheel ships it), run by
onnxruntime: no TensorFlow.

basic-pitch 0.4.0 declares TensorFlow as a dependency, but its inference path needs
only onnxruntime, librosa, pretty_midi, mir_eval and resampy; the "eval" extra
installs those, and basic-pitch itself is installed with ``--no-deps`` (see
setup.py). The model runs on basic-pitch's own windows (its ``window_audio_file``
and ``unwrap_output``) and its note decoder (``model_output_to_notes``); we only
feed it an array instead of a file path.

:func:`load_transcriber` returns None when basic-pitch or onnxruntime is missing: the
metrics then fall back to chroma (``song.py``) and say so in ``pitch_source``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
from collections.abc import Sequence

import numpy as np

NAME = "basic-pitch"


@dataclasses.dataclass(frozen=True)
class Note:
    start: float  # seconds
    end: float
    pitch: int  # MIDI note number
    amplitude: float


def pitch_class_histogram(notes: Sequence[Note]) -> np.ndarray:
    """Duration-weighted histogram of the notes' pitch classes (12 bins, C first)."""
    hist = np.zeros(12)
    for n in notes:
        hist[n.pitch % 12] += max(n.end - n.start, 0.0)
    return hist


@contextlib.contextmanager
def _quiet():
    """basic-pitch's import logs a warning for every backend it does not find (TF,
    TFLite, CoreML) and its inference prints to stdout: keep both out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class Transcriber:
    """basic-pitch's polyphonic note transcriber on an ONNX runtime session."""

    name = NAME

    def __init__(self, model_path: str = ""):
        # Optional heavy dependencies (the "eval" extra): basic-pitch and onnxruntime.
        with _quiet():
            import basic_pitch
            from basic_pitch import inference, note_creation
        self._inference = inference
        self._decode = note_creation
        path = model_path or os.path.join(
            os.path.dirname(basic_pitch.__file__), "saved_models", "icassp_2022", "nmp.onnx"
        )
        with _quiet():
            self._model = inference.Model(path)
        self.sample_rate = inference.AUDIO_SAMPLE_RATE

    def posteriorgrams(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        """The model's frame outputs (``note``, ``onset`` [frames, 88], ``contour``
        [frames, 264]) for mono ``audio``, as basic-pitch's ``run_inference`` makes them."""
        inf = self._inference
        x = np.asarray(audio, np.float32)
        if sample_rate != self.sample_rate:
            import librosa  # the "eval" extra

            x = librosa.resample(x, orig_sr=sample_rate, target_sr=self.sample_rate)
        overlap_frames = 30  # basic-pitch's run_inference overlap
        overlap = overlap_frames * inf.FFT_HOP
        hop = inf.AUDIO_N_SAMPLES - overlap
        padded = np.concatenate([np.zeros(overlap // 2, np.float32), x])
        windows = np.stack([w for w, _ in inf.window_audio_file(padded, hop)])
        out: dict[str, list[np.ndarray]] = {"note": [], "onset": [], "contour": []}
        for i in range(0, len(windows), 16):  # batches of 16 windows of 2 s
            for k, v in self._model.predict(windows[i : i + 16]).items():
                out[k].append(v)
        return {k: inf.unwrap_output(np.concatenate(v), x.shape[0], overlap_frames) for k, v in out.items()}

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> list[Note]:
        """Notes of mono ``audio`` with basic-pitch's default thresholds."""
        if audio.size < sample_rate // 10:
            return []
        grams = self.posteriorgrams(audio, sample_rate)
        min_len = int(np.round(127.7 / 1000 * (self.sample_rate / self._inference.FFT_HOP)))
        with _quiet():
            _, events = self._decode.model_output_to_notes(
                grams, onset_thresh=0.5, frame_thresh=0.3, min_note_len=min_len, melodia_trick=True
            )
        return [Note(float(s), float(e), int(p), float(a)) for s, e, p, a, *_ in events]


@functools.cache
def load_transcriber() -> Transcriber | None:
    """The basic-pitch transcriber, or None when it (or onnxruntime) is not installed."""
    try:
        return Transcriber()
    except ImportError:
        return None
