#!/bin/sh
# flowlab vs PyTorch eager, same architecture, same machine, run back to back per model
# (this kind of VM drifts by ±10 % within minutes, so the two sides are interleaved).
#   sh bench/vs_torch.sh [ROUNDS] [BATCH] [MODELS...]
# Needs a release build (cargo build --release) and a Python with torch: PYTHON=/path/python.
# Prints one JSON line per side per model per round, flowlab's first;
# `python3 bench/vs_table.py FILE` turns them into results/README.md's table.
set -eu
ROUNDS=${1:-2}; BATCH=${2:-64}
# The models are the arguments after the first two (all ten when there are none).
if [ $# -gt 2 ]; then shift 2; else set --; fi
MODELS=${*:-coupling simple vardeq multiscale realnvp glow affine14 spline unconditional conditional}
PYTHON=${PYTHON:-python3}
FLOWLAB=${FLOWLAB:-target/release/flowlab}
spec() {
  case $1 in
    coupling) echo bench/tutorial_coupling.yaml ;;
    simple|vardeq|multiscale) echo experiments/uva_tutorial11.yaml ;;
    realnvp|glow) echo experiments/glow_vs_realnvp.yaml ;;
    affine14|spline) echo experiments/spline_vs_affine.yaml ;;
    unconditional|conditional) echo experiments/conditional_mnist.yaml ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}
# flowlab's variant name for each model.
variant() {
  case $1 in
    affine14) echo affine ;;
    *) echo "$1" ;;
  esac
}
r=1
while [ "$r" -le "$ROUNDS" ]; do
  for m in $MODELS; do
    "$FLOWLAB" bench "$(spec "$m")" --variant "$(variant "$m")" --batch "$BATCH" --steps 5 --json
    "$PYTHON" bench/torch_reference.py --model "$m" --batch "$BATCH" --steps 5 --threads 2
  done
  r=$((r + 1))
done
