r"""``audiodiff-eval``: metrics for every song of a folder, and a page that shows them.

    audiodiff-eval --folder=samples/sweep1
    audiodiff-eval --folder=samples/sweep1 --reference=renders/heldout --embedding=spectral
    audiodiff-eval --folder=renders/scores --labels=renders/scores/manifest.jsonl
    audiodiff-eval --judgements=listening/teacher_vs_student

Measures every audio file under ``--folder`` (sweep outputs, a corpus, any folder):
tempo, key, integrated loudness (LUFS), true peak and clipped share, silence share,
onset rate, note density (basic-pitch), pitch-class entropy, a drone indicator, and
tempo and key per 30 s window with their stability. Where a song's manifest row,
labels or prompt states a tempo or key, checks it (tempo within 4%, octave errors
wrong). With ``--reference``, the Fréchet distance between the two sets in an
embedding (``codec``, ``spectral``, ``mel``, ``basic-pitch``, or your own:
``onnx:PATH[@RATE]``, ``npz:PATH``).

Writes ``metrics.jsonl`` (one row per song), ``metrics_summary.json`` and
``eval.html`` (tables, and plots against each grid axis a sweep varies) into the
folder.

With ``--judgements=FILE_OR_FOLDER`` (the ``judgements.jsonl`` of blind A/B tests,
``audiodiff-serve --ab``) it prints each source's win rate (wins over decisive
judgements) with its Wilson confidence interval and the binomial test against 50%, and
the head-to-head counts, and writes them to ``win_rates.json`` beside the file
(``audiodiff_jax/evaluation/judgements.py``).

Exit status: 0 when every file was measured, 1 when some could not be read (listed in
the summary and on the page), 2 for bad input that stops everything.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from audiodiff_jax.evaluation import embeddings, folder, judgements, page, song
from audiodiff_jax.programs import cli

_FOLDER = flags.DEFINE_string("folder", None, "Folder of audio files to evaluate (searched recursively).")
_REFERENCE = flags.DEFINE_string("reference", "", "Folder of reference audio for the Fréchet distance.")
_LABELS = flags.DEFINE_string(
    "labels", "", "JSONL of labels per id or file (default: the folder's manifest rows and prompts)."
)
_EMBEDDING = flags.DEFINE_string(
    "embedding",
    embeddings.DEFAULT_EMBEDDING,
    "Embedding of the set distance: " + ", ".join(embeddings.BUILTIN) + ", onnx:PATH[@RATE] or npz:PATH.",
)
_WINDOW = flags.DEFINE_float("window_seconds", song.WINDOW_SECONDS, "Window of the per-window tempo and key.")
_TRANSCRIBE = flags.DEFINE_bool("transcribe", True, "Transcribe notes with basic-pitch (when installed).")
_PAGE = flags.DEFINE_bool("page", True, "Write eval.html.")
_JUDGEMENTS = flags.DEFINE_string(
    "judgements", "", "A judgements.jsonl of blind A/B tests (or its folder): win rates per source."
)
_CONFIDENCE = flags.DEFINE_float(
    "confidence", judgements.CONFIDENCE, "Confidence level of the win rates' intervals."
)


def win_rates() -> None:
    """``--judgements``: the win-rate table on stdout and ``win_rates.json``."""
    if not 0 < _CONFIDENCE.value < 1:
        raise folder.EvalError(f"--confidence={_CONFIDENCE.value} must be in (0, 1)")
    result, path, bad = judgements.write_win_rates(_JUDGEMENTS.value, _CONFIDENCE.value)
    print(f"{result['judgements']} judgement(s) in {_JUDGEMENTS.value}")
    print(judgements.format_table(result), end="")
    print(f"wrote {path}")
    for line in bad:
        print(f"unreadable: {line}", file=sys.stderr)
    if bad:
        sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise folder.EvalError(f"unexpected arguments {argv[1:]}; give the folder with --folder")
    if _JUDGEMENTS.value:
        if _FOLDER.value:
            raise folder.EvalError("give --folder (songs to measure) or --judgements (A/B choices), not both")
        return win_rates()
    if not _FOLDER.value:
        raise folder.EvalError("--folder (or --judgements) is required")
    if _WINDOW.value <= 0:
        raise folder.EvalError(f"--window_seconds={_WINDOW.value} must be > 0")
    try:
        song.require_extra()
    except song.MissingExtra as e:
        raise folder.EvalError(str(e)) from e
    result = folder.evaluate_folder(
        _FOLDER.value,
        reference=_REFERENCE.value or None,
        labels=_LABELS.value or None,
        embedding=_EMBEDDING.value,
        window_seconds=_WINDOW.value,
        transcribe=_TRANSCRIBE.value,
    )
    print(f"wrote {result.metrics_path} ({len(result.rows)} songs) and {result.summary_path}")
    if _PAGE.value:
        print(
            "wrote",
            page.write_eval_page(
                _FOLDER.value, result.rows, result.summary, title=f"Evaluation of {_FOLDER.value}"
            ),
        )
    print(
        json.dumps(
            {k: result.summary[k] for k in ("means", "adherence", "set_distance") if k in result.summary}
        )
    )
    if result.issues:
        for issue in result.issues:
            print(f"unreadable: {issue['where']}: {issue['message']}", file=sys.stderr)
        sys.exit(1)


def run():
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
