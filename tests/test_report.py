"""The report pages (``report.py``, ``launch/demo.py``): Jinja2 templates with autoescaping,
matplotlib spectrogram and loss-curve PNGs."""

import io
import json
import types

import numpy as np
from PIL import Image

from audiodiff_jax.core import report
from launch import demo

SR = 16000


def _chirp(seconds=2.0, channels=2):
    t = np.arange(int(SR * seconds)) / SR
    x = 0.5 * np.sin(2 * np.pi * (100 * t + 1000 * t**2))
    return np.stack([x] * channels).astype(np.float32)


def test_spectrogram_follows_the_chirp():
    db, (t0, t1, f0, f1) = report.spectrogram_db(_chirp(), SR)
    assert db.shape[0] == 1024 // 2 + 1 and db.max() == 0.0 and db.min() >= -120.0
    assert t0 <= 0.0 and t1 >= 2.0 and f0 == 0.0 and SR / 2 <= f1 <= SR / 2 + SR / 1024  # bin edges
    peak_hz = db.argmax(axis=0) * SR / 1024
    n = db.shape[1]
    assert peak_hz[n // 4] < peak_hz[n // 2] < peak_hz[3 * n // 4]  # rising pitch
    silent, _ = report.spectrogram_db(np.zeros(100, np.float32), SR)  # shorter than a window
    assert (silent == -120.0).all()
    long, _ = report.spectrogram_db(np.zeros(SR * 600, np.float32), SR, max_columns=300)
    assert long.shape[1] <= 310  # the hop grows with the length


def test_spectrogram_png_decodes_and_is_reproducible(tmp_path):
    path = str(tmp_path / "s.png")
    report.write_spectrogram_png(path, _chirp(), SR)
    data = open(path, "rb").read()
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size == (1000, 260)
    assert np.asarray(img.convert("L")).std() > 10  # not blank
    assert report.spectrogram_png(_chirp(), SR) == data  # same audio, same bytes


def test_report_page_escapes_and_links(tmp_path):
    rows = [
        {
            "id": "r0",
            "prompt": "<script>alert(1)</script> & harp",
            "file": "r0.wav",
            "spectrogram": "r0.png",
            "seed": 3,
            "negative_prompt": "",
            "timings": {"denoise_s_per_output": 0.5, "decode_s": 0.1, "realtime_factor": 4.0},
        },
        {"id": "r1", "prompt": "drums", "file": "r1.wav", "spectrogram": "r1.png"},
    ]
    issues = [types.SimpleNamespace(where="prompts.jsonl:4", message="bad <row>")]
    path = report.write_report(str(tmp_path), rows, issues, title="Sweep <1>", facts={"step": 7})
    page = open(path, encoding="utf-8").read()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; harp" in page
    assert "<title>Sweep &lt;1&gt;</title>" in page and 'data-outputs="2"' in page
    assert page.count("<audio") == 2 and page.count('class="spec"') == 2
    assert 'src="r0.wav"' in page and 'src="r1.png"' in page and 'href="manifest.jsonl"' in page
    assert "<tr><th>step</th><td>7</td></tr>" in page and "<tr><th>seed</th><td>3</td></tr>" in page
    assert "negative_prompt" not in page  # empty parameters are left out
    assert "Problems (1)" in page and "<code>prompts.jsonl:4</code>: bad &lt;row&gt;" in page
    assert "denoise 0.5 s/output, decode 0.1 s, 4.0x real time" in page
    assert "denoise ? s/output" in page  # a row without timings
    manifest = page.split('id="manifest">')[1].split("</script>")[0]
    assert json.loads(manifest) == ["r0", "r1"]
    assert "imagesOk" in page and "audioOk" in page  # the load check of the browser test
    no_issues = open(report.write_report(str(tmp_path), rows[1:], [], title="t")).read()
    assert "Problems" not in no_issues


def test_demo_report_has_the_loss_curve(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 51):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    facts = {"final step": 50, "name": "<b>", "config": {"model": {"width": 64}}}
    path = demo.write_report(str(tmp_path), str(run), None, facts, songs_report="songs/report.html")
    page = open(path, encoding="utf-8").read()
    assert '<a href="songs/report.html">' in page and 'src="loss.png"' in page
    assert "<tr><th>final step</th><td>50</td></tr>" in page and "&lt;b&gt;" in page
    assert "<th>config</th>" not in page and "&#34;width&#34;: 64" in page
    assert f"--logdir {run / 'tensorboard'}" in page
    img = Image.open(tmp_path / "loss.png")
    assert img.format == "PNG" and img.size == (640, 280)

    # The held-out prompt table: asked against heard, verdicts, the ceiling; the loss
    # curve continues the pretraining's.
    from launch import demo_prompts

    row = demo_prompts.PromptRow(
        prompt="piano and drums in F# minor at 136 bpm",
        file="a.wav",
        key_prompted="F# minor",
        key_measured="A major",
        key_ok=False,
        tempo_prompted=136.0,
        tempo_measured=135.2,
        tempo_ok=True,
        onset_rate=3.5,
        onsets_ok=True,
    )
    prompts = {
        "rows": [row],
        "verdicts": demo_prompts.verdicts({"key": 0.0, "tempo": 1.0, "onsets": 1.0}),
        "accuracy": {},
        "ceiling": {
            "renders": {"key": 0.875, "tempo": 1.0, "onsets": 1.0},
            "through the codec": {"key": 0.8, "tempo": 0.95, "onsets": 1.0},
        },
        "songs_report": "heldout_songs/report.html",
        "renders": {"renders": "heldout_renders", "through the codec": "heldout_renders_codec"},
        "tempo_tolerance": 0.08,
        "min_onset_rate": 0.5,
        "few_step": [
            {
                "model": "the demo model (teacher)",
                "sampler": "50 dpmpp_2m steps, guided",
                "model_evals": 300.0,
                "seconds_per_song": 1.234,
                "key": 0.79,
                "tempo": 0.83,
                "onsets": 1.0,
            },
            {
                "model": "the few-step student",
                "sampler": "8 ddim steps, progressive distillation",
                "model_evals": 24.0,
                "seconds_per_song": 0.25,
                "key": 0.75,
                "tempo": 0.8,
                "onsets": 1.0,
            },
        ],
    }
    page = open(
        demo.write_report(
            str(tmp_path), str(run), None, facts, prompts=prompts, pretrain_loss={0: 2.0, 500: 0.5}
        )
    ).read()
    assert "<code>heldout_renders</code>, <code>heldout_renders_codec</code>" in page
    assert "within 8%" in page and '<a href="heldout_songs/report.html">' in page
    assert "0% (target 75%, chance 4%): NOT met" in page and "<td>88%</td><td>80%</td>" in page
    assert '<td class="bad">A major</td>' in page and '<td class="ok">135.2</td>' in page
    # The few-step row beside the teacher's: evaluations, seconds and adherence.
    assert "<td>the few-step student</td><td>8 ddim steps, progressive distillation</td><td>24</td>" in page
    assert (
        "<td>0.25</td><td>75%</td>" in page and "<td>80%</td><td>100%</td>" in page and "<td>300</td>" in page
    )
    assert Image.open(tmp_path / "loss.png").size == (640, 280)

    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "loss.png").unlink()
    page = open(demo.write_report(str(tmp_path), str(run), None, {"final step": 1})).read()
    assert "not enough steps to plot" in page and "loss.png" not in page and "Listen" not in page
    assert not (tmp_path / "loss.png").exists()
