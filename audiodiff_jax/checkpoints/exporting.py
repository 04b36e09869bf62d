"""Writing exports of checkpoints: what ``audiodiff-export`` runs (``programs/export_main.py``),
for other programs to call without its flags (``audiodiff-calibrate``)."""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from audiodiff_jax.checkpoints import adapter_export, export, source
from audiodiff_jax.core import optim
from audiodiff_jax.model import adapters


def export_checkpoint(
    checkpoint: str,
    out: str,
    *,
    step: int | None = None,
    weights: str | None = None,
    adapters_text: str = "",
) -> str:
    """Exports one weight set of a checkpoint step into ``out`` (an adapter run: its
    adapter, :func:`export_adapter`), with ``adapters_text`` (``PATH[@SCALE],...``)
    merged in; returns ``out``.

    Raises:
      GenerationError (from the weights source) / export.ExportError: bad input, named.
    """
    if source.is_adapter(checkpoint):
        if adapters_text:
            raise export.ExportError(
                f"{checkpoint} is an adapter run; --adapters merges adapters into a base"
            )
        return export_adapter(checkpoint, out, step=step, weights=weights)
    stack = source.open_adapter_stacks([adapters_text])[0]
    src = source.WeightsSource(checkpoint, step)
    if src.is_export and not stack.layers:
        raise export.ExportError(f"{checkpoint} is an export already; copy the folder instead")
    canonical = src.canonical_weights(weights or src.default_weights())
    src.check_weights(src.step, [canonical])
    params = src.host_params(src.step, canonical)
    for adapter, _ in stack.layers:
        src.check_adapter(adapter, src.step, canonical)
    extra = {}
    if stack.layers:
        # The same jitted merge as sampling's (Generator.use_weights), on one device.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        factors = [scale * a.spec.factor for a, scale in stack.layers]
        merge = jax.jit(
            lambda base, ps: adapters.merge(base, list(zip(ps, factors, strict=True))),
            out_shardings=jax.tree.map(lambda _: device, params),
        )
        params = jax.tree.map(np.asarray, merge(params, [a.params for a, _ in stack.layers]))
        extra["adapters"] = adapter_export.merged_description(list(stack.layers))
        extra["base_content_hash"] = src.identity(src.step, canonical)["hash"]
    aliases = [optim.EMA] if canonical == src.canonical_weights(optim.EMA) else []
    items = source.json_items(src.step_dir)
    step, step_dir = src.step, src.step_dir
    export.write(
        out,
        params,
        weights=canonical,
        aliases=aliases,
        step=step,
        source=str(step_dir),
        json_items=items,
        extra=extra,
    )
    n = sum(int(x.size) for x in export.flatten(params).values())
    merged = f" with adapters {stack.text} merged in" if stack.layers else ""
    logging.info("exported weights %s of step %d (%d parameters)%s to %s", canonical, step, n, merged, out)
    return out


def export_adapter(run: str, out: str, *, step: int | None = None, weights: str | None = None) -> str:
    """Writes the adapter of an adapter run's checkpoint step (weight set ``weights``,
    default its EMA) as an adapter folder; returns ``out``."""
    adapter, where = source.open_adapter(run, weights, step)
    adapter_export.write(out, adapter, weights=where["weights"], step=where["step"], source=where["source"])
    logging.info(
        "exported adapter %s (rank %d, %d parameters) of step %d to %s; its base: %s",
        where["weights"],
        adapter.spec.rank,
        adapters.count_params(adapter.params),
        where["step"],
        out,
        adapter.base.get("name"),
    )
    return out
