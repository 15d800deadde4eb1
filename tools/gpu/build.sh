#!/usr/bin/env bash
# Builds the CUDA binaries for tools/gpu/run.sh on a machine with a CUDA 13 toolkit
# (nvcc, headers, and the libraries or stubs to link against) but no GPU, and packs them
# into .gpu/ (ignored by git) for the trip. Without CUDA_ROOT, tools/gpu/toolkit.sh
# assembles a toolkit from PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_ROOT=${CUDA_ROOT:-$(tools/gpu/toolkit.sh)}
export PATH=$CUDA_ROOT/bin:$PATH CUDA_PATH=$CUDA_ROOT CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true
cargo build --release -p nulltext-cli --features cuda
# the same with cuDNN's convolutions, in its own target folder, for `run.sh cudnn`
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/cudnn cargo build --release -p nulltext-cli --features cudnn
cargo test --release -p nulltext-models -p nulltext --features nulltext-models/cuda,nulltext/cuda --no-run 2>&1 | tee /tmp/gpu-test-build.log
T=${CARGO_TARGET_DIR:-target}/release
# The lent machine has python's lzma but no zstd.
mkdir -p .gpu && rm -f .gpu/*.xz
strip -o /tmp/nulltext.stripped "$T/nulltext" && xz -T0 -6 -c /tmp/nulltext.stripped > .gpu/nulltext.xz
strip -o /tmp/nulltext-cudnn.stripped "${CARGO_TARGET_DIR:-target}/cudnn/release/nulltext" \
  && xz -T0 -6 -c /tmp/nulltext-cudnn.stripped > .gpu/nulltext-cudnn.xz
# nulltext_models: the library's unit tests (the fused kernels against their formulas)
for t in golden inversion_golden edit_golden context_tape nulltext_models; do
  f=$(ls -t "$T"/deps/$t-* | grep -v '\.d$' | head -1)
  strip -o "/tmp/$t.stripped" "$f" && xz -T0 -6 -c "/tmp/$t.stripped" > ".gpu/$t.xz"
done
ls -la .gpu
