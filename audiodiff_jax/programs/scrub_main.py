r"""``audiodiff-scrub``: checks that a run's checkpoints or an export still hold what was written.

    audiodiff-scrub --checkpoint=gs://BUCKET/runs/dit1b     # every step of a run
    audiodiff-scrub --checkpoint=exports/dit1b-ema           # an export

Reads every array of every complete step (or every tensor of an export) and compares
it with the SHA-256 written with it (``audiodiff_jax/checkpoints/scrub.py``). Prints one
line per damaged item (``DAMAGED <step folder>: array params.x[0:16, 0:48] does not
match its sha256``), one per step too old to carry hashes (``unchecked``), and a summary.

Exit status: 0 when nothing is damaged, 1 when something is, 2 for bad input (a path
that does not exist or holds no checkpoint or export).
"""

from __future__ import annotations

import sys

from absl import app, flags

from audiodiff_jax.checkpoints import scrub
from audiodiff_jax.programs import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run workdir, its checkpoints folder, a step folder, or an export folder."
)
_BUDGET = flags.DEFINE_integer("budget_mb", 1024, "Host memory for the arrays read at a time (MB).")

EXIT_DAMAGED = 1


def main(argv):
    del argv
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required")
    report = scrub.scrub(_CHECKPOINT.value, budget_bytes=_BUDGET.value << 20)
    for finding in report.findings:
        print(finding.line(), flush=True)
    damaged = len(report.damaged)
    what = f"{len(report.checked)} step(s)" if len(report.checked) != 1 else report.checked[0]
    verdict = f"{damaged} damaged item(s)" if damaged else "no damage"
    print(f"audiodiff-scrub: checked {what} of {report.path}: {verdict}")
    sys.exit(EXIT_DAMAGED if damaged else 0)


def run():
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
