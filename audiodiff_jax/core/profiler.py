"""Traces of what the host and the devices do (``jax.profiler``), placed where
TensorBoard's profile plugin finds them.

The plugin (``tensorboard-plugin-profile``, or ``xprof``) reads
``LOGDIR/plugins/profile/RUN/HOST.xplane.pb``: one folder per trace (a run in the
plugin's menu) with one file per host. ``jax.profiler.stop_trace`` names the run after
the time and the file after the machine, so the hosts of one job would name their parts
of the same steps differently, and several processes on one machine would write the same
file. :class:`Trace` traces into a local scratch folder and then moves the files to
``LOGDIR/plugins/profile/RUN/``, with a run name the caller gives (the same on every
host) and ``-processK`` after the host name when the job has several processes (a
``jax.distributed`` job's, or the shares of a sweep, which joins none). The log folder
may be local or ``gs://``.

A trace must never stop the work it watches: a trace that cannot start (another one is
running in this process) or cannot be written is logged and skipped.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import jax
from absl import logging
from etils import epath

PLUGIN_DIR = "plugins/profile"
XPLANE_SUFFIX = ".xplane.pb"
# Files jax.profiler writes per host (the trace viewer's JSON comes with the xplane).
_HOST_SUFFIXES = (XPLANE_SUFFIX, ".trace.json.gz", ".memory_profile.json.gz")


def run_dir(logdir: str, run: str) -> epath.Path:
    """``LOGDIR/plugins/profile/RUN``: the folder of one trace."""
    return epath.Path(logdir) / PLUGIN_DIR / run


def xplane_files(logdir: str) -> list[epath.Path]:
    """Every trace file under ``logdir``, in run order."""
    root = epath.Path(logdir) / PLUGIN_DIR
    if not root.exists():
        return []
    return sorted(f for run in root.iterdir() for f in run.iterdir() if f.name.endswith(XPLANE_SUFFIX))


def load(path: str | epath.Path) -> jax.profiler.ProfileData:
    """A trace file parsed (the XSpace protobuf the profile plugin reads); local or gs://."""
    return jax.profiler.ProfileData.from_serialized_xspace(epath.Path(path).read_bytes())


def _host_file(name: str, index: int, count: int) -> str:
    """jax's ``HOST.SUFFIX`` with the process index after the host, in a multi-process job."""
    if count == 1:
        return name
    for suffix in _HOST_SUFFIXES:
        if name.endswith(suffix):
            return f"{name[: -len(suffix)]}-process{index}{suffix}"
    return name


class Trace:
    """One trace of this process into ``LOGDIR/plugins/profile/RUN/``.

    ``start()`` and ``stop()`` return the seconds they took (the tracer's start, and
    stopping plus writing the files), for the caller's time accounts.

    Args:
      logdir: the TensorBoard log folder (local or gs://).
      run: the trace's folder name, the same on every process of the job.
      process: (index, count) of this process in its job; default jax's.
    """

    def __init__(self, logdir: str, run: str, *, process: tuple[int, int] | None = None):
        self.logdir, self.run = logdir, run
        self.process = process or (jax.process_index(), jax.process_count())
        self.path: epath.Path | None = None  # the xplane file, once written
        self._scratch: str | None = None

    @property
    def active(self) -> bool:
        return self._scratch is not None

    def start(self) -> float:
        t0 = time.perf_counter()
        scratch = tempfile.mkdtemp(prefix="audiodiff-trace-")
        try:
            jax.profiler.start_trace(scratch)
        except RuntimeError as e:  # "Only one profile may be run at a time"
            logging.warning("profile %s: not traced (%s)", self.run, e)
            shutil.rmtree(scratch, ignore_errors=True)
            return time.perf_counter() - t0
        self._scratch = scratch
        return time.perf_counter() - t0

    def stop(self) -> float:
        if self._scratch is None:
            return 0.0
        t0 = time.perf_counter()
        scratch, self._scratch = self._scratch, None
        try:
            jax.profiler.stop_trace()
            dest = run_dir(self.logdir, self.run)
            dest.mkdir(parents=True, exist_ok=True)
            for folder in (epath.Path(scratch) / PLUGIN_DIR).iterdir():
                for f in folder.iterdir():
                    target = dest / _host_file(f.name, *self.process)
                    f.copy(target, overwrite=True)
                    if f.name.endswith(XPLANE_SUFFIX):
                        self.path = target
        except Exception as e:  # noqa: BLE001 - a lost trace must not end the run
            logging.warning("profile %s: could not write the trace (%s: %s)", self.run, type(e).__name__, e)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.perf_counter() - t0
        if self.path is not None:
            logging.info("profile %s: trace written to %s in %.1fs", self.run, self.path, seconds)
        return seconds

    def __enter__(self) -> Trace:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
