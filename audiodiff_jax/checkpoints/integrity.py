"""Content hashes of checkpoint steps and exports, and their checks (docs/DESIGN.md, contract 4).

Orbax and TensorStore keep no content checksum on a local disk and a safetensors file
has none, so bytes that rot after a save would be read back silently. Every checkpoint
step therefore carries the SHA-256 of every array it holds, and every export the SHA-256
of every tensor; whatever reads them checks them first.

Checkpoints. Each process hashes the parts of each array it writes itself (Orbax's
replica slices: a whole shard, or a slice of a replicated shard), from the host copy
the asynchronous save already makes, in background threads, while the same copy is
being written. The hashes go into the step's item ``hashes``, one file per process
(``process_K-of-N.json``: every part's global index, the array's shape and dtype, the
hash). That item is written by a commit future of the same save, so Orbax finalizes the
step (renames its temporary folder, or writes its commit marker in a bucket) only once
every process has written its hashes: a complete step always has them.

Orbax offers no hook on its host copy. :func:`install_hook` wraps the one function
that makes it (``orbax.checkpoint._src.serialization.replica_slices.
transfer_arrays_to_host``, orbax-checkpoint==0.12.8 as pinned in setup.py); arrays of
a save that did not pass through it (e.g. typed PRNG keys, which Orbax converts
first) are hashed from a host copy of their own before the save returns. A test checks
that every array of a saved step has its hashes, so an Orbax upgrade that bypasses the
wrapper fails there, not silently.

Checks. Restores check what they restored, in memory: each saved part is hashed from
the restored array that holds it (the same region of another mesh's shards; in a
multi-process job a part spread over several processes' shards is gathered first). A
part that differs raises :class:`IntegrityError` naming the step, the array and the
part. A step written before hashes existed (no ``hashes`` item) restores as before,
with one log line saying it carries none. :func:`scrub_step` reads
everything a step holds and lists what does not match; ``scrub.py`` runs it over a run,
and checks exports with :func:`check_export_hashes` (``audiodiff-scrub``).

SHA-256 was measured against BLAKE2b, SHA-1, MD5 and CRC-32 (``benchmarks/
integrity_bench.py``, BENCHMARKS.md): on CPUs with SHA extensions it is the fastest
cryptographic hash of the standard library (1.8 GB/s per core on the development
machine when idle) and releases the GIL, so hashing runs beside training.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import replica_slices

from audiodiff_jax.core import paths
from audiodiff_jax.core.errors import UserError

ALGORITHM = "sha256"
ITEM = "hashes"  # the checkpoint item holding them
FORMAT = "audiodiff-jax hashes"
VERSION = 1
_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")
# How long a save's hashes may wait for Orbax's host copy before the save fails (a
# save whose arrays never reach the hook must fail loudly, never hang).
_WAIT_S = 3600.0

Bounds = tuple[tuple[int, int], ...]  # (start, stop) per axis, in the global array
KeyPath = tuple[str, ...]


class IntegrityError(UserError):
    """Content that does not match the hash written with it (or hashes that cannot be read)."""


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that hash (hashlib releases the GIL on large buffers)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="audiodiff-hash"
            )
        return _POOL


def digest(x: Any) -> str:
    """SHA-256 (hex) of an array's bytes in C order (a contiguous copy only if needed)."""
    a = np.ascontiguousarray(np.asarray(x))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def digest_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def key_path(keypath: tuple) -> KeyPath:
    """A jax key path as strings (dict keys, attribute names, sequence indices): the
    same names Orbax gives the arrays of a saved tree."""
    out = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _bounds(index: tuple, shape: tuple[int, ...]) -> Bounds:
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        out.append((start, stop))
    return tuple(out)


def _contains(outer: Bounds, inner: Bounds) -> bool:
    return all(a0 <= b0 and b1 <= a1 for (a0, a1), (b0, b1) in zip(outer, inner, strict=True))


def _relative(outer: Bounds, inner: Bounds) -> tuple[slice, ...]:
    return tuple(slice(b0 - a0, b1 - a0) for (a0, _), (b0, b1) in zip(outer, inner, strict=True))


def _slices(bounds: Bounds) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in bounds)


def describe(path: KeyPath, bounds: Bounds | None = None) -> str:
    name = ".".join(path)
    if bounds is None or not bounds:
        return name
    return name + "[" + ", ".join(f"{a}:{b}" for a, b in bounds) + "]"


# -- writing: the hashes of one save ------------------------------------------------


@dataclasses.dataclass
class _Entry:
    shape: tuple[int, ...]
    dtype: str
    parts: list[tuple[Bounds, concurrent.futures.Future]] = dataclasses.field(default_factory=list)


class Collector:
    """The hashes of one save of one pytree on this process.

    Created before the save with the tree being saved; the hook hands it Orbax's host
    copy of each array (:meth:`on_transfer`), which it hashes in the background;
    :meth:`result` waits for every hash (in the save's commit thread). With ``defer``
    (asynchronous saves) hashing starts only once the save call returned
    (:meth:`release`), so that it never competes with the part of the save the
    training loop waits for.
    """

    def __init__(self, tree: Any, defer: bool = False):
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._released = threading.Event()
        self._pending: list[tuple[concurrent.futures.Future, Any]] | None = [] if defer else None
        if not defer:
            self._released.set()
        self._error: str | None = None
        self._entries: dict[KeyPath, _Entry] = {}
        self._by_id: dict[int, list[KeyPath]] = {}
        self._leaves: dict[int, Any] = {}
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = key_path(keypath)
            arr = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
            dtype = arr.dtype
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
                # Orbax saves a typed key as its key data, a new array the hook never sees.
                self._entries[path] = _Entry(tuple(leaf.shape), "key<" + str(dtype) + ">")
                self._hash_own_copy(path, jax.random.key_data(leaf))
            elif isinstance(leaf, jax.Array):
                self._entries[path] = _Entry(tuple(leaf.shape), str(dtype))
                self._by_id.setdefault(id(leaf), []).append(path)
                self._leaves[id(leaf)] = leaf
            else:
                self._entries[path] = _Entry(tuple(arr.shape), str(dtype))
                if jax.process_index() == 0:
                    self._entries[path].parts.append(
                        (_bounds((), arr.shape), pool().submit(digest, np.array(arr)))
                    )
        if not self._by_id:
            self._done.set()

    def _hash_own_copy(self, path: KeyPath, arr: jax.Array) -> None:
        for shard in arr.addressable_shards:
            if shard.replica_id == 0:
                host = np.array(shard.data)  # a copy: the state's buffers are donated next step
                bounds = _bounds(shard.index, arr.shape)
                self._entries[path].parts.append((bounds, pool().submit(digest, host)))

    def array_ids(self) -> list[int]:
        return list(self._by_id)

    def on_transfer(self, arr: jax.Array, rslices: Any) -> None:
        """Orbax's host copy of ``arr``: the parts this process writes, on the host."""
        with self._lock:
            paths_ = self._by_id.pop(id(arr), None)
            self._leaves.pop(id(arr), None)
            if paths_ is None:
                return
            parts = []
            for rslice in rslices.replica_slices:
                data = rslice.data()
                if self._pending is None:
                    job = pool().submit(digest, data)
                else:
                    job = concurrent.futures.Future()
                    self._pending.append((job, data))
                parts.append((_bounds(rslice.index, tuple(arr.shape)), job))
            for path in paths_:
                self._entries[path].parts.extend(parts)
            if not self._by_id:
                self._done.set()

    def release(self) -> None:
        """Starts hashing what the hook handed over (a deferred collector)."""
        with self._lock:
            pending, self._pending = self._pending or [], None
        for job, data in pending:
            pool().submit(_fill, job, data)
        self._released.set()

    def abandon(self, why: str) -> None:
        with self._lock:
            self._error = why
            self._by_id.clear()
            self._leaves.clear()
            self._done.set()
        self.release()

    def result(self) -> dict:
        """The JSON of this process's hashes file, once every part is hashed."""
        if not (self._done.wait(_WAIT_S) and self._released.wait(_WAIT_S)):
            missing = [describe(p) for ps in self._by_id.values() for p in ps]
            raise RuntimeError(
                f"checkpoint hashes: Orbax's host copy of {len(missing)} array(s) never reached the hook "
                f"(e.g. {missing[0]}); see audiodiff_jax/checkpoints/integrity.py"
            )
        if self._error:
            raise RuntimeError(f"checkpoint hashes not written: {self._error}")
        arrays = []
        for path, entry in self._entries.items():
            parts = [{"index": [list(b) for b in bounds], "hash": f.result()} for bounds, f in entry.parts]
            arrays.append(
                {"path": list(path), "shape": list(entry.shape), "dtype": entry.dtype, "parts": parts}
            )
        return {
            "format": FORMAT,
            "version": VERSION,
            "algorithm": ALGORITHM,
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "arrays": arrays,
        }


_ACTIVE: dict[int, Collector] = {}  # id(array) -> the collector of the save in progress
_ACTIVE_LOCK = threading.Lock()
_ORIGINAL_TRANSFER: Callable | None = None


def _transfer_and_hash(arrays, *args, **kwargs):
    host = _ORIGINAL_TRANSFER(arrays, *args, **kwargs)
    with _ACTIVE_LOCK:
        wanted = [(_ACTIVE.pop(id(a), None), a, h) for a, h in zip(arrays, host, strict=True)]
    for collector, arr, rslices in wanted:
        if collector is not None:
            collector.on_transfer(arr, rslices)
    return host


def install_hook() -> None:
    """Wraps Orbax's device-to-host copy so that saves started with :func:`begin` hash it."""
    global _ORIGINAL_TRANSFER
    if _ORIGINAL_TRANSFER is None:
        _ORIGINAL_TRANSFER = replica_slices.transfer_arrays_to_host
        replica_slices.transfer_arrays_to_host = _transfer_and_hash


def _fill(job: concurrent.futures.Future, data: Any) -> None:
    try:
        job.set_result(digest(data))
    except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the hash
        job.set_exception(e)


def begin(tree: Any, *, defer: bool = False) -> Collector:
    """A collector for the save of ``tree`` that is about to start; :func:`end` it after.
    ``defer``: hash only once :func:`end` is called (asynchronous saves; a synchronous
    save waits for its hashes inside the call, so it must not defer)."""
    install_hook()
    collector = Collector(tree, defer=defer)
    with _ACTIVE_LOCK:
        for i in collector.array_ids():
            _ACTIVE[i] = collector
    return collector


def end(collector: Collector, *, started: bool, error: BaseException | None = None) -> None:
    """After ``manager.save`` returned (or raised): arrays Orbax did not copy through
    the hook are hashed from a copy of their own; a save that did not start drops out."""
    with _ACTIVE_LOCK:
        for i in collector.array_ids():
            if _ACTIVE.get(i) is collector:
                del _ACTIVE[i]
    if error is not None or not started:
        collector.abandon(f"the save failed ({error})" if error is not None else "the save was skipped")
        return
    with collector._lock:
        left = [(collector._leaves[i], ps) for i, ps in collector._by_id.items()]
    for arr, ps in left:
        logging.warning("checkpoint hashes: %s did not pass the hook; hashing a copy", describe(ps[0]))
        for p in ps:
            collector._hash_own_copy(p, arr)
        with collector._lock:
            collector._by_id.pop(id(arr), None)
            collector._leaves.pop(id(arr), None)
    with collector._lock:
        if not collector._by_id:
            collector._done.set()
    collector.release()


@dataclasses.dataclass
class HashesSave(ocp.args.CheckpointArgs):
    """Save args of the ``hashes`` item: the collector of the ``state`` item's save."""

    collector: Collector


class HashesHandler(ocp.AsyncCheckpointHandler):
    """Writes this process's hashes file into the item folder, in a commit future, so
    the step is finalized only once every process has written its file."""

    async def _write(self, directory: epath.Path, collector: Collector) -> None:
        data = await asyncio.to_thread(collector.result)
        name = f"process_{data['process_index']}-of-{data['process_count']}.json"
        (epath.Path(directory) / name).write_text(json.dumps(data, separators=(",", ":")))

    async def async_save(self, directory: epath.Path, args: HashesSave):
        return [
            ocp.future.CommitFutureAwaitingContractedSignals(
                self._write(directory, args.collector), name="audiodiff_hashes"
            )
        ]

    def save(self, directory: epath.Path, args: HashesSave) -> None:
        asyncio.run(self._write(directory, args.collector))

    def restore(self, directory: epath.Path, args: Any = None) -> Hashes:
        return _read_folder(epath.Path(directory), where=str(directory))

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@dataclasses.dataclass
class HashesRestore(ocp.args.CheckpointArgs):
    """Restore args of the ``hashes`` item (Orbax wants one; :func:`read` is the reader)."""


ocp.args.register_with_handler(HashesHandler, for_save=True)(HashesSave)
ocp.args.register_with_handler(HashesHandler, for_restore=True)(HashesRestore)


# -- reading and checking -----------------------------------------------------------


@dataclasses.dataclass
class Hashes:
    """Every process's hashes of one step: path -> (shape, dtype, [(bounds, hash)])."""

    where: str
    arrays: dict[KeyPath, tuple[tuple[int, ...], str, list[tuple[Bounds, str]]]]


def _read_folder(folder: epath.Path, where: str) -> Hashes:
    files, counts = {}, set()
    for f in folder.iterdir():
        m = _FILE.search(f.name)
        if m:
            files[int(m.group(1))] = f
            counts.add(int(m.group(2)))
    if len(counts) != 1 or sorted(files) != list(range(next(iter(counts)))):
        raise IntegrityError(
            f"{where}: its hashes are incomplete (files of processes {sorted(files)}, "
            f"written by {sorted(counts) or '?'} process(es)): damaged step"
        )
    arrays: dict = {}
    for k in sorted(files):
        try:
            data = json.loads(files[k].read_text())
            if data.get("format") != FORMAT or data.get("algorithm") != ALGORITHM:
                raise ValueError(f"format {data.get('format')!r}, algorithm {data.get('algorithm')!r}")
            for a in data["arrays"]:
                path = tuple(a["path"])
                shape, dtype, parts = arrays.setdefault(path, (tuple(a["shape"]), a["dtype"], []))
                for p in a["parts"]:
                    parts.append((tuple((int(x), int(y)) for x, y in p["index"]), str(p["hash"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{where}: hashes file {files[k]} cannot be read ({e}): damaged step") from e
    for path, (shape, dtype, parts) in arrays.items():  # a part two processes wrote, once
        arrays[path] = (shape, dtype, sorted(set(parts)))
    return Hashes(where=where, arrays=arrays)


def read(step_dir: epath.Path, where: str | None = None) -> Hashes | None:
    """The hashes of a checkpoint step; None for a step written before hashes existed.

    Raises:
      IntegrityError: the ``hashes`` item is there but incomplete or unreadable.
    """
    folder = epath.Path(step_dir) / ITEM
    if not folder.is_dir():
        return None
    return _read_folder(folder, where or str(step_dir))


def _mismatch(hashes: Hashes, bad: list[tuple[KeyPath, Bounds]]) -> IntegrityError:
    path, bounds = bad[0]
    more = f" (and {len(bad) - 1} more part(s))" if len(bad) > 1 else ""
    return IntegrityError(
        f"{hashes.where}: array {describe(path, bounds)} does not match the {ALGORITHM} written with "
        f"it{more}: the data changed on disk since it was saved"
    )


def verify(tree: Any, hashes: Hashes) -> int:
    """Checks restored arrays against the hashes of the step they came from.

    Args:
      tree: what was restored (any subtree of the saved item, e.g. the state, or
        ``{"params": ...}``): jax Arrays on any mesh, or host arrays.
      hashes: :func:`read` of that step.

    Returns:
      The number of parts checked.

    Raises:
      IntegrityError: a part that differs, naming it (the first; how many more).
    """
    jobs: list[tuple[KeyPath, Bounds, str, Callable[[], Any]]] = []
    gathers: list[tuple[KeyPath, jax.Array, list[tuple[Bounds, str]]]] = []
    unverified = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = key_path(keypath)
        saved = hashes.arrays.get(path)
        shape = tuple(np.shape(leaf))
        dtype = str(leaf.dtype) if hasattr(leaf, "dtype") else str(np.asarray(leaf).dtype)
        if saved is None or saved[0] != shape or saved[1] != dtype:
            unverified.append(describe(path))
            continue
        parts = saved[2]
        if not isinstance(leaf, jax.Array):
            host = np.asarray(leaf)
            for bounds, h in parts:
                jobs.append((path, bounds, h, lambda host=host, b=bounds: host[_slices(b)]))
            continue
        shards = {}
        for shard in leaf.addressable_shards:
            shards.setdefault(_bounds(shard.index, shape), shard)
        everywhere = None
        far = []
        for bounds, h in parts:
            local = next((b for b in shards if _contains(b, bounds)), None)
            if local is not None:
                shard = shards[local]
                rel = _relative(local, bounds)
                jobs.append((path, bounds, h, lambda s=shard, r=rel: np.asarray(s.data)[r]))
                continue
            if leaf.is_fully_addressable:
                jobs.append((path, bounds, h, lambda a=leaf, b=bounds: np.asarray(a)[_slices(b)]))
                continue
            if everywhere is None:
                everywhere = [_bounds(i, shape) for i in leaf.sharding.devices_indices_map(shape).values()]
            if not any(_contains(b, bounds) for b in everywhere):
                far.append((bounds, h))  # spread over several processes' shards
            # else: the process whose shard holds it checks it
        if far:
            gathers.append((path, leaf, far))
    bad = []
    if jobs:
        results = pool().map(lambda j: digest(j[3]()) == j[2], jobs)
        bad += [(j[0], j[1]) for j, ok in zip(jobs, results, strict=True) if not ok]
    # The same arrays in the same order on every process: the decision depends only on
    # the global sharding and the hashes, which every process reads alike.
    for path, leaf, far in gathers:
        whole = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for bounds, h in far:
            if digest(whole[_slices(bounds)]) != h:
                bad.append((path, bounds))
    if unverified:
        logging.warning(
            "%s: %d restored array(s) have no hash of their shape and dtype and were not checked (e.g. %s)",
            hashes.where,
            len(unverified),
            unverified[0],
        )
    if bad:
        raise _mismatch(hashes, bad)
    return len(jobs) + sum(len(f) for _, _, f in gathers)


def verify_step(step_dir: epath.Path, tree: Any, where: str) -> None:
    """:func:`verify` of what was restored from ``step_dir``; a step without hashes is
    logged in one line and passes."""
    hashes = read(step_dir, where)
    if hashes is None:
        logging.warning(
            "%s carries no content hashes (written before they existed): restored without checking them",
            where,
        )
        return
    n = verify(tree, hashes)
    logging.info("%s: %d part(s) match their %s", where, n, ALGORITHM)


# -- scrubbing: reading everything back ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finding:
    """One damaged (or unchecked) thing found by a scrub."""

    where: str
    what: str
    damaged: bool = True

    def line(self) -> str:
        return f"{'DAMAGED' if self.damaged else 'unchecked'} {self.where}: {self.what}"


def _chunks(tree: dict, budget: int) -> Iterator[set[KeyPath]]:
    """Sets of array paths of a metadata tree of about ``budget`` bytes each."""
    chunk, size = set(), 0
    for keypath, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
        n = int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize if hasattr(meta, "shape") else 0
        if chunk and size + n > budget:
            yield chunk
            chunk, size = set(), 0
        chunk.add(key_path(keypath))
        size += n
    if chunk:
        yield chunk


def scrub_step(step_dir: epath.Path, budget_bytes: int = 1 << 30) -> list[Finding]:
    """Reads every array of a checkpoint step's ``state`` (on the host, about
    ``budget_bytes`` at a time) and checks it against the step's hashes.

    Returns:
      What is damaged (an array part that differs, an array or file that cannot be
      read, hashes that are incomplete), or one unchecked finding for a step written
      before hashes existed.
    """
    step_dir = epath.Path(step_dir)
    where = str(step_dir)
    try:
        hashes = read(step_dir, where)
    except IntegrityError as e:
        return [Finding(where, str(e).removeprefix(where + ": "))]
    if hashes is None:
        return [Finding(where, "no hashes (written before they existed): not checked", damaged=False)]
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(step_dir / "state")
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
        return [Finding(where, f"state metadata cannot be read ({type(e).__name__}: {_first_line(e)})")]
    findings = []
    saved_paths = {key_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for path in sorted(set(hashes.arrays) - saved_paths):
        findings.append(Finding(where, f"array {describe(path)} has hashes but is not in the state"))
    for chunk in _chunks(tree, budget_bytes):
        wanted = lambda kp, chunk=chunk: key_path(kp) in chunk  # noqa: E731
        item = jax.tree_util.tree_map_with_path(
            lambda kp, m, w=wanted: jax.ShapeDtypeStruct(m.shape, m.dtype) if w(kp) else ocp.PLACEHOLDER, tree
        )
        rargs = jax.tree_util.tree_map_with_path(
            lambda kp, m, w=wanted: ocp.RestoreArgs(restore_type=np.ndarray) if w(kp) else ocp.PLACEHOLDER,
            tree,
        )
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                restored = ckptr.restore(
                    step_dir / "state", args=ocp.args.PyTreeRestore(item=item, restore_args=rargs)
                )
        except Exception as e:  # noqa: BLE001 - a truncated or missing data file
            names = sorted(describe(p) for p in chunk)
            findings.append(
                Finding(
                    where,
                    f"{len(names)} array(s) from {names[0]} cannot be read "
                    f"({type(e).__name__}: {_first_line(e)})",
                )
            )
            continue
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
            path = key_path(keypath)
            if path not in chunk or leaf is ocp.PLACEHOLDER:
                continue
            saved = hashes.arrays.get(path)
            if saved is None:
                findings.append(Finding(where, f"array {describe(path)} has no hash", damaged=False))
                continue
            host = np.asarray(leaf)
            if saved[0] != host.shape:
                findings.append(
                    Finding(where, f"array {describe(path)} has shape {host.shape}, not {saved[0]}")
                )
                continue
            for bounds, h in saved[2]:
                if digest(host[_slices(bounds)]) != h:
                    findings.append(
                        Finding(where, f"array {describe(path, bounds)} does not match its {ALGORITHM}")
                    )
    return findings


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- exports: one hash per tensor of a safetensors file -----------------------------


def safetensors_layout(header_and_data: bytes | memoryview | mmap.mmap) -> tuple[int, dict[str, dict]]:
    """(offset of the data, the header's tensors: name -> {dtype, shape, data_offsets})
    of a safetensors file's bytes (an 8-byte little-endian header length, a JSON header)."""
    (n,) = struct.unpack("<Q", header_and_data[:8])
    header = json.loads(bytes(header_and_data[8 : 8 + n]))
    header.pop("__metadata__", None)
    return 8 + n, header


def tensor_hashes(file: str) -> dict[str, str]:
    """SHA-256 of each tensor's bytes in a safetensors file (local: memory-mapped;
    a bucket: read whole)."""
    if paths.is_remote(file):
        data = memoryview(epath.Path(file).read_bytes())
        return _tensor_hashes(data)
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            return _tensor_hashes(view)
        finally:
            view.release()


def _tensor_hashes(data: memoryview) -> dict[str, str]:
    start, header = safetensors_layout(data)
    names = sorted(header)
    regions = [header[k]["data_offsets"] for k in names]
    for (a, b), k in zip(regions, names, strict=True):
        if not 0 <= a <= b or start + b > len(data):
            raise ValueError(f"tensor {k} lies past the end of the file (truncated?)")
    results = pool().map(lambda r: digest_bytes(data[start + r[0] : start + r[1]]), regions)
    return dict(zip(names, results, strict=True))


def check_export_hashes(file: str, want: dict[str, str], where: str) -> list[str]:
    """Tensors of ``file`` whose hash differs from ``want`` (name -> hash), described.

    Raises:
      IntegrityError: the file cannot be read as a safetensors file.
    """
    try:
        have = tensor_hashes(file)
    except (OSError, ValueError, struct.error) as e:
        raise IntegrityError(f"{where}: {file} cannot be read ({e})") from e
    problems = []
    for name in sorted(want):
        if name not in have:
            problems.append(f"tensor {name} is missing from {os.path.basename(file)}")
        elif have[name] != want[name]:
            problems.append(f"tensor {name} does not match its {ALGORITHM}")
    return problems
