"""Production DiT presets on Stable Audio-style latents (64 channels at 21.5 Hz).

    audiodiff-train --config=configs/dit.py:1B --workdir=gs://BUCKET/runs/dit1b \
        --config.data.shards_dir=gs://BUCKET/latents/corpus

ARG is a size preset of ``audiodiff_jax/model/presets.py``: S, B, L, XL, 1B or 3B.
Sequences are 5-minute windows (6,460 frames at 21.5 Hz); compute in bf16 with fp32
params, blocks run as one lax.scan, FSDP over all devices of a slice, data parallel
across slices. The model takes masked context (``model.masked_context``: known clean
latents and their mask), so long songs, continuations and inpainting work from the start.
"""

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.model import presets


def get_config(arg="B"):
    arg = arg or "B"
    config = config_lib.default_configdict()
    presets.apply_preset(config.model, arg)
    config.model.latent_channels = 64
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat = "dots_with_no_batch_dims_saveable"
    config.model.scan_layers = True  # one compiled block: pod-size AOT compiles in minutes
    config.model.text.vocab_size = 8192
    config.model.text.max_len = 128
    # Songs longer than the window are made window by window, each conditioned on the
    # frames it inherits; continuation and inpainting need it too. A share of rows
    # (diffusion.context_none_prob) still trains with no context, for plain generation.
    config.model.masked_context = True
    config.diffusion.timestep_sampling = "logit_normal"
    config.diffusion.schedule_shift = 3.0
    config.data.window_frames = 6460
    config.data.global_batch_size = 256
    config.data.worker_count = 4
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.optim.learning_rate = 1e-4
    config.optim.warmup_steps = 2000
    config.optim.weight_decay = 0.01
    config.optim.ema_decay = 0.9999
    config.train.num_steps = 500_000
    config.train.log_every = 100
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep_last = 3
    config.checkpoint.keep_every = 50_000
    return config
