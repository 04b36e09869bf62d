r"""What every launcher passes to ``audiodiff-train``: the command, its flags, its environment.

The launchers (``tpu_vm.py``, ``gke.py``, ``slurm.py``) differ in how they reach the
hosts; the program they start is the same on every host of every cluster, built here:

    audiodiff-train --config=CONFIG --workdir=WORKDIR --distributed=on \
        --heartbeat_timeout_s=100 --step_timeout_s=1800 [--config.KEY=VALUE ...]

The workdir may be a ``gs://`` path: Orbax writes arrays through TensorStore and the
rest through ``etils.epath``, which reads and writes GCS when ``gcsfs`` is installed
(the host setup installs it).

Other jobs go through the same launchers: after ``--``, another program of the package
and its flags, run as given on every host (``--config``/``--workdir`` are then not used)::

    python -m launch.slurm --nodes=2 -- audiodiff-sample --checkpoint=gs://B/runs/x \
        --out=gs://B/sweeps/x --prompts_file=gs://B/prompts.jsonl
    python -m launch.tpu_vm --action=train ... -- audiodiff-precompute \
        --corpus=/mnt/corpus --out_dir=gs://B/latents/corpus

Those programs split their work by the process index and count the scheduler gives
each host (``audiodiff_jax.core.distributed.work_share``), with no collective between hosts.
"""

from __future__ import annotations

import os
import shlex
import types
from collections.abc import Sequence

from absl import app, flags

from audiodiff_jax.core.errors import UserError
from audiodiff_jax.programs import cli

FLAGS = None  # the shared flags' holders, once define_flags() ran


def define_flags() -> None:
    """Defines the flags every launcher takes. Called by a launcher's ``__main__`` only,
    so that importing several launchers (tests) defines no flag twice."""
    global FLAGS
    FLAGS = types.SimpleNamespace(
        config=flags.DEFINE_string("config", None, "Config file (as on the hosts), e.g. configs/dit.py:1B."),
        workdir=flags.DEFINE_string("workdir", None, "Run directory, e.g. gs://BUCKET/runs/dit1b."),
        overrides=flags.DEFINE_multi_string(
            "override", [], "Config override KEY=VALUE, passed as --config.KEY=VALUE (repeatable)."
        ),
        heartbeat=flags.DEFINE_integer(
            "heartbeat_timeout_s", 100, "A host silent this long is declared dead; the others exit."
        ),
        step_timeout=flags.DEFINE_integer(
            "step_timeout_s", 1800, "Exit when no step finishes this long (hung peer)."
        ),
        dry_run=flags.DEFINE_bool("dry_run", False, "Print what would run (commands or manifest) and stop."),
    )


# Environment every host gets. Unbuffered output, or the last lines before a crash
# (the coordination service's error naming a dead host) can be lost.
BASE_ENV = {"PYTHONUNBUFFERED": "1"}


def train_args(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    *,
    heartbeat_timeout_s: int = 100,
    step_timeout_s: int = 1800,
    distributed: str = "on",
) -> list[str]:
    """``audiodiff-train`` and its flags, as a list of arguments."""
    if not config or not workdir:
        raise ValueError("--config and --workdir are required")
    args = [
        "audiodiff-train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--distributed={distributed}",
        f"--heartbeat_timeout_s={heartbeat_timeout_s}",
        f"--step_timeout_s={step_timeout_s}",
    ]
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or not key:
            raise ValueError(f"--override={o!r} must be KEY=VALUE, e.g. train.num_steps=1000")
        key = key.removeprefix("config.")
        args.append(f"--config.{key}={value}")
    return args


class LaunchError(UserError, ValueError):
    """A launch that cannot work as asked; the message says what to change."""


def portable_config(config: str, *, shared_filesystem: bool) -> str:
    """The ``--config`` value that means the same file on every host.

    A config of the installed package (a path into it, ``configs/dit.py:1B`` or
    ``dit:1B``) becomes its name (``dit:1B``), which every host resolves from its own
    installed copy. Any other local file is made absolute when the hosts share this
    machine's file system (SLURM clusters), and refused otherwise (TPU VMs, GKE), since
    it would not exist there.
    """
    path, sep, arg = config.partition(":")
    resolved = cli.resolve_config(config).partition(":")[0]
    package = cli.configs_dir()
    if package and os.path.isfile(resolved) and os.path.dirname(os.path.abspath(resolved)) == package:
        return os.path.splitext(os.path.basename(resolved))[0] + sep + arg
    if os.path.isfile(path):
        if shared_filesystem:
            return os.path.abspath(path) + sep + arg
        raise LaunchError(
            f"--config={config}: this file exists only on this machine, not on the hosts; "
            "add it to configs/ (installed with the package) or give a name of an installed config"
        )
    return config


# Programs a launcher may run instead of training (``-- PROGRAM FLAGS...``).
JOB_PROGRAMS = ("audiodiff-train", "audiodiff-codec-train", "audiodiff-sample", "audiodiff-precompute")
_JOB_COMMAND: list[str] = []  # set by take_command()


def take_command(argv: Sequence[str]) -> None:
    """A launcher's positional arguments: none (the job is ``audiodiff-train`` from the
    flags), or ``[--] PROGRAM FLAGS...``, a program of :data:`JOB_PROGRAMS` run as
    given on every host."""
    rest = list(argv[1:])
    if rest and rest[0] == "--":
        rest = rest[1:]
    if rest and rest[0] not in JOB_PROGRAMS:
        raise app.UsageError(
            f"unexpected arguments {rest}; config overrides go in --override=KEY=VALUE, and a job "
            f"other than training is given after -- as one of {', '.join(JOB_PROGRAMS)} and its flags"
        )
    _JOB_COMMAND[:] = rest


def train_args_from_flags(distributed: str = "on", *, shared_filesystem: bool = False) -> list[str]:
    """The command every host runs: the one after ``--`` if given, else ``audiodiff-train``."""
    if _JOB_COMMAND:
        return list(_JOB_COMMAND)
    return train_args(
        portable_config(FLAGS.config.value, shared_filesystem=shared_filesystem),
        FLAGS.workdir.value,
        FLAGS.overrides.value,
        heartbeat_timeout_s=FLAGS.heartbeat.value,
        step_timeout_s=FLAGS.step_timeout.value,
        distributed=distributed,
    )


def dry_run() -> bool:
    return FLAGS.dry_run.value


def print_or_write(text: str, out: str, next_step: str) -> bool:
    """``--dry_run``: prints ``text``; ``--out=PATH``: writes it there and prints
    ``next_step`` (a command, PATH filled in). Returns whether one of them applied,
    i.e. whether the launcher should stop without submitting."""
    if dry_run():
        print(text)
        return True
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}; {next_step.format(path=out)}")
        return True
    return False


def env_prefix(env: dict[str, str]) -> str:
    """``K=V K2=V2`` for a shell command line (values quoted)."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
