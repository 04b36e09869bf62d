#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root, the wheels that benchmarks/gpu_suite.sh
# installs on a GPU machine that has no package index (CPython 3.12, x86-64): the
# packages this project imports that such an image lacks (its list: jax 0.11.2 with
# CUDA, flax, optax, orbax-checkpoint, etils, tensorstore, sentencepiece, matplotlib,
# scipy, jinja2, safetensors ... are there; grain and what it needs, ml_collections and
# soundfile are not). About 6 MB. Keep .whl/ out of git (.git/info/exclude).
#
#   benchmarks/gpu_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 \
    soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
ls -la .whl
