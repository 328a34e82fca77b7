#!/bin/bash
# Issue 20's GPU window as one prepared script. Here, once, in the checkout the device tool
# sends (the data, the commit and the code of the baseline go into the git-ignored data/):
#
#   bash benchmarks/gpu_window.sh --prepare [BASELINE_COMMIT]     # default bf36ea5
#
# then, on the lent machine (device tool: carry ["data"], timeout_s 590):
#
#   bash benchmarks/gpu_window.sh
#
# In order, each step bounded by `timeout` and the whole by WINDOW_S seconds (default 540):
#  1. the GPU, the versions;
#  2. the CUDA tests (tests/sparse/test_cuda.py, tests/zoo/test_zoo_cuda.py);
#  3. the rewiring's peak extra memory and time on ResNet-18 and VGG16, of this code
#     (benchmarks/overhead.py --sections rewiring);
#  4. runs per GPU-hour, today's way: one 40-epoch run of the baseline code alone
#     (benchmarks/study_throughput.py baseline; appended to throughput_baselines.json);
#  5. the new way, short: WORKERS runs at a time for 3 epochs (a probe; not records), without
#     and then with CUDA MPS when the machine has it, each extrapolated to 40 epochs;
#  6. the grid (study.py run --network resnet18 --plan paper) with the faster of the two,
#     until a deadline that leaves REPORT_S seconds; every finished run's record is merged
#     at once into $OUT/runs_resnet18.json (a copy of the committed records at the start);
#  7. the tables: every cell with its n, the claims, runs per GPU-hour.
#
# What comes back ($OUT, at most 8 files): window.log (everything printed), cuda_tests.log,
# rewiring.md, throughput_baselines.json, runs_resnet18.json. Afterwards, here: copy the two
# JSON files into docs/results/, run `python benchmarks/study.py report --network resnet18
# --plan paper` and commit (docs/study.md, "The grid that accumulates across GPU windows").
#
# GPU_WINDOW_DRY=1: the same steps on the CPU at a tiny setting (tests/test_gpu_window.py);
# GPU_WINDOW_DRY=print: print the commands only. Other knobs: WORKERS (8), MPS (auto|0),
# WINDOW_S, REPORT_S (45), STUDY_DATA, BASELINE_ROOT, RUNS_DIR, GRID_MAX_RUNS, PYTHON.
set -u
HERE=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
    base=${2:-bf36ea5}
    mkdir -p data/baseline
    [ -f data/cifar100_subset.npz ] || cp ../shared/data/cifar100_subset.npz data/ || exit 1
    git rev-parse HEAD > data/commit.txt
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
        echo "$(cat data/commit.txt)-dirty" > data/commit.txt
        echo "warning: tracked files differ from HEAD: the records will say -dirty"
    fi
    rm -rf data/baseline && mkdir -p data/baseline
    git archive "$base" lightning_ggr benchmarks | tar -x -C data/baseline || exit 1
    git rev-parse "$base" > data/baseline/commit.txt
    du -sh data; echo "commit $(cat data/commit.txt), baseline $(cat data/baseline/commit.txt)"
    exit 0
fi

DRY=${GPU_WINDOW_DRY:-0}
OUT=${OUT:-$HERE/gpu_window_out}
mkdir -p "$OUT"
T0=$(date +%s)
WINDOW_S=${WINDOW_S:-540}
REPORT_S=${REPORT_S:-45}
WORKERS=${WORKERS:-8}
MPS=${MPS:-auto}
DATA=${STUDY_DATA:-data/cifar100_subset.npz}
BASELINE_ROOT=${BASELINE_ROOT:-data/baseline}
RUNS=${RUNS_DIR:-/tmp/study_window}
DEVICE=cuda
TINY=()                 # the recipe as it is
PROBE=(--epochs 3)      # the probe: 3 epochs, extrapolated to the recipe's 40
EPOCHS=40
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TINY=(--epochs 2 --batch-size 4 --limit-batches 1)
    PROBE=("${TINY[@]}")
    EPOCHS=2
fi
export LIGHTNING_GGR_COMMIT=${LIGHTNING_GGR_COMMIT:-$(cat data/commit.txt 2>/dev/null)}
export BASELINE_COMMIT=${BASELINE_COMMIT:-$(cat "$BASELINE_ROOT/commit.txt" 2>/dev/null)}

left() { echo $(( T0 + WINDOW_S - $(date +%s) )); }
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
run() {  # run SECONDS COMMAND...: bounded by SECONDS and by what the window has left
    local limit=$1; shift
    local room=$(( $(left) - REPORT_S ))
    [ "$limit" -gt "$room" ] && limit=$room
    if [ "$DRY" = print ]; then echo "+ timeout $limit $*"; return 0; fi
    if [ "$limit" -le 5 ]; then echo "skipped (no time left): $*"; return 124; fi
    timeout --kill-after=10 "$limit" "$@"
}
STUDY=(benchmarks/study.py run --network resnet18 --plan paper --device "$DEVICE" --data "$DATA")

if [ "$DRY" != print ]; then
    exec > >(tee -a "$OUT/window.log") 2>&1
fi
step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
[ "$DRY" = print ] || $PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
echo "commit ${LIGHTNING_GGR_COMMIT:-unknown}; baseline ${BASELINE_COMMIT:-unknown}; data $DATA; $WORKERS workers; window $WINDOW_S s"
[ -f "$DATA" ] || [ "$DRY" = print ] || { echo "error: no data at $DATA (run --prepare first)"; exit 2; }

step "CUDA tests"
run 150 $PY -m pytest -q -p no:cacheprovider tests/sparse/test_cuda.py tests/zoo/test_zoo_cuda.py \
    > "$OUT/cuda_tests.log" 2>&1
echo "rc=$?"; tail -3 "$OUT/cuda_tests.log" 2>/dev/null

step "rewiring: peak extra memory and time (this code)"
if [ "$DRY" != 1 ]; then
    run 150 $PY benchmarks/overhead.py --device cuda --sections rewiring --reps 3 \
        > "$OUT/rewiring.md" 2> "$OUT/rewiring.err"
else
    run 150 $PY benchmarks/overhead.py --device cpu --tiny --sections rewiring --reps 1 \
        > "$OUT/rewiring.md" 2> "$OUT/rewiring.err"
fi
echo "rc=$?"; cat "$OUT/rewiring.md"; tail -3 "$OUT/rewiring.err"; rm -f "$OUT/rewiring.err"

step "runs per GPU-hour, today's way: one run of the baseline code ($BASELINE_COMMIT), alone"
[ -f "$OUT/throughput_baselines.json" ] || cp docs/results/throughput_baselines.json "$OUT/" 2>/dev/null
PYTHONPATH=$BASELINE_ROOT run 150 $PY benchmarks/study_throughput.py baseline --root "$BASELINE_ROOT" \
    --data "$DATA" --device "$DEVICE" --out "$RUNS/baseline" --append "$OUT/throughput_baselines.json" \
    ${TINY[@]+"${TINY[@]}"}
echo "rc=$?"

MPS_CONTROL=$(command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin/nvidia-cuda-mps-control 2>/dev/null)
mps_start() {
    [ "$DRY" = 0 ] && [ "$MPS" != 0 ] && [ -n "$MPS_CONTROL" ] || return 1
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p /tmp/mps_pipe /tmp/mps_log
    "$MPS_CONTROL" -d || return 1
    if timeout 60 $PY -c "import torch; torch.ones(1, device='cuda').sum().item(); print('MPS client ok')"; then
        export STUDY_MPS=1; return 0
    fi
    mps_stop; return 1
}
mps_stop() {
    [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | "$MPS_CONTROL" 2>/dev/null
    sleep 2; unset STUDY_MPS CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
probe() {  # probe NAME: WORKERS runs at a time, 3 epochs, scratch records
    [ "$DRY" = print ] && { run 120 $PY "${STUDY[@]}" --workers "$WORKERS" --max-runs "$WORKERS" \
        --out "$RUNS/probe_$1" --records-out "$RUNS/probe_$1.json" "${PROBE[@]}"; return; }
    rm -rf "$RUNS/probe_$1" "$RUNS/probe_$1.json"
    run 120 $PY "${STUDY[@]}" --workers "$WORKERS" --max-runs "$WORKERS" --out "$RUNS/probe_$1" \
        --records-out "$RUNS/probe_$1.json" "${PROBE[@]}" | tail -2
    $PY benchmarks/study_throughput.py extrapolate "$RUNS/probe_$1.json" --epochs "$EPOCHS" \
        2>/dev/null | tee "$RUNS/probe_$1.md"
}
per_hour() { tail -1 "$RUNS/probe_$1.md" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $7); print ($7 ~ /^[0-9]+$/) ? $7 : 0}'; }

step "runs per GPU-hour, the new way: probe, $WORKERS at a time, no MPS"
probe plain
CHOSEN=plain
step "the same with CUDA MPS"
if mps_start; then
    probe mps
    if [ "$(per_hour mps)" -gt "$(per_hour plain)" ]; then CHOSEN=mps; else mps_stop; fi
else
    echo "MPS not used (MPS=$MPS, control: ${MPS_CONTROL:-none}, dry=$DRY)"
fi
GRID_WORKERS=$WORKERS
if [ "$DRY" != print ] && [ "$(per_hour "$CHOSEN")" = 0 ]; then
    GRID_WORKERS=1  # no probe finished: one run at a time, estimated from the committed runs
fi
echo "the grid runs with: $GRID_WORKERS at a time, $CHOSEN"

step "the grid until $(( WINDOW_S - REPORT_S )) s"
[ -f "$OUT/runs_resnet18.json" ] || cp docs/results/runs_resnet18.json "$OUT/runs_resnet18.json"
GRID_S=$(( $(left) - REPORT_S ))
if [ "$GRID_S" -gt 10 ] || [ "$DRY" = print ]; then
    # A run that has not ended GRACE_S after the deadline is abandoned (its record is not
    # written, none is half written); the backstop leaves the rest of REPORT_S to the tables.
    GRACE_S=$(( REPORT_S / 3 ))
    REPORT_S=$(( REPORT_S - 2 * GRACE_S )) run $(( GRID_S + 2 * GRACE_S )) $PY "${STUDY[@]}" \
        --workers "$GRID_WORKERS" --deadline "$GRID_S" --grace-s "$GRACE_S" --out "$RUNS/grid" \
        --records-out "$OUT/runs_resnet18.json" --history "$RUNS/probe_$CHOSEN.json" \
        ${TINY[@]+"${TINY[@]}"} ${GRID_MAX_RUNS:+--max-runs "$GRID_MAX_RUNS"}
    echo "rc=$?"
fi
[ "$CHOSEN" = mps ] && mps_stop

step "tables"
mkdir -p "$RUNS/results"; cp "$OUT/throughput_baselines.json" "$RUNS/results/" 2>/dev/null
REPORT_S=0 run 40 $PY benchmarks/study.py report --network resnet18 --plan paper --out "$RUNS/none" \
    --records "$OUT/runs_resnet18.json" --results "$RUNS/results" > /dev/null
cat "$RUNS/results/resnet18_table.md" 2>/dev/null | sed -n '/Every cell of the plan/,$p'
cat "$RUNS/results/resnet18_claims.md" 2>/dev/null
echo; echo "probes:"; cat "$RUNS"/probe_*.md 2>/dev/null
rm -f "$OUT"/.*.tmp
echo "=== done at $(( $(date +%s) - T0 )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
