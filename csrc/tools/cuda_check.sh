#!/usr/bin/env bash
# Compile-check every csrc/**/*.cu with nvcc on a machine whose torch has no CUDA (`make cuda-check`).
# Object files are thrown away; only compile errors matter. Needs nvcc (CUDA >= 12) and the venv.
#   usage: csrc/tools/cuda_check.sh [PYTHON] [file.cu ...]   (default: .venv/bin/python, all .cu)
# The CPU torch wheel lacks the generated header c10/cuda/impl/cuda_cmake_macros.h, so a one-line
# stub goes first on the include path. Kernels must avoid ATen/cuda/CUDAContext.h (it pulls cuBLAS /
# cuSPARSE / cuSOLVER headers this toolkit does not have); use c10/cuda/CUDAStream.h for the stream.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
shift || true
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}
ARCH=${CUDA_CHECK_ARCH:-sm_90}

if [ $# -gt 0 ]; then files=("$@"); else mapfile -t files < <(find csrc -name '*.cu' | sort); fi
if [ ${#files[@]} -eq 0 ]; then
  echo "cuda-check: no .cu files under csrc/, nothing to compile"
  exit 0
fi

out=build/cuda-check
mkdir -p "$out/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t incs < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
flags=(-c -O3 -std=c++20 -arch="$ARCH" --expt-relaxed-constexpr -DCK_WITH_CUDA
       -I"$out/stub" -Icsrc "${incs[@]/#/-I}")

status=0
for f in "${files[@]}"; do
  start=$SECONDS
  if "$NVCC" "${flags[@]}" "$f" -o "$out/$(basename "$f" .cu).o"; then
    echo "cuda-check: OK   $f ($((SECONDS - start)) s)"
  else
    echo "cuda-check: FAIL $f"; status=1
  fi
done
exit $status
