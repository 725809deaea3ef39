#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU, CuPy and a
# CUDA PyTorch (the device machine): build the extension for that machine's
# python3, run every test marked gpu plus the CUDA compile checks, then
# `python -m convcore bench --gpu`. Logs go to $OUT (default ./gpu_out).
#   bash scripts/gpu_check.sh            # everything
#   GPU_CHECK_BENCH=0 bash scripts/gpu_check.sh   # tests only
#   GPU_CHECK_SANITIZER=1 ...   # also the GPU tests under compute-sanitizer memcheck
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L; $PY --version
  $PY -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, torch.version.cuda)"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)
cmake -S . -B /tmp/ccbuild -G Ninja -DCMAKE_BUILD_TYPE=Release -DCONVCORE_BUILD_PYTHON=ON \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $PY)" \
  > "$OUT/build.log" 2>&1 && cmake --build /tmp/ccbuild -j "$(nproc)" >> "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
cp /tmp/ccbuild/_core*.so python/convcore/
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH=$PWD/python
timeout ${GPU_CHECK_TEST_TIMEOUT:-240} $PY -m pytest tests -m gpu -rs -q -p no:cacheprovider \
  --timeout 120 --tb=short 2>&1 | tee "$OUT/gpu_tests.log" | tail -60
timeout 60 $PY -m pytest tests/test_cuda_compile.py tests/test_cuda_detection.py -rs -q \
  -p no:cacheprovider --tb=short 2>&1 | tee "$OUT/cuda_compile_tests.log" | tail -8
if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
  timeout ${GPU_CHECK_BENCH_TIMEOUT:-180} $PY -m convcore bench --gpu --json "$OUT/gpu_bench.json" \
    2>&1 | tee "$OUT/gpu_bench.log"
fi
if [ "${GPU_CHECK_SANITIZER:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  # out-of-bounds accesses and misaligned loads in the kernels, on the GPU tests
  timeout ${GPU_CHECK_SANITIZER_TIMEOUT:-150} compute-sanitizer --tool memcheck \
    --error-exitcode 3 --print-limit 20 $PY -m pytest tests/test_cuda_gpu.py -m gpu -q \
    -p no:cacheprovider --tb=short 2>&1 | tee "$OUT/memcheck.log" | tail -30
fi
echo "total: $(( $(date +%s) - start )) s"
