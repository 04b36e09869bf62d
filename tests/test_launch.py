"""The pod and cluster launchers generate exactly the commands and manifests they should.

Nothing here reaches a cloud: ``--dry_run`` prints what would run, and the tests read
that text (and parse the GKE manifest as YAML).
"""

import os
import shlex
import subprocess
import sys
import time

import pytest
import yaml

from launch import common, gke, slurm, tpu_vm
from tests.helpers import REPO, bin_path, read_state, write_shards

ARGS = common.train_args(
    "configs/dit.py:1B",
    "gs://bucket/runs/dit1b",
    ["data.shards_dir=gs://bucket/latents", "config.train.num_steps=1000"],
)


def test_train_args_carry_config_workdir_overrides_and_timeouts():
    assert ARGS == [
        "audiodiff-train",
        "--config=configs/dit.py:1B",
        "--workdir=gs://bucket/runs/dit1b",
        "--distributed=on",
        "--heartbeat_timeout_s=100",
        "--step_timeout_s=1800",
        "--config.data.shards_dir=gs://bucket/latents",
        "--config.train.num_steps=1000",
    ]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        common.train_args("c", "w", ["no_equals_sign"])


def _dry_run(module, *flags):
    res = subprocess.run(
        [sys.executable, "-m", f"launch.{module}", "--dry_run", *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_tpu_vm_single_slice_dry_run():
    out = _dry_run(
        "tpu_vm",
        "--action=all",
        "--name=dit1b",
        "--project=proj",
        "--zone=us-east5-a",
        "--accelerator_type=v5p-128",
        "--config=configs/dit.py:1B",
        "--workdir=gs://bucket/runs/dit1b",
        "--override=data.shards_dir=gs://bucket/latents",
        "--package=git+https://example.com/audiodiff-jax@abc123",
        "--spot",
    )
    lines = out.strip().splitlines()
    assert lines[0] == (
        "gcloud compute tpus queued-resources create dit1b --project=proj --zone=us-east5-a "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=dit1b --spot"
    )
    assert lines[1].startswith("bash -c 'until [ \"$(gcloud compute tpus queued-resources describe dit1b")
    assert "ACTIVE" in lines[1]
    assert lines[2].startswith(
        "gcloud compute tpus tpu-vm ssh dit1b --project=proj --zone=us-east5-a --worker=all '--command=set -e"
    )
    assert "git+https://example.com/audiodiff-jax@abc123" in lines[2] and "uv venv" in lines[2]
    train = lines[3]
    assert train.startswith(
        "gcloud compute tpus tpu-vm ssh dit1b --project=proj --zone=us-east5-a --worker=all"
    )
    for piece in (
        # the installed config by name: the same file on every host whatever its directory
        "PATH=~/audiodiff-venv/bin:$PATH PYTHONUNBUFFERED=1 nohup audiodiff-train --config=dit:1B",
        "--workdir=gs://bucket/runs/dit1b --distributed=on --heartbeat_timeout_s=100",
        "--config.data.shards_dir=gs://bucket/latents > ~/audiodiff-train.log 2>&1 &",
        "& echo $! > ~/audiodiff-train.pid",
    ):
        assert piece in train, train
    assert "MEGASCALE" not in train
    assert len(lines) == 4


def test_tpu_vm_multislice_sets_megascale_per_slice(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(
        "#!/bin/bash\n"
        'case "$*" in *describe*) echo 10.1.2.3 ;; *ssh*) for a in "$@"; do '
        '[[ $a == --command=* ]] && echo "${a#--command=}"; done ;; esac\n'
    )
    gcloud.chmod(0o755)
    cmds = tpu_vm.train_commands(
        "big", project="p", zone="z", num_slices=2, train_args=ARGS, libtpu_args="--xla_tpu_flag=1"
    )
    assert len(cmds) == 2
    for i, cmd in enumerate(cmds):
        assert cmd[:2] == ["bash", "-c"]
        script = cmd[2]
        # The coordinator is worker 0 of slice 0, looked up when the command runs.
        assert script.startswith(
            "COORDINATOR_IP=$(gcloud compute tpus tpu-vm describe big-0 --project=p --zone=z "
            "'--format=value(networkEndpoints[0].ipAddress)'); gcloud compute tpus tpu-vm ssh "
            f"big-{i} "
        )
        assert f"MEGASCALE_SLICE_ID={i} " in script and "MEGASCALE_NUM_SLICES=2 " in script
        # Run it with a stand-in gcloud that answers "describe" with an IP and prints
        # what "ssh" would run on the hosts: the quoting must deliver the IP there.
        remote = subprocess.run(
            ["bash", "-c", script],
            env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        want = (
            "PATH=~/audiodiff-venv/bin:$PATH PYTHONUNBUFFERED=1 MEGASCALE_COORDINATOR_ADDRESS=10.1.2.3:8080 "
        )
        assert remote.startswith(want), remote
        assert f"MEGASCALE_SLICE_ID={i} " in remote and "LIBTPU_INIT_ARGS=--xla_tpu_flag=1 nohup" in remote
        assert remote.rstrip().endswith("& echo $! > ~/audiodiff-train.pid")
    create = tpu_vm.create_commands(
        "big",
        project="p",
        zone="z",
        accelerator_type="v5p-128",
        runtime_version="v2-alpha-tpuv5",
        num_slices=2,
        queued=True,
        spot=False,
    )[0]
    assert "--node-count=2" in create and "--node-prefix=big" in create
    with pytest.raises(ValueError, match="queued"):
        tpu_vm.create_commands(
            "big",
            project="p",
            zone="z",
            accelerator_type="v5p-128",
            runtime_version="x",
            num_slices=2,
            queued=False,
            spot=False,
        )


def test_gke_jobset_manifest():
    text = gke.manifest(
        name="dit1b", image="reg/audiodiff:1", accelerator_type="v5p-128", num_slices=2, train_args=ARGS
    )
    doc = yaml.safe_load(text)
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "dit1b"
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == 10
    (rj,) = doc["spec"]["replicatedJobs"]
    assert rj["replicas"] == 2
    job = rj["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 16  # 64 chips / 4 per host
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "4x4x4",
    }
    (c,) = pod["containers"]
    assert c["image"] == "reg/audiodiff:1" and c["command"] == ARGS
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e for e in c["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "dit1b-slice-0-0.dit1b:8080"
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert "job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["PYTHONUNBUFFERED"]["value"] == "1"
    # Shared memory for Grain's worker processes (a container's default /dev/shm is 64 MB).
    (mount,) = c["volumeMounts"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/dev/shm" and vol["emptyDir"] == {"medium": "Memory"}

    one = yaml.safe_load(
        gke.manifest(name="s", image="i", accelerator_type="v5e-256", num_slices=1, train_args=ARGS)
    )
    pod = one["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "16x16"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    assert not any(e["name"].startswith("MEGASCALE") for e in pod["containers"][0]["env"])
    assert gke.chips_per_host("v5e", 8) == 8 and gke.chips_per_host("v5e", 256) == 4


def test_image_is_built_by_the_set_up_script_that_ci_runs():
    """The Dockerfile installs through launch/setup_env.sh, which `make test` also runs."""
    docker = open(os.path.join(REPO, "Dockerfile")).read()
    make = open(os.path.join(REPO, "Makefile")).read()
    assert "bash launch/setup_env.sh" in docker and "launch/setup_env.sh" in make
    assert "AUDIODIFF_EXTRAS=tpu" in docker and "FROM python:3.11" in docker
    setup = open(os.path.join(REPO, "launch", "setup_env.sh")).read()
    assert ".[$EXTRAS]" in setup and "AUDIODIFF_SYSTEM_PACKAGES" in setup
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "setup_env.sh")]).returncode == 0


def test_gke_dry_run_prints_manifest():
    out = _dry_run(
        "gke",
        "--name=x",
        "--image=img",
        "--accelerator_type=v6e-64",
        "--config=configs/dit.py:1B",
        "--workdir=gs://b/r",
    )
    doc = yaml.safe_load(out)
    assert doc["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 16


def test_slurm_script(tmp_path):
    text = slurm.sbatch_script(
        name="dit1b",
        nodes=4,
        gpus_per_node=8,
        cpus_per_task=32,
        time="48:00:00",
        train_args=ARGS,
        partition="gpu",
        venv="/shared/venv",
    )
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",  # one task (process) per GPU
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=TERM@300",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "source /shared/venv/bin/activate",
        "export PYTHONUNBUFFERED=1",
    ):
        assert want in lines, want
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun == "srun --kill-on-bad-exit=1 --ntasks-per-node=8 " + shlex.join(ARGS)
    assert not any(line.startswith("mkdir") for line in lines)  # the launcher makes the log folder
    # The script is valid bash.
    path = tmp_path / "job.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_launchers_pass_a_config_every_host_has(tmp_path):
    assert common.portable_config("configs/dit.py:1B", shared_filesystem=False) == "dit:1B"
    assert common.portable_config("dit:1B", shared_filesystem=False) == "dit:1B"
    own = tmp_path / "mine.py"
    own.write_text("")
    with pytest.raises(common.LaunchError, match="exists only on this machine"):
        common.portable_config(f"{own}:x", shared_filesystem=False)
    assert common.portable_config(f"{own}:x", shared_filesystem=True) == f"{own}:x"  # SLURM: shared disk
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.gke",
            "--dry_run",
            "--name=n",
            "--image=i",
            f"--config={own}",
            "--workdir=w",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (
        out.returncode == 2 and "exists only on this machine" in out.stderr and "Traceback" not in out.stderr
    )


def test_slurm_dry_run_flags():
    out = _dry_run(
        "slurm",
        "--nodes=2",
        "--config=configs/dit.py:1B",
        "--workdir=/shared/runs/x",
        "--override=mesh.dcn_data=2",
        "--heartbeat_timeout_s=60",
    )
    assert "#SBATCH --nodes=2" in out
    assert "--heartbeat_timeout_s=60" in out and "--config.mesh.dcn_data=2" in out


def test_local_launcher_reports_pids_and_kill(tmp_path):
    from launch import local

    status = local.launch(
        [sys.executable, "-c", "import os, sys; sys.exit(int(os.environ['AUDIODIFF_PROCESS_ID']) * 3)"],
        num_processes=2,
        devices_per_process=1,
        grace_s=5,
        log_dir=str(tmp_path),
        env=dict(os.environ),
    )
    assert status == 3
    assert int((tmp_path / "process_1.pid").read_text()) > 0
    assert (
        local.describe_exit(-9) == "was killed by SIGKILL"
        and local.describe_exit(3) == "exited with status 3"
    )


# A stand-in for SLURM's srun: starts --ntasks-per-node local tasks of the command with
# the variables SLURM gives each task, one fake CPU device per task (one "GPU" each).
FAKE_SRUN = r"""#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
n = 1
while args and args[0].startswith("--"):
    if args[0].startswith("--ntasks-per-node="):
        n = int(args[0].split("=", 1)[1])
    args = args[1:]
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_JOB_ID=os.environ["FAKE_SLURM_JOB_ID"], SLURM_STEP_NODELIST="localhost",
               SLURM_JOB_NODELIST="localhost", SLURM_NTASKS=str(n), SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
               SLURM_NODEID="0", SLURM_STEP_NUM_NODES="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    log = open(os.path.join(os.environ["FAKE_SLURM_LOGS"], f"task_{i}.log"), "w")
    procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
codes = [p.wait(timeout=600) for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""


@pytest.mark.slow
def test_slurm_script_runs_one_process_per_gpu(tmp_path):
    """The generated script, run by bash with a stand-in srun on this machine: two tasks
    ("GPUs") join one jax.distributed job, each process sees its own device, and it trains."""
    shards = write_shards(str(tmp_path / "shards"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    workdir = tmp_path / "run"
    args = common.train_args(
        "tiny",  # by name: the installed configs/tiny.py, whatever the task's directory
        str(workdir),
        [f"data.shards_dir={shards}", "train.num_steps=3", "checkpoint.every_steps=3", "mesh.data=2"],
    )
    args[0] = bin_path("audiodiff-train")
    text = slurm.sbatch_script(
        name="t", nodes=1, gpus_per_node=2, cpus_per_task=1, time="0:10:00", train_args=args
    )
    (tmp_path / "job.sh").write_text(text)
    (tmp_path / "logs").mkdir()
    env = dict(
        os.environ,
        PATH=f"{bindir}:{os.environ['PATH']}",
        FAKE_SLURM_JOB_ID=str(os.getpid() % 4000 + 1),
        FAKE_SLURM_LOGS=str(tmp_path / "logs"),
    )
    res = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, cwd=tmp_path, timeout=600)
    logs = [(tmp_path / "logs" / f"task_{i}.log").read_text() for i in range(2)]
    assert res.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    for i, log in enumerate(logs):
        assert f"joined jax.distributed: process {i} of 2" in log, log[-3000:]
    assert read_state(str(workdir))["step"] == 3


@pytest.mark.slow
def test_tpu_vm_host_scripts_run_on_a_stand_in_host(tmp_path):
    """The per-host set-up and launch commands, run by bash on this machine as a stand-in
    TPU host (a fresh HOME, the base Python on PATH): uv makes the Python 3.11 venv, the
    package goes into it, and the launch starts that venv's audiodiff-train in the
    background with its log and pid files. A stub package stands in for audiodiff-jax
    (same name and extra) so the test does not download jax."""
    pkg, home = tmp_path / "pkg", tmp_path / "home"
    pkg.mkdir()
    home.mkdir()
    (pkg / "setup.py").write_text(
        "from setuptools import setup\n"
        "setup(name='audiodiff-jax', version='0.0.1', py_modules=['stub_train'],\n"
        "      extras_require={'tpu': []},\n"
        "      entry_points={'console_scripts': ['audiodiff-train=stub_train:main']})\n"
    )
    (pkg / "stub_train.py").write_text(
        "import os, sys\n"
        "def main():\n"
        "    print('python', sys.version_info[:2], 'args', sys.argv[1:], os.environ['PYTHONUNBUFFERED'])\n"
    )
    path = [os.path.join(sys.base_prefix, "bin")] + [
        p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)
    ]
    env = dict(os.environ, HOME=str(home), PATH=os.pathsep.join(path), UV_NATIVE_TLS="1")
    env.pop("VIRTUAL_ENV", None)
    res = subprocess.run(
        ["bash", "-c", tpu_vm.setup_script(str(pkg))], env=env, cwd=home, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    venv_python = home / "audiodiff-venv" / "bin" / "python"
    version = subprocess.run(
        [str(venv_python), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True
    )
    assert version.stdout.decode().strip() == "(3, 11)"
    launch = tpu_vm.train_script(["audiodiff-train", "--config=dit:1B"], tpu_vm.train_env(0, 1, "", ""))
    assert subprocess.run(["bash", "-c", launch], env=env, cwd=home).returncode == 0
    assert int((home / "audiodiff-train.pid").read_text()) > 0
    log_file = home / "audiodiff-train.log"
    for _ in range(200):  # the background job writes its line at once
        if log_file.exists() and "args" in log_file.read_text():
            break
        time.sleep(0.1)
    log = log_file.read_text()
    assert "python (3, 11) args ['--config=dit:1B'] 1" in log, log
