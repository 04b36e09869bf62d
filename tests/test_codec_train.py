"""Codec training on tiny data (8 fake CPU devices): it learns, its checkpoint opens as a
codec, the discriminator path trains, and the real program survives SIGTERM and resumes
bit for bit."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from audiodiff_jax.codec import config as codec_config
from audiodiff_jax.codec import losses
from audiodiff_jax.codec import model as model_lib
from audiodiff_jax.codec.codec import load_codec
from audiodiff_jax.core import sharding
from audiodiff_jax.core.metrics import read_loss_history
from audiodiff_jax.training import codec_trainer, goodput
from configs import codec as codec_configs
from tests.helpers import REPO, assert_trees_equal, bin_path, read_state, wait_then_sigterm


class ToneSource:
    """Crops of tones (three pitches, random phase), a pure function of the step (like CropSource).

    Pure tones: the tiny codec fits them measurably within a dozen steps."""

    def __init__(self, crop: int = 1024, sample_rate: int = 8000):
        self.crop, self.sr = crop, sample_rate

    def batch(self, step, global_batch, process_index=0, process_count=1):
        rng = np.random.default_rng([7, step])
        t = np.arange(self.crop) / self.sr
        f0 = rng.choice([250.0, 500.0, 1000.0], (global_batch, 1))
        phase = rng.uniform(0, 2 * np.pi, (global_batch, 1))
        return (0.5 * np.sin(2 * np.pi * f0 * t + phase))[:, :, None].astype(np.float32)


def _cfg(**changes):
    cd = codec_configs.get_config("tiny")
    for k, v in changes.items():
        section, key = k.split(".")
        cd[section][key] = v
    return codec_config.from_configdict(cd)


def _recon_loss(cfg, params, x):
    net = model_lib.make_vae(cfg.model).merge(params)
    mean, _ = model_lib.posterior(net.encode(x))
    y = net.decode(mean)
    return float(losses.multi_resolution_stft_loss(y, x, cfg.loss.stft_fft_sizes))


def test_training_lowers_loss_and_opens_as_a_codec(tmp_path):
    cfg = _cfg(**{"train.num_steps": 12, "checkpoint.every_steps": 6})
    x = jnp.asarray(ToneSource().batch(10_000, 8))  # a batch no training step sees
    trainer = codec_trainer.CodecTrainer(cfg, sharding.make_mesh(cfg.mesh))  # one compilation for all runs
    # Run A: 12 steps straight through.
    a = codec_trainer.train(cfg, str(tmp_path / "a"), source=ToneSource(), trainer=trainer)
    assert a.final_step == 12
    fresh = model_lib.make_vae(cfg.model).init(jax.random.split(jax.random.key(cfg.train.seed), 3)[0])
    before = _recon_loss(cfg, fresh, x)
    after = _recon_loss(cfg, jax.device_get(a.state["params"]), x)
    assert after < 0.85 * before, (before, after)  # measured: 9.36 -> 6.69
    # Resuming (after a crash or SIGTERM) is the shared loop's, tested through the
    # real program below (test_codec_train_cli_survives_sigterm_and_resumes_bit_for_bit).
    # The run opens as a codec (EMA weights of the last checkpoint).
    codec = load_codec(str(tmp_path / "a"))
    np.testing.assert_array_equal(
        jax.tree.leaves(codec.params)[0],
        np.asarray(jax.tree.leaves(jax.device_get(a.state["ema_params"]))[0]),
    )
    assert codec.encode(np.zeros((1, 640), np.float32), 8000).shape == (10, 4)


@pytest.mark.slow
def test_discriminator_trains(tmp_path):
    cfg = _cfg(
        **{
            "train.num_steps": 3,
            "discriminator.adversarial_weight": 0.1,
            "discriminator.feature_weight": 1.0,
            "checkpoint.every_steps": 3,
        }
    )
    trainer = codec_trainer.CodecTrainer(cfg, sharding.make_mesh(cfg.mesh))
    d0 = jax.device_get(trainer.init_state(cfg.train.seed)["disc_params"])
    result = codec_trainer.train(cfg, str(tmp_path), source=ToneSource(), trainer=trainer)
    d1 = jax.device_get(result.state["disc_params"])
    moved = [
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(d1), strict=True)
    ]
    assert max(moved) > 0, "the discriminator's weights did not change"
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    scalars = [r["scalars"] for r in rows if codec_trainer.DISC_LOSS in r.get("scalars", {})][-1]
    for key in (codec_trainer.DISC_LOSS, codec_trainer.ADV, codec_trainer.FEAT):
        assert np.isfinite(scalars[key]) and scalars[key] > 0, key
    assert sorted(read_loss_history(str(tmp_path))) == [1, 2, 3]


CLI_STEPS = 40


def _codec_cli_args(audio_dir, workdir):
    return [
        "--config=" + os.path.join(REPO, "configs", "codec.py") + ":tiny",
        f"--workdir={workdir}",
        f"--config.data.audio_dir={audio_dir}",
        f"--config.train.num_steps={CLI_STEPS}",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=1000",  # only the preemption save and the last step
        "--config.mesh.data=2",
    ]


@pytest.mark.slow
def test_codec_train_cli_survives_sigterm_and_resumes_bit_for_bit(tmp_path):
    """``audiodiff-codec-train`` under SIGTERM saves the step it is at and exits 0; the same
    command resumes and ends bit for bit where an uninterrupted run ends (the shared loop)."""
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    t = np.arange(8000 * 2) / 8000
    for i, f0 in enumerate((220.0, 330.0, 440.0)):
        sf.write(audio_dir / f"tone{i}.wav", (0.4 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), 8000)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [bin_path("audiodiff-codec-train")]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # The uninterrupted run and the run to interrupt go side by side.
    a = subprocess.Popen([*cmd, *_codec_cli_args(audio_dir, full)], env=env)
    b = subprocess.Popen([*cmd, *_codec_cli_args(audio_dir, resumed)], env=env)
    assert wait_then_sigterm(b, str(resumed), at_step=3) == 0
    assert a.wait(timeout=600) == 0
    ckpts = sorted(int(d) for d in os.listdir(resumed / "checkpoints") if d.isdigit())
    assert len(ckpts) == 1 and 3 <= ckpts[0] < CLI_STEPS, ckpts  # saved on the spot
    subprocess.run([*cmd, *_codec_cli_args(audio_dir, resumed)], env=env, check=True, timeout=600)
    sa, sb = read_state(str(full)), read_state(str(resumed))
    assert int(sa["step"]) == int(sb["step"]) == CLI_STEPS
    assert_trees_equal(sa, sb, "codec state")
    ha, hb = read_loss_history(str(full)), read_loss_history(str(resumed))
    assert sorted(ha) == list(range(1, CLI_STEPS + 1)) and ha == hb
    # The codec's goodput account spans both incarnations (the shared loop's).
    assert len(goodput.load(str(resumed))) == 2 and len(goodput.load(str(full))) == 1


def test_decoder_only_fine_tune_keeps_the_encoder_latents_and_statistics(tmp_path):
    """``train.trainable="decoder"`` from an exported codec: the decoder learns, the encoder
    stays bit for bit (so latents made with the old codec stay valid) and the export keeps
    the old codec's latent statistics."""
    from audiodiff_jax.codec.codec import JaxCodec, export_run
    from audiodiff_jax.core.config import ConfigError

    base_cfg = _cfg()
    params = jax.device_get(model_lib.make_vae(base_cfg.model).init(jax.random.key(3)))
    stats = (np.linspace(-0.1, 0.1, 4).astype(np.float32), np.linspace(0.5, 1.0, 4).astype(np.float32))
    JaxCodec(base_cfg.model, params, latent_mean=stats[0], latent_std=stats[1]).save(str(tmp_path / "base"))
    cfg = _cfg(
        **{
            "train.num_steps": 3,
            "train.init_from": str(tmp_path / "base"),
            "train.trainable": "decoder",
            "checkpoint.every_steps": 3,
        }
    )
    result = codec_trainer.train(cfg, str(tmp_path / "run"), source=ToneSource())
    new = jax.device_get(result.state["params"])
    assert_trees_equal(params["encoder"], new["encoder"], "encoder")
    moved = [
        float(np.abs(a - b).max())
        for a, b in zip(*map(jax.tree.leaves, (params["decoder"], new["decoder"])), strict=True)
    ]
    assert max(moved) > 0, "the decoder did not learn"
    export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    out = load_codec(str(tmp_path / "out"))
    np.testing.assert_array_equal(out.latent_mean, stats[0])
    np.testing.assert_array_equal(out.latent_std, stats[1])
    x = ToneSource().batch(5, 1)[0].T
    np.testing.assert_array_equal(out.encode(x, 8000), load_codec(str(tmp_path / "base")).encode(x, 8000))
    # Freezing the encoder needs a codec to start from; a codec of another layout is named.
    with pytest.raises(ConfigError, match="train.init_from"):
        codec_config.validate(_cfg(**{"train.trainable": "decoder"}))
    with pytest.raises(ConfigError, match="train.trainable"):
        codec_config.validate(_cfg(**{"train.trainable": "encoder"}))
    wrong = _cfg(**{"train.init_from": "default"})
    with pytest.raises(ConfigError, match="do not fit"):
        codec_trainer.CodecTrainer(wrong, sharding.make_mesh(wrong.mesh)).initial_state()


def test_crop_source_balances_subfolders(tmp_path):
    """``data.balance_subfolders``: six short clips in one folder and one long song in
    another give half the crops each (without it, one crop in seven is the song's)."""
    from audiodiff_jax.codec.data import CropSource

    for sub in ("renders", "songs"):
        (tmp_path / sub).mkdir()
    for i in range(6):  # positive levels: renders; negative: the song
        sf.write(tmp_path / "renders" / f"r{i}.wav", np.full(1600, 0.1 + 0.01 * i, np.float32), 8000)
    sf.write(tmp_path / "songs" / "song.flac", np.full(40000, -0.2, np.float32), 8000)

    def song_share(balance):
        src = CropSource(
            str(tmp_path), sample_rate=8000, channels=1, crop_samples=1024, seed=0, balance_subfolders=balance
        )
        crops = np.concatenate([src.batch(step, 64)[:, 0, 0] for step in range(8)])
        return float(np.mean(crops < 0))

    assert 0.43 < song_share(True) < 0.57
    assert 0.08 < song_share(False) < 0.22
