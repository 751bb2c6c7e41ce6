#!/usr/bin/env bash
# GBA-ITC group-size study on the bundled emoji demo set, CPU only: the tiny flavor trained with
# 4 data-parallel gloo ranks under global ITC, k=2, k=1 and k=2 with feature accumulation
# (2 seeds each), held-out retrieval, ITC bytes, step time and loss memory per configuration,
# and the planner's projection to 32 nodes x 8 GPUs. Writes runs/study_gba/study.json,
# docs/img/gba_study.png and the generated section of docs/results.md.
#
#   bash examples/studies/gba_group_size.sh
#   bash examples/studies/gba_group_size.sh --iters 200 --resume
#   bash examples/studies/gba_group_size.sh --extra-args="--lr 2e-3"
#
# Every argument goes to tools/study_gba.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
exec "$PYTHON" tools/study_gba.py "$@"
