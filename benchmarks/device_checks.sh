#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (about 5 minutes on one GPU): the CUDA tests, the
# exact-aggregation benchmark (FedEx-LoRA against FedIT), and the executors at 100 FEMNIST clients
# on one GPU (vectorized against sequential, and the parallel executor with one worker on GPU 0).
# Each step has its own time limit and log; a failing step does not stop the others. Run it from
# the repository root with the FEMNIST LEAF folder (train/ and test/), on a machine whose python
# has torch with CUDA and this project's requirements (PYTHON names another interpreter than python3):
#   bash benchmarks/device_checks.sh data/femnist runs/device_checks
# DEVICE=cpu CLIENTS=4 REPS=1 runs the same steps on the CPU at a small size, to check the script.
set -uo pipefail
DATA=${1:-data/femnist}
OUT=${2:-runs/device_checks}
DEVICE=${DEVICE:-cuda}
CLIENTS=${CLIENTS:-100}
REPS=${REPS:-7}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [[ ! -d $DATA/train ]]; then
  echo "error: $DATA has no train/ folder; give the FEMNIST LEAF folder as the first argument" >&2
  exit 2
fi
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: torch sees no CUDA GPU here; run on a GPU machine (or DEVICE=cpu to check the script)" >&2
  exit 2
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run one check into OUT/NAME.log, report its exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  (( rc == 0 )) || status=1
}

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| lightning', lightning.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$OUT/machine.log"

if [[ $DEVICE == cuda ]]; then
  step cuda_tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/experts/test_workers.py tests/federation/test_parallel.py \
    tests/federation/test_vectorized.py
fi
step lora_aggregation 300 "$PY" benchmarks/lora_aggregation.py --device "$DEVICE" --reps "$REPS"
step executors_vectorized 420 "$PY" benchmarks/executors.py --data-dir "$DATA" --clients "$CLIENTS" --device "$DEVICE" \
  --parallel-devices none --rounds 2
if [[ $DEVICE == cuda ]]; then
  step executors_parallel_gpu 420 "$PY" benchmarks/executors.py --data-dir "$DATA" --clients "$CLIENTS" --device cuda \
    --parallel-devices 0 --rounds 2
fi
exit $status
