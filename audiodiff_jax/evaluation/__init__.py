"""Evaluation of generated audio (docs/DESIGN.md, contract 6): per-song and per-window
metrics, prompt adherence, set-level Fréchet distances, and the page that shows them.

    result = evaluate_folder("samples/sweep1", reference="renders/heldout")
    write_eval_page("samples/sweep1", result.rows, result.summary)

- ``song.py``: tempo, key, loudness, peaks, silence, onsets, notes, drone; per window.
- ``notes.py``: basic-pitch's ONNX note transcriber.
- ``adherence.py``: labels from prompts and manifests, accuracies, estimator ceilings.
- ``embeddings.py``: window embeddings and the Fréchet distance.
- ``folder.py``: :func:`evaluate_folder`, ``metrics.jsonl``, ``metrics_summary.json``.
- ``page.py``: plots against grid axes and ``eval.html``.

The estimators need the "eval" extra (``pip install 'audiodiff-jax[eval]'``).
"""

from audiodiff_jax.evaluation.embeddings import Gaussian, frechet_distance, get_embedder
from audiodiff_jax.evaluation.folder import (
    METRICS_FILE,
    SUMMARY_FILE,
    EvalError,
    EvalResult,
    evaluate_folder,
    read_metrics,
    set_distance,
)
from audiodiff_jax.evaluation.page import plot_metrics_against, section_context, write_eval_page
from audiodiff_jax.evaluation.song import song_metrics

__all__ = [
    "METRICS_FILE",
    "SUMMARY_FILE",
    "EvalError",
    "EvalResult",
    "Gaussian",
    "evaluate_folder",
    "frechet_distance",
    "get_embedder",
    "plot_metrics_against",
    "read_metrics",
    "section_context",
    "set_distance",
    "song_metrics",
    "write_eval_page",
]
