#!/usr/bin/env bash
# Set-up shared by `make demo` and `make test`: system packages (best effort) and the
# virtualenv with the package, its test/eval/serve extras and the corpus renderers.
#
# System packages (Debian): mma (groove corpus), chromium (report-page tests),
# fluidsynth + fluid-soundfont-gm (optional second renderer). Installed only when we
# are root and apt-get works; tests that need them skip with a message otherwise.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
# Knobs for images (Dockerfile): which extras, and whether to try system packages.
EXTRAS=${AUDIODIFF_EXTRAS:-test,eval,serve}
SYSTEM_PACKAGES=${AUDIODIFF_SYSTEM_PACKAGES:-auto}  # auto | none

want=()
if [ "$SYSTEM_PACKAGES" != "none" ]; then
  command -v mma >/dev/null 2>&1 || want+=(mma)
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
fi
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${want[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null) \
      || echo "setup: WARNING: could not install ${want[*]}; the tests that need them will skip"
  else
    echo "setup: WARNING: ${want[*]} missing and not root; the tests that need them will skip"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet -e ".[$EXTRAS]" music21==10.5.1 pretty-midi==0.2.11.post0
# tinysoundfont declares pyaudio (live playback, never used here), which only builds
# from source against portaudio headers: install it without its dependencies.
"$VENV/bin/pip" install --quiet --no-deps tinysoundfont==0.3.7
# basic-pitch declares TensorFlow; its ONNX transcriber (the eval extra) needs only onnxruntime.
case ",$EXTRAS," in *,eval,*) "$VENV/bin/pip" install --quiet --no-deps basic-pitch==0.4.0 ;; esac
