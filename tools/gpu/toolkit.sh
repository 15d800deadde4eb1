#!/usr/bin/env bash
# Assembles a CUDA 13 toolkit for building (not running) nulltext's CUDA binaries, from
# NVIDIA's wheels on PyPI: nvcc, the headers, cuBLAS, cuRAND, NVRTC, cuDNN's front library
# (for `--features cudnn`), and a link stub for the driver library (libcuda.so comes with
# the driver, not with the toolkit; the stub defines every function cuda.h declares, so
# that the binary links, and the GPU machine's driver provides the real ones when it runs).
#
#   tools/gpu/toolkit.sh [DIR]        # default ~/.cache/nulltext/cuda-13.0
#   CUDA_ROOT=DIR tools/gpu/build.sh
set -euo pipefail
dir=${1:-$HOME/.cache/nulltext/cuda-13.0}
if [[ -x $dir/bin/nvcc && -f $dir/lib64/stubs/libcuda.so && -e $dir/lib64/libcudnn.so ]]; then
  echo "$dir"
  exit 0
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25 nvidia-cudnn-cu13==9.28.1.4 >&2
for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$wheels/x"; done
rm -rf "$dir" && mkdir -p "$(dirname "$dir")"
cp -a "$wheels/x/nvidia/cu13" "$dir"
# zip archives keep no permissions
chmod +x "$dir"/bin/* "$dir"/bin/crt/* "$dir"/nvvm/bin/* 2>/dev/null || true
ln -s lib "$dir/lib64"
# cuDNN: its front library (which loads the others at run time) and headers
cp "$wheels/x/nvidia/cudnn/lib/libcudnn.so.9" "$dir/lib/"
cp -r "$wheels/x/nvidia/cudnn/include/." "$dir/include/"
for f in "$dir"/lib/*.so.*; do
  link=${f%%.so.*}.so
  [[ -e $link ]] || ln -s "$(basename "$f")" "$link"
done
mkdir -p "$dir/lib/stubs"
gcc -E -P -I"$dir/include" "$dir/include/cuda.h" \
  | grep -oE '\bcu[A-Za-z0-9_]+ *\(' | sed 's/ *($//' | sort -u \
  | awk '{ print "void " $1 "(void) {}" }' > "$dir/lib/stubs/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/lib/stubs/libcuda.so" "$dir/lib/stubs/libcuda.c"
"$dir/bin/nvcc" --version >&2
echo "$dir"
