"""Benchmark of sampling: real-time factor of the denoising loop and of decoding.

    python benchmarks/sample_bench.py --config=configs/dit.py:1B --seconds=300 --steps=50 \
        --guidance=5 --sampler=dpmpp_2m --batch=1

Builds the model of ``--config`` with random weights (no checkpoint needed; the loop's
cost does not depend on the weights), directly sharded on a mesh of all devices
(``--config.mesh.*``), and times the sampling program ``audiodiff-sample`` runs
(``generation.SampleProgram``: the whole sampler loop of ``audiodiff_jax/sampling.py``)
for a song of ``--seconds`` at the config's latent rate (``--latent_rate``, 21.5 Hz by
default), in one pass (the DESIGN.md target: 5-minute song, DiT-1B, 50 steps with
guidance, <= 5 s on one H100). Compilation is excluded (one untimed run first).
With ``--codec=NAME`` (``audiodiff_jax.codec.load_codec``) it also times decoding
the latents to audio. Prints one JSON line; record it in BENCHMARKS.md with the
command and the machine.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from audiodiff_jax import config as config_lib
from audiodiff_jax import generation, sampling, sharding
from audiodiff_jax.codec import load_codec
from audiodiff_jax.data.batch import Conditioning
from audiodiff_jax.model import count_params, make_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_SECONDS = flags.DEFINE_float("seconds", 300.0, "Song length.")
_LATENT_RATE = flags.DEFINE_float("latent_rate", 44100 / 2048, "Latent frames per second.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_SAMPLER = flags.DEFINE_string("sampler", "dpmpp_2m", "Sampler.")
_GUIDANCE = flags.DEFINE_float("guidance", 5.0, "CFG scale (1 = no guidance: half the model calls).")
_BATCH = flags.DEFINE_integer("batch", 1, "Songs per batch (rounded up to the mesh's data x fsdp).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (the median is reported).")
_CODEC = flags.DEFINE_string("codec", "", "Codec name for load_codec; empty = no decode timing.")


def main(argv):
    del argv
    cfg = config_lib.from_configdict(_CONFIG.value)
    config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    model = make_model(cfg.model)
    shardings = sharding.named_shardings(model.logical_axes(), mesh)
    params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
    frames = int(round(_SECONDS.value * _LATENT_RATE.value))
    batch, frames_pad = generation.padded_shape(mesh, _BATCH.value, frames)
    c, max_len = cfg.model.latent_channels, cfg.model.text.max_len
    use_cfg = _GUIDANCE.value != 1.0
    grid = sampling.time_grid(_STEPS.value, shift=cfg.diffusion.schedule_shift)
    # The program audiodiff-sample runs (generation.SampleProgram), for one window of the whole song.
    program = generation.SampleProgram(
        _SAMPLER.value, _STEPS.value, batch, frames_pad, frames, use_cfg, False
    )
    rows = lambda x: np.asarray(x)
    cond = Conditioning(
        tokens=np.full((batch, max_len), 5, np.int32),
        seconds_start=np.zeros((batch,), np.float32),
        seconds_total=np.full((batch,), _SECONDS.value, np.float32),
        num_frames=np.full((batch,), frames, np.int32),
    )
    inputs = generation.SampleInputs(
        uncond_tokens=np.zeros((batch, max_len), np.int32),
        scale=np.full((batch,), _GUIDANCE.value, np.float32),
        rescale=np.zeros((batch,), np.float32),
        keys_data=rows(jax.random.key_data(jax.vmap(jax.random.key)(jnp.arange(batch)))),
        times=np.tile(grid, (batch, 1)),
        eta=np.zeros((batch,), np.float32),
        init=np.zeros((batch, frames_pad, c), np.float32),
        known=np.zeros((batch, frames_pad, c), np.float32),
        known_mask=np.zeros((batch, frames_pad), np.float32),
    )
    _, abstract_cond, abstract_inputs = program.abstract_args(cfg, None, mesh)
    to_device = lambda tree, like: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), tree, like)
    cond, inputs = to_device(cond, abstract_cond), to_device(inputs, abstract_inputs)
    with jax.set_mesh(mesh):
        fn = jax.jit(program.fn(model.apply), out_shardings=program.out_shardings(mesh))
        t0 = time.perf_counter()
        out = fn(params, cond, inputs).block_until_ready()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(_REPEATS.value):
            t0 = time.perf_counter()
            out = fn(params, cond, inputs).block_until_ready()
            times.append(time.perf_counter() - t0)
    loop_s = float(np.median(times))
    result = {
        "preset": cfg.model.preset,
        "params_M": round(count_params(params) / 1e6, 2),
        "seconds": _SECONDS.value,
        "frames": frames,
        "steps": _STEPS.value,
        "sampler": _SAMPLER.value,
        "cfg": use_cfg,
        "model_evals": _STEPS.value * sampling.EVALS_PER_STEP[_SAMPLER.value] * (2 if use_cfg else 1),
        "batch": batch,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "mesh": dict(mesh.shape),
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attention,
        "compile_s": round(compile_s, 2),
        "loop_s": round(loop_s, 4),
        "loop_realtime_factor": round(_SECONDS.value * batch / loop_s, 2),
    }
    if _CODEC.value:
        codec = load_codec(_CODEC.value)
        latents = np.asarray(out[0, :frames])
        codec.decode(latents)  # warm-up (compilation)
        t0 = time.perf_counter()
        codec.decode(latents)
        decode_s = time.perf_counter() - t0
        result.update(decode_s=round(decode_s, 4), decode_realtime_factor=round(_SECONDS.value / decode_s, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
