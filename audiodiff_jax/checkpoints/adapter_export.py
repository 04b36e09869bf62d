"""Adapters as artifacts: one adapter in its own small folder (``audiodiff-export`` writes it).

An adapter run's checkpoints hold the adapter's train state (its factors, their
optimizer state and EMAs) and, as the JSON item ``adapter``, the spec and the base's
identity, never a copy of the base. Exported, one weight set of the adapter becomes a
folder of a few megabytes:

- ``adapter.safetensors``: the factors, one tensor each, named by their path
  (``blocks.0.self_attn.query.a``; the layout is ``audiodiff_jax/model/adapters.py``'s);
- ``adapter.json``: format and version; ``spec`` (rank, alpha, targets); ``base``, the
  identity of the weights it was trained on (a name, and the content hash of those
  weights, ``export.content_hash``); the weight set and step it came from; every
  tensor's shape and dtype.

``audiodiff-sample --adapters=FOLDER`` stacks it on its base; ``audiodiff-export
--checkpoint=BASE --adapters=FOLDER`` merges it into a full export. Both also take an
adapter run itself (``source.open_adapter`` asks "folder or run?"). Reading checks the
file whole: a truncated or damaged file, or tensors that disagree with the description,
are refused naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from audiodiff_jax.checkpoints import export
from audiodiff_jax.core import paths
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.model.adapters import FACTORS, KERNELS, Adapter, AdapterSpec, kernel_paths

FORMAT = "audiodiff-jax adapter"
VERSION = 1
META = "adapter.json"
PARAMS = "adapter.safetensors"


class AdapterError(UserError, ValueError):
    """An adapter folder that cannot be written or read, or that does not fit its base."""


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapter folder (it holds ``adapter.json``)."""
    return (epath.Path(path) / META).is_file()


def write(out_dir: str, adapter: Adapter, *, weights: str, step: int, source: str) -> str:
    """Writes an adapter folder (into a temporary folder renamed at the end: never half-written).

    Args:
      out_dir: the folder to create; must not exist (or be empty).
      adapter: the factors (host arrays), spec and base identity.
      weights, step, source: the weight set (``ema0.999``...), step and checkpoint folder
        of the adapter run they came from.

    Returns:
      ``out_dir``.
    """
    out = epath.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"adapter folder {out_dir} exists and is not empty; give a new folder")
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in export.flatten(adapter.params).items()}
    tmp = epath.Path(f"{out_dir.rstrip('/')}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / PARAMS), metadata={"format": FORMAT})
    paths.usual_mode(tmp / PARAMS)  # safetensors writes 0600
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "spec": adapter.spec.to_dict(),
        "base": adapter.base,
        "weights": weights,
        "step": int(step),
        "source": str(source),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
    }
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))  # last: marks it complete
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out_dir


def read_meta(path: str) -> dict:
    """``adapter.json`` of an adapter folder, checked for its format and version."""
    f = epath.Path(path) / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{f}: not a readable adapter description ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{f}: not an {FORMAT} description")
    if meta.get("version") != VERSION:
        raise AdapterError(
            f"{f}: adapter version {meta.get('version')!r}; this program reads version {VERSION}"
        )
    try:
        spec = meta["spec"]
        AdapterSpec(int(spec["rank"]), float(spec["alpha"]), tuple(spec["targets"]))
        base = meta["base"]
        if not isinstance(base, dict) or not str(base.get("hash", "")).startswith("sha256:"):
            raise ValueError("base has no content hash")
        if not isinstance(meta["tensors"], dict):
            raise ValueError("tensors is not a mapping")
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{f}: incomplete adapter description ({type(e).__name__}: {e})") from e
    return meta


def spec_of(meta: dict) -> AdapterSpec:
    s = meta["spec"]
    return AdapterSpec(int(s["rank"]), float(s["alpha"]), tuple(s["targets"]))


def check_factors(params: dict, spec: AdapterSpec, where: str) -> None:
    """Raises AdapterError unless every adapted kernel has an ``a`` and a ``b`` of the spec's rank."""
    flat = traverse_util.flatten_dict(params)
    targets = {".".join(rel) for rel, _ in KERNELS.values()}
    for path in kernel_paths(params):
        a, b = flat.get((*path, "a")), flat.get((*path, "b"))
        name = ".".join(path)
        if a is None or b is None or set(k[-1] for k in flat if k[:-1] == path) != set(FACTORS):
            raise AdapterError(f"{where}: {name} needs exactly the factors a and b")
        if a.shape[-1] != spec.rank or b.shape[0] != spec.rank:
            raise AdapterError(
                f"{where}: {name} has factors {tuple(a.shape)} and {tuple(b.shape)}, not of rank {spec.rank}"
            )
        if len(path) < 3 or path[0] != "blocks" or ".".join(path[2:]) not in targets:
            raise AdapterError(f"{where}: {name} is not a projection an adapter can target")


def read(path: str, name: str = "") -> Adapter:
    """The adapter of a folder, as host arrays.

    Raises:
      AdapterError: not an adapter folder, a truncated or damaged ``adapter.safetensors``,
        tensors that differ from ``adapter.json``.
    """
    meta = read_meta(path)
    file = str(epath.Path(path) / PARAMS)
    flat = {}
    try:
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - not a dict
                flat[key] = f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterError(f"{file} is truncated or damaged: {type(e).__name__}: {e}") from e
    want = {k: (tuple(v["shape"]), v["dtype"]) for k, v in meta["tensors"].items()}
    have = {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items()}
    if want != have:
        first = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[0]
        raise AdapterError(
            f"{file}: tensor {first} is {have.get(first, 'missing')} in the file, "
            f"{want.get(first, 'missing')} in {META}: a damaged or mixed-up folder"
        )
    params = traverse_util.unflatten_dict({tuple(k.split(export.SEP)): v for k, v in flat.items()})
    spec = spec_of(meta)
    check_factors(params, spec, file)
    return Adapter(params, spec, dict(meta["base"]), name or epath.Path(path).name)


def merged_description(stack: list[tuple[Adapter, float]]) -> list[dict[str, Any]]:
    """What a merged export's ``export.json`` records of the adapters merged in."""
    return [
        {"name": a.name, "scale": scale, "spec": a.spec.to_dict(), "base_hash": a.base["hash"]}
        for a, scale in stack
    ]
