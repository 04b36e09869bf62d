"""A codec by name: the one place where a name (a flag, a config value, a dataset card's
codec field) becomes a codec object.

A name opens a codec shipped in the package (its :data:`~audiodiff_jax.codec.codec.SHIPPED`
key, ``"default"`` or ``"music"``, or its card name, ``"audiodiff-vae-small"``: what a
dataset card records), an exported codec folder, or a codec training workdir.

A name the user typed (a command-line flag, a config file value, a Python caller) may also
be ``module:factory``: ``module`` is imported and ``factory`` called (custom codecs,
tests). A name read from an artifact (the dataset card of a checkpoint or an export) is
data, and data never chooses code to import: with ``allow_code=False`` such a name is
refused, and the error says how to give the codec instead.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from audiodiff_jax.codec import codec as codec_lib
from audiodiff_jax.core.errors import UserError

# ``package.module:factory``: what may name code to import (a folder path never has this shape
# unless it holds no codec, and a folder that holds one is opened first).
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class CodecNotFoundError(UserError, ValueError):
    """A codec name that opens no codec here, or that is code an artifact may not choose;
    the one-line message names the codec and says how to give one."""


def codec_by_name(name: str, *, allow_code: bool, where: str | None = None, option: str = "--codec") -> Any:
    """Opens the codec called ``name``.

    Args:
      name: a shipped codec (key or card name), an exported codec folder, a codec
        training workdir, or (``allow_code`` only) ``module:factory``.
      allow_code: True only when the user gave ``name`` (a flag, a config value, a Python
        argument): then ``module:factory`` imports ``module`` and takes ``factory`` if it
        is a codec object, else calls it. False for a name read from an artifact.
      where: what gave the name, for the error (``"the dataset card"``, ``"--codec"``);
        default: ``"the dataset card"`` when ``allow_code`` is False, else not said.
      option: how the user gives another codec, for the error (``--codec``,
        ``--config.eval.codec``).

    Returns:
      A codec object (``card``, ``encode``, ``decode``): a :class:`~audiodiff_jax.codec.JaxCodec`,
      or what the factory gave.

    Raises:
      CodecNotFoundError: nothing here opens under ``name``, or it is ``module:factory``
        and ``allow_code`` is False, or the factory cannot be imported or gives no codec.
    """
    if where is None:
        where = "" if allow_code else "the dataset card"
    what = f"{where} names codec {name!r}, which" if where else f"codec {name!r}"
    shipped = ", ".join(sorted(codec_lib.SHIPPED))
    choices = f"shipped: {shipped}; an exported codec folder; a codec training workdir"
    choices += "; module:factory" if allow_code else ""
    folder = codec_lib.shipped_folder(name) or name
    if name and (
        os.path.exists(os.path.join(folder, codec_lib.WEIGHTS_FILE))
        or os.path.isdir(os.path.join(folder, "checkpoints"))
    ):
        return codec_lib.load_codec(folder)
    if not _FACTORY.fullmatch(name):
        raise CodecNotFoundError(f"{what} is not on this machine; pass {option}=NAME_OR_PATH ({choices})")
    if not allow_code:
        raise CodecNotFoundError(
            f"{what} is module:factory code, not imported because the name came from an artifact; "
            f"pass {option}={name} to run it, or {option}=NAME_OR_PATH ({choices})"
        )
    module, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CodecNotFoundError(f"{what} cannot be imported ({first}); pass {option}=NAME_OR_PATH") from e
    codec = obj if _is_codec(obj) or not callable(obj) else obj()
    if not _is_codec(codec):
        raise CodecNotFoundError(
            f"{what} gives a {type(codec).__name__} (no card, encode and decode); pass {option}=NAME_OR_PATH"
        )
    return codec


def _is_codec(obj: Any) -> bool:
    """Has the codec interface (an instance, not a class: a class is a factory)."""
    return all(hasattr(obj, name) for name in ("card", "encode", "decode")) and not isinstance(obj, type)
