"""Paths that may be local or in a bucket: how to tell them apart, and how to write a file whole.

Workdirs, shard folders, sweeps and exports may be ``gs://`` URLs (read and written
through ``etils.epath``). The few places that must act differently on a bucket ask
:func:`is_remote`; every file that a reader may open while it is being written goes
through :func:`atomic_write`, so the reader sees the old content or the new, never half.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as ``gs://bucket/dir`` (anything with ``://``), False for a local path."""
    return "://" in str(path)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a reader sees the old file or the new one, never part.

    Locally: a temporary file in the same folder (``PATH.tmp-PID``), then ``os.replace``
    (a rename, atomic on POSIX). In a bucket: one upload, which replaces the object
    whole (a rename there would be a copy, not atomic).
    """
    path = str(path)
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a failed write (full disk...) leaves no stray file
            os.remove(tmp)
        raise


def usual_mode(path: str | os.PathLike) -> None:
    """Gives a local file the mode a plain ``open(path, "w")`` would: readable by others as
    the umask allows. safetensors writes its files owner-only (0600); exports and
    adapters are made to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
