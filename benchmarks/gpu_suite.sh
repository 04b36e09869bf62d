#!/usr/bin/env bash
# The accelerator benchmark suite in one command, for one H100 or H200, in at most 9
# minutes (installation and compilation included): benchmarks/suite.py --profile=gpu,
# which writes OUT_DIR/suite.json after every part (a time limit still leaves figures),
# OUT_DIR/suite.md (the table), OUT_DIR/curves.png and OUT_DIR/suite.log.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]          # default: $OUT, else /tmp/audiodiff_suite
#   STUDENT=runs/student8/export benchmarks/gpu_suite.sh   # another distilled student
#
# Its "student" part times a 300 s song of the distilled student, decoding included,
# against the target of at most 1.3 s on one H200: the export at $STUDENT (default
# audiodiff_jax/demo_student, the shipped one). Without one there the part is recorded
# in suite.json as {"not_run": "no distilled student at ..."} and the suite goes on.
#
# Installation: with a .whl/ folder at the repository root (benchmarks/gpu_wheels.sh
# fills it; for machines without a package index whose image has jax with CUDA) the
# wheels go into /tmp/site on PYTHONPATH; without one, `pip install -e .[gpu]` installs
# the package with its GPU extra from the index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/audiodiff_suite}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
STUDENT=${STUDENT:-audiodiff_jax/demo_student}
t0=$SECONDS
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 3
    export PYTHONPATH=/tmp/site
else
    "$PY" -m pip install -q -e ".[gpu]" || exit 3
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
echo "[gpu_suite] installed in $((SECONDS - t0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"
if [ -f "$STUDENT/export.json" ] || [ -d "$STUDENT/checkpoints" ]; then
    echo "[gpu_suite] student: $STUDENT"
else
    echo "[gpu_suite] student: nothing at $STUDENT; its part is not run (STUDENT=PATH: an export or a run)"
fi
# The suite stops starting parts at its own budget (500 s); this is the hard stop.
timeout -k 10 $((530 - (SECONDS - t0))) "$PY" benchmarks/suite.py --profile=gpu --out_dir="$OUT_DIR" \
    --student="$STUDENT" 2>&1 | tee "$OUT_DIR/suite.log"
rc=${PIPESTATUS[0]}
echo "[gpu_suite] exit $rc after $((SECONDS - t0)) s; figures in $OUT_DIR/suite.json"
exit "$rc"
