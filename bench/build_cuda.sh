#!/bin/sh
# Builds the CUDA binary (target-cuda/release/flowlab) on a machine without a system CUDA
# toolkit, from NVIDIA's PyPI wheels, and packs it for a GPU machine:
#   sh bench/build_cuda.sh            # → target-cuda/release/flowlab, target-cuda/flowlab-cuda.gz
# Steps: (1) a venv with nvcc, headers, runtime, cuBLAS, cuRAND and NVRTC of one CUDA minor
# version; (2) unversioned .so names for the linker; (3) when no driver library is installed,
# a link-time stub libcuda.so (soname libcuda.so.1, so the real driver is loaded at run
# time) exporting the driver symbols cudarc references; (4) cargo build --features cuda.
# Where a full CUDA toolkit exists, plain `cargo build --release --features cuda` is enough.
# CUDA_MINOR picks the toolkit minor version (default 2, i.e. 13.2); candle's kernels are
# PTX compiled by the driver at run time, so it must not be newer than the GPU driver's
# CUDA version (a 580 driver is CUDA 13.0: CUDA_MINOR=0).
set -eu
ENV=${CUDA_ENV:-$PWD/cudaenv}
MINOR=${CUDA_MINOR:-2}
CAP=${CUDA_COMPUTE_CAP:-90}             # 90: H100/H200
TARGET=${CARGO_TARGET_DIR:-$PWD/target-cuda}
[ -x "$ENV/bin/pip" ] || python3 -m venv "$ENV"
"$ENV/bin/pip" install -q "nvidia-cuda-nvcc==13.$MINOR.*" "nvidia-cuda-cccl==13.$MINOR.*" \
    "nvidia-cuda-runtime==13.$MINOR.*" "nvidia-nvvm==13.$MINOR.*" "nvidia-cuda-crt==13.$MINOR.*" \
    "nvidia-cuda-nvrtc==13.$MINOR.*" "nvidia-cublas==13.*" "nvidia-curand==10.*"
R=$(echo "$ENV"/lib/python3*/site-packages/nvidia/cu13)
LINK=$TARGET/cuda-link
mkdir -p "$LINK"
for l in cublas cublasLt cudart nvrtc; do ln -sf "$R/lib/lib$l.so.13" "$LINK/lib$l.so"; done
ln -sf "$R/lib/libcurand.so.10" "$LINK/libcurand.so"
build() {
  CUDA_ROOT=$R PATH=$R/bin:$PATH CUDA_COMPUTE_CAP=$CAP CUDARC_CUDA_VERSION=130${MINOR}0 \
    LIBRARY_PATH=$LINK${LIBRARY_PATH:+:$LIBRARY_PATH} \
    cargo build --release --features cuda --target-dir "$TARGET"
}
if ! ldconfig -p | grep -q 'libcuda\.so '; then
  # First pass compiles everything; its link fails without libcuda. The stub lists every
  # driver entry point (cuXxx) the compiled cudarc refers to.
  echo "build_cuda: no driver library installed; the first link below fails on -lcuda" >&2
  build || true
  nm -u "$TARGET"/release/deps/libcudarc-*.rlib 2>/dev/null | awk '{print $2}' \
    | grep -E '^cu[A-Z]' | sort -u | awk '{print "void " $1 "(void) {}"}' > "$LINK/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda_stub.c"
fi
build
gzip -c "$TARGET/release/flowlab" > "$TARGET/flowlab-cuda.gz"
ls -l "$TARGET/release/flowlab" "$TARGET/flowlab-cuda.gz"
