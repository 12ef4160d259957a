#!/usr/bin/env bash
# Issue #5's GPU checks as one call on a lent device machine (README, "GPU checks"), ~7 minutes:
#   1. every test of tests/test_fused.py on the GPU: fused training equals one-by-one training there;
#   2. benchmarks.fused_vs_loop with the loop and the engine both on the GPU, MLP and LSTM at N=1660
#      (the targets: MLP >= 50x, LSTM >= 20x);
#   3. benchmarks.fused_phases: where the fused iteration's seconds go there (host work, mostly);
#   4. benchmarks.gpu_recurrent_step: the fused LSTM's time steps eager against torch.compile'd (per cell,
#      per layer), the measurement the LSTM's 20x needs next.
# Here first: `make gpu-wheels` (what the machine's image lacks, into .whl). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# Everything it prints and the benchmark's JSON land in $OUT. A dry run on this CPU:
#   PYTHON=.venv/bin/python SIZES=16 bash benchmarks/gpu_check.sh cpu
set -uo pipefail
DEVICE=${1:-cuda}
PYTHON=${PYTHON:-python3}
SIZES=${SIZES:-1660}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "pydantic is missing and .whl could not supply it: run 'make gpu-wheels' and carry .whl"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"

MANYNETS_TEST_DEVICE=$DEVICE timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fused.py 2>&1 \
    | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}

timeout 220 "$PYTHON" -m benchmarks.fused_vs_loop --device "$DEVICE" --architectures mlp lstm --sizes $SIZES \
    --skip-one-by-one --output "fused_vs_loop_$DEVICE.json" 2>&1 | tee "$OUT/benchmark.txt"
bench=${PIPESTATUS[0]}
cp "benchmarks/results/fused_vs_loop_$DEVICE.json" "$OUT/" 2>/dev/null

timeout 80 "$PYTHON" -m benchmarks.fused_phases --device "$DEVICE" --networks $SIZES 2>&1 | tee "$OUT/phases.txt"
cp "benchmarks/results/fused_phases_$DEVICE.json" "$OUT/" 2>/dev/null

step_sizes="256 $SIZES"
[ "$DEVICE" = cpu ] && step_sizes=$SIZES  # a CPU dry run: 256 stacked LSTMs would take minutes there
timeout 150 "$PYTHON" -m benchmarks.gpu_recurrent_step --device "$DEVICE" --networks $step_sizes 2>&1 \
    | tee "$OUT/recurrent_step.txt"
cp "benchmarks/results/gpu_recurrent_step_$DEVICE.json" "$OUT/" 2>/dev/null

echo "tests exit $tests, benchmark exit $bench; output in $OUT"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
