"""Keeps the run log readable: library chatter below WARNING is dropped.

Orbax and Grain log several INFO lines per checkpoint save; our own progress lines
(step, rate, ETA) would drown in them. Warnings and errors from libraries still show.
"""

from __future__ import annotations

import logging as py_logging

from absl import logging

_NOISY = ("/orbax/", "/grain/", "/jax/_src/")


class _LibraryFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.WARNING:
            return True
        return not any(part in record.pathname for part in _NOISY)


def quiet_library_logs() -> None:
    """Drops INFO logs of orbax, grain and jax internals from the absl handler."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
        handler.addFilter(_LibraryFilter())
