"""Codec configs: ``configs/codec.py:small`` (default), ``:music``, ``:stable`` and ``:tiny``.

    audiodiff-codec-train --config=configs/codec.py:small --workdir=/tmp/codec \
        --config.data.audio_dir=/tmp/renders/train

- ``small``: 22.05 kHz mono, hop 1024 (strides 4x4x8x8), 32 latent channels,
  21.53 latent frames/s, encoder widths 8..128, decoder 16..256 (1.9M parameters).
  Sized for a 2-core CPU: 0.5 s per step at batch 8 x 0.74 s; the shipped default
  (``audiodiff_jax/codec/weights``) is this preset's 6,000 steps (76 minutes).
- ``music``: the ``small`` layout fine-tuned, encoder and decoder, on real produced songs
  and renders (``data.audio_dir`` with ``renders/`` and ``songs/`` subfolders, half the
  crops each), starting from the shipped default (``train.init_from=default``). Its
  latents differ from the default's, so it has its own name (``audiodiff-vae-music``);
  ``load_codec("music")`` opens the shipped one. ``--config.train.trainable=decoder``
  instead keeps the encoder (and so the latents) of the codec it starts from.
- ``stable``: Stable Audio's layout: 44.1 kHz stereo, hop 2048 (strides 2x4x4x8x8),
  64 latent channels, 21.53 Hz, widths 128..2048, discriminator on. Accelerators only.
- ``tiny``: for tests (hop 64, a few thousand parameters).
"""

from audiodiff_jax.codec import config as codec_config

PRESETS = {
    # name: (sample_rate, audio_channels, latent_channels, strides, widths, decoder_width_mult)
    "small": (22050, 1, 32, (4, 4, 8, 8), (8, 16, 32, 64, 128), 2),
    "music": (22050, 1, 32, (4, 4, 8, 8), (8, 16, 32, 64, 128), 2),
    "stable": (44100, 2, 64, (2, 4, 4, 8, 8), (128, 128, 256, 512, 1024, 2048), 1),
    "tiny": (8000, 1, 4, (4, 4, 4), (4, 8, 8, 16), 1),
}


def get_config(arg=None):
    name = arg or "small"
    if name not in PRESETS:
        raise ValueError(f"configs/codec.py:{name}: unknown preset; one of {sorted(PRESETS)}")
    sr, ch, latent, strides, widths, dec_mult = PRESETS[name]
    config = codec_config.default_configdict()
    m = config.model
    m.name = f"audiodiff-vae-{name}"
    m.sample_rate, m.audio_channels, m.latent_channels = sr, ch, latent
    m.strides, m.widths, m.decoder_width_mult = strides, widths, dec_mult
    config.mesh.data = -1
    config.optim.warmup_steps = 100
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.0
    config.optim.ema_decay = 0.99
    config.optim.end_lr_ratio = 0.1
    config.train.log_every = 10
    config.checkpoint.every_steps = 100
    config.checkpoint.keep_last = 2
    if name in ("small", "music"):
        config.data.crop_samples = 16384
        config.data.global_batch_size = 8
        config.optim.warmup_steps = 50
        # A strong waveform term is what makes the decoder learn phase within a CPU
        # budget: with weight 0.1-1 the STFT loss dominates, the output matches the
        # magnitudes only and SI-SDR stays near -50 dB; at 20 a fixed batch reaches
        # +9 dB in 150 steps. Deterministic latents (posterior_noise 0), the KL term
        # only bounding the means: the diffusion model normalizes by the card's stats.
        config.loss.waveform_l1_weight = 20.0
        config.loss.posterior_noise = 0.0
        config.train.num_steps = 6000
        config.checkpoint.every_steps = 250
        if name == "music":
            config.train.init_from = "default"
            config.data.balance_subfolders = True
            config.optim.learning_rate = 3e-4
            config.optim.ema_decay = 0.995
    elif name == "stable":
        config.data.crop_samples = 65536
        config.data.global_batch_size = 32
        config.loss.stft_fft_sizes = (2048, 1024, 512, 256, 128, 64, 32)
        config.optim.learning_rate = 1.5e-4
        config.optim.ema_decay = 0.999
        config.discriminator.adversarial_weight = 0.1
        config.discriminator.feature_weight = 5.0
        config.discriminator.start_step = 5000
        config.discriminator.fft_sizes = (2048, 1024, 512, 256, 128)
        config.discriminator.width = 32
        config.train.num_steps = 500000
        config.checkpoint.every_steps = 5000
    else:  # tiny
        m.dilations = (1, 3)
        m.kernel_size = 5
        config.data.crop_samples = 1024
        config.data.global_batch_size = 8
        config.loss.stft_fft_sizes = (256, 64)
        config.optim.warmup_steps = 2
        config.optim.learning_rate = 1e-2
        config.optim.ema_decay = 0.9
        config.train.num_steps = 10
        config.train.log_every = 2
        config.checkpoint.every_steps = 5
        config.discriminator.fft_sizes = (256, 64)
        config.discriminator.width = 4
        config.discriminator.num_layers = 2
    return config
