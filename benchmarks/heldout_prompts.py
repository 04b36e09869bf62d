r"""The demo's measure of learning on any checkpoint step: songs for the 24 held-out
prompt pairings of the prompted corpus, measured against what each prompt asks.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/heldout_prompts.py \
        --checkpoint=/tmp/pre/run2 --step=2000 --out=/tmp/heldout_2000 [--guidance=7] [--trained]

Samples one song per prompt (``data_pipeline.corpus_prompts.held_out_prompts``; with
``--trained``, 12 pairings the corpus does train on, at 80 and 162 bpm) from the step's
EMA weights with the demo's sampler settings (a distilled student with its own steps),
then measures key, tempo and onsets with the built-in evaluation
(``launch/demo_prompts.py``). Prints one line per song and the accuracies; the folder
holds the WAVs, ``metrics.jsonl`` and the sweep's report page. This is how the
pretraining progress table in BENCHMARKS.md ("make demo end to end") was made.
"""

from __future__ import annotations

import time

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run workdir, checkpoint step or export.", required=True
)
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint step (or latest).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_GUIDANCE = flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale.")
_SECONDS = flags.DEFINE_float("seconds", 12.0, "Seconds per song.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every song.")
_WEIGHTS = flags.DEFINE_string("weights", "ema", "Weight set (raw, ema, ema<decay>).")
_TRAINED = flags.DEFINE_bool("trained", False, "Ask for trained pairings at 80 and 162 bpm instead.")
_ORDER = flags.DEFINE_bool(
    "order",
    False,
    "Models with the tempo control: 12 pairings without a tempo in the caption, at 80 and 162 bpm.",
)


def prompts(trained: bool, controls: bool = False) -> list:
    from data_pipeline import corpus_prompts as cp
    from launch import demo_prompts

    if not trained:
        return demo_prompts.held_out_rows(controls)
    out = []
    for k in range(0, 24, 3):
        for tempo in (cp.TEMPOS[0], cp.TEMPOS[-1]):
            choice = cp.Choice(k // 2, cp.MODES[k % 2], tempo, 0, "piano")
            if not cp.is_held_out(choice):
                out.append(choice.caption())
    return out[:12]


def main(argv):
    del argv
    from audiodiff_jax.checkpoints import source
    from audiodiff_jax.codec import load_codec
    from audiodiff_jax.evaluation import evaluate_folder
    from audiodiff_jax.sweeps import sweep
    from launch import demo_prompts

    t = time.time()
    cfg = source.WeightsSource(source.resolve(_CHECKPOINT.value)).cfg
    controls = bool(cfg.model.controls)
    # A distilled student samples with its own steps (its config's sample section).
    steps = {} if cfg.model.guidance_input else {"steps": 50, "sampler": "dpmpp_2m"}
    rows = demo_prompts.tempo_order_rows() if _ORDER.value else prompts(_TRAINED.value, controls)
    result = sweep.generate_songs(
        _CHECKPOINT.value,
        rows,
        _OUT.value,
        seconds=_SECONDS.value,
        seeds=(_SEED.value,),
        guidance=_GUIDANCE.value,
        **steps,
        codec=load_codec("default"),
        weights=(_WEIGHTS.value,),
        checkpoint_steps=[_STEP.value],
        batch_size=8,
    )
    if _ORDER.value:
        share, pairs = demo_prompts.tempo_order(evaluate_folder(_OUT.value, transcribe=False).rows)
        for prompt, slow, fast in pairs:
            print(
                f"{prompt} | 80 bpm -> {slow:.1f} | 162 bpm -> {fast:.1f} | "
                + ("ok" if fast > slow else "wrong")
            )
        print(f"tempo order: {share:.0%} of {len(pairs)} pairs (target 80%); {time.time() - t:.0f} s")
        return
    rows, acc = demo_prompts.measure(_OUT.value)
    for r in rows:
        print(
            f"{r.prompt} | key {r.key_measured} {'ok' if r.key_ok else 'wrong'} | "
            f"tempo {r.tempo_measured:.1f} {'ok' if r.tempo_ok else 'wrong'} | onsets/s {r.onset_rate:.2f}"
        )
    for name, text in demo_prompts.verdicts(acc).items():
        print(f"{name}: {text}")
    print(f"{len(result.rows)} songs, {len(result.issues)} issues, {time.time() - t:.0f} s")


if __name__ == "__main__":
    app.run(main)
