"""``make demo``: the main job end to end on the embedded default, on a CPU.

1. Writes latent shards and a tokenizer (``data_pipeline/demo_shards.py``; a
   stand-in generator until the codec and corpus stages land).
2. Trains the ``configs/demo.py`` DiT with the real loop: Grain loader, sharded jitted
   step, async Orbax checkpoints, TensorBoard metrics.
3. Writes ``OUT/report.html``: the loss curve and the run's facts.

Run it again and training resumes from the last checkpoint (and finishes at once if
it already reached the last step).
"""

from __future__ import annotations

import html
import json
import os
import time

from absl import app, flags, logging

_OUT = flags.DEFINE_string("out", "demo_out", "Output folder.")
_STEPS = flags.DEFINE_integer("steps", 0, "Override the demo config's train.num_steps (0 = keep).")


def loss_curve_svg(history: dict[int, float], width: int = 640, height: int = 280) -> str:
    """A plain SVG line plot of loss per step (log scale), no plotting library needed."""
    import math

    steps = sorted(history)
    if len(steps) < 2:
        return "<p>not enough steps to plot</p>"
    losses = [math.log10(max(history[s], 1e-12)) for s in steps]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1
    pad = 40

    def xy(s, v):
        x = pad + (s - steps[0]) / (steps[-1] - steps[0]) * (width - 2 * pad)
        y = height - pad - (v - lo) / (hi - lo) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    pts = " ".join(xy(s, v) for s, v in zip(steps, losses, strict=True))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{pts}"/>'
        f'<text x="{pad}" y="{pad - 10}" font-size="12">loss (log10 scale): '
        f"{10**hi:.3g} .. {10**lo:.3g}</text>"
        f'<text x="{pad}" y="{height - 10}" font-size="12">step {steps[0]}</text>'
        f'<text x="{width - pad - 60}" y="{height - 10}" font-size="12">step {steps[-1]}</text>'
        "</svg>"
    )


def write_report(out: str, workdir: str, cfg, facts: dict) -> str:
    from audiodiff_jax.metrics import read_loss_history

    history = read_loss_history(workdir)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items()
    )
    config_text = html.escape(json.dumps(facts.get("config", {}), indent=1))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>audiodiff-jax demo</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}
th{{text-align:left;padding-right:1em}}</style>
</head><body><h1>audiodiff-jax demo run</h1>
<h2>Training loss</h2>{loss_curve_svg(history)}
<h2>Run</h2><table>{rows}</table>
<p>TensorBoard: <code>tensorboard --logdir {html.escape(os.path.join(workdir, "tensorboard"))}</code></p>
<details><summary>Resolved config</summary><pre>{config_text}</pre></details>
</body></html>"""
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def main(argv):
    del argv
    import jax

    from audiodiff_jax import config as config_lib
    from audiodiff_jax import train
    from configs import demo as demo_config
    from data_pipeline import demo_shards

    out = os.path.abspath(_OUT.value)
    shards_dir = os.path.join(out, "shards")
    workdir = os.path.join(out, "run")
    os.makedirs(out, exist_ok=True)
    cd = demo_config.get_config()
    cd.data.shards_dir = shards_dir
    if _STEPS.value:
        cd.train.num_steps = _STEPS.value
    cfg = config_lib.from_configdict(cd)

    t0 = time.time()
    if not os.path.exists(os.path.join(shards_dir, "dataset_card.json")):
        logging.info("[1/3] writing demo latent shards to %s", shards_dir)
        demo_shards.write_demo_shards(
            shards_dir,
            num_clips=256,
            latent_channels=cfg.model.latent_channels,
            num_shards=4,
            seed=0,
            vocab_size=cfg.model.text.vocab_size,
        )
    else:
        logging.info("[1/3] demo shards already in %s", shards_dir)
    logging.info("[2/3] training configs/demo.py for %d steps in %s", cfg.train.num_steps, workdir)
    result = train.train(cfg, workdir)
    logging.info("[3/3] writing the report")
    facts = {
        "final step": result.final_step,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "parameters": sum(x.size for x in jax.tree.leaves(result.state.params)),
        "wall time (s)": round(time.time() - t0, 1),
        "checkpoints": os.path.join(workdir, "checkpoints"),
        "config": json.loads(config_lib.to_json(cfg)),
    }
    path = write_report(out, workdir, cfg, facts)
    print(f"demo done in {time.time() - t0:.0f}s: report {path}, checkpoints in {workdir}/checkpoints")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
