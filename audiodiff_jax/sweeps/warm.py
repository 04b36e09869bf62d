"""A warm model: weights restored once, each sampling program compiled once per shape,
songs made one at a time on request (what ``audiodiff-serve`` keeps in memory).

    warm = WarmModel(gen, "serve_out", name="demo")
    song = warm.song(SampleParams("marimba and drums in D minor at 114 bpm", seconds=12))
    song.wav, song.spectrogram, song.metrics, song.timings["compiled"]

Every song is checked before it is sampled (the Generator's own checks, plus the
prompt's length against what the model reads) and written into the output folder as a
WAV and a spectrogram, with a row in ``served.jsonl``: the id a sweep would give it
(``sweep.item_id``), every parameter, the weights it came from, the edit, its metrics
and timings, compilation apart (``compiled``, ``compile_s``). Songs from several
warm models of one device run in turn: they share one lock, and the Generators of one
model share their compiled programs (``Generator.share_programs``).

Uploaded audio for edits (continuation, inpainting, variation) is read by
:func:`read_upload`, which refuses files over the size or length limits and files that
do not decode, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import soundfile as sf
from absl import logging

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import report
from audiodiff_jax.evaluation import adherence as eval_adherence
from audiodiff_jax.evaluation import notes as eval_notes
from audiodiff_jax.evaluation import song as eval_song
from audiodiff_jax.sampling.generation import AudioEdit, GenerationError, Generator, SampleParams, write_wav
from audiodiff_jax.sweeps import sweep

SERVED = "served.jsonl"
EDITS = ("none", "continuation", "inpainting", "variation")
Progress = Callable[[float, str], None]  # (fraction done, what is happening)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request may ask of a server (flags of ``audiodiff-serve``)."""

    max_prompt_chars: int = 400
    max_upload_mb: float = 25.0
    max_upload_seconds: float = 120.0


@dataclasses.dataclass(frozen=True)
class Song:
    """One song made by a warm model, written to disk."""

    id: str
    wav: str
    spectrogram: str
    params: SampleParams
    source: dict[str, Any]  # the weights: checkpoint, step, weights, adapters (what makes it again)
    edit: str
    metrics: dict[str, Any] | None  # evaluation.song metrics and adherence; None without the eval extra
    timings: dict[str, Any]

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "file": os.path.basename(self.wav),
            "spectrogram": os.path.basename(self.spectrogram),
            **self.params.to_dict(),
            **self.source,
            "edit": self.edit,
            "metrics": self.metrics,
            "timings": self.timings,
        }


def read_upload(path: str, limits: Limits) -> tuple[np.ndarray, int, str]:
    """An uploaded audio file as ``([channels, samples] float32, sample rate, sha256)``.

    Raises:
      GenerationError: the file is too big or too long, or does not decode; the message
        names the file (its base name) and the limit.
    """
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size > limits.max_upload_mb * 2**20:
        raise GenerationError(
            f"upload {name}: {size / 2**20:.1f} MB is more than the limit of {limits.max_upload_mb:g} MB"
        )
    try:
        info = sf.info(path)
        if info.frames <= 0 or info.samplerate <= 0:
            raise ValueError("no audio frames")
        seconds = info.frames / info.samplerate
        if seconds > limits.max_upload_seconds:
            raise GenerationError(
                f"upload {name}: {seconds:.1f} s is longer than the limit of {limits.max_upload_seconds:g} s"
            )
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except GenerationError:
        raise
    except Exception as e:  # noqa: BLE001 - libsndfile raises LibsndfileError, RuntimeError, ValueError
        why = str(e).replace(path, name)  # the server's temporary path says nothing to the user
        raise GenerationError(f"upload {name}: not readable audio ({type(e).__name__}: {why})") from e
    if not np.all(np.isfinite(audio)):
        raise GenerationError(f"upload {name}: the audio holds NaN or infinite samples")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return audio.T, int(rate), digest


class WarmModel:
    """A Generator kept in memory for songs on request.

    Args:
      gen: the generator (weights restored, a codec given).
      out_dir: where songs go (WAVs, spectrograms, ``served.jsonl``).
      name: how pages and judgements name these weights (e.g. the ``--ab`` text).
      lock: shared by every warm model of one device, so songs run in turn.
      limits: what a request may ask.
      measure: measure every song (``audiodiff_jax/evaluation``: tempo, key, loudness...).
      sample: the sample section requests start from (default: the generator's): the
        checkpoint's own, under the server's flags.
    """

    def __init__(
        self,
        gen: Generator,
        out_dir: str,
        *,
        name: str = "",
        lock: threading.Lock | None = None,
        limits: Limits = Limits(),
        measure: bool = True,
        sample: config_lib.SampleConfig | None = None,
    ):
        if gen.codec is None:
            raise GenerationError("a warm model needs a codec to decode its songs")
        self.gen, self.out_dir, self.name = gen, out_dir, name or gen.checkpoint
        self.lock = lock or threading.Lock()
        self.limits, self.measure = limits, measure
        self.sample = sample or gen.sample
        os.makedirs(out_dir, exist_ok=True)
        if measure:
            try:
                eval_song.require_extra()
            except eval_song.MissingExtra as e:
                logging.warning("serve: songs are not measured: %s", e)
                self.measure = False

    def describe(self) -> dict[str, Any]:
        """The weights, as a row records them (what makes a song again with its params)."""
        g = self.gen
        return {
            "checkpoint": g.checkpoint,
            "checkpoint_step": g.step,
            "weights": g.weights,
            "adapters": g.adapters.text,
            "adapter_list": g.adapters.describe(),
            "model_preset": g.cfg.model.preset,
            "codec": g.codec.card.name,
        }

    # -- requests --------------------------------------------------------------------

    def check(self, p: SampleParams) -> None:
        """Raises GenerationError naming the first bad field of ``p``: the Generator's
        checks, the prompt's length in characters and in tokens."""
        max_len = self.gen.cfg.model.text.max_len
        for field in ("prompt", "negative_prompt"):
            text = getattr(p, field)
            if not isinstance(text, str):
                raise GenerationError(f"{field}={text!r} is not text")
            if len(text) > self.limits.max_prompt_chars:
                raise GenerationError(
                    f"{field} is {len(text)} characters long; the limit is {self.limits.max_prompt_chars}"
                )
            if text and self.gen.tokenizer.length(text) > max_len:
                raise GenerationError(
                    f"{field} is {self.gen.tokenizer.length(text)} tokens long; this model reads "
                    f"{max_len} (model.text.max_len) and would not hear the rest: shorten it"
                )
        self.gen.check(p)

    def edit(
        self, mode: str, upload: str | None, start_s: float | None = None, end_s: float | None = None
    ) -> tuple[AudioEdit | None, str]:
        """The edit ``mode`` (one of :data:`EDITS`) of an uploaded file, and its tag
        (mode, the file's sha256 and name, the range): what a row records of it."""
        if mode not in EDITS:
            raise GenerationError(f"edit={mode!r}: one of {', '.join(EDITS)}")
        if mode == "none":
            return None, ""
        if not upload:
            raise GenerationError(f"{mode} needs an uploaded audio file")
        audio, rate, digest = read_upload(upload, self.limits)
        tag = f"{mode}:sha256:{digest}:{os.path.basename(upload)}"
        if mode == "continuation":
            return self.gen.continuation(audio, rate), tag
        if mode == "variation":
            return self.gen.variation(audio, rate), tag
        if start_s is None or end_s is None:
            raise GenerationError("inpainting needs the start and end (seconds) of the part to regenerate")
        return self.gen.inpainting(audio, rate, float(start_s), float(end_s)), f"{tag}:{start_s}-{end_s}"

    def song(
        self,
        p: SampleParams,
        *,
        edit: AudioEdit | None = None,
        edit_tag: str = "",
        stem: str = "",
        progress: Progress | None = None,
        measure: bool | None = None,
    ) -> Song:
        """Samples, decodes, writes and measures one song.

        Args:
          p: the parameters (checked first: :meth:`check`).
          edit, edit_tag: audio to continue, inpaint or vary, and its tag (:meth:`edit`).
          stem: the file name without extension (default: the song's id); blind pairs
            give names that do not tell the sources apart.
          progress: called with (fraction, what) as the song goes.
          measure: measure the song (default: as the model was made; never without the
            eval extra). Blind pairs show no numbers, and skip it.
        """
        report_progress = progress or (lambda fraction, what: None)
        self.check(p)
        gen, card = self.gen, self.gen.codec.card
        sid = sweep.item_id(p, gen.step, gen.weights, gen.adapters.text, edit_tag=edit_tag)
        stem = stem or f"song-s{p.seed}-{sid}"
        report_progress(0.0, "waiting for the model")
        with self.lock:
            report_progress(0.02, "sampling")
            res = gen.generate_latents(
                [p],
                edit=edit,
                on_window=lambda done, total: report_progress(
                    0.05 + 0.75 * done / total, f"sampled window {done}/{total}"
                ),
            )
            report_progress(0.82, "decoding")
            t0 = time.perf_counter()
            audio = gen.decode(res.latents[0], seconds=p.seconds)
            decode_s = time.perf_counter() - t0
        if res.compiled:
            logging.info(
                "serve: %s: sampling program compiled (%.2f s) for song %s", self.name, res.compile_s, sid
            )
        else:
            logging.info("serve: %s: sampling program reused, no compilation, for song %s", self.name, sid)
        wav = os.path.join(self.out_dir, stem + ".wav")
        png = os.path.join(self.out_dir, stem + ".png")
        write_wav(wav, audio, card.sample_rate)
        report.write_spectrogram_png(png, audio, card.sample_rate)
        metrics, measure_s = None, 0.0
        if self.measure and measure is not False:
            report_progress(0.9, "measuring")
            t0 = time.perf_counter()
            metrics = eval_song.song_metrics(
                audio, card.sample_rate, transcriber=eval_notes.load_transcriber()
            )
            metrics.pop("window_metrics", None)
            metrics.update(eval_adherence.adherence(metrics, eval_adherence.labels_from(p.to_dict())))
            measure_s = time.perf_counter() - t0
        timings = {
            "compiled": res.compiled,
            "compile_s": round(res.compile_s, 4),
            "denoise_s": round(res.denoise_s, 4),
            "decode_s": round(decode_s, 4),
            "measure_s": round(measure_s, 4),
            "windows": res.windows,
            "model_evals": self.gen.model_evals(p, res.windows),
            "realtime_factor": round(p.seconds / max(res.denoise_s, 1e-9), 2),
        }
        song = Song(sid, wav, png, p, self.describe(), edit_tag, metrics, timings)
        with self.lock, open(os.path.join(self.out_dir, SERVED), "a", encoding="utf-8") as f:
            f.write(json.dumps(song.row(), sort_keys=True) + "\n")
        report_progress(1.0, "done")
        return song
