"""Every sampler on every time grid, at equal model evaluations: error and convergence order.

Two cases:

* **Gaussian**: data ``x ~ N(MU, S^2)`` per element, whose exact v-prediction is closed
  form; the probability-flow ODE maps the start noise ``n`` to ``MU + S n`` exactly, so
  a deterministic sampler's error has no Monte Carlo part.
* **Trained model**: a DiT trained here on the demo shards (or ``--checkpoint``), through
  the CLI's own ``generation.Generator``; the reference is Heun on the log-SNR grid at
  ``--ref_nfe`` evaluations from the same start noise.

Error = RMS over all latent elements against the reference; order = slope of
log(error) against log(evaluations) from 16 to 128 evaluations. Writes JSON and a
Markdown table (BENCHMARKS.md, "Samplers and time grids").

    JAX_PLATFORMS=cpu python benchmarks/sampler_table.py --out=benchmarks/results/sampler_table.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from audiodiff_jax.core import config as config_lib
from audiodiff_jax.diffusion import objective, samplers
from audiodiff_jax.sampling import generation
from audiodiff_jax.sampling.generation import SampleParams
from audiodiff_jax.training import dit_trainer

_OUT = flags.DEFINE_string("out", "benchmarks/results/sampler_table.json", "JSON output")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "a trained run to measure (default: train a tiny one)")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "steps of the tiny model trained when no checkpoint")
_REF_NFE = flags.DEFINE_integer("ref_nfe", 512, "evaluations of the trained model's reference")
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "guidance scale on the trained model")

NFES = (8, 16, 32, 64, 128)
MU, S = 0.7, 0.4


def gaussian_v(z, t):
    a, s = objective.alpha_sigma(t)
    a, s = a[:, None, None], s[:, None, None]
    var = a * a * S * S + s * s
    x = MU + a * S * S / var * (z - a * MU)
    eps = s * (z - a * MU) / var
    return a * eps - s * x


def gaussian_errors() -> dict:
    rows, frames, channels = 8, 256, 8
    keys = jax.vmap(jax.random.key)(jnp.arange(rows))
    exact = MU + S * samplers.row_noise(keys, samplers.STREAM_INIT, 0, (frames, channels), frames)
    out = {}
    for method in samplers.SAMPLERS:
        for schedule in samplers.SCHEDULES:
            errs = {}
            for nfe in NFES:
                steps = nfe // samplers.EVALS_PER_STEP[method]
                ts = jnp.asarray(np.tile(samplers.time_grid(steps, schedule=schedule), (rows, 1)))
                z = jax.jit(
                    lambda ts, method=method: samplers.sample(
                        gaussian_v, jnp.zeros((rows, frames, channels)), ts, keys, method=method
                    )
                )(ts)
                errs[nfe] = float(jnp.sqrt(jnp.mean(jnp.square(z - exact))))
            out[f"{method}/{schedule}"] = errs
    return out


def trained_errors(checkpoint: str) -> dict:
    gen = generation.open_generator(checkpoint)[0]
    seconds = gen.window / gen.latent_rate  # one window: the one-pass program
    base = dict(prompt="a calm piano melody", seconds=seconds, guidance=_GUIDANCE.value)

    def run(method, schedule, nfe):
        steps = nfe // samplers.EVALS_PER_STEP[method]
        rows = [
            SampleParams(seed=s, steps=steps, sampler=method, schedule=schedule, **base) for s in range(8)
        ]
        return np.stack(gen.generate_latents(rows).latents)

    ref = run("heun", "logsnr", _REF_NFE.value)
    out = {}
    for method in samplers.SAMPLERS:
        for schedule in samplers.SCHEDULES:
            out[f"{method}/{schedule}"] = {
                nfe: float(np.sqrt(np.mean(np.square(run(method, schedule, nfe) - ref)))) for nfe in NFES
            }
    return out


def order(errs: dict) -> float:
    x = np.log([n for n in NFES if n >= 16])
    y = np.log([max(errs[n], 1e-12) for n in NFES if n >= 16])
    return float(-np.polyfit(x, y, 1)[0])


def table(title: str, results: dict) -> str:
    head = "| sampler / grid | " + " | ".join(f"{n} evals" for n in NFES) + " | order |"
    lines = [f"**{title}** (RMS error)", "", head, "|" + "---|" * (len(NFES) + 2)]
    best_at = {n: min(results, key=lambda k, n=n: results[k][n]) for n in NFES}
    for key, errs in results.items():
        cells = [f"**{errs[n]:.2e}**" if best_at[n] == key else f"{errs[n]:.2e}" for n in NFES]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {order(errs):.2f} |")
    return "\n".join(lines)


def _train_tiny(root: str) -> str:
    from configs import tiny  # noqa: PLC0415
    from data_pipeline import demo_shards  # noqa: PLC0415 (benchmarks may use the data pipeline)

    shards = os.path.join(root, "shards")
    demo_shards.write_demo_shards(
        shards, num_clips=64, latent_channels=8, num_shards=1, seed=0, vocab_size=256
    )
    cd = tiny.get_config()
    cd.data.shards_dir = shards
    cfg = config_lib.from_configdict(cd)
    cfg = config_lib.replace(
        cfg,
        **{
            "train.num_steps": _TRAIN_STEPS.value,
            "checkpoint.every_steps": _TRAIN_STEPS.value,
            "optim.learning_rate": 3e-3,
            "train.log_every": 50,
        },
    )
    dit_trainer.train(cfg, os.path.join(root, "run"))
    return os.path.join(root, "run")


def main(argv):
    del argv
    t0 = time.time()
    gauss = gaussian_errors()
    print(table("Gaussian data, exact denoiser", gauss), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _CHECKPOINT.value or _train_tiny(tmp)
        trained = trained_errors(checkpoint)
    print(
        table(
            f"Trained model ({_CHECKPOINT.value or 'tiny, ' + str(_TRAIN_STEPS.value) + ' steps'})", trained
        )
    )
    result = {
        "machine": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "nfes": list(NFES),
        "gaussian": gauss,
        "trained": trained,
        "orders": {
            "gaussian": {k: order(v) for k, v in gauss.items()},
            "trained": {k: order(v) for k, v in trained.items()},
        },
        "seconds": time.time() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {_OUT.value} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
