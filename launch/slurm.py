r"""SLURM GPU clusters: an sbatch script generated from flags, submitted with sbatch.

    python -m launch.slurm --name=dit1b --nodes=4 --gpus_per_node=8 --time=48:00:00 \
        --config=configs/dit.py:1B --workdir=gs://BUCKET/runs/dit1b \
        --override=mesh.dcn_data=4 --venv=/shared/audiodiff/.venv --dry_run

``--dry_run`` prints the script; ``--out=FILE`` writes it; otherwise the log folder is
created and the script is piped to ``sbatch``. One task per GPU (``--ntasks-per-node``
= ``--gpus_per_node``), as ``jax.distributed`` expects on SLURM: it finds the
coordinator, process count and process id from SLURM's variables by itself
(``--distributed=on``) and gives each process the GPU of its ``SLURM_LOCALID``.
``srun --kill-on-bad-exit=1`` ends every task when one fails, SLURM sends SIGTERM
``--signal_s`` seconds before the time limit (the program saves a checkpoint and exits
0), and ``--requeue`` lets the scheduler restart a
preempted job, which then resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import flags

from audiodiff_jax.programs import cli
from launch import common

# Flag holders, set by define_flags().
_NAME = None
_NODES = None
_GPUS = None
_CPUS = None
_TIME = None
_PARTITION = None
_ACCOUNT = None
_SIGNAL_S = None
_VENV = None
_LOG_DIR = None
_OUT = None


# NCCL and XLA settings for multi-node GPU training.
GPU_ENV = {
    # Leave room for NCCL's and cuDNN's own buffers beside XLA's pool.
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    # Overlap collectives with compute (latency-hiding scheduler).
    "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "NCCL_DEBUG": "WARN",
}


def define_flags() -> None:
    """Defines this launcher's flags (its ``__main__`` only; see ``common.define_flags``)."""
    global _NAME, _NODES, _GPUS, _CPUS, _TIME, _PARTITION, _ACCOUNT, _SIGNAL_S, _VENV, _LOG_DIR, _OUT
    _NAME = flags.DEFINE_string("name", "audiodiff-train", "Job name.")
    _NODES = flags.DEFINE_integer("nodes", 1, "Nodes.")
    _GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (one task, i.e. one process, each).")
    _CPUS = flags.DEFINE_integer("cpus_per_task", 8, "CPU cores per task (per GPU) for its data loader.")
    _TIME = flags.DEFINE_string("time", "24:00:00", "Time limit.")
    _PARTITION = flags.DEFINE_string("partition", "", "Partition ('' = the cluster default).")
    _ACCOUNT = flags.DEFINE_string("account", "", "Account ('' = none).")
    _SIGNAL_S = flags.DEFINE_integer("signal_s", 300, "SIGTERM this long before the time limit (checkpoint).")
    _VENV = flags.DEFINE_string("venv", "", "Virtualenv with audiodiff-jax[gpu] to activate on the nodes.")
    _LOG_DIR = flags.DEFINE_string("slurm_log_dir", "slurm_logs", "Where SLURM writes the job's output.")
    _OUT = flags.DEFINE_string("out", "", "Write the script here instead of submitting it.")
    common.define_flags()


def sbatch_script(
    *,
    name: str,
    nodes: int,
    gpus_per_node: int,
    cpus_per_task: int,
    time: str,
    train_args: list[str],
    partition: str = "",
    account: str = "",
    signal_s: int = 300,
    venv: str = "",
    log_dir: str = "slurm_logs",
) -> str:
    """The text of the sbatch script."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes={nodes} and --gpus_per_node={gpus_per_node} must be >= 1")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        f"#SBATCH --signal=TERM@{signal_s}",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        f"#SBATCH --output={log_dir}/%x-%j.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    # SLURM opens --output before the script runs: the launcher creates log_dir first.
    lines += ["", "set -euo pipefail"]
    if venv:
        lines.append(f"source {shlex.quote(venv + '/bin/activate')}")
    env = {**common.BASE_ENV, **GPU_ENV}
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [
        "",
        "# One task per GPU; jax.distributed reads SLURM_* for the coordinator, the ranks and",
        "# each task's GPU (SLURM_LOCALID). --kill-on-bad-exit: when one task fails, SLURM",
        "# ends the others at once.",
        f"srun --kill-on-bad-exit=1 --ntasks-per-node={gpus_per_node} " + shlex.join(train_args),
        "",
    ]
    return "\n".join(lines)


def main(argv):
    common.take_command(argv)
    text = sbatch_script(
        name=_NAME.value,
        nodes=_NODES.value,
        gpus_per_node=_GPUS.value,
        cpus_per_task=_CPUS.value,
        time=_TIME.value,
        train_args=common.train_args_from_flags(shared_filesystem=True),
        partition=_PARTITION.value,
        account=_ACCOUNT.value,
        signal_s=_SIGNAL_S.value,
        venv=_VENV.value,
        log_dir=_LOG_DIR.value,
    )
    if common.print_or_write(
        text, _OUT.value, f"create the log folder and submit: mkdir -p {_LOG_DIR.value} && sbatch {{path}}"
    ):
        return
    os.makedirs(_LOG_DIR.value, exist_ok=True)  # before sbatch: SLURM opens --output there
    print("sbatch <<script>>", flush=True)
    sys.exit(subprocess.run(["sbatch"], input=text, text=True).returncode)


if __name__ == "__main__":
    define_flags()
    cli.run(main, module=(__name__, "launch.common"))
