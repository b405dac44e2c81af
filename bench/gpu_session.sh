#!/usr/bin/env bash
# One call on the GPU machine: build fewstep with CUDA, run the whole test suite (or the paths in
# FEWSTEP_TESTS), then the GPU benchmarks. Logs and results go to $OUT (the device tool) or ./gpu-out.
#   bash bench/gpu_session.sh [run_gpu.py args...]
exec bash "$(dirname "$0")/gpu_steps.sh" "0:test:${FEWSTEP_TESTS:-tests}" "0:bench:$*"
