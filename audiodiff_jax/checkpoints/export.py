"""Exported weights: one set of weights in a portable folder (``audiodiff-export`` writes it).

An export is what researchers hand to each other: no Orbax, no optimizer state, no
train state, readable with any safetensors reader. The folder holds

- ``params.safetensors``: the arrays, one tensor per parameter, named by its path in
  the params tree joined with ``.`` (``blocks.0.cross_attn.key``);
- ``export.json``: what the weights are (the set's name, e.g. ``ema0.9999``, the names
  it answers to, the checkpoint step and folder it came from, each tensor's shape,
  dtype and SHA-256 of its bytes in ``params.safetensors``, under ``hash``, the
  weights' content hash (:func:`content_hash`, what adapters name their base by) and,
  for a merged export, the adapters merged in);
- ``config.json``: the resolved config of the run; ``dataset_card.json``: the card of
  its latents; ``tokenizer.json``: its sentencepiece model (base64, with its sha256).

``audiodiff-sample --checkpoint=EXPORT`` samples from it and ``train.init_from=EXPORT``
starts a run from it (``checkpointing.restore_params``). Loading checks every tensor's
bytes against its hash (an export written before hashes existed loads with one log line
saying so) and every name and shape against the model that receives the weights, and
names the first that differs.
Each process reads only the slices of each tensor its devices hold (safetensors slices
of a memory-mapped file), so an export restores onto any mesh without a full host copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from audiodiff_jax.checkpoints import integrity
from audiodiff_jax.core import paths
from audiodiff_jax.core.errors import UserError

FORMAT = "audiodiff-jax export"
VERSION = 1
META = "export.json"
PARAMS = "params.safetensors"
JSON_ITEMS = ("config", "dataset_card", "tokenizer")  # each as <name>.json
SEP = "."


class ExportError(UserError, ValueError):
    """An export folder that cannot be written or read, or weights that do not fit a model."""


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export folder (it holds ``export.json``)."""
    return (epath.Path(path) / META).is_file()


def flatten(params: Any) -> dict[str, Any]:
    """A params tree (nested dicts of str keys) -> ``{"a.b.c": leaf}``."""
    flat = traverse_util.flatten_dict(params)
    for path in flat:
        bad = [k for k in path if not isinstance(k, str) or SEP in k or not k]
        if bad:
            raise ExportError(
                f"parameter path {path} has a key that cannot be named in an export: {bad[0]!r}"
            )
    return {SEP.join(path): leaf for path, leaf in flat.items()}


def content_hash(params: Any) -> str:
    """The identity of a set of weights: ``sha256:`` of every tensor's name, dtype, shape
    and bytes, in name order. The same weights give the same hash whether they come from
    a checkpoint step or its export; adapters record their base's
    (``audiodiff_jax/checkpoints/adapter_export.py``). Host arrays, or device arrays
    this process holds whole."""
    h = hashlib.sha256()
    for name, leaf in sorted(flatten(params).items()):
        x = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(json.dumps([name, str(x.dtype), list(x.shape)]).encode())
        h.update(x.tobytes())
    return "sha256:" + h.hexdigest()


def short_hash(digest: str) -> str:
    """``sha256:0123456789ab`` (12 hex digits): how messages show a content hash."""
    return digest[: len("sha256:") + 12]


def write(
    out_dir: str,
    params: Any,
    *,
    weights: str,
    aliases: list[str],
    step: int,
    source: str,
    json_items: dict[str, dict],
    extra: dict[str, Any] | None = None,
) -> str:
    """Writes an export folder (into a temporary folder renamed at the end: never half-written).

    Args:
      out_dir: the folder to create; must not exist (or be empty).
      params: the params tree, host arrays.
      weights: the weight set's name (``raw``, ``ema0.999``...); ``aliases`` the other
        names it answers to (``ema``).
      step, source: the checkpoint step and folder the weights came from.
      json_items: ``config``, ``dataset_card`` and ``tokenizer`` JSON objects.
      extra: more fields of ``export.json`` (e.g. ``adapters``: the adapters merged in).

    Returns:
      ``out_dir``.
    """
    out = epath.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export folder {out_dir} exists and is not empty; give a new folder")
    missing = [k for k in JSON_ITEMS if k not in json_items]
    if missing:
        raise ExportError(f"cannot export without {missing}")
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten(params).items()}
    tmp = epath.Path(f"{out_dir.rstrip('/')}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    hashes = integrity.pool().map(integrity.digest, flat.values())  # beside the write
    save_file(flat, str(tmp / PARAMS), metadata={"format": FORMAT, "weights": weights})
    paths.usual_mode(tmp / PARAMS)  # safetensors writes 0600
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "weights": weights,
        "aliases": list(aliases),
        "step": int(step),
        "source": str(source),
        "params": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype), "hash": h}
            for (k, v), h in zip(flat.items(), hashes, strict=True)
        },
        "hash_algorithm": integrity.ALGORITHM,
        "content_hash": content_hash(params),
        **(extra or {}),
    }
    for name in JSON_ITEMS:
        (tmp / f"{name}.json").write_text(json.dumps(json_items[name], indent=1, sort_keys=True))
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))  # last: marks it complete
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out_dir


def read_meta(path: str) -> dict:
    """``export.json`` of an export folder, checked for its format and version."""
    f = epath.Path(path) / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{f}: not a readable export description ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(
            f"{f}: not an {FORMAT} (format={meta.get('format') if isinstance(meta, dict) else meta!r})"
        )
    if meta.get("version") != VERSION:
        raise ExportError(
            f"{f}: export version {meta.get('version')!r}; this program reads version {VERSION}"
        )
    return meta


def read_json_item(path: str, name: str) -> dict:
    """One of :data:`JSON_ITEMS` of an export folder."""
    f = epath.Path(path) / f"{name}.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{f}: cannot be read ({e})") from e
    if not isinstance(data, dict):
        raise ExportError(f"{f}: not a JSON object")
    return data


def check_hashes(path: str, meta: dict | None = None) -> list[str]:
    """Tensors of an export whose bytes differ from the hashes in its ``export.json``,
    described ([] when all match). An export written before hashes existed: [] and one
    log line saying it carries none.

    Raises:
      ExportError: ``params.safetensors`` cannot be read.
    """
    meta = read_meta(path) if meta is None else meta
    want = {k: v["hash"] for k, v in meta.get("params", {}).items() if isinstance(v, dict) and "hash" in v}
    if not want or meta.get("hash_algorithm") != integrity.ALGORITHM:
        logging.warning(
            "export %s carries no content hashes (written before they existed): loaded without checking them",
            path,
        )
        return []
    try:
        return integrity.check_export_hashes(str(epath.Path(path) / PARAMS), want, str(path))
    except integrity.IntegrityError as e:
        raise ExportError(str(e)) from e


def verify(path: str, meta: dict | None = None) -> None:
    """Raises ExportError naming the first tensor of the export that differs from its hash."""
    problems = check_hashes(path, meta)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(
            f"export {path}: {problems[0]}{more}; the file changed since it was exported, refusing it"
        )


def answers_to(meta: dict) -> list[str]:
    """The names an export's weights answer to: its own and its aliases."""
    return [meta["weights"], *meta.get("aliases", [])]


def _first_mismatch(want: dict[str, tuple], have: dict[str, tuple]) -> str:
    """The first parameter (in sorted order) whose name or shape differs, described; "" if none."""
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"parameter {name} {tuple(want[name])} of the model is not in the export"
        if name not in want:
            return f"parameter {name} {tuple(have[name])} of the export is not in the model"
        if tuple(want[name]) != tuple(have[name]):
            return (
                f"parameter {name} has shape {tuple(have[name])} in the export, "
                f"{tuple(want[name])} in the model"
            )
    return ""


def load_params(path: str, abstract_params: Any) -> Any:
    """The export's weights as arrays placed like ``abstract_params``.

    Args:
      path: an export folder.
      abstract_params: params tree of ``jax.ShapeDtypeStruct`` (with shardings: the
        arrays are placed on them, each device reading its own slice; without: host
        numpy arrays).

    Raises:
      ExportError: a tensor differs from its hash, or a name or shape differs from
        ``abstract_params``'s, naming the first.
    """
    verify(path, read_meta(path))
    want = flatten(abstract_params)
    file = str(epath.Path(path) / PARAMS)
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportError(f"{file}: cannot be read ({type(e).__name__}: {e})") from e
    with handle as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        problem = _first_mismatch({k: v.shape for k, v in want.items()}, have)
        if problem:
            raise ExportError(f"{path}: {problem}; these weights are not for this model")
        out = {}
        cast = set()
        for name, spec in want.items():
            dtype = np.dtype(spec.dtype)
            sl = f.get_slice(name)
            if str(sl.get_dtype()).lower() not in (dtype.name.lower(), _st_dtype(dtype)):
                cast.add(name)
            sharding = getattr(spec, "sharding", None)
            if sharding is None:
                out[name] = (
                    np.asarray(sl[:], dtype=dtype) if spec.shape else np.asarray(f.get_tensor(name), dtype)
                )
            elif not spec.shape:
                out[name] = jax.device_put(np.asarray(f.get_tensor(name), dtype), sharding)
            else:
                out[name] = jax.make_array_from_callback(
                    spec.shape, sharding, lambda idx, sl=sl, dtype=dtype: np.asarray(sl[idx], dtype=dtype)
                )
    if cast:
        logging.warning(
            "export %s: %d parameter(s) cast to the model's dtype (e.g. %s)", path, len(cast), min(cast)
        )
    return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in out.items()})


_ST_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float64": "F64",
}


def _st_dtype(dtype: np.dtype) -> str:
    return _ST_DTYPES.get(dtype.name, dtype.name).lower()
