#!/usr/bin/env bash
# One GPU-machine call in steps, each under its own time limit, most important first, so a call
# cut short by its budget still returns what it measured. Build once, then for each
# "LIMIT_S:KIND:ARGS" step: KIND=test runs pytest ARGS, KIND=bench runs bench/run_gpu.py ARGS,
# KIND=cmd runs ARGS as a shell command (a sweep script, compute-sanitizer around pytest).
#   bash bench/gpu_steps.sh "120:test:tests/gpu/test_adamw_gpu.py" "90:bench:--only adamw"
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
# The GPU machine's default CXX (/opt/gcc/bin/g++, a wrapper around GCC 13) builds extensions —
# torch's own cpp_extension ones included — that segfault in the first C++ error message that
# formats a number (a libstdc++ facet mismatch); the system g++ (with CMakeLists.txt naming the
# shared libstdc++) builds working ones (docs/gpu.md).
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
echo "build: $(( $(date +%s) - start )) s; $(python3 -c 'import fewstep; print(fewstep.build_info())')"
n=0
for step in "$@"; do
  n=$((n + 1)); limit=${step%%:*}; rest=${step#*:}; kind=${rest%%:*}; args=${rest#*:}
  t0=$(date +%s)
  if [ "$kind" = test ]; then
    timeout "$limit" python3 -m pytest $args -q -ra -p no:cacheprovider >"$OUT/step$n-tests.log" 2>&1
    rc=$?; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/step$n-tests.log" | tail -20
  elif [ "$kind" = cmd ]; then
    timeout "$limit" bash -c "$args" >"$OUT/step$n-cmd.log" 2>&1
    rc=$?; tail -40 "$OUT/step$n-cmd.log"
  else
    timeout "$limit" python3 bench/run_gpu.py --out "$OUT" $args >"$OUT/step$n-bench.log" 2>&1
    rc=$?; tail -40 "$OUT/step$n-bench.log"
  fi
  echo "step $n ($kind $args): rc=$rc in $(( $(date +%s) - t0 )) s"
done
