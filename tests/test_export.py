"""Checkpoints as artifacts: several EMAs by name, sweeps across checkpoints and weight
sets, export and import of one weight set, through the real programs.

One module fixture trains ``configs/tiny.py`` for 3 steps with a checkpoint at every
step and two EMA decays (0.05, the main one, and 0.2: both below the warm-up ramp
``(1 + step) / (10 + step)`` for a while, so the two EMAs differ from the first step).
"""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from audiodiff_jax.checkpoints import checkpointing, export, integrity, source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import optim, sharding
from audiodiff_jax.core.config import MeshConfig
from audiodiff_jax.sampling import generation
from audiodiff_jax.training import dit_trainer
from tests.helpers import REPO, assert_trees_equal, bin_path, read_state, tiny_config, write_shards

MAIN, EXTRA = 0.05, 0.2
CODEC = "--codec=tests.test_generation:make_codec"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=16)


@pytest.fixture(scope="module")
def run3(shards, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run3"))
    cfg = tiny_config(
        shards,
        **{
            "train.num_steps": 3,
            "checkpoint.every_steps": 1,
            "checkpoint.keep_last": 3,
            "optim.learning_rate": 3e-2,
            "optim.warmup_steps": 0,
            "optim.ema_decay": MAIN,
            "optim.extra_ema_decays": (EXTRA,),
        },
    )
    dit_trainer.train(cfg, workdir)
    return workdir


def _env():
    return dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _cli(name, *args, timeout=300):
    return subprocess.run(
        [bin_path(name), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env()
    )


def _step_dir(run, step):
    return checkpointing.find_step(run, step)[0]


def test_two_ema_decays_are_saved_and_restorable_by_name(run3):
    names = [optim.RAW, optim.EMA, optim.ema_name(MAIN), optim.ema_name(EXTRA)]
    assert names[2:] == ["ema0.05", "ema0.2"]
    assert list(checkpointing.weight_paths(_step_dir(run3, 3))) == ["raw", "ema", "ema0.05", "ema0.2"]
    before = checkpointing.restore_weight_sets(_step_dir(run3, 2), names, None)
    after = checkpointing.restore_weight_sets(_step_dir(run3, 3), names, None)
    assert_trees_equal(after["ema"], after["ema0.05"], "ema is the main EMA")
    # The update of step 3 (state.step 2 before it) in closed form, for each decay:
    # ema_3 = d * ema_2 + (1 - d) * raw_3 with d = min(decay, 3 / 12).
    for name, decay in (("ema0.05", MAIN), ("ema0.2", EXTRA)):
        d = min(decay, 3 / 12)
        want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, before[name], after["raw"])
        got = after[name]
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    gap = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(after["ema0.05"]), jax.tree.leaves(after["ema0.2"]), strict=True)
    )
    assert gap > 1e-4, "the two EMAs should differ"
    with pytest.raises(
        checkpointing.WeightsNotFound, match=r"no weights 'ema0.5'; it holds raw, ema, ema0.05, ema0.2"
    ):
        checkpointing.restore_weight_sets(_step_dir(run3, 3), ["ema0.5"], None)


def test_checkpoint_with_the_old_single_ema_still_restores(run3, tmp_path):
    """A step written before several EMAs existed: no ``extra_ema`` in the state, and a
    config with ``sample.use_ema`` and a single schedule. ``ema`` (and
    ``ema<optim.ema_decay>``) restore its EMA; sampling reads its config."""
    src = _step_dir(run3, 3)
    old = tmp_path / "old" / "checkpoints" / "3"
    state = read_state(run3, 3)
    del state["extra_ema"]
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(old / "state", state)
    for item in ("config", "dataset_card", "tokenizer"):
        shutil.copytree(src / item, old / item)
    (cfg_file,) = [f for f in (old / "config").iterdir() if f.read_text().startswith('{"model"')]
    saved = json.loads(cfg_file.read_text())
    del saved["optim"]["extra_ema_decays"], saved["sample"]["weights"]
    saved["sample"]["use_ema"], saved["sample"]["schedule"] = False, "uniform"
    cfg_file.write_text(json.dumps(saved))
    assert list(checkpointing.weight_paths(old)) == ["raw", "ema", "ema0.05"]
    got = checkpointing.restore_weight_sets(old, ["ema", "raw"], None)
    assert_trees_equal(got["ema"], state["ema_params"], "ema")
    assert_trees_equal(got["raw"], state["params"], "raw")
    cfg, _ = source.read_checkpoint_meta(old)
    assert cfg.sample.weights == ("raw",) and cfg.sample.schedule == ("uniform",)
    assert cfg.optim.extra_ema_decays == ()
    params, step = checkpointing.restore_params(str(old.parent.parent), None, use_ema=True)
    assert step == 3
    assert_trees_equal(params, state["ema_params"], "restore_params(use_ema=True)")
    # Training resumes from it: the extra EMA starts from the main one (loop._restore_target).
    shutil.copytree(src / "data_iter", old / "data_iter")
    cfg = source.read_checkpoint_meta(src)[0]
    resumed = dit_trainer.train(
        config_lib.replace(cfg, **{"train.num_steps": 4, "data.shards_dir": cfg.data.shards_dir}),
        str(old.parent.parent),
    )
    assert resumed.final_step == 4
    d = EXTRA
    want = jax.tree.map(
        lambda e, p: d * e + (1 - d) * p, state["ema_params"], jax.device_get(resumed.state.params)
    )
    got4 = jax.device_get(resumed.state.extra_ema[optim.ema_name(EXTRA)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got4, want)


@pytest.fixture(scope="module")
def swept(run3, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    args = [
        f"--checkpoint={run3}",
        f"--out={out}",
        CODEC,
        "--prompt=a slow harp",
        "--step=1,2,latest",
        "--weights=ema0.2,raw",
        "--seeds=0",
        "--schedule=uniform,karras",
    ]
    first = _cli("audiodiff-sample", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _cli("audiodiff-sample", *args)
    return out, first, again


def test_sweep_over_checkpoints_and_weights_writes_one_manifest(swept):
    out, first, again = swept
    rows = [json.loads(line) for line in open(out / generation.MANIFEST)]
    # 3 checkpoints x 2 weight sets x 2 schedules, in that nesting.
    got = [(r["checkpoint_step"], r["weights"], r["schedule"]) for r in rows]
    want = [(s, w, sc) for s in (1, 2, 3) for w in ("ema0.2", "raw") for sc in ("uniform", "karras")]
    assert got == want
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    assert len({r["id"] for r in rows}) == 12 and all((out / r["file"]).exists() for r in rows)
    # Different weights give different songs.
    audio = {
        (r["checkpoint_step"], r["weights"], r["schedule"]): (out / r["file"]).read_bytes() for r in rows
    }
    assert audio[3, "raw", "uniform"] != audio[3, "ema0.2", "uniform"]
    assert audio[3, "raw", "uniform"] != audio[2, "raw", "uniform"]
    # Each checkpoint step restored once, both weight sets in one read.
    restores = [line for line in first.stderr.splitlines() if "restored weights" in line and "sweep:" in line]
    assert len(restores) == 3 and all("ema0.2, raw" in line for line in restores), restores
    # The rerun finds everything done and reads no checkpoint.
    assert again.returncode == 0 and "(0 new)" in again.stdout, again.stdout
    assert "restored weights" not in again.stderr
    # The report plots the real-time factor against the step, a line per weight set.
    page = (out / "report.html").read_text()
    assert 'class="plot"' in page and 'data-column="timings.realtime_factor"' in page
    assert (out / "step-timings.realtime_factor.png").stat().st_size > 1000


def test_sampling_flags_for_missing_weights_and_the_older_raw(run3, tmp_path):
    res = _cli(
        "audiodiff-sample",
        f"--checkpoint={run3}",
        f"--out={tmp_path / 'o'}",
        "--prompt=x",
        CODEC,
        "--weights=ema0.5",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "--weights=ema0.5: checkpoint step 3 holds no such weights; it holds raw, ema0.05, ema0.2"
        in res.stderr
    )
    res = _cli(
        "audiodiff-sample",
        f"--checkpoint={run3}",
        f"--out={tmp_path / 'o'}",
        "--prompt=x",
        "--raw",
        "--weights=raw",
    )
    assert res.returncode == 2 and "give --weights or the older --raw, not both" in res.stderr, res.stderr[
        -2000:
    ]


@pytest.fixture(scope="module")
def exported(run3, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ema02-step2"
    res = _cli("audiodiff-export", f"--checkpoint={run3}", "--step=2", "--weights=ema0.2", f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_export_holds_the_weights_and_what_sampling_needs(run3, exported):
    meta = export.read_meta(str(exported))
    assert meta["weights"] == "ema0.2" and meta["step"] == 2 and meta["aliases"] == []
    arrays = load_file(str(exported / export.PARAMS))  # any safetensors reader
    umask = os.umask(0)
    os.umask(umask)
    assert (exported / export.PARAMS).stat().st_mode & 0o777 == 0o666 & ~umask  # not owner-only
    want = export.flatten(checkpointing.restore_weight_sets(_step_dir(run3, 2), ["ema0.2"], None)["ema0.2"])
    assert sorted(arrays) == sorted(want) and all(np.array_equal(arrays[k], want[k]) for k in want)
    assert json.loads((exported / "config.json").read_text())["optim"]["extra_ema_decays"] == [EXTRA]
    assert "model_base64" in json.loads((exported / "tokenizer.json").read_text())
    again = _cli("audiodiff-export", f"--checkpoint={run3}", f"--out={exported}")
    assert again.returncode == 2 and "exists and is not empty" in again.stderr, again.stderr[-2000:]


def test_sampling_an_export_is_bit_identical_to_sampling_the_checkpoint(swept, exported, tmp_path):
    out, _, _ = swept
    res = _cli(
        "audiodiff-sample",
        f"--checkpoint={exported}",
        f"--out={tmp_path / 'from_export'}",
        CODEC,
        "--prompt=a slow harp",
        "--seeds=0",
        "--schedule=uniform,karras",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "from_export" / generation.MANIFEST)]
    ref = {r["id"]: r for r in map(json.loads, open(out / generation.MANIFEST))}
    assert len(rows) == 2
    for row in rows:  # the same parameters, step and weights: the same id as in the sweep
        assert row["checkpoint_step"] == 2 and row["weights"] == "ema0.2"
        twin = ref[row["id"]]
        assert (tmp_path / "from_export" / row["file"]).read_bytes() == (out / twin["file"]).read_bytes()
    res = _cli(
        "audiodiff-sample",
        f"--checkpoint={exported}",
        f"--out={tmp_path / 'x'}",
        "--prompt=x",
        CODEC,
        "--weights=raw",
    )
    assert (
        res.returncode == 2
        and "export" in res.stderr
        and "holds no such weights; it holds ema0.2" in res.stderr
    )


def test_init_from_an_export_imports_the_weights_and_refuses_another_model(shards, run3, exported, tmp_path):
    cfg = tiny_config(shards, **{"train.num_steps": 1, "train.init_from": str(exported)})
    trainer = dit_trainer.Trainer(cfg, sharding.make_mesh(MeshConfig(data=2), devices=jax.devices()[:2]))
    state = trainer.initial_state()
    want = checkpointing.restore_weight_sets(_step_dir(run3, 2), ["ema0.2"], None)["ema0.2"]
    assert_trees_equal(jax.device_get(state.params), want, "imported params")
    assert_trees_equal(jax.device_get(state.ema_params), want, "imported into the EMA")
    # Another model: the first differing parameter is named, exit 2 before any step.
    res = _cli(
        "audiodiff-train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.shards_dir={shards}",
        "--config.model.text.width=32",
        f"--config.train.init_from={exported}",
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "train.init_from:" in res.stderr and "has shape" in res.stderr and "in the export" in res.stderr
    # A renamed tensor: named as missing from the export.
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    arrays = load_file(str(broken / export.PARAMS))
    first = sorted(arrays)[0]
    arrays["renamed"] = arrays.pop(first)
    from safetensors.numpy import save_file

    save_file(arrays, str(broken / export.PARAMS))
    # An export of another model describes its own tensors (else it is refused as damaged).
    meta = json.loads((broken / export.META).read_text())
    meta["params"]["renamed"] = meta["params"].pop(first)
    for name, digest in integrity.tensor_hashes(str(broken / export.PARAMS)).items():
        meta["params"][name]["hash"] = digest
    (broken / export.META).write_text(json.dumps(meta))
    with pytest.raises(export.ExportError, match=f"parameter {first} .* of the model is not in the export"):
        export.load_params(str(broken), trainer.model.abstract_params())
