r"""TPU VM pods: create the slice(s), set up every host, start training on all of them.

    python -m launch.tpu_vm --action=all --name=dit1b --project=P --zone=us-east5-a \
        --accelerator_type=v5p-128 --config=configs/dit.py:1B \
        --workdir=gs://BUCKET/runs/dit1b --override=data.shards_dir=gs://BUCKET/latents \
        --package='git+https://github.com/ORG/audiodiff-jax@COMMIT' --dry_run

``--dry_run`` prints the exact shell commands and runs nothing; without it they run
one after another (``gcloud`` must be installed and logged in). Actions:

- ``create``: a queued resource (``gcloud compute tpus queued-resources create``),
  which waits for capacity and can hold several slices (``--num_slices``: nodes
  ``NAME-0``, ``NAME-1``, ...), or with ``--no-queued`` a plain ``tpu-vm create``;
- ``setup``: on every host (``tpu-vm ssh --worker=all``) make a Python 3.11 venv with
  ``uv`` (stock images ship an older Python) and install the package with the TPU
  extra into it (``setup_script``);
- ``train``: on every host, the same ``audiodiff-train`` command in the background
  (``nohup``; output in ``~/audiodiff-train.log``, pid in ``~/audiodiff-train.pid``)
  so a dropped ssh session does not stop it. Several slices talk over DCN through
  the ``MEGASCALE_*`` variables, set here with the coordinator at worker 0 of slice 0;
- ``logs`` (tail every host's log), ``stop`` (SIGTERM: a checkpoint is saved at the
  current step), ``delete``; ``all`` = create, setup, train.

Run ``train`` again after a failure or a preemption and the job resumes from the
last complete checkpoint in the workdir.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app, flags, logging

from audiodiff_jax.programs import cli
from launch import common

# Flag holders, set by define_flags().
_ACTION = None
_NAME = None
_PROJECT = None
_ZONE = None
_ACCELERATOR = None
_RUNTIME = None
_NUM_SLICES = None
_QUEUED = None
_SPOT = None
_PACKAGE = None
_LIBTPU_ARGS = None


# TPU VM images per generation (Google Cloud's documented runtime versions).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
MEGASCALE_PORT = 8080
LOG_FILE = "~/audiodiff-train.log"
VENV = "~/audiodiff-venv"  # made by setup_script with a Python 3.11 from uv
UV_REQUIREMENT = "uv==0.13.8"
PID_FILE = "~/audiodiff-train.pid"


def define_flags() -> None:
    """Defines this launcher's flags (its ``__main__`` only; see ``common.define_flags``)."""
    global \
        _ACTION, \
        _NAME, \
        _PROJECT, \
        _ZONE, \
        _ACCELERATOR, \
        _RUNTIME, \
        _NUM_SLICES, \
        _QUEUED, \
        _SPOT, \
        _PACKAGE, \
        _LIBTPU_ARGS
    _ACTION = flags.DEFINE_enum(
        "action", "all", ["all", "create", "setup", "train", "logs", "stop", "delete"], "What to do."
    )
    _NAME = flags.DEFINE_string("name", None, "TPU (or queued resource) name; slices are NAME-0, NAME-1, ...")
    _PROJECT = flags.DEFINE_string("project", None, "Google Cloud project.")
    _ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-east5-a.")
    _ACCELERATOR = flags.DEFINE_string(
        "accelerator_type", "v5p-128", "Slice type, e.g. v5p-128, v5litepod-256."
    )
    _RUNTIME = flags.DEFINE_string(
        "runtime_version", "", "TPU VM image ('' = the default for the generation)."
    )
    _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (queued resources only).")
    _QUEUED = flags.DEFINE_bool("queued", True, "Create through queued resources (waits for capacity).")
    _SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; the job resumes from checkpoints).")
    _PACKAGE = flags.DEFINE_string(
        "package", "audiodiff-jax", "What pip installs on the hosts: a requirement, git URL or gs:// wheel."
    )
    _LIBTPU_ARGS = flags.DEFINE_string(
        "libtpu_init_args", "", "LIBTPU_INIT_ARGS for the hosts (XLA TPU flags)."
    )
    common.define_flags()


def runtime_for(accelerator_type: str) -> str:
    gen = accelerator_type.split("-")[0]
    if gen not in RUNTIME_VERSIONS:
        raise ValueError(f"accelerator_type={accelerator_type!r}: unknown generation {gen!r}")
    return RUNTIME_VERSIONS[gen]


def node_names(name: str, num_slices: int) -> list[str]:
    return [name] if num_slices == 1 else [f"{name}-{i}" for i in range(num_slices)]


def _where(project: str, zone: str) -> list[str]:
    return [f"--project={project}", f"--zone={zone}"]


def create_commands(
    name: str,
    *,
    project: str,
    zone: str,
    accelerator_type: str,
    runtime_version: str,
    num_slices: int,
    queued: bool,
    spot: bool,
) -> list[list[str]]:
    if num_slices > 1 and not queued:
        raise ValueError("several slices (--num_slices > 1) need queued resources (--queued)")
    if queued:
        cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", name, *_where(project, zone)]
        cmd += [f"--accelerator-type={accelerator_type}", f"--runtime-version={runtime_version}"]
        cmd += (
            [f"--node-id={name}"]
            if num_slices == 1
            else [f"--node-count={num_slices}", f"--node-prefix={name}"]
        )
        if spot:
            cmd.append("--spot")
        wait = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "describe",
            name,
            *_where(project, zone),
            "--format=value(state.state)",
        ]
        # Poll until the slices are provisioned (state ACTIVE); creation only queues them.
        poll = f'until [ "$({shlex.join(wait)})" = ACTIVE ]; do sleep 30; done'
        return [cmd, ["bash", "-c", poll]]
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *_where(project, zone)]
    cmd += [f"--accelerator-type={accelerator_type}", f"--version={runtime_version}"]
    if spot:
        cmd.append("--spot")
    return [cmd]


def ssh_all(node: str, project: str, zone: str, command: str) -> list[str]:
    """One command on every host (worker) of one slice."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        node,
        *_where(project, zone),
        "--worker=all",
        f"--command={command}",
    ]


def setup_script(package: str, uv: str = UV_REQUIREMENT) -> str:
    """Per-host set-up that works on the stock TPU VM images, whose Python is older than
    the pinned jax needs: ``uv`` (from PyPI, into the user site) makes a Python 3.11
    venv at ``VENV`` (a uv-managed interpreter when the image has no 3.11) and installs
    ``package`` with the TPU extra into it."""
    return (
        "set -e; "
        # (images whose system Python is "externally managed" still take a --user install)
        f"PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user {shlex.quote(uv)} && "
        f"python3 -m uv venv --quiet --allow-existing --python 3.11 {VENV} && "
        f"python3 -m uv pip install --quiet --python {VENV}/bin/python "
        f"{shlex.quote(package)} 'audiodiff-jax[tpu]'"
    )


def train_env(slice_id: int, num_slices: int, coordinator: str, libtpu_args: str) -> dict[str, str]:
    env = dict(common.BASE_ENV)
    if num_slices > 1:
        # libtpu's multi-slice runtime (DCN between slices) reads these.
        env.update(
            MEGASCALE_COORDINATOR_ADDRESS=f"{coordinator}:{MEGASCALE_PORT}",
            MEGASCALE_NUM_SLICES=str(num_slices),
            MEGASCALE_SLICE_ID=str(slice_id),
            MEGASCALE_PORT=str(MEGASCALE_PORT),
        )
    if libtpu_args:
        env["LIBTPU_INIT_ARGS"] = libtpu_args
    return env


def train_script(train_args: list[str], env: dict[str, str]) -> str:
    """The host-side command: the training program of the set-up's venv in the background,
    logging to a file."""
    run = f"{common.env_prefix(env)} nohup {shlex.join(train_args)} > {LOG_FILE} 2>&1 &"
    return f"PATH={VENV}/bin:$PATH {run} echo $! > {PID_FILE}"


def coordinator_lookup(name: str, project: str, zone: str) -> str:
    """Shell expression (run by the launcher) for the internal IP of worker 0 of slice 0."""
    cmd = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        name,
        *_where(project, zone),
        "--format=value(networkEndpoints[0].ipAddress)",
    ]
    return f"$({shlex.join(cmd)})"


def train_commands(
    name: str, *, project: str, zone: str, num_slices: int, train_args: list[str], libtpu_args: str = ""
) -> list[list[str]]:
    nodes = node_names(name, num_slices)
    if num_slices == 1:
        env = train_env(0, 1, "", libtpu_args)
        return [ssh_all(nodes[0], project, zone, train_script(train_args, env))]
    # The coordinator's address is looked up when the commands run: wrap each in bash
    # so the $(...) is expanded locally, not on the hosts. The placeholder sits inside
    # the single-quoted --command argument; '"$VAR"' closes the quote around it.
    out = []
    for i, node in enumerate(nodes):
        env = train_env(i, num_slices, "COORDINATOR_IP", libtpu_args)
        remote = train_script(train_args, env)
        ssh = shlex.join(ssh_all(node, project, zone, remote))
        lookup = coordinator_lookup(nodes[0], project, zone)
        out.append(
            [
                "bash",
                "-c",
                f"COORDINATOR_IP={lookup}; " + ssh.replace("COORDINATOR_IP", "'\"$COORDINATOR_IP\"'"),
            ]
        )
    return out


def build_commands(action: str) -> list[list[str]]:
    for f in (_NAME, _PROJECT, _ZONE):
        if not f.value:
            raise app.UsageError(f"--{f.name} is required")
    name, project, zone = _NAME.value, _PROJECT.value, _ZONE.value
    nodes = node_names(name, _NUM_SLICES.value)
    runtime = _RUNTIME.value or runtime_for(_ACCELERATOR.value)
    cmds: list[list[str]] = []
    if action in ("create", "all"):
        cmds += create_commands(
            name,
            project=project,
            zone=zone,
            accelerator_type=_ACCELERATOR.value,
            runtime_version=runtime,
            num_slices=_NUM_SLICES.value,
            queued=_QUEUED.value,
            spot=_SPOT.value,
        )
    if action in ("setup", "all"):
        cmds += [ssh_all(n, project, zone, setup_script(_PACKAGE.value)) for n in nodes]
    if action in ("train", "all"):
        cmds += train_commands(
            name,
            project=project,
            zone=zone,
            num_slices=_NUM_SLICES.value,
            train_args=common.train_args_from_flags(),
            libtpu_args=_LIBTPU_ARGS.value,
        )
    if action == "logs":
        cmds += [ssh_all(n, project, zone, f"tail -n 50 {LOG_FILE}") for n in nodes]
    if action == "stop":
        # SIGTERM to the process this launcher started (its pid file): it saves and exits.
        cmds += [ssh_all(n, project, zone, f"kill -TERM $(cat {PID_FILE})") for n in nodes]
    if action == "delete":
        if _QUEUED.value:
            cmds.append(
                ["gcloud", "compute", "tpus", "queued-resources", "delete", name, *_where(project, zone)]
                + ["--force", "--quiet"]
            )
        else:
            cmds.append(
                ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *_where(project, zone), "--quiet"]
            )
    return cmds


def main(argv):
    common.take_command(argv)
    cmds = build_commands(_ACTION.value)
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if not common.dry_run():
            rc = subprocess.call(cmd)
            if rc:
                logging.error("command failed with status %d: %s", rc, shlex.join(cmd))
                sys.exit(rc)


if __name__ == "__main__":
    define_flags()
    cli.run(main, module=(__name__, "launch.common"))
