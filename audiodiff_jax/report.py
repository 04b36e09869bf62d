"""The sweep report page: audio players, spectrogram images and parameters, per output.

``report.html`` is a static page beside the WAVs (relative links, so the folder can be
copied anywhere and opened from disk). Spectrograms are PNGs written by a small
numpy + zlib PNG encoder, so the sampling program needs no plotting library.

When the page has loaded, a small script writes into ``<body>`` how many images
decoded and how many audio players read their WAV header (``data-images-ok``,
``data-audio-ok``): the headless-browser test reads those back.
"""

from __future__ import annotations

import html
import json
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

# Colour map stops (dark blue -> purple -> orange -> pale yellow), interpolated in RGB.
_STOPS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [252, 255, 164]],
    np.float64,
)


def encode_png(rgb: np.ndarray) -> bytes:
    """``rgb [height, width, 3]`` uint8 -> PNG bytes (8-bit truecolour, no filter)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png needs uint8 [h, w, 3], got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB ``[..., 3]``."""
    x = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    i = np.minimum(x.astype(np.int64), len(_STOPS) - 2)
    f = (x - i)[..., None]
    return np.round(_STOPS[i] * (1 - f) + _STOPS[i + 1] * f).astype(np.uint8)


def spectrogram_db(
    audio: np.ndarray, sample_rate: int, *, n_fft: int = 1024, max_columns: int = 1200
) -> np.ndarray:
    """Log-magnitude spectrogram ``[freq, time]`` (dB re. the maximum) of mono-mixed audio.

    The hop grows with the length so a 5-minute song still gives at most
    ``max_columns`` frames (one FFT batch of bounded size).
    """
    del sample_rate  # the axis is in bins; kept for a future labelled axis
    x = np.asarray(audio, np.float32)
    x = x.mean(axis=0) if x.ndim == 2 else x
    if x.shape[0] < n_fft:
        x = np.pad(x, (0, n_fft - x.shape[0]))
    hop = max(n_fft // 4, -(-(x.shape[0] - n_fft) // max_columns))
    count = 1 + (x.shape[0] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    frames = x[idx] * np.hanning(n_fft).astype(np.float32)
    mag = np.abs(np.fft.rfft(frames, axis=1)).T
    db = 20 * np.log10(np.maximum(mag, 1e-10))
    return db - db.max()


def spectrogram_png(
    audio: np.ndarray, sample_rate: int, *, height: int = 256, floor_db: float = -80.0
) -> bytes:
    db = spectrogram_db(audio, sample_rate)
    # Pool frequency bins down to ``height`` rows (max keeps narrow partials visible).
    bins = db.shape[0] - 1
    group = max(bins // height, 1)
    db = db[: (bins // group) * group].reshape(-1, group, db.shape[1]).max(axis=1)
    img = colormap((db[::-1] - floor_db) / -floor_db)  # low frequencies at the bottom
    return encode_png(img)


def write_spectrogram_png(path: str, audio: np.ndarray, sample_rate: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(spectrogram_png(audio, sample_rate))
    os.replace(tmp, path)


_SHOWN = (
    "prompt",
    "negative_prompt",
    "seconds",
    "seed",
    "guidance",
    "guidance_rescale",
    "sampler",
    "steps",
    "schedule",
    "eta",
    "strength",
    "windows",
    "checkpoint_step",
    "weights",
)

_CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.querySelectorAll('img.spec'));
  document.body.dataset.imagesOk = imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0;
  }).length;
  var auds = Array.from(document.querySelectorAll('audio'));
  function count() {
    document.body.dataset.audioOk = auds.filter(function (a) {
      return a.readyState >= 1 && a.duration > 0;
    }).length;
  }
  auds.forEach(function (a) {
    a.addEventListener('loadedmetadata', count);
    a.addEventListener('error', count);
  });
  count();
});
</script>
"""


def write_report(
    out_dir: str,
    rows: Sequence[dict],
    issues: Sequence,
    *,
    title: str,
    facts: dict | None = None,
) -> str:
    """Writes ``out_dir/report.html``; returns its path.

    Args:
      rows: manifest rows (``file``, ``spectrogram`` relative to ``out_dir``, params, timings).
      issues: objects with ``where`` and ``message`` (bad rows, failed batches).
      title: page heading.
      facts: key -> value shown at the top (checkpoint, model, devices...).
    """
    esc = lambda v: html.escape(str(v))
    facts_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in (facts or {}).items())
    cards = []
    for r in rows:
        params = "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(r[k])}</td></tr>" for k in _SHOWN if k in r and r[k] != ""
        )
        t = r.get("timings", {})
        timing = (
            f"denoise {t.get('denoise_s_per_output', '?')} s/output, decode {t.get('decode_s', '?')} s, "
            f"{t.get('realtime_factor', '?')}x real time"
        )
        cards.append(
            f'<div class="out" id="{esc(r["id"])}"><h3>{esc(r["prompt"])}</h3>'
            f'<audio controls preload="metadata" src="{esc(r["file"])}"></audio>'
            f'<img class="spec" alt="spectrogram of {esc(r["file"])}" src="{esc(r["spectrogram"])}">'
            f'<table class="params">{params}</table><p class="timing">{esc(timing)}</p>'
            f'<p class="file"><a href="{esc(r["file"])}">{esc(r["file"])}</a></p></div>'
        )
    issue_html = ""
    if issues:
        items = "".join(f"<li><code>{esc(i.where)}</code>: {esc(i.message)}</li>" for i in issues)
        issue_html = f'<h2>Problems ({len(issues)})</h2><ul class="issues">{items}</ul>'
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
th{{text-align:left;padding-right:1em;font-weight:normal;color:#555}}
.out{{border-top:1px solid #ccc;padding:1em 0}} .out h3{{margin:0 0 .5em}}
img.spec{{display:block;width:100%;max-height:256px;image-rendering:pixelated;margin:.5em 0}}
audio{{width:100%}} .timing{{color:#555;font-size:90%}} .issues{{color:#a00}}
</style></head>
<body data-outputs="{len(rows)}">
<h1>{esc(title)}</h1>
<table class="facts">{facts_html}</table>
<p>{len(rows)} output(s); parameters of every output in <a href="manifest.jsonl">manifest.jsonl</a>.</p>
{issue_html}
{"".join(cards)}
<script type="application/json" id="manifest">{esc(json.dumps([r["id"] for r in rows]))}</script>
{_CHECK_SCRIPT}
</body></html>
"""
    path = os.path.join(out_dir, "report.html")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
