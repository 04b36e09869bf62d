"""The sampling program on a real (tiny) checkpoint: meshes, determinism, edits, sweeps, report.

One module fixture trains ``configs/tiny.py`` for 2 steps with the real loop; the codec
is a small deterministic linear one defined here (each latent frame is a mix of fixed
sinusoids), standing in for the shipped codec.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from audiodiff_jax.checkpoints import source
from audiodiff_jax.compilation import aot
from audiodiff_jax.core import config as config_lib
from audiodiff_jax.core import profiler, sharding
from audiodiff_jax.core.config import MeshConfig
from audiodiff_jax.data.cards import CodecCard
from audiodiff_jax.sampling import generation
from audiodiff_jax.sweeps import sweep
from audiodiff_jax.training import dit_trainer
from tests.helpers import REPO, bin_path, tiny_config, write_shards

SR, HOP = 22050, 1024
SECONDS = 1.0  # 22 frames: short songs keep the tests fast


class LinearCodec:
    """Framewise linear codec: frame audio = latents @ basis (sinusoids), encode = least squares."""

    def __init__(self, channels: int = 8):
        self.card = CodecCard("synthetic-demo", SR, 1, HOP, SR / HOP, channels)
        n = np.arange(HOP)
        freqs = 110.0 * 2 ** (np.arange(channels) / 2)
        self.basis = (0.05 * np.sin(2 * np.pi * freqs[:, None] * n[None, :] / SR)).astype(np.float32)
        self.pinv = np.linalg.pinv(self.basis).astype(np.float32)

    def encode(self, audio, sample_rate):
        assert sample_rate == SR
        x = np.asarray(audio, np.float32).mean(axis=0)
        frames = x.shape[0] // HOP
        return x[: frames * HOP].reshape(frames, HOP) @ self.pinv

    def decode(self, latents):
        return (np.asarray(latents, np.float32) @ self.basis).reshape(1, -1)


def make_codec():
    return LinearCodec()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    shards = write_shards(str(tmp_path_factory.mktemp("shards")), num_clips=16)
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_config(
        shards, **{"train.num_steps": 2, "checkpoint.every_steps": 2, "optim.learning_rate": 3e-2}
    )
    dit_trainer.train(cfg, workdir)
    return workdir


def mesh_of(n, **axes):
    return sharding.make_mesh(MeshConfig(**{"data": 1, **axes}), devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def gen(run_dir):
    return generation.open_generator(run_dir, LinearCodec(), mesh=mesh_of(2, data=2), min_seconds=0.5)[0]


def P(prompt="a slow piano piece in C minor", **kw):
    kw.setdefault("seconds", SECONDS)
    kw.setdefault("steps", 3)
    return generation.SampleParams(prompt, **kw)


def test_checkpoint_restores_on_another_mesh_and_samples_the_same(run_dir, gen):
    p = [P(seed=1, guidance=3.0), P("fast jazz trumpet", seed=2, guidance=3.0)]
    a = gen.generate_latents(p)
    # 4 devices: frames split over "sequence", heads over "tensor"; the whole song in one pass.
    other = generation.open_generator(
        run_dir, LinearCodec(), mesh=mesh_of(4, sequence=2, tensor=2), min_seconds=0.5
    )[0]
    b = other.generate_latents(p)
    assert a.latents[0].shape == (22, 8) and a.windows == 1
    for x, y in zip(a.latents, b.latents, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    assert np.abs(a.latents[0] - a.latents[1]).max() > 1e-3  # different prompt and seed
    raw = generation.open_generator(
        run_dir, LinearCodec(), mesh=mesh_of(2, data=2), use_ema=False, min_seconds=0.5
    )[0]
    assert np.abs(raw.generate_latents(p).latents[0] - a.latents[0]).max() > 1e-4  # EMA != raw weights


def test_tokenizer_travels_with_the_checkpoint(run_dir, gen, tmp_path):
    """Sampling needs only the checkpoint: its ``tokenizer`` item stands in for the
    shards folder (gone here), and a corrupt copy is refused by name."""
    import json
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    step_dir, _ = source.find_checkpoint(str(moved), None)
    (cfg_file,) = [f for f in (step_dir / "config").iterdir() if f.read_text().startswith('{"model"')]
    saved = json.loads(cfg_file.read_text())
    saved["data"]["shards_dir"] = str(tmp_path / "no_such_shards")
    saved["data"]["tokenizer"] = ""
    cfg_file.write_text(json.dumps(saved))
    other = generation.open_generator(str(moved), LinearCodec(), mesh=mesh_of(2, data=2), min_seconds=0.5)[0]
    assert other.tokenizer.model_bytes == gen.tokenizer.model_bytes
    p = [P(seed=4, guidance=2.0)]
    np.testing.assert_array_equal(other.generate_latents(p).latents[0], gen.generate_latents(p).latents[0])

    (tok_file,) = [f for f in (step_dir / "tokenizer").iterdir() if '"model_base64"' in f.read_text()]
    item = json.loads(tok_file.read_text())
    item["model_base64"] = item["model_base64"][:-8] + "AAAAAAA="
    tok_file.write_text(json.dumps(item))
    with pytest.raises(generation.GenerationError, match="tokenizer.*sha256"):
        generation.open_generator(str(moved), LinearCodec(), mesh=mesh_of(2, data=2), min_seconds=0.5)[0]


def test_same_seed_same_latents_whatever_shares_the_batch(gen):
    p = P(seed=7, guidance=2.0, sampler="ddim", eta=0.5)
    a = gen.generate_latents([p, P("organ", seed=1, guidance=4.0, sampler="ddim")], batch_size=4).latents[0]
    b = gen.generate_latents([P("harp", seed=3, guidance=6.0, sampler="ddim"), p], batch_size=4).latents[1]
    c = gen.generate_latents([p], batch_size=4).latents[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_long_song_goes_window_by_window(gen):
    # 3 s = 65 frames > the 32-frame training window: windows at 0, 24 and 33.
    res = gen.generate_latents([P(seconds=3.0, seed=4)])
    assert res.windows == 3 and res.latents[0].shape == (65, 8)
    assert np.isfinite(res.latents[0]).all()
    one_pass = generation.open_generator(
        gen.checkpoint, gen.codec, mesh=gen.mesh, window_frames=0, min_seconds=0.5
    )[0]
    assert one_pass.generate_latents([P(seconds=3.0, seed=4)]).windows == 1


def test_compilation_is_timed_apart_from_sampling(gen):
    """A new program is compiled ahead of its first call and its time reported apart, so
    the sampling time (and a sweep's real-time factor) never includes compilation."""
    p = P(seconds=1.2, seed=3)  # a length no other test uses: a new program
    cold, warm = gen.generate_latents([p]), gen.generate_latents([p])
    assert cold.compiled and cold.compile_s > 0
    assert not warm.compiled and warm.compile_s == 0
    np.testing.assert_array_equal(cold.latents[0], warm.latents[0])


def test_audiodiff_compile_compiles_the_program_the_generator_runs(gen):
    s = gen.cfg.sample  # the defaults audiodiff-compile takes: first sampler, steps, guidance
    gen.generate_latents(
        [P(seconds=3.0, seed=4, steps=s.steps[0], sampler=s.samplers[0], guidance=s.guidance[0])]
    )
    program = aot.sample_program(gen.cfg, gen.mesh, songs=1, frames=gen.window)
    assert program.known and program in gen._fns  # a window after the first: overlap known


def test_continuation_inpainting_variation(gen):
    rng = np.random.default_rng(0)
    audio = gen.codec.decode(rng.normal(size=(44, 8)).astype(np.float32))  # 2 s of "music"
    src = gen.codec.encode(audio, SR)
    # Continuation: the first 2 s are the prompt audio exactly, the rest is new.
    cont = gen.generate_latents([P(seconds=3.0, seed=1)], edit=gen.continuation(audio, SR)).latents[0]
    np.testing.assert_allclose(cont[:44], src, atol=1e-4)
    # Inpainting seconds [0.5, 1.5): frames outside are kept, inside regenerated.
    inp = gen.generate_latents([P(seconds=2.0, seed=1)], edit=gen.inpainting(audio, SR, 0.5, 1.5)).latents[0]
    a, b = gen.frames_for(0.5), gen.frames_for(1.5)
    np.testing.assert_allclose(inp[:a], src[:a], atol=1e-4)
    np.testing.assert_allclose(inp[b:], src[b : inp.shape[0]], atol=1e-4)
    assert np.abs(inp[a:b] - src[a:b]).max() > 0.1
    # Variation: low strength stays near the source, full strength does not.
    var = gen.variation(audio, SR)
    near = gen.generate_latents([P(seconds=2.0, strength=0.05)], edit=var).latents[0]
    far = gen.generate_latents([P(seconds=2.0, strength=1.0)], edit=var).latents[0]
    n = near.shape[0]
    assert np.abs(near - src[:n]).mean() < 0.25 * np.abs(far - src[:n]).mean()


def test_bad_inputs_are_named(run_dir, tmp_path, gen):
    with pytest.raises(generation.GenerationError, match="does not exist"):
        generation.open_generator(str(tmp_path / "nope"), LinearCodec())[0]
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir(parents=True)
    with pytest.raises(
        generation.GenerationError, match=r"no complete checkpoint.*unfinished saves: 5\.orbax"
    ):
        generation.open_generator(str(empty), LinearCodec())[0]
    with pytest.raises(generation.GenerationError, match=r"step 99 is not in .*complete steps: \[2\]"):
        source.find_checkpoint(run_dir, 99)
    # A step folder that lost its state item, and one whose weights are damaged.
    half = tmp_path / "half" / "checkpoints"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "2"), half / "2")
    shutil.rmtree(half / "2" / "state")
    with pytest.raises(generation.GenerationError, match=r"incomplete.*missing item\(s\) \['state'\]"):
        generation.open_generator(str(half.parent), LinearCodec())[0]
    broken = tmp_path / "broken" / "checkpoints"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "2"), broken / "2")
    for root, _, files in os.walk(broken / "2" / "state"):
        for f in files:
            if f not in ("commit_success.txt",):
                open(os.path.join(root, f), "wb").close()  # truncate every data file
    with pytest.raises(generation.GenerationError, match=r"could not (restore|read) the weights"):
        generation.open_generator(str(broken.parent), LinearCodec(), mesh=mesh_of(1))[0]
    with pytest.raises(generation.GenerationError, match=r"latent_channels=4 but checkpoint .* 8-channel"):
        generation.open_generator(run_dir, LinearCodec(channels=4))[0]
    for bad, pattern in [
        (P(seconds=0.1), r"seconds=0.1 is out of range \[0.5, 300\]"),
        (P(seconds=301.0), "seconds=301.0 is out of range"),
        (P(prompt="  "), "prompt='  ' is empty"),
        (P(sampler="plms"), "sampler='plms'"),
        (P(guidance_rescale=2.0), "guidance_rescale=2.0"),
    ]:
        with pytest.raises(generation.GenerationError, match=pattern):
            gen.check(bad)


def _sweep(gen, out, prompts_file, **kw):
    rows, issues = sweep.read_prompts_file(prompts_file)
    grid = sweep.Grid(guidance=(1.0, 3.0), steps=(2,), samplers=("ddim",), seeds=(0, 1), seconds=(SECONDS,))
    return sweep.run_sweep(gen, sweep.expand_grid(rows, grid), str(out), issues=issues, batch_size=2, **kw)


def _no_timings(path):
    return [{k: v for k, v in json.loads(line).items() if k != "timings"} for line in open(path)]


@pytest.fixture(scope="module")
def sweep_out(gen, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a slow piano piece"}\n'
        '{"prompt": "fast jazz trumpet", "seconds": 1.5, "seed": 9}\n'
        '{"prompt": ""}\n'
        '{"prompt": "harp", "tempo": 3}\n'
        "not json\n"
        '{"prompt": "cello", "seconds": 900}\n'
    )
    full = _sweep(gen, tmp / "full", prompts, evaluate=True)
    return tmp, prompts, full


def test_sweep_reports_bad_rows_and_goes_on(sweep_out):
    tmp, prompts, full = sweep_out
    # 2 good rows: 2 guidance x 2 seeds, and 2 guidance x its own seed.
    assert len(full.rows) == 6 and full.generated == 6
    msgs = {i.where.rsplit(":", 1)[1]: i.message for i in full.issues}
    assert "prompt is empty" in msgs["3"]
    assert "unknown field(s) ['tempo']" in msgs["4"]
    assert "not valid JSON" in msgs["5"]
    assert "seconds=900.0 is out of range" in msgs["6"] and len(msgs) == 4
    row = full.rows[0]
    for key in ("prompt", "seed", "guidance", "steps", "sampler", "checkpoint_step", "weights", "timings"):
        assert key in row
    assert {r["seconds"] for r in full.rows} == {1.0, 1.5}
    # A song is exactly as long as asked, to the sample (whole latent frames overshoot).
    for row in full.rows:
        audio, sr = sf.read(str(tmp / "full" / row["file"]))
        assert sr == SR and len(audio) == round(row["seconds"] * SR), (row["seconds"], len(audio))
        assert row["audio_seconds"] == pytest.approx(row["seconds"], abs=1 / SR)


def test_sweep_interrupted_and_rerun_equals_uninterrupted(gen, sweep_out):
    tmp, prompts, full = sweep_out

    def stop_after_two(done):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(gen, tmp / "resumed", prompts, on_batch_done=stop_after_two)
    assert len(open(tmp / "resumed" / generation.MANIFEST).readlines()) == 4
    with open(tmp / "resumed" / generation.MANIFEST, "a") as f:
        f.write('{"id": "torn')  # a write cut by the interruption
    again = _sweep(gen, tmp / "resumed", prompts)
    assert again.generated == 2
    assert _no_timings(tmp / "full" / generation.MANIFEST) == _no_timings(
        tmp / "resumed" / generation.MANIFEST
    )
    for row in full.rows:
        for key in ("file", "spectrogram"):
            a = (tmp / "full" / row[key]).read_bytes()
            assert a == (tmp / "resumed" / row[key]).read_bytes(), row[key]
    assert _sweep(gen, tmp / "resumed", prompts).generated == 0  # all done: nothing to redo


def test_report_page_in_headless_chromium(sweep_out, tmp_path):
    tmp, _, full = sweep_out
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed: apt-get update && apt-get install -y chromium")
    page = tmp / "full" / "report.html"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--mute-audio",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    n = len(full.rows)
    assert dom.count("<audio") == n and dom.count('class="spec"') == n
    assert f'data-images-ok="{n}"' in dom, "spectrogram PNGs did not decode in the browser"
    assert f'data-audio-ok="{n}"' in dom, "WAV files did not load in the audio players"
    assert "Problems (4)" in dom and "prompts.jsonl:4" in dom
    # The evaluation section (every song measured at the end of the sweep): a metrics row
    # per song and the metrics plotted against the grid axis that varies (guidance).
    assert f'data-songs="{n}"' in dom and dom.count("<tr data-id=") == n
    assert 'data-axis="guidance"' in dom
    metrics = [json.loads(line) for line in open(tmp / "full" / "metrics.jsonl")]
    assert sorted(m["id"] for m in metrics) == sorted(r["id"] for r in full.rows)
    assert all(np.isfinite(m["lufs"]) for m in metrics if m.get("lufs") is not None)


def test_cli_writes_songs_and_rejects_bad_input(run_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    base = [sys.executable, "-m", "audiodiff_jax.programs.sample_main", f"--checkpoint={run_dir}"]
    base += ["--codec=tests.test_generation:make_codec"]
    # No --seconds, --steps, --min_seconds: the sample section of configs/tiny.py,
    # saved in the checkpoint, gives them (1 s, 2 steps, 0.5 s).
    ok = subprocess.run(
        base + [f"--out={tmp_path / 'o'}", "--prompt=a slow harp", "--seeds=0,1", "--profile_songs=1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "o" / generation.MANIFEST)]
    assert [r["seed"] for r in rows] == [0, 1] and all((tmp_path / "o" / r["file"]).exists() for r in rows)
    assert {(r["seconds"], r["steps"]) for r in rows} == {(1.0, 2)}
    assert (tmp_path / "o" / "report.html").exists()
    # --profile_songs=1: the batch that made the first song, traced for the profile plugin,
    # with the compilation, the denoising window and the decoding marked.
    (trace,) = profiler.xplane_files(str(tmp_path / "o" / "profile"))
    assert trace.parent.name == "sample_first_1_songs"
    marks = {e.name for p in profiler.load(trace).planes for line in p.lines for e in line.events}
    assert {"compile_sampling_program", "sample_window", "decode"} <= marks
    bad = subprocess.run(
        base + [f"--out={tmp_path / 'b'}", "--prompt= ", "--seconds=1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert bad.returncode == 2 and "prompt is empty" in bad.stderr, bad.stderr[-2000:]
    # Without --codec the dataset card's codec is looked up; it is not on this machine
    # (synthetic-demo shards): one line naming it and the flag, exit 2, nothing written.
    no_codec = subprocess.run(
        [a for a in base if not a.startswith("--codec")] + [f"--out={tmp_path / 'c'}", "--prompt=a harp"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert no_codec.returncode == 2, no_codec.stderr[-2000:]
    assert "'synthetic-demo'" in no_codec.stderr and "--codec=" in no_codec.stderr, no_codec.stderr[-2000:]
    assert "Traceback" not in no_codec.stderr and not (tmp_path / "c").exists()


def test_sampling_defaults_come_from_the_config_sample_section():
    s = config_lib.SampleConfig()
    assert sweep.Grid() == sweep.Grid.from_config(s)
    assert sweep.Grid.from_config(s, steps=(7,)).steps == (7,)
    p = generation.SampleParams("x", seconds=s.seconds[0])
    assert (p.seed, p.guidance, p.steps, p.sampler) == (s.seeds[0], s.guidance[0], s.steps[0], s.samplers[0])
    assert set(sweep.ROW_FIELDS) == {f for f in p.to_dict()}
    assert sweep.ROW_FIELDS["seed"] is int and sweep.ROW_FIELDS["seconds"] is float


def test_checkpoint_config_without_sample_section_still_samples(run_dir, tmp_path):
    """A checkpoint written before the ``sample`` section existed: its defaults fill in."""
    moved = tmp_path / "old"
    shutil.copytree(os.path.join(run_dir, "checkpoints", "2"), moved / "checkpoints" / "2")
    step_dir, _ = source.find_checkpoint(str(moved))
    (cfg_file,) = [f for f in (step_dir / "config").iterdir() if f.read_text().startswith('{"model"')]
    saved = json.loads(cfg_file.read_text())
    assert saved["sample"]["steps"] == [2]  # configs/tiny.py's
    del saved["sample"]
    cfg_file.write_text(json.dumps(saved))
    cfg, _ = source.read_checkpoint_meta(step_dir)
    assert cfg.sample == config_lib.SampleConfig()


def _sample_cli(args, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run(
        [bin_path("audiodiff-sample"), f"--out={tmp_path / 'out'}", "--prompt=a harp", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--sampler=dpmpp_2m,typo", "--sampler=dpmpp_2m,typo: 'typo' is not a sampler; one of"),
        ("--steps=0", "--steps=0: 0 must be an integer in [1, 10000]"),
        ("--steps=ten", "--steps=ten: 'ten' is not an int"),
        ("--schedule=cosine", "--schedule=cosine: 'cosine' is not a schedule"),
        ("--weights=ema,best", "--weights=ema,best: 'best' is not a weight set"),
        ("--step=2,last", "--step=2,last: 'last' is not a step number or 'latest'"),
    ],
)
def test_cli_bad_grid_flag_exits_2_before_reading_the_checkpoint(tmp_path, flag, message):
    # The checkpoint does not exist: the flag is reported, not the checkpoint.
    res = _sample_cli([f"--checkpoint={tmp_path / 'no_such_run'}", flag], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"audiodiff-sample: {message}" in res.stderr, res.stderr[-2000:]
    assert "no_such_run" not in res.stderr and not (tmp_path / "out").exists()


def test_cli_flag_checked_against_the_checkpoint_sample_section_before_restore(run_dir, tmp_path):
    res = _sample_cli([f"--checkpoint={run_dir}", "--seconds=400"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert (
        "--seconds=400.0: 400.0 is out of range [0.5, 300] (sample.min_seconds of the checkpoint's config"
        in res.stderr
    ), res.stderr[-2000:]
    assert "restore" not in res.stderr.lower()
