#!/bin/sh
# The prepared GPU check: one short script for a lent GPU machine (no Rust toolchain
# there; build the binary here with `CUDA_MINOR=0 sh bench/build_cuda.sh` for their 580
# driver (CUDA 13.0), see README "CUDA", and carry the gzipped binary, 36 MB, since the
# 110 MB one is over the carry limit):
#   FLOWLAB_BIN_GZ=target-cuda/flowlab-cuda.gz sh bench/gpu_check.sh
# Prints the GPU, `flowlab bench --json` lines for the experiment models on cuda:0, and
# trains ci_small on the GPU into $OUT/results (or ./gpu-results).
set -eu
BIN=${FLOWLAB_BIN:-./target/release/flowlab}
if [ -n "${FLOWLAB_BIN_GZ:-}" ]; then
  BIN=/tmp/flowlab-cuda
  gunzip -c "$FLOWLAB_BIN_GZ" > "$BIN" && chmod +x "$BIN"
fi
OUT_DIR=${OUT:-.}/gpu-results
# The binary needs CUDA 13's cuBLAS, cudart, NVRTC and cuRAND at run time. Where the loader
# does not find them (the lent machines' image has them in PyTorch's venv), add the
# folders holding them.
for l in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libnvrtc.so.13 libcurand.so.10; do
  if ! ldconfig -p | grep -q "$l"; then
    f=$(find /usr /opt -name "$l" 2>/dev/null | head -1)
    [ -n "$f" ] && LD_LIBRARY_PATH=$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
ldd "$BIN" | grep 'not found' || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
for spec in experiments/uva_tutorial11.yaml experiments/glow_vs_realnvp.yaml \
            experiments/spline_vs_affine.yaml experiments/conditional_mnist.yaml \
            experiments/ci_small.yaml; do
  "$BIN" bench "$spec" --set device=cuda:0 --steps 5 --json
done
"$BIN" run experiments/ci_small.yaml --set device=cuda:0 --out "$OUT_DIR" --quiet
"$BIN" compare "$OUT_DIR" --markdown
