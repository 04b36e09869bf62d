"""The one base class of errors a user can fix (a bad config field, a missing or corrupt
file, an unreadable checkpoint).

Every program runs through ``cli.run``, which turns a :class:`UserError` into one line
on stderr naming the file, record or field, and exit status :data:`EXIT_USER_ERROR`;
the traceback goes to the log at verbosity 1 (``-v=1``). Anything else is a bug and
keeps its traceback.
"""

EXIT_USER_ERROR = 2
# Another process of a multi-process job died or was cut off (loop.PeerLost, distributed.PeerMonitor).
EXIT_PEER_LOST = 5


class UserError(Exception):
    """An error in what the user gave the program; the message names what to fix."""


class GenerationError(UserError, ValueError):
    """Bad input to sampling: the weights source (a checkpoint or export path, step,
    weight set), the codec, a prompt, a duration...; the message says which."""
