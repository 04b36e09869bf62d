r"""``audiodiff-export``: one set of weights of a checkpoint as a portable folder.

    audiodiff-export --checkpoint=runs/dit1b --weights=ema0.9999 --out=exports/dit1b-ema

Writes the weight set ``--weights`` (``raw``, ``ema``, ``ema<decay>``; default: the
first of the checkpoint config's ``sample.weights``) of the latest (or ``--step``)
checkpoint, with the resolved config, the dataset card and the tokenizer, into
``--out`` (``audiodiff_jax/checkpoints/export.py``: safetensors for the arrays, JSON for the rest).
Only those weights are read (never the optimizer state), as host arrays in one process.

``audiodiff-sample --checkpoint=OUT`` samples from the folder, and
``--config.train.init_from=OUT`` starts a training run from it.

Exit status: 0 when written, 2 for bad input (no such checkpoint, step or weights; an
output folder that is not empty).
"""

from __future__ import annotations

from absl import app, flags, logging

from audiodiff_jax.checkpoints import export, source
from audiodiff_jax.core import optim
from audiodiff_jax.programs import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run workdir, its checkpoints folder, or a step folder."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
_WEIGHTS = flags.DEFINE_string(
    "weights",
    None,
    "Weight set: raw, ema, or ema<decay> (default: sample.weights of the checkpoint's config).",
)
_OUT = flags.DEFINE_string("out", None, "The export folder to write (new or empty).")


def export_checkpoint(
    checkpoint: str, out: str, *, step: int | None = None, weights: str | None = None
) -> str:
    """Exports one weight set of a checkpoint step into ``out``; returns ``out``.

    Raises:
      GenerationError (from the weights source) / export.ExportError: bad input, named.
    """
    src = source.WeightsSource(checkpoint, step)
    if src.is_export:
        raise export.ExportError(f"{checkpoint} is an export already; copy the folder instead")
    canonical = src.canonical_weights(weights or src.default_weights())
    params = src.restore(src.step, [canonical], None)[canonical]
    aliases = [optim.EMA] if canonical == src.canonical_weights(optim.EMA) else []
    items = source.json_items(src.step_dir)
    step, step_dir = src.step, src.step_dir
    export.write(
        out, params, weights=canonical, aliases=aliases, step=step, source=str(step_dir), json_items=items
    )
    n = sum(int(x.size) for x in export.flatten(params).values())
    logging.info("exported weights %s of step %d (%d parameters) to %s", canonical, step, n, out)
    return out


def main(argv):
    del argv
    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    out = export_checkpoint(_CHECKPOINT.value, _OUT.value, step=_STEP.value, weights=_WEIGHTS.value)
    print(f"audiodiff-export: wrote {out}")


def run():
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
