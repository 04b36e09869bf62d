r"""A planted fault for training: ``audiodiff-train`` that kills itself once, mid-run.

    python -m tests.fault_train --kill_at_step=6 --marker=/tmp/killed -- \
        audiodiff-train --config=configs/tiny.py --workdir=/tmp/run ...

Runs the real training program in this process (its console script's ``run``) with a
watcher thread that reads ``WORKDIR/metrics.jsonl`` and, once the run has logged
``--kill_at_step`` and ``--marker`` does not exist yet, creates the marker and sends this
process SIGKILL: a crash with no chance to save or clean up, as when a host dies. The
marker makes the fault fire once, so the same command run again (by a launcher's
restart) trains to the end. The program's own code is not changed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from audiodiff_jax.programs import train_main
from tests.helpers import last_logged_step


def _watch(workdir: str, at_step: int, marker: str) -> None:
    while True:
        if last_logged_step(workdir) >= at_step and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"killed at step {last_logged_step(workdir)}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)


def main(argv: list[str]) -> None:
    split = argv.index("--")
    own, command = argv[1:split], argv[split + 1 :]
    opts = dict(a.removeprefix("--").split("=", 1) for a in own)
    workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
    if not os.path.exists(opts["marker"]):
        threading.Thread(
            target=_watch, args=(workdir, int(opts["kill_at_step"]), opts["marker"]), daemon=True
        ).start()
    sys.argv = [command[0], *command[1:]]
    train_main.run()  # the program itself, as its console script runs it


if __name__ == "__main__":
    main(sys.argv)
