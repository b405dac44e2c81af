#!/usr/bin/env bash
# One call on the GPU machine: build fewstep with CUDA, run the whole test suite, run the GPU
# benchmarks. Logs and results go to $OUT (the device tool) or ./gpu-out.
#   bash bench/gpu_session.sh [run_gpu.py args...]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
# The GPU machine's default CXX (/opt/gcc/bin/g++, a wrapper around GCC 13) builds extensions —
# torch's own cpp_extension ones included — that segfault in the first C++ error message that
# formats a number (a libstdc++ facet mismatch); the system g++ (with CMakeLists.txt naming the
# shared libstdc++) builds working ones.
if [ "${CXX:-}" = /opt/gcc/bin/g++ ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
if [ -d .whl ]; then  # test-only wheels carried to a machine without network (diffusers)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "fewstep: (CUDA|torch)" "$OUT/build.log"
python3 -c "import fewstep; print(fewstep.build_info())"
python3 -m pytest ${FEWSTEP_TESTS:-tests} -q -ra -p no:cacheprovider --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25
python3 bench/run_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -80
