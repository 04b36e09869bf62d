"""``audiodiff-serve`` (audiodiff_jax/programs/serve_main.py, serve_page.py) and what it
stands on: warm songs and uploads (sweeps/warm.py), blind A/B pairs (sweeps/listening.py),
judgements and win rates (evaluation/judgements.py, ``audiodiff-eval --judgements``).

The page tests start the real program on the shipped demo weights and drive it in
Debian's chromium through Playwright (its bundled driver; no browser download): a song
is generated and played, the same settings again compile nothing, two pages' requests
both come back, bad values and a corrupt upload are shown on the page while the server
goes on, and three blind pairs (the demo weights against the same weights with an
adapter) give a judgements file whose win rates ``audiodiff-eval`` computes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
import scipy.stats
import soundfile as sf

from audiodiff_jax.checkpoints import adapter_export, source
from audiodiff_jax.evaluation import judgements
from audiodiff_jax.model import adapters
from audiodiff_jax.sampling.generation import GenerationError, SampleParams
from audiodiff_jax.sweeps import listening, warm
from tests.helpers import REPO, bin_path

PROMPT = "marimba and drums in D minor at 114 bpm"
SONG_SECONDS = 3
START_TIMEOUT_S = 240
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--mute-audio",
]


def _program(name: str, module: str) -> list[str]:
    """The console script beside this interpreter, or the module it runs."""
    script = bin_path(name)
    return [script] if os.path.exists(script) else [sys.executable, "-m", module]


# -- win rates ----------------------------------------------------------------------


def _row(a: str, b: str, choice: str, n: int = 0) -> dict:
    params = SampleParams(PROMPT, seconds=3.0, seed=n).to_dict()
    return judgements.record(
        choice=choice,
        left={"source": a, "params": params},
        right={"source": b, "params": params},
        pair=f"p{n}",
        pair_index=n,
        listener="",
        session="s",
    )


def _wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval, written out (the closed form scipy implements)."""
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_win_rates_count_each_source_with_wilson_intervals(tmp_path):
    rows = [_row("A", "B", "left", n) for n in range(5)]  # A wins 5 shown left
    rows += [_row("B", "A", "right", 5 + n) for n in range(2)]  # A wins 2 shown right
    rows += [_row("A", "B", "right", 7 + n) for n in range(3)]  # B wins 3
    rows += [_row("B", "A", "same", 10), _row("A", "B", "same", 11)]
    rows += [_row("C", "A", "left", 12), _row("A", "A", "left", 13)]  # C beats A once; A vs A counts for none
    for row in rows:
        judgements.append(str(tmp_path), row)
    with open(tmp_path / judgements.JUDGEMENTS_FILE, "a") as f:
        f.write('{"choice": "left"}\n')  # a torn or foreign line is named, not counted
    read, bad = judgements.read(str(tmp_path))
    assert len(read) == len(rows) and len(bad) == 1 and ":15:" in bad[0]
    result = judgements.win_rates(read)
    a, b, c = (result["sources"][n] for n in "ABC")
    assert (a["wins"], a["losses"], a["ties"], a["judgements"]) == (7, 4, 2, 13)
    assert (b["wins"], b["losses"], b["ties"]) == (3, 7, 2)
    assert (c["wins"], c["losses"], c["ties"]) == (1, 0, 0)
    assert a["win_rate"] == pytest.approx(7 / 11) and a["score"] == pytest.approx(8 / 13)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx(_wilson(7, 11), abs=1e-9)
    assert (b["ci_low"], b["ci_high"]) == pytest.approx(_wilson(3, 10), abs=1e-9)
    assert a["p_value"] == pytest.approx(scipy.stats.binomtest(7, 11).pvalue)
    assert result["same_source"] == 1
    ab = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("A", "B"))
    assert (ab["wins"], ab["losses"], ab["ties"]) == (7, 3, 2)
    table = judgements.format_table(result)
    assert re.search(r"^A\s+13\s+7\s+4\s+2\s+63\.6%", table, re.M), table
    assert judgements.win_rates([])["sources"] == {}
    with pytest.raises(judgements.JudgementError, match="choice='better'"):
        judgements.record(choice="better", left={"source": "A"}, right={"source": "B"}, pair="", pair_index=0,
                          listener="", session="")  # fmt: skip


# -- sources, sweep pairs and uploads ------------------------------------------------


def test_parse_source_reads_path_step_weights_and_adapters(tmp_path):
    assert listening.parse_source("demo") == listening.SourceSpec("demo", "demo")
    s = listening.parse_source("runs/x:4000@ema0.9999+ad/one@0.5,ad/two")
    assert (s.path, s.step, s.weights, s.adapters) == ("runs/x", 4000, "ema0.9999", "ad/one@0.5,ad/two")
    s = listening.parse_source("gs://b/run:latest@raw")
    assert (s.path, s.step, s.weights) == ("gs://b/run", None, "raw")
    s = listening.parse_source("demo+ad@0.5")  # the scale belongs to the adapter
    assert (s.path, s.weights, s.adapters) == ("demo", None, "ad@0.5")
    with pytest.raises(GenerationError, match="nothing after"):
        listening.parse_source("demo+")
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "manifest.jsonl").write_text("")
    assert listening.parse_source(str(folder)).is_sweep
    with pytest.raises(GenerationError, match="is a sweep folder"):
        listening.parse_source(f"{folder}@raw")


def _sweep(folder, rows: list[tuple[str, int, float]], weights: str) -> None:
    """A finished sweep folder: one manifest row and WAV per (prompt, seed, guidance)."""
    folder.mkdir()
    lines = []
    for n, (prompt, seed, guidance) in enumerate(rows):
        p = SampleParams(prompt, seconds=1.0, seed=seed, guidance=guidance)
        name = f"{weights}-{n}.wav"
        tone = np.sin(2 * np.pi * (220 + 110 * n) * np.arange(8000) / 8000).astype(np.float32)
        sf.write(folder / name, tone, 8000)
        lines.append({"id": f"{weights}{n}", "file": name, **p.to_dict(), "weights": weights, "edit": ""})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_sweep_folders_pair_songs_of_the_same_request_in_random_order(tmp_path):
    _sweep(tmp_path / "g3", [("piano", 0, 3.0), ("piano", 1, 3.0), ("cello", 0, 3.0)], "raw")
    _sweep(tmp_path / "g5", [("piano", 0, 5.0), ("flute", 0, 5.0)], "ema")
    sources = [listening.SweepSource(listening.parse_source(str(tmp_path / n))) for n in ("g3", "g5")]
    test = listening.ABTest(sources, str(tmp_path / "pairs"), str(tmp_path / "judge"), seed=0)
    pairs = [test.draw() for _ in range(16)]
    names = {s.name for s in sources}
    for pair in pairs:
        assert {pair.left["source"], pair.right["source"]} == names
        for side in (pair.left, pair.right):
            assert (side["params"]["prompt"], side["params"]["seed"]) == (
                "piano",
                0,
            )  # the one request in common
            assert re.fullmatch(r"pair-[0-9a-f]{32}\.wav", os.path.basename(side["file"]))
            own = tmp_path / ("g3" if side["source"].endswith("g3") else "g5") / side["sweep_file"]
            assert open(side["file"], "rb").read() == own.read_bytes()
        assert {pair.left["params"]["guidance"], pair.right["params"]["guidance"]} == {3.0, 5.0}
    lefts = [p.left["source"] for p in pairs]
    assert 3 <= lefts.count(sources[0].name) <= 13, lefts  # both orders, neither always
    row = test.judge(pairs[0], "right", listener="ana", session="abc", index=1)
    (back,), bad = judgements.read(str(tmp_path / "judge"))
    assert back == row and not bad and back["winner"] == pairs[0].right["source"]
    assert back["left"]["source_spec"]["kind"] == "sweep" and back["left"]["source_spec"]["weights"] in {
        "raw",
        "ema",
    }
    _sweep(tmp_path / "other", [("drums", 0, 3.0)], "raw")
    with pytest.raises(GenerationError, match="nothing to pair"):
        listening.ABTest([sources[0], listening.SweepSource(listening.parse_source(str(tmp_path / "other")))],
                         str(tmp_path), str(tmp_path))  # fmt: skip


def test_read_upload_refuses_corrupt_long_and_big_files(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.zeros((16000, 2), np.float32), 8000)
    audio, rate, digest = warm.read_upload(str(good), warm.Limits())
    assert audio.shape == (2, 16000) and rate == 8000 and len(digest) == 64
    with pytest.raises(GenerationError, match=r"upload good.wav: 2.0 s is longer than the limit of 1 s"):
        warm.read_upload(str(good), warm.Limits(max_upload_seconds=1))
    with pytest.raises(GenerationError, match=r"upload good.wav: .* MB is more than the limit of 0.01 MB"):
        warm.read_upload(str(good), warm.Limits(max_upload_mb=0.01))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    with pytest.raises(GenerationError, match=r"upload bad.wav: not readable audio") as e:
        warm.read_upload(str(bad), warm.Limits())
    assert str(tmp_path) not in str(e.value)  # names the file, not the server's folders


def test_serve_says_when_it_is_reachable_from_the_network():
    result = subprocess.run(
        [*_program("audiodiff-serve", "audiodiff_jax.programs.serve_main"), "--host=0.0.0.0",
         "--checkpoint=/no/such/run"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert "WARNING: will listen on 0.0.0.0:7860: the page is reachable from the network" in result.stderr
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("audiodiff-serve: error: "), result.stderr[
        -2000:
    ]


# -- the page in a browser -----------------------------------------------------------


def _chromium() -> str | None:
    """Debian's chromium (launch/setup_env.sh installs it as root)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_adapter(out: str) -> str:
    """A real adapter folder for the demo weights (random factors on the MLP inputs)."""
    src = source.WeightsSource("demo")
    spec = adapters.AdapterSpec(2, 2.0, ("mlp.fc1",))
    params = jax.tree.map(np.asarray, adapters.make_adapter(src.cfg.model, spec).init(jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.normal(size=x.shape) * 0.5).astype(np.float32) if path[-1].key == "b" else x,
        params,
    )
    base = src.identity(None, src.default_weights())
    adapter_export.write(out, adapters.Adapter(params, spec, base, "test"), weights=base["weights"], step=0,
                         source="tests")  # fmt: skip
    return out


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: str, root, adapter: str):
        self.url, self.proc, self.log, self.root, self.adapter = url, proc, log, root, adapter
        demo = source.WeightsSource("demo")  # what the page should say of the weights it serves
        self.step, self.sample_rate = demo.step, demo.card.codec.sample_rate

    def text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def compilations(self) -> int:
        return self.text().count("sampling program compiled (")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if _chromium() is None:
        pytest.skip("chromium is not installed: apt-get update && apt-get install -y chromium")
    root = tmp_path_factory.mktemp("serve")
    adapter = _demo_adapter(str(root / "adapter"))
    port = _free_port()
    # One CPU device for the server (not the tests' eight fake ones: a request would run 8 rows).
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla}
    cmd = [
        *_program("audiodiff-serve", "audiodiff_jax.programs.serve_main"),
        "--checkpoint=demo",
        "--ab=demo",
        f"--ab=demo+{adapter}",
        f"--out={root / 'out'}",
        f"--judgements_dir={root / 'judgements'}",
        "--ab_seed=0",
        f"--port={port}",
        f"--seconds={SONG_SECONDS}",
        "--steps=4",
        "--min_seconds=1",
        f"--prompt={PROMPT}",
    ]
    log = str(root / "server.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (
                f"audiodiff-serve exited with {proc.returncode}:\n{open(log).read()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"audiodiff-serve did not answer:\n{open(log).read()[-4000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield Server(url, proc, log, root, adapter)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright  # the test extra's; only the page tests need it

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=_chromium(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield context
        finally:
            context.close()


def _open(browser, server):
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(server.url)
    page.wait_for_selector("#generate")
    return page


def _song_done(page, *needles: str) -> str:
    """Waits until the song's text holds every needle and no progress bar is shown; returns it."""
    page.wait_for_function(
        "needles => { const t = document.querySelector('#song_info').innerText;"
        " return needles.every(n => t.includes(n)) && !/\\d%/.test(t); }",
        arg=["compiled:", *needles],
    )
    return page.inner_text("#song_info")


def _generate(page, *, seed: int) -> str:
    """Generates the song of ``seed`` (the other fields as they are) and returns its text."""
    page.fill("#seed input", str(seed))
    page.click("#generate")
    return _song_done(page, f"seed {seed} ·")


def _error(page, text: str) -> str:
    toast = page.locator(".toast-body", has_text=text)
    toast.first.wait_for()
    return toast.first.inner_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_page_generates_plays_and_compiles_each_shape_once(server, browser):
    page = _open(browser, server)
    # Every text the song's panel shows while it is made (the progress bar's steps).
    page.evaluate(
        """() => { window.seen = new Set();
        new MutationObserver(() => {
          const t = document.querySelector('#song_info')?.innerText || '';
          const steps = /(sampling|sampled window \\d+\\/\\d+|decoding|measuring) - \\d+/g;
          for (const m of t.matchAll(steps)) window.seen.add(m[1]);
        }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
    )
    first = _generate(page, seed=0)
    assert "compiled: yes" in first and f"seed 0 · step {server.step}," in first, first
    progress = page.evaluate("Array.from(window.seen)")
    assert {"sampled window 1/1", "decoding"} & set(progress), progress  # the bar followed the song
    assert server.compilations() == 1
    # The song plays: the player's clock moves.
    page.wait_for_function(f"document.querySelector('#song #duration')?.innerText === '0:0{SONG_SECONDS}'")
    page.click("#song button[aria-label='Play']")
    page.wait_for_function("document.querySelector('#song #time').innerText !== '0:00'", timeout=30_000)
    # What the player loaded is the WAV of the song, of the length asked.
    href = page.get_attribute("#song a[download]", "href")
    with urllib.request.urlopen(href, timeout=30) as r:
        audio, rate = sf.read(io.BytesIO(r.read()), dtype="float32")
    assert rate == server.sample_rate and abs(len(audio) - SONG_SECONDS * rate) <= 1, (rate, audio.shape)
    assert np.abs(audio).max() > 1e-3
    # The metrics of the song are on the page.
    assert re.search(r"tempo \(bpm\)\s+\d", first) and "key asked\tD minor" in first, first
    # The same settings again: the same song, no compilation (the page and the log say so).
    page.click("#generate")
    again = _song_done(page, "compiled: no", "seed 0 ·")
    assert first.split("\n")[1] == again.split("\n")[1], (first, again)  # same song id and weights
    assert server.compilations() == 1
    assert server.text().count("sampling program reused, no compilation") >= 1
    # Two pages at once: both requests come back (they queue; one program, no compilation).
    other = _open(browser, server)
    for p, seed in ((page, 11), (other, 12)):
        p.fill("#seed input", str(seed))
    page.click("#generate")
    other.click("#generate")
    for p, seed in ((page, 11), (other, 12)):
        assert "compiled: no" in _song_done(p, f"seed {seed} ·")
    assert server.compilations() == 1
    other.close()

    # Bad input is an error on the page; the server goes on.
    page.fill("#seconds input", "1000")
    page.click("#generate")
    assert "seconds=1000.0 is out of range [1, 300]" in _error(page, "out of range")
    page.fill("#seconds input", str(SONG_SECONDS))
    page.fill("#prompt textarea", "piano " * 100)
    page.click("#generate")
    assert "prompt is 600 characters long; the limit is 400" in _error(page, "characters long")
    page.fill("#prompt textarea", PROMPT)
    corrupt = server.root / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    page.get_by_text("Edit an uploaded song").click()
    page.locator("#edit_mode").get_by_label("continuation", exact=True).check()
    page.set_input_files("#upload input[type=file]", str(corrupt))
    page.locator("#upload", has_text="corrupt").wait_for()  # shown as its name and size
    page.click("#generate")
    assert "upload corrupt.wav: not readable audio" in _error(page, "not readable audio")
    assert server.proc.poll() is None
    page.locator("#edit_mode").get_by_label("none", exact=True).check()
    after = _generate(page, seed=7)
    assert "compiled: no" in after and "edit" not in after.split("\n")[1], after
    page.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_blind_pairs_are_judged_into_a_file_whose_win_rates_audiodiff_eval_reports(server, browser):
    compiled_before = server.compilations()
    page = _open(browser, server)
    page.get_by_role("tab", name="Blind A/B").click()
    page.fill("#listener textarea, #listener input", "tester")
    choices = ["left", "right", "same"]
    for n, choice in enumerate(choices, start=1):
        page.click("#next_pair")
        page.locator("#ab_status", has_text=f"Pair {n}:").wait_for()
        for side in ("#left", "#right"):  # both players hold a song of the length asked
            page.wait_for_function(
                f"document.querySelector('{side} #duration')?.innerText === '0:0{SONG_SECONDS}'"
            )
        page.click(f"#pick_{choice}")
        page.locator("#ab_status", has_text=f"Recorded: {choice} for pair {n}").wait_for()
    page.close()
    # Two sources of one model: their songs ran the one compiled program of the page's songs.
    assert server.compilations() == max(compiled_before, 1)

    folder = server.root / "judgements"
    rows, bad = judgements.read(str(folder))
    assert not bad and [r["choice"] for r in rows] == choices and [r["pair_index"] for r in rows] == [1, 2, 3]
    sources = {"demo", f"demo+{server.adapter}"}
    wins = dict.fromkeys(sources, 0)
    ties = 0
    for row in rows:
        left, right = row["left"], row["right"]
        assert {left["source"], right["source"]} == sources and row["listener"] == "tester"
        assert left["params"] == right["params"] and left["params"]["prompt"] == PROMPT  # one request
        assert left["params"]["steps"] == 4 and left["params"]["seconds"] == SONG_SECONDS
        assert re.fullmatch(r"pair-[0-9a-f]{32}\.wav", os.path.basename(left["file"]))
        assert open(left["file"], "rb").read() != open(right["file"], "rb").read()  # two sources, two songs
        for side in (left, right):
            spec = side["source_spec"]
            assert spec["checkpoint"].endswith("demo_weights") and spec["checkpoint_step"] == server.step
            assert spec["adapters"] == ("" if side["source"] == "demo" else f"{server.adapter}@1")
        if row["choice"] == "same":
            ties += 1
        else:
            wins[row[row["choice"]]["source"]] += 1
            assert row["winner"] == row[row["choice"]]["source"]
    # The report of the file: the same counts as by hand.
    result = subprocess.run(
        [*_program("audiodiff-eval", "audiodiff_jax.programs.eval_main"), f"--judgements={folder}"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "95% CI (Wilson)" in result.stdout and "3 judgement(s)" in result.stdout, result.stdout
    report = json.loads((folder / judgements.WIN_RATES_FILE).read_text())
    for name in sources:
        r = report["sources"][name]
        other = (sources - {name}).pop()
        assert (r["wins"], r["losses"], r["ties"]) == (wins[name], wins[other], ties), (name, r)
        decisive = wins[name] + wins[other]
        assert r["win_rate"] == pytest.approx(wins[name] / decisive)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(_wilson(wins[name], decisive), abs=1e-9)
    assert report["source_specs"][f"demo+{server.adapter}"]["adapters"] == f"{server.adapter}@1"
