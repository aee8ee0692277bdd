#!/usr/bin/env bash
# Fed-MoE (the released folder's preset and Algorithm 1), FedAvg and FedProx on the real FEMNIST and
# CIFAR-10 samples at CPU scale, one run after another on one torch thread (docs/results.md).
#   bash experiments/samples.sh [DATA_ROOT] [RUNS_ROOT] [DATA SETS] [EXTRA ARGUMENTS...]
# DATA_ROOT holds femnist/ and cifar10/ (default ../shared/data); runs go to RUNS_ROOT/<data set>/<algo>;
# DATA SETS is "femnist cifar10" (default) or one of them.
# EXTRA ARGUMENTS go to every run, e.g. --ckpt_path last with a higher --federation.rounds extends
# finished runs (bit-identical on CPU to running the higher number of rounds at once).
# The Sent140 and Yelp samples: experiments/samples_text.sh.
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs/samples}
sets=${3:-femnist cifar10}
more=("${@:4}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
algos=(fedmoe fedmoe_algorithm1 fedavg fedprox)
failed=0  # a failed run does not stop the others; the script exits 1 after them
# Reduced from the paper's settings to fit one CPU core. FEMNIST: 20 clients x 4 writers, 20 rounds,
# 2 local epochs (paper 5). CIFAR-10: 40 clients, 3 per round, 3 planned rounds of 1 local epoch
# (paper 100 rounds of 2), per class 10 server (D_s), 10 validation and 5 probe images (paper 1000,
# 500, 20); Fed-MoE with T = 1 (paper 5), and the folder preset's server training cut from 20 epochs
# of E_0 alone + 5 joint epochs to 5 + 1 (a ResNet-18 trains about 11 images per second on one core).
femnist=(--data.data_dir "$data/femnist" --data.num_clients 20 --data.writers_per_client 4
         --data.server_writers 10 --data.probe_writers 1 --federation.rounds 20 --trainer.max_epochs 2
         --federation.progress false)
cifar=(--data.data_dir "$data/cifar10" --data.num_clients 40 --data.server_per_class 10
       --data.val_per_class 10 --data.probe_per_class 5 --federation.clients_per_round 3
       --federation.rounds 3 --trainer.max_epochs 1 --federation.progress false)
for set in $sets; do
  for algo in "${algos[@]}"; do
    extra=()
    if [[ "$set" == femnist ]]; then
      extra=("${femnist[@]}")
    elif [[ "$set" == cifar10 ]]; then
      extra=("${cifar[@]}")
      [[ "$algo" == fedmoe* ]] && extra+=(--federation.algorithm.iterations 1)
      [[ "$algo" == fedmoe ]] && extra+=(--federation.algorithm.main_epochs 5 --federation.algorithm.server_epochs 1)
    else
      echo "unknown data set $set (femnist or cifar10)" >&2; exit 2
    fi
    python -m fedmoe.cli fit --config "experiments/$set/$algo.yaml" "${extra[@]}" \
      --trainer.default_root_dir "$runs/$set/$algo" "${more[@]}" || { echo "$set/$algo failed" >&2; failed=1; }
  done
done
exit $failed
