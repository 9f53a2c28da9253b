#!/usr/bin/env bash
# Issue 11's GPU checks in one go, for a lent GPU machine (one H100/H200, 16 CPUs, no package
# registry; ../shared/specs/environment.md). Device time is short: run it as prepared, once.
#
#   bash ../shared/tools/device-pack.sh      # here first: Ray, MLflow, Optuna into .device/ (~3 min)
#   then on the device, from the project root, carrying .device:  bash bench/gpu-check.sh
#   (the device tool: command "bash bench/gpu-check.sh", carry [".device"], timeout_s 600; the
#   steps' limits, BENCH_S=515 (+15 to stop) and TESTS_S=45 seconds, keep it inside one 10-minute call;
#   the bench's streamed runs exercise the GPU training path too, so the tests come last)
#   (H200 runs: the tests took 77 s in the first; the second's bench was cut at 440 s in its
#   last streamed run, GPU decode at 512 px, which now runs second, before CPU decode at 512 px)
#
# Writes under $OUT (default ./gpu-check): gpu.txt (the GPU), gpu-tests.txt (the GPU-marked tests
# and the loss library's CUDA tests), gpu.md (`bench/gpu.py --goals`: ceilings, decode, each half
# alone, streamed runs, the goals met or not), gpu-bench.log and ray-data-logs.tgz. Each step has
# its own time limit, so a slow one leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -f .device/site.tar.xz ]; then  # the packed dependencies the machine lacks
    tar -C /tmp -xJf .device/site.tar.xz
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
unset RAY_ADDRESS  # a fresh local Ray, whatever the machine has set
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
nproc >>"$OUT/gpu.txt"
# the bench first: its goals are what only this machine can measure (the tests ran green here before)
# at the limit, SIGTERM: the bench stops its run in progress and still prints the goals for the
# runs it finished (15 s later, SIGKILL)
timeout -k 15 "${BENCH_S:-515}" "$PY" bench/gpu.py --goals --out "$OUT/gpu.md" >"$OUT/gpu-bench.log" 2>&1
echo "bench: exit $?" >>"$OUT/gpu.txt"
# Ray Data's own log of each execution (operator metrics: task times, scheduling, backpressure)
tar -czf "$OUT/ray-data-logs.tgz" /tmp/ray/session_2*/logs/ray-data 2>/dev/null
timeout "${TESTS_S:-45}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/test_gpu.py "tests/test_losses.py" -k "gpu or cuda or nvjpeg or bf16" >"$OUT/gpu-tests.txt" 2>&1
echo "tests: exit $?" >>"$OUT/gpu.txt"
cat "$OUT/gpu.txt" "$OUT/gpu.md" 2>/dev/null
tail -5 "$OUT/gpu-tests.txt"
