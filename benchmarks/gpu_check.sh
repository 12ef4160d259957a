#!/usr/bin/env bash
# Issue #5's GPU checks as one call on a lent device machine (README, "GPU checks"), ~6 minutes:
#   1. tests/test_gpu_recurrent.py and every test of tests/test_fused.py on the GPU: the Triton LSTM
#      layer computes what the eager steps do, and fused training equals one-by-one training there;
#   2. benchmarks.fused_vs_loop with the loop and the engine both on the GPU, MLP and LSTM at N=1660
#      (the targets: MLP >= 50x, LSTM >= 20x), and the engine's groups WIDTHS wide where set;
#   3. benchmarks.fused_phases: where the fused iteration's seconds go there;
#   4. benchmarks.gpu_recurrent_step: one training step of the fused LSTM, eager against the Triton layer
#      (STEP_WAYS; "cell layer" adds torch.compile'd ways, ~90 s of compiling).
# ARCHS=lstm leaves out the MLP, whose loop alone takes ~2 minutes there.
# Here first: `make gpu-wheels` (what the machine's image lacks, into .whl). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# Everything it prints and the benchmarks' JSON land in $OUT. A dry run on this CPU:
#   PYTHON=.venv/bin/python SIZES=16 STEP_WAYS=eager bash benchmarks/gpu_check.sh cpu
set -uo pipefail
DEVICE=${1:-cuda}
PYTHON=${PYTHON:-python3}
SIZES=${SIZES:-1660}
ARCHS=${ARCHS:-mlp lstm}
WIDTHS=${WIDTHS:-}
STEP_WAYS=${STEP_WAYS:-eager triton}
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

MANYNETS_TEST_DEVICE=$DEVICE timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_recurrent.py \
    tests/test_fused.py 2>&1 \
    | tee "$OUT/tests.txt"
tests=${PIPESTATUS[0]}

timeout 240 "$PYTHON" -m benchmarks.fused_vs_loop --device "$DEVICE" --architectures $ARCHS --sizes $SIZES \
    --skip-one-by-one ${WIDTHS:+--fused-widths $WIDTHS} --output "fused_vs_loop_$DEVICE.json" 2>&1 \
    | tee "$OUT/benchmark.txt"
bench=${PIPESTATUS[0]}
cp "benchmarks/results/fused_vs_loop_$DEVICE.json" "$OUT/" 2>/dev/null

timeout 80 "$PYTHON" -m benchmarks.fused_phases --device "$DEVICE" --architectures $ARCHS --networks $SIZES 2>&1 \
    | tee "$OUT/phases.txt"
cp "benchmarks/results/fused_phases_$DEVICE.json" "$OUT/" 2>/dev/null

step_sizes="256 $SIZES"
[ "$DEVICE" = cpu ] && step_sizes=$SIZES  # a CPU dry run: 256 stacked LSTMs would take minutes there
timeout 150 "$PYTHON" -m benchmarks.gpu_recurrent_step --device "$DEVICE" --networks $step_sizes --ways $STEP_WAYS 2>&1 \
    | tee "$OUT/recurrent_step.txt"
cp "benchmarks/results/gpu_recurrent_step_$DEVICE.json" "$OUT/" 2>/dev/null

echo "tests exit $tests, benchmark exit $bench; output in $OUT"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
