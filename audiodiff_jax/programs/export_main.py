r"""``audiodiff-export``: one set of weights of a checkpoint as a portable folder.

    audiodiff-export --checkpoint=runs/dit1b --weights=ema0.9999 --out=exports/dit1b-ema

Writes the weight set ``--weights`` (``raw``, ``ema``, ``ema<decay>``; default: the
first of the checkpoint config's ``sample.weights``) of the latest (or ``--step``)
checkpoint, with the resolved config, the dataset card and the tokenizer, into
``--out`` (``audiodiff_jax/checkpoints/export.py``: safetensors for the arrays, JSON for the rest).
Only those weights are read (never the optimizer state), as host arrays in one process.

``audiodiff-sample --checkpoint=OUT`` samples from the folder, and
``--config.train.init_from=OUT`` starts a training run from it.

Adapters (``audiodiff_jax/checkpoints/adapter_export.py``):

    audiodiff-export --checkpoint=runs/my_adapter --out=adapters/mine
    audiodiff-export --checkpoint=runs/dit1b --adapters=adapters/mine@0.8 --out=exports/dit1b-mine

The first writes an adapter run's adapter (its EMA by default) as a small folder
(``adapter.safetensors`` + ``adapter.json``: the spec and the base's identity; never the
base). The second merges adapters, each at its scale, into the weights of a base and
writes a whole export; its ``export.json`` lists the adapters merged in. An adapter made
for other weights is refused, naming both.

Exit status: 0 when written, 2 for bad input (no such checkpoint, step or weights; an
output folder that is not empty; an adapter that is damaged or made for another base).
"""

from __future__ import annotations

from absl import app, flags

from audiodiff_jax.checkpoints.exporting import export_adapter, export_checkpoint
from audiodiff_jax.programs import cli

__all__ = ["export_adapter", "export_checkpoint", "main", "run"]

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
_ADAPTERS = flags.DEFINE_string(
    "adapters",
    "",
    "Adapters to merge into the weights, PATH[@SCALE],... (adapter folders or adapter runs): "
    "writes a whole export of the merged weights.",
)


def main(argv):
    del argv
    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required")
    out = export_checkpoint(
        _CHECKPOINT.value, _OUT.value, step=_STEP.value, weights=_WEIGHTS.value, adapters_text=_ADAPTERS.value
    )
    print(f"audiodiff-export: wrote {out}")


def run():
    cli.run(main, module=__name__)


if __name__ == "__main__":
    run()
