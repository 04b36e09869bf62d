"""Low-rank adapters: their factors and merge, the adapter run (frozen base, SIGTERM and
bitwise resume through the real program), adapters as artifacts, sampling with stacks
and scales, and the bad inputs that must stop with one line.

The bases are exports of ``configs/tiny.py`` models with random weights (every
parameter perturbed, so no block is the identity and every factor gets a gradient): no
base is trained. One module fixture trains adapters on a base in this process: the
reference run that the program's interrupted and resumed run must equal bit for bit,
and whose adapter the export and sampling tests use.
"""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from audiodiff_jax.checkpoints import adapter_export, checkpointing, export, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import sharding
from audiodiff_jax.core.config import ConfigError, MeshConfig
from audiodiff_jax.core.errors import GenerationError
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.model import adapters
from audiodiff_jax.programs import export_main
from audiodiff_jax.sampling import generation
from audiodiff_jax.training import adapter_trainer
from configs import adapter as adapter_config
from tests.helpers import (
    REPO,
    assert_trees_equal,
    bin_path,
    random_export,
    read_state,
    tiny_config,
    wait_then_sigterm,
    write_shards,
)
from tests.test_generation import LinearCodec

NUM_STEPS = 16
MESH = {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
DEVICES = 4
TRAIN_STATE_FIELDS = ("step", "params", "opt_state", "ema_params", "rng", "extra_ema")
CODEC = "--codec=tests.test_generation:make_codec"


def _env(devices=DEVICES):
    return dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=16)


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory):
    """Two bases: the one the adapters are trained on, and another."""
    root = tmp_path_factory.mktemp("bases")
    cfg = tiny_config(shards)
    return random_export(cfg, root / "base", 0), random_export(cfg, root / "other", 1)


def _adapter_args(base_run, shards, workdir):
    return [
        f"--config={os.path.join(REPO, 'configs', 'adapter.py')}:{base_run}",
        f"--workdir={workdir}",
        f"--config.data.shards_dir={shards}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=5",
        "--config.checkpoint.keep_last=5",
        "--config.optim.learning_rate=3e-2",
        "--config.adapters.rank=4",
        "--config.adapters.dropout=0.25",
        *(f"--config.mesh.{axis}={size}" for axis, size in MESH.items()),
    ]


def _adapter_cfg(base_run, shards):
    cd = adapter_config.get_config(base_run)
    cd.data.shards_dir = shards
    cd.train.num_steps = NUM_STEPS
    cd.train.log_every = 1
    cd.checkpoint.every_steps = 5
    cd.checkpoint.keep_last = 5
    cd.optim.learning_rate = 3e-2
    cd.adapters.rank = 4
    cd.adapters.dropout = 0.25
    for axis, size in MESH.items():
        cd.mesh[axis] = size
    return config_lib.from_configdict(cd)


@pytest.fixture(scope="module")
def adapter_run(base, shards, tmp_path_factory):
    """The reference adapter run, uninterrupted, in this process (the same code the program runs)."""
    workdir = str(tmp_path_factory.mktemp("adapter") / "run")
    cfg = _adapter_cfg(base[0], shards)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:DEVICES])
    result = adapter_trainer.train(cfg, workdir, mesh=mesh)
    assert result.final_step == NUM_STEPS
    return workdir


def test_factors_take_their_axes_from_the_kernels_and_merge_exactly(base):
    cfg = source.WeightsSource(base[0]).cfg
    spec = adapters.AdapterSpec(4, 8.0, ("self_attn.query", "self_attn.out", "mlp.fc2"))
    fns = adapters.make_adapter(cfg.model, spec)
    axes = fns.logical_axes()["blocks"]["1"]
    assert axes["self_attn"]["query"] == {
        "a": ("embed", "adapter_rank"),
        "b": ("adapter_rank", "heads", "head_dim"),
    }
    assert axes["self_attn"]["out"] == {
        "a": ("heads", "head_dim", "adapter_rank"),
        "b": ("adapter_rank", "embed"),
    }
    assert axes["mlp"]["fc2"]["kernel"] == {"a": ("mlp", "adapter_rank"), "b": ("adapter_rank", "embed")}
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sh = sharding.named_shardings(fns.logical_axes(), mesh)["blocks"]["0"]
    assert sh["self_attn"]["query"]["a"].spec == P("fsdp", None)  # as the kernel: embed over fsdp
    assert sh["self_attn"]["query"]["b"].spec == P(None, "tensor", None)  # heads over tensor
    assert sh["mlp"]["fc2"]["kernel"]["a"].spec == P("tensor", None)
    # At init b = 0: merging gives the base bit for bit; scale 0 gives the base's own arrays.
    base_params = source.WeightsSource(base[0]).host_params(None, "ema")
    init = fns.init(jax.random.key(0))
    assert_trees_equal(adapters.merge(base_params, [(init, 2.0)]), base_params, "merge at init")
    assert adapters.merge(base_params, [(init, 0.0)]) is base_params
    # The update is factor * a @ b on the kernel's own dims.
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), init)
    merged = adapters.merge(base_params, [(trained, 2.0)])
    a, b = trained["blocks"]["1"]["self_attn"]["out"]["a"], trained["blocks"]["1"]["self_attn"]["out"]["b"]
    want = base_params["blocks"]["1"]["self_attn"]["out"] + 2.0 * np.einsum("hdr,re->hde", a, b)
    np.testing.assert_allclose(merged["blocks"]["1"]["self_attn"]["out"], want, rtol=1e-5, atol=1e-5)
    assert_trees_equal(
        merged["blocks"]["1"]["cross_attn"], base_params["blocks"]["1"]["cross_attn"], "untargeted"
    )
    # A rank a kernel cannot hold is named before anything is built.
    with pytest.raises(
        ConfigError, match=r"adapters.rank=65 is larger than self_attn.query can use: .* at most 64"
    ):
        adapters.check_rank(cfg.model, spec._replace(rank=65))
    # "demo" names the shipped weights wherever weights are read (a path that exists wins).
    assert export.is_export(source.resolve("demo")) and source.resolve(base[0]) == base[0]
    # Configs saved before the section existed still load (with adapters off).
    old = json.loads(config_lib.to_json(cfg))
    old.pop("adapters")
    assert config_lib.from_configdict(old).adapters == config_lib.AdaptersConfig()


@pytest.mark.slow
def test_sigterm_and_restart_of_the_program_is_bitwise_identical(base, shards, adapter_run, tmp_path):
    resumed = str(tmp_path / "resumed")
    # A relative workdir (Orbax itself takes only absolute paths).
    args = [bin_path("audiodiff-train"), *_adapter_args(base[0], shards, "resumed")]
    proc = subprocess.Popen(args, env=_env(), cwd=tmp_path)
    assert wait_then_sigterm(proc, resumed, at_step=4) == 0
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(resumed, "checkpoints")) if d.isdigit())
    stopped_at = ckpts[-1]
    assert 4 <= stopped_at < NUM_STEPS, ckpts  # saved at the preemption, mid-run
    done = subprocess.run(args, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from checkpoint step {stopped_at}" in done.stderr
    a, b = read_state(adapter_run), read_state(resumed)
    assert int(a["step"]) == int(b["step"]) == NUM_STEPS
    for field in ("params", "ema_params", "opt_state"):
        assert_trees_equal(a[field], b[field], field)
    ha, hb = read_loss_history(adapter_run), read_loss_history(resumed)
    assert sorted(ha) == list(range(1, NUM_STEPS + 1)) and ha == hb
    # The state holds the factors, two moments of each and their EMA; of the base, its
    # identity (the content hash of its weights), never a copy.
    cfg = source.WeightsSource(base[0]).cfg
    targets = _adapter_cfg(base[0], shards).adapters.targets
    want = adapters.make_adapter(cfg.model, adapters.AdapterSpec(4, 16.0, targets))
    assert jax.tree.map(lambda x: x.shape, b["params"]) == jax.tree.map(
        lambda x: x.shape, want.abstract_params()
    )
    n = adapters.count_params(b["params"])
    assert sum(x.size for x in jax.tree.leaves(b["opt_state"]) if x.ndim) == 2 * n
    arrays = [
        x for f in ("params", "opt_state", "ema_params", "extra_ema") for x in jax.tree.leaves(b.get(f, {}))
    ]
    assert sum(x.size for x in arrays if np.ndim(x)) == 4 * n and set(b) <= {*map(str, TRAIN_STATE_FIELDS)}
    step_dir, _ = checkpointing.find_step(resumed)
    item = checkpointing.read_json_item(step_dir / source.ADAPTER_ITEM)
    ema = source.WeightsSource(base[0]).host_params(None, "ema")
    assert item["base"]["hash"] == export.content_hash(ema) == export.read_meta(base[0])["content_hash"]
    assert item["spec"] == {"rank": 4, "alpha": 16.0, "targets": list(targets)}
    # The adapters learned: every b moved off zero.
    assert all(
        np.abs(f).max() > 0 for p, f in traverse_util.flatten_dict(b["ema_params"]).items() if p[-1] == "b"
    )


@pytest.fixture(scope="module")
def adapter_folder(adapter_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adapter_export") / "mine")
    export_main.export_checkpoint(adapter_run, out)
    return out


def test_an_adapter_exports_as_a_small_folder_and_merges_into_an_export(
    base, adapter_run, adapter_folder, tmp_path
):
    exported = base[0]
    meta = adapter_export.read_meta(adapter_folder)
    assert meta["weights"] == "ema0.99" and meta["step"] == NUM_STEPS
    size = sum(os.path.getsize(os.path.join(adapter_folder, f)) for f in os.listdir(adapter_folder))
    assert size < os.path.getsize(os.path.join(exported, export.PARAMS)) / 2  # the factors only
    # Shared artifacts: readable like any file the user writes (safetensors alone gives 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(adapter_folder, adapter_export.PARAMS)).st_mode & 0o777 == 0o666 & ~umask
    adapter, _ = source.open_adapter(adapter_folder)
    from_run, where = source.open_adapter(adapter_run)
    assert_trees_equal(adapter.params, from_run.params, "folder against run")
    assert where["weights"] == "ema0.99" and adapter.base == from_run.base
    # Merged into its base: one whole export with the weights sampling merges for the
    # base with the adapter stacked at that scale (to float32 rounding: the dot's order of
    # summation over the rank follows the layout, one device here, a 2x2 mesh there).
    merged = export_main.export_checkpoint(
        exported, str(tmp_path / "merged"), adapters_text=f"{adapter_folder}@0.5"
    )
    mmeta = export.read_meta(merged)
    assert [a["scale"] for a in mmeta["adapters"]] == [0.5] and mmeta["content_hash"] != mmeta[
        "base_content_hash"
    ]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    stack = source.open_adapter_stacks([f"{adapter_folder}@0.5"])[0]
    stacked = generation.open_generator(exported, LinearCodec(), mesh=mesh, adapters=stack)[0]
    whole = generation.open_generator(merged, LinearCodec(), mesh=mesh)[0]
    for x, y in zip(jax.tree.leaves(stacked.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert_trees_equal(
        jax.device_get(stacked.base_params), source.WeightsSource(exported).host_params(None, "ema"), "base"
    )
    # An adapter run is not a model to sample, nor an adapter folder a checkpoint.
    for path in (adapter_run, adapter_folder):
        with pytest.raises(GenerationError, match="--adapters="):
            source.WeightsSource(path)


def test_sampling_stacks_scales_and_sweeps(base, adapter_run, adapter_folder, tmp_path):
    out = tmp_path / "sweep"
    res = subprocess.run(
        [
            bin_path("audiodiff-sample"),
            f"--checkpoint={base[0]}",
            f"--out={out}",
            CODEC,
            "--prompt=a slow harp",
            "--seeds=0,1",
            "--eval=false",
            "--adapters=none",
            f"--adapters={adapter_folder}@0",
            f"--adapters={adapter_folder}",
            f"--adapters={adapter_folder}@1,{adapter_run}@0.5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=_env(2),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / generation.MANIFEST)]
    stacks = ["", f"{adapter_folder}@0", f"{adapter_folder}@1", f"{adapter_folder}@1,{adapter_run}@0.5"]
    assert [(r["adapters"], r["seed"]) for r in rows] == [(s, seed) for s in stacks for seed in (0, 1)]
    assert [[a["scale"] for a in r["adapter_list"]] for r in rows[::2]] == [[], [0.0], [1.0], [1.0, 0.5]]
    audio = {(r["adapters"], r["seed"]): (out / r["file"]).read_bytes() for r in rows}
    for seed in (0, 1):
        assert audio[stacks[1], seed] == audio["", seed]  # scale 0: the base's song, bit for bit
        assert audio[stacks[2], seed] != audio["", seed]
        assert audio[stacks[3], seed] not in (audio["", seed], audio[stacks[2], seed])
    assert len({r["id"] for r in rows}) == len(rows)
    # The weights are restored once, every stack merged into them in turn.
    assert sum("sweep: restored weights" in line for line in res.stderr.splitlines()) == 1


def _truncated(adapter_folder, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(adapter_folder, broken)
    data = (broken / adapter_export.PARAMS).read_bytes()
    (broken / adapter_export.PARAMS).write_bytes(data[: len(data) // 2])
    return broken


def test_bad_input_is_one_line_exit_2_and_writes_nothing(base, shards, adapter_folder, tmp_path):
    exported, other = base
    other_codec = tmp_path / "other_codec"
    shutil.copytree(shards, other_codec)
    card = json.loads((other_codec / "dataset_card.json").read_text())
    card["codec"]["name"] = "music"
    (other_codec / "dataset_card.json").write_text(json.dumps(card))
    no_audio = tmp_path / "no_audio"
    no_audio.mkdir()
    (no_audio / "notes.txt").write_text("not audio")
    (no_audio / "song.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    train = [bin_path("audiodiff-train"), f"--config=configs/adapter.py:{exported}"]
    sample = [bin_path("audiodiff-sample"), f"--checkpoint={exported}", "--prompt=x", CODEC]
    cases = {
        "rank": (
            [
                *train,
                f"--workdir={tmp_path / 'w_rank'}",
                f"--config.data.shards_dir={shards}",
                "--config.adapters.rank=65",
            ],
            "adapters.rank=65 is larger than mlp.fc1 can use",  # configs/adapter.py: the MLP
            tmp_path / "w_rank",
        ),
        "codec": (
            [*train, f"--workdir={tmp_path / 'w_codec'}", f"--config.data.shards_dir={other_codec}"],
            "holds latents of codec 'music'",
            tmp_path / "w_codec",
        ),
        "truncated": (
            [*sample, f"--out={tmp_path / 'o_trunc'}", f"--adapters={_truncated(adapter_folder, tmp_path)}"],
            "adapter.safetensors is truncated or damaged",
            tmp_path / "o_trunc",
        ),
        "other_base": (
            [
                *sample[:1],
                f"--checkpoint={other}",
                *sample[2:],
                f"--out={tmp_path / 'o_base'}",
                f"--adapters={adapter_folder}",
            ],
            "adapter mine was trained on",
            tmp_path / "o_base",
        ),
        "no_audio": (
            [
                bin_path("audiodiff-precompute"),
                f"--corpus={no_audio}",
                f"--out_dir={tmp_path / 'lat'}",
                CODEC,
                "--progress=false",
            ],
            "no usable audio",
            tmp_path / "lat",
        ),
    }
    procs = {
        name: subprocess.Popen(
            cmd, cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (cmd, _, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        _, want, written = cases[name]
        program = os.path.basename(cases[name][0][0])
        lines = [line for line in err.splitlines() if line.startswith(f"{program}: ")]
        assert proc.returncode == 2 and len(lines) == 1 and want in lines[0], (
            f"{name}: {proc.returncode}\n{err[-3000:]}"
        )
        assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
        assert not written.exists(), f"{name}: wrote {written}"
        if name == "other_base":  # both sets of weights are named
            assert f"trained on export {exported}, " in lines[0] and f"not on export {other}, " in lines[0]
