"""Evaluation during training (audiodiff_jax/evaluators/train_eval.py): validation loss, demo samples."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from audiodiff_jax.core import names, sharding
from audiodiff_jax.core.metrics import MetricWriter
from audiodiff_jax.data.cards import DatasetCard
from audiodiff_jax.data.tokenizer import Tokenizer
from audiodiff_jax.diffusion import objective
from audiodiff_jax.evaluators import train_eval
from audiodiff_jax.training import dit_trainer
from data_pipeline import demo_shards
from tests.helpers import REPO, tiny_config

CHANNELS = 32  # the shipped codec's latent channels, so demo samples decode with the real codec


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training shards and held-out shards (other clips, other seed), both of demo latents."""
    root = tmp_path_factory.mktemp("eval_data")
    out = {}
    for name, seed, clips in (("train", 0, 32), ("heldout", 7, 12)):
        d = str(root / name)
        demo_shards.write_demo_shards(
            d, num_clips=clips, latent_channels=CHANNELS, num_shards=1, seed=seed, vocab_size=256
        )
        out[name] = d
    return out


def _cfg(data, **changes):
    base = {
        "model.latent_channels": CHANNELS,
        "eval.shards_dir": data["heldout"],
        "eval.num_examples": 6,
        "eval.buckets": 4,
    }
    base.update(changes)
    return tiny_config(data["train"], **base)


def test_validation_loss_matches_closed_form_and_is_fixed(data, tmp_path):
    """At initialization the DiT's output layer is zero, so the v-loss of a row is mean(v^2)
    over its valid frames, with v = alpha eps - sigma x: computed here in numpy from the
    fixed examples, noise and times."""
    cfg = _cfg(data)
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = dit_trainer.Trainer(cfg, mesh)
    state = trainer.init_state(0)
    card = DatasetCard.load(data["train"])
    tok = Tokenizer(os.path.join(data["train"], card.tokenizer))
    ev = train_eval.Evaluator(
        cfg,
        mesh,
        trainer.model.apply,
        lambda s: {"raw": s.params, "ema": s.ema_params},
        card,
        tok,
        str(tmp_path),
    )
    val = ev.val
    k, n = cfg.eval.buckets, cfg.eval.num_examples
    rows = k * n
    assert len(val.t) % sharding.batch_shards(mesh) == 0 and len(val.t) >= rows
    # Every bucket holds each example once, at a time inside the bucket; padding rows are -1.
    for b, (lo, hi) in enumerate(train_eval.bucket_edges(k)):
        sel = val.bucket == b
        assert sel.sum() == n and np.all((val.t[sel] >= lo) & (val.t[sel] < hi))
    assert np.all(val.bucket[rows:] == -1)
    # The same config gives the same rows (examples, noise, times).
    again = train_eval.make_validation_set(cfg, card, tok, sharding.batch_shards(mesh))
    np.testing.assert_array_equal(again.noise, val.noise)
    np.testing.assert_array_equal(again.t, val.t)
    np.testing.assert_array_equal(again.batch.latents, val.batch.latents)

    got = ev.validation_losses(state)
    t = val.t[:rows].astype(np.float64)
    alpha, sigma = np.cos(t * np.pi / 2), np.sin(t * np.pi / 2)
    x, eps, mask = val.batch.latents[:rows], val.noise[:rows], val.batch.loss_mask[:rows]
    v = alpha[:, None, None] * eps - sigma[:, None, None] * x
    per_row = (np.square(v).sum(-1) * mask).sum(-1) / (mask.sum(-1) * CHANNELS)
    want = [per_row[val.bucket[:rows] == b].mean() for b in range(k)]
    for (lo, hi), w in zip(train_eval.bucket_edges(k), want, strict=True):
        tag = train_eval.bucket_tag(lo, hi)
        np.testing.assert_allclose(got[f"{names.EVAL_LOSS}/{tag}"], w, rtol=1e-5)
        np.testing.assert_allclose(got[f"{names.EVAL_LOSS}_raw/{tag}"], w, rtol=1e-5)
    np.testing.assert_allclose(got[names.EVAL_LOSS], np.mean(want), rtol=1e-5)
    # Closed form of the expectation, as a check on the numbers' meaning: E[v^2] =
    # alpha^2 + sigma^2 E[x^2]; low t is dominated by the noise (alpha ~ 1), so ~ 1.
    assert abs(want[0] - 1.0) < 0.15
    # objective.add_noise is the training objective's own: the per-row loss agrees with it.
    z, v_jax = objective.add_noise(x[:2], eps[:2], val.t[:2])
    np.testing.assert_allclose(np.asarray(v_jax), v[:2], rtol=1e-5, atol=1e-6)


EVAL_CHANGES = {
    "train.num_steps": 10,
    "train.log_every": 5,
    "checkpoint.every_steps": 10,
    "optim.learning_rate": 3e-3,
    "eval.every_steps": 5,
    "eval.prompts": ("calm piano in C major",),
    "sample.guidance": (1.0, 3.0),
    "sample.seconds": (1.0,),
    "sample.min_seconds": 0.5,
    "sample.steps": (3,),
    "eval.codec": "default",
}


@pytest.fixture(scope="module")
def eval_run(data, tmp_path_factory):
    """A run with eval every 5 steps and a checkpoint at step 10: (workdir, result)."""
    workdir = str(tmp_path_factory.mktemp("with_eval"))
    return workdir, dit_trainer.train(
        _cfg(data, **EVAL_CHANGES), workdir, make_evaluator=train_eval.from_config
    )


def test_training_writes_eval_to_tensorboard_and_page(data, eval_run, tmp_path):
    """A run with eval every 5 steps: bucketed validation losses in metrics.jsonl and
    TensorBoard, demo samples decoded by the real codec as audio + spectrogram, a page;
    and the evaluation does not change the trained weights."""
    workdir, result = eval_run
    changes = EVAL_CHANGES
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "scalars" in r and names.EVAL_LOSS in r["scalars"]]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        buckets = [k for k in r["scalars"] if k.startswith(names.EVAL_LOSS + "/t")]
        assert len(buckets) == 4 and all(np.isfinite(r["scalars"][k]) for k in buckets)
        assert names.EVAL_LOSS + "_raw" in r["scalars"]
    # The loss falls between the two evaluations (same examples, noise and times).
    assert evals[1]["scalars"][names.EVAL_LOSS + "_raw"] < evals[0]["scalars"][names.EVAL_LOSS + "_raw"]

    events = _read_events(os.path.join(workdir, "tensorboard"))
    kinds = {}
    for step, value in events:
        kinds.setdefault((value.tag, value.WhichOneof("value")), []).append((step, value))
    assert (names.EVAL_LOSS, "simple_value") in kinds
    audio = kinds[("eval/sample_00_g3", "audio")]
    assert [s for s, _ in audio] == [5, 10] and audio[0][1].audio.sample_rate == 22050
    assert ("eval/sample_00_g1", "audio") in kinds
    assert ("eval/sample_00_g1/spectrogram", "image") in kinds

    page = os.path.join(workdir, "eval", "index.html")
    html = open(page).read()
    assert "calm piano in C major" in html and "loss_by_bucket.png" in html
    wavs = [
        os.path.join(r, f)
        for r, _, fs in os.walk(os.path.join(workdir, "eval"))
        for f in fs
        if f.endswith(".wav")
    ]
    assert len(wavs) == 4  # 2 evaluations x 2 guidance scales
    import soundfile  # noqa: PLC0415

    wav, rate = soundfile.read(wavs[0])
    assert rate == 22050 and len(wav) == 22050 and np.abs(wav).max() > 0

    # Evaluation only reads the state: the same run without it trains the same weights.
    plain = dit_trainer.train(_cfg(data, **{**changes, "eval.every_steps": 0}), str(tmp_path / "plain"))
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
        jax.device_get(result.state.params),
        jax.device_get(plain.state.params),
    )
    assert all(jax.tree.leaves(same))


def test_demo_samples_are_the_songs_of_audiodiff_sample_bit_for_bit(eval_run, tmp_path):
    """One sampler: the song evaluation during training made at step 10 from the EMA
    weights in memory is, byte for byte, the song ``audiodiff-sample`` makes from the
    step-10 checkpoint with the same prompt, seed and settings (the same 8-device mesh)."""
    workdir, _ = eval_run
    out = tmp_path / "sampled"
    cmd = [sys.executable, "-m", "audiodiff_jax.programs.sample_main", f"--checkpoint={workdir}"]
    cmd += ["--step=10", f"--out={out}", "--prompt=calm piano in C major", "--guidance=3", "--weights=ema"]
    cmd += ["--codec=default", "--noeval"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert (row["checkpoint_step"], row["seed"], row["steps"], row["seconds"]) == (10, 0, 3, 1.0)
    sampled = (out / row["file"]).read_bytes()
    in_training = open(os.path.join(workdir, "eval", "step_00000010", "00_g3.wav"), "rb").read()
    assert sampled == in_training
    # Not equal by accident: the other guidance scale made another song.
    assert open(os.path.join(workdir, "eval", "step_00000010", "00_g1.wav"), "rb").read() != sampled


def _read_events(tb_dir: str):
    """(step, Summary.Value) of every event file in ``tb_dir``: TFRecord framing (length,
    its CRC, the record, its CRC) around tensorboardX's Event protos."""
    import struct  # noqa: PLC0415

    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    out = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            out += [(event.step, v) for v in event.summary.value]
    return out


def test_heldout_shards_of_another_codec_are_refused(data, tmp_path):
    other = str(tmp_path / "other")
    demo_shards.write_demo_shards(other, num_clips=4, latent_channels=8, num_shards=1, seed=3, vocab_size=256)
    cfg = _cfg(data, **{"eval.shards_dir": other})
    card = DatasetCard.load(data["train"])
    tok = Tokenizer(os.path.join(data["train"], card.tokenizer))
    with pytest.raises(train_eval.ConfigError, match="eval.shards_dir=.*same codec"):
        train_eval.make_validation_set(cfg, card, tok, 8)


def test_metric_writer_writes_audio(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write_audio("a", np.zeros((1, 100), np.float32), 1, 8000)
    w.close()
    assert os.listdir(os.path.join(str(tmp_path), "tensorboard"))
