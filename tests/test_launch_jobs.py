"""Sampling sweeps launched like training: the same command on every process.

``launch.local`` starts two ``audiodiff-sample`` processes with one command line; each
takes its index and count from the launcher's variables, makes its own disjoint share
of the grid on its own devices, and process 0 merges one manifest and report once both
are done (``audiodiff_jax/sweeps/share.py``). The SLURM launcher runs the same job from
``-- audiodiff-sample ...`` (its script run by bash with a stand-in ``srun``).
Precompute's run through ``launch.local`` is tested in ``test_precompute.py``.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest
import soundfile as sf

from audiodiff_jax.sampling import generation
from audiodiff_jax.sweeps import share
from audiodiff_jax.training import dit_trainer
from tests.helpers import REPO, bin_path, tiny_config, write_shards
from tests.test_launch import FAKE_SRUN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    shards = write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=16)
    workdir = str(tmp_path_factory.mktemp("run"))
    dit_trainer.train(tiny_config(shards, **{"train.num_steps": 2, "checkpoint.every_steps": 2}), workdir)
    return workdir


def test_sweep_split_across_two_launched_processes(run_dir, tmp_path):
    out = tmp_path / "sweep"
    sample = [bin_path("audiodiff-sample"), f"--checkpoint={run_dir}", f"--out={out}"]
    sample += ["--prompt=a slow harp", "--prompt=fast drums", "--seeds=0,1,2"]
    sample += ["--codec=tests.test_generation:make_codec"]
    cmd = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=2"]
    cmd += ["--timeout_s=300", "--grace_s=10", "--", *sample]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]

    rows = [json.loads(line) for line in (out / generation.MANIFEST).read_text().splitlines()]
    # 2 prompts x 3 seeds, numbered and ordered as one process would write them.
    assert [r["index"] for r in rows] == list(range(6))
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        (p, s) for p in ("a slow harp", "fast drums") for s in (0, 1, 2)
    ]
    # Item i was made by process i % 2, into its own part folder, and nowhere else.
    for r in rows:
        part = share.part_name(r["index"] % 2, 2)
        assert r["file"].startswith(f"{share.PARTS}/{part}/"), r["file"]
        audio, sr = sf.read(out / r["file"])
        assert sr == r["sample_rate"] and len(audio) > 0
    for k in range(2):
        part = out / share.PARTS / share.part_name(k, 2)
        assert len(list(part.glob("*.wav"))) == 3
        assert len((part / generation.MANIFEST).read_text().splitlines()) == 3
    assert not list(out.glob("*.wav"))
    # One page at the top, linking every output; each process said which share it made.
    page = (out / "report.html").read_text()
    assert all(r["file"] in page for r in rows)
    for k in range(2):
        assert f"[p{k}] " in res.stdout and f"process {k} of 2 makes 3 of 6 items" in res.stdout

    # Run again: every share is complete, nothing is made twice.
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "6 output(s)" in again.stdout and "(0 new)" in again.stdout
    assert [json.loads(line) for line in (out / generation.MANIFEST).read_text().splitlines()] == rows


def _merged(out):
    return [json.loads(line) for line in (out / generation.MANIFEST).read_text().splitlines()]


def test_slurm_launcher_runs_a_sweep_given_after_double_dash(run_dir, tmp_path):
    out = tmp_path / "sweep"
    job = ["audiodiff-sample", f"--checkpoint={run_dir}", f"--out={out}", "--prompt=a harp", "--seeds=0,1,2"]
    job += ["--codec=tests.test_generation:make_codec"]
    script = tmp_path / "job.sh"
    cmd = [sys.executable, "-m", "launch.slurm", "--gpus_per_node=2", f"--out={script}", "--", *job]
    made = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr[-2000:]
    (srun,) = [line for line in script.read_text().splitlines() if line.startswith("srun ")]
    assert srun.endswith(" " + shlex.join(job)) and "--distributed" not in srun  # run as given

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    (tmp_path / "logs").mkdir()
    env = dict(
        os.environ,
        PATH=f"{bindir}:{os.path.dirname(bin_path('audiodiff-sample'))}:{os.environ['PATH']}",
        PYTHONPATH=REPO,
        FAKE_SLURM_JOB_ID="1",
        FAKE_SLURM_LOGS=str(tmp_path / "logs"),
    )
    res = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, timeout=400)
    logs = [(tmp_path / "logs" / f"task_{i}.log").read_text() for i in range(2)]
    assert res.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    rows = _merged(out)
    assert [r["seed"] for r in rows] == [0, 1, 2]
    assert [r["file"].split("/")[1] for r in rows] == [share.part_name(i % 2, 2) for i in range(3)]
    assert "process 1 of 2 makes 1 of 3 items" in logs[1]


def test_launchers_refuse_an_unknown_program_after_double_dash():
    cmd = [sys.executable, "-m", "launch.slurm", "--dry_run", "--", "rm", "-rf", "/"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "audiodiff-sample" in res.stderr and "Traceback" not in res.stderr


def test_each_scheduler_gives_the_process_its_share(monkeypatch):
    from audiodiff_jax.core import distributed

    for var in (
        "AUDIODIFF_PROCESS_ID",
        "AUDIODIFF_NUM_PROCESSES",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "TPU_WORKER_ID",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_NUM_SLICES",
        "MEGASCALE_SLICE_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    assert distributed.process_from_environment() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3")
    monkeypatch.setenv("TPU_WORKER_ID", "2")
    assert distributed.process_from_environment() == (2, 4)
    # Two slices of 4 hosts: worker 2 of slice 1 is process 6 of 8, not a second process 2.
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")
    monkeypatch.setenv("MEGASCALE_SLICE_ID", "1")
    assert distributed.process_from_environment() == (6, 8)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.process_from_environment() == (3, 16)
    monkeypatch.setenv("AUDIODIFF_PROCESS_ID", "1")
    monkeypatch.setenv("AUDIODIFF_NUM_PROCESSES", "2")
    assert distributed.process_from_environment() == (1, 2)
