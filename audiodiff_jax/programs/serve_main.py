r"""``audiodiff-serve``: listen to a model in the browser, and run blind A/B tests.

    audiodiff-serve --checkpoint=demo --prompt="marimba and drums in D minor at 114 bpm"
    audiodiff-serve --checkpoint=runs/dit1b --adapters=adapters/mine@0.8 --seconds=30 --steps=25
    audiodiff-serve --ab=exports/teacher --ab=exports/student --ab_prompts=prompts.jsonl \
        --judgements_dir=listening/teacher_vs_student
    audiodiff-serve --ab=sweeps/guidance3 --ab=sweeps/guidance5 --judgements_dir=listening/g3_g5

Restores the weights of ``--checkpoint`` (a run, a step folder, an export, or ``demo``)
once, with ``--adapters`` merged in, and serves a page (Gradio) on
``http://127.0.0.1:7860``: a prompt and negative prompt, seconds, seed, guidance, steps,
sampler, schedule and the other fields of the config's sample section; continuation,
inpainting and variation of an uploaded file. Each song comes back as a player, a
spectrogram, its metrics (tempo, key, loudness, ...) and timings; a program is compiled
once per shape and kept, and the page and the log say whether a song compiled one.
Requests wait in one queue and run in turn. Songs are written to ``--out`` with a row
each in ``served.jsonl``.

With ``--ab=A --ab=B`` (each ``PATH[:STEP][@WEIGHTS][+ADAPTERS]`` or a sweep folder) a
"Blind A/B" tab plays pairs, one song of each source for the same request, in random
order and without labels; every choice (left, right, same) is appended to
``--judgements_dir/judgements.jsonl`` with everything that makes both songs again.
``audiodiff-eval --judgements=DIR`` turns it into win rates with confidence intervals.

Listens on localhost only unless ``--host`` says otherwise (``--host=0.0.0.0`` is
reachable from the network, and says so); open it from another machine through an SSH
tunnel: ``ssh -L 7860:localhost:7860 HOST``. Uploads are limited in size and length;
a bad value, upload or prompt is shown on the page and the server goes on.
"""

from __future__ import annotations

import os
import sys
import threading

from absl import flags, logging

from audiodiff_jax.checkpoints import source
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import names, sharding
from audiodiff_jax.core.errors import UserError
from audiodiff_jax.programs import cli, sample_flags
from audiodiff_jax.sweeps import listening, sweep, warm

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run workdir, step folder, export folder or 'demo': the model of the Generate tab."
)
_STEP = flags.DEFINE_string("step", source.LATEST, "Checkpoint step of --checkpoint (a number or 'latest').")
_ADAPTERS = flags.DEFINE_string(
    "adapters", "", "Adapters stacked on --checkpoint's weights: PATH[@SCALE],... (see audiodiff-sample)."
)
_PROMPT = flags.DEFINE_multi_string(
    "prompt", [], "A caption: the first fills the page; all are the A/B prompts without --ab_prompts."
)
_HOST = flags.DEFINE_string(
    "host", "127.0.0.1", "Address to listen on; 0.0.0.0 makes the page reachable from the network."
)
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on.", lower_bound=1, upper_bound=65535)
_OUT = flags.DEFINE_string("out", "serve_out", "Folder of the songs made (WAVs, spectrograms, served.jsonl).")
_AB = flags.DEFINE_multi_string(
    "ab",
    [],
    "A source of a blind A/B test (give it twice): PATH[:STEP][@WEIGHTS][+ADAPTERS] (a run, an export, "
    "'demo'; e.g. runs/x:4000@ema0.9999, demo+adapters/mine@0.5) or a finished sweep folder.",
)
_AB_PROMPTS = flags.DEFINE_string(
    "ab_prompts", "", "JSONL prompt rows (audiodiff-sample's --prompts_file) for A/B pairs of weights."
)
_AB_SEED = flags.DEFINE_integer(
    "ab_seed", -1, "Seed of the A/B draws (prompt, song seed, sides); -1: random."
)
_JUDGEMENTS_DIR = flags.DEFINE_string(
    "judgements_dir", "", "Folder of judgements.jsonl (the A/B choices); default --out."
)
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_chars", warm.Limits.max_prompt_chars, "Longest prompt accepted.", lower_bound=1
)
_MAX_UPLOAD_MB = flags.DEFINE_float(
    "max_upload_mb", warm.Limits.max_upload_mb, "Largest upload accepted (MB).", lower_bound=0.01
)
_MAX_UPLOAD_S = flags.DEFINE_float(
    "max_upload_seconds",
    warm.Limits.max_upload_seconds,
    "Longest upload accepted (seconds).",
    lower_bound=0.1,
)
_QUEUE = flags.DEFINE_integer("queue_size", 64, "Requests that may wait in the queue.", lower_bound=1)
_MEASURE = flags.DEFINE_bool(
    "measure", True, "Measure every song (tempo, key, loudness...: the eval extra; skipped without it)."
)
_MESH = {
    axis: flags.DEFINE_integer(
        f"mesh_{axis}", getattr(config_lib.MeshConfig(), axis), f"Sampling mesh size of '{axis}'."
    )
    for axis in names.MESH_AXES
}

LOCALHOSTS = ("127.0.0.1", "localhost", "::1")


def _announce(host: str, port: int) -> None:
    if host in LOCALHOSTS:
        logging.info("serve: will listen on http://%s:%d (this machine only)", host, port)
        print(
            f"audiodiff-serve: will listen on http://{host}:{port} (this machine only; from a laptop: "
            f"ssh -L {port}:localhost:{port} THIS_HOST, then open http://localhost:{port})",
            flush=True,
        )
        return
    message = (
        f"will listen on {host}:{port}: the page is reachable from the network, and whoever reaches it "
        "can use the model and add judgements (no login, no TLS); --host=127.0.0.1 and an SSH tunnel "
        "keep it private"
    )
    logging.warning("serve: %s", message)
    print(f"audiodiff-serve: WARNING: {message}", file=sys.stderr, flush=True)


def _ab_prompts() -> list[dict]:
    if not _AB_PROMPTS.value:
        return [{"prompt": p} for p in _PROMPT.value if p.strip()]
    rows, issues = sweep.read_prompts_file(_AB_PROMPTS.value)
    for issue in issues:
        logging.warning("serve: --ab_prompts: %s: %s", issue.where, issue.message)
    if not rows:
        raise UserError(f"--ab_prompts={_AB_PROMPTS.value}: no usable prompt row")
    return [row for _, row in rows]


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if not _CHECKPOINT.value and not _AB.value:
        raise UserError("give --checkpoint (a model to play with), or --ab twice (a blind A/B test), or both")
    if _AB.value and len(_AB.value) != 2:
        raise UserError(f"--ab is given {len(_AB.value)} time(s): an A/B test has two sources")
    try:
        overrides = sample_flags.given()
        config_lib.check_sample_values(overrides, sample_flags.flag_name)
    except ValueError as e:  # ConfigError is one
        raise UserError(str(e)) from e
    step = None if _STEP.value == source.LATEST else _STEP.value
    if step is not None and not step.isdigit():
        raise UserError(f"--step={_STEP.value}: a step number or 'latest'")
    limits = warm.Limits(_MAX_PROMPT.value, _MAX_UPLOAD_MB.value, _MAX_UPLOAD_S.value)
    _announce(_HOST.value, _PORT.value)  # before the minutes a big model may take to load
    mesh = sharding.make_mesh(config_lib.MeshConfig(**{a: f.value for a, f in _MESH.items()}))
    pool = listening.ModelPool(
        os.path.join(_OUT.value, "songs"),
        lock=threading.Lock(),
        overrides=overrides,
        mesh=mesh,
        limits=limits,
        measure=_MEASURE.value,
    )
    model = None
    if _CHECKPOINT.value:
        # Its weight set: --weights, else the one its config samples first.
        spec = listening.SourceSpec(
            _CHECKPOINT.value, _CHECKPOINT.value, int(step) if step else None, adapters=_ADAPTERS.value
        )
        model = pool.open(spec)
    ab = None
    if _AB.value:
        sources = listening.open_sources(_AB.value, pool)
        needs_prompts = not any(isinstance(s, listening.SweepSource) for s in sources)
        ab = listening.ABTest(
            sources,
            os.path.join(_OUT.value, "pairs"),
            _JUDGEMENTS_DIR.value or _OUT.value,
            prompts=_ab_prompts() if needs_prompts else (),
            seed=None if _AB_SEED.value < 0 else _AB_SEED.value,
        )
    # Gradio only phones home (analytics, version checks, Hugging Face telemetry) when
    # asked to: set before it is imported.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.abspath(os.path.join(_OUT.value, "gradio_cache")))
    try:
        from audiodiff_jax.programs import serve_page  # Gradio: the optional, heavy "serve" extra
    except ImportError as e:
        raise UserError(f"the page needs the serve extra: pip install 'audiodiff-jax[serve]' ({e})") from e
    page = serve_page.build(
        model,
        ab,
        limits=limits,
        prompt=_PROMPT.value[0] if _PROMPT.value else "",
    )
    serve_page.launch(
        page,
        host=_HOST.value,
        port=_PORT.value,
        limits=limits,
        queue_size=_QUEUE.value,
        allowed=[os.path.abspath(_OUT.value)],
    )


def run():
    cli.run(main, module=(__name__, sample_flags.__name__))


if __name__ == "__main__":
    run()
