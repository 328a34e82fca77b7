#!/bin/bash
# The GPU check of issue 13, as one prepared script (run from the repository root on a machine
# with a CUDA GPU; about 6 minutes on an H100):
#
#   bash benchmarks/gpu_check.sh [BASELINE_ROOT]
#
# 1. the CUDA tests (tests/sparse/test_cuda.py) and the CPU speed contract, then every CUDA
#    synchronisation of the pass and of one rewiring per method with its Python line
#    (benchmarks/sync_sites.py);
# 2. `benchmarks/overhead.py --suite gpu` on this checkout;
# 3. with BASELINE_ROOT (another checkout, e.g. `git archive <commit> | tar -x -C /tmp/base`),
#    the same sections but the Trainer's on that checkout's engine, in the same session, for
#    before/after figures on the same card.
# Results go to $OUT (default ./gpu_check_out). rigl-torch's column needs `pip install -e
# '.[bench]'`, or its source on PYTHONPATH.
set -u
export PYTHONUNBUFFERED=1
HERE=$PWD
OUT=${OUT:-$HERE/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" \
    >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} timeout ${TESTS_TIMEOUT:-120} $PY -m pytest -q -p no:cacheprovider \
    tests/sparse/test_cuda.py tests/sparse/test_speed_contract.py > "$OUT/cuda_tests.log" 2>&1
echo "CUDA tests rc=$?"; tail -3 "$OUT/cuda_tests.log"
PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} timeout 120 $PY benchmarks/sync_sites.py \
    > "$OUT/sync_sites.txt" 2>&1
echo "sync sites rc=$?"; cat "$OUT/sync_sites.txt"
PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} timeout ${SUITE_TIMEOUT:-420} $PY benchmarks/overhead.py --suite gpu \
    > "$OUT/suite.md" 2> "$OUT/suite.log"
echo "suite rc=$?"; tail -2 "$OUT/suite.log"
cat "$OUT/suite.md"
if [ $# -ge 1 ]; then
    PYTHONPATH=$1${PYTHONPATH:+:$PYTHONPATH} timeout ${BASELINE_TIMEOUT:-200} $PY benchmarks/overhead.py --device cuda \
        --sections loop pass rewiring build --rounds 3 > "$OUT/baseline.md" 2> "$OUT/baseline.log"
    echo; echo "=== baseline: $1 (rc=$?) ==="; tail -2 "$OUT/baseline.log"
    cat "$OUT/baseline.md"
fi
