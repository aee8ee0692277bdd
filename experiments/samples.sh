#!/usr/bin/env bash
# Fed-MoE, FedAvg and FedProx on the real FEMNIST and CIFAR-10 samples at CPU scale (docs/results.md).
#   bash experiments/samples.sh [DATA_ROOT] [RUNS_ROOT]
# DATA_ROOT holds femnist/ and cifar10/ (default ../shared/data); runs go to RUNS_ROOT/{femnist,cifar10}/<algo>.
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs/samples}
# Reduced from the paper's settings to fit 2 CPU cores: FEMNIST 20 clients x 4 writers, 20 rounds,
# 2 local epochs (paper 5); CIFAR-10 10 clients, 8 rounds, 1 local epoch (paper 2), T = 1 (paper 5).
femnist=(--data.data_dir "$data/femnist" --data.num_clients 20 --data.writers_per_client 4
         --data.server_writers 10 --data.probe_writers 1 --federation.rounds 20 --trainer.max_epochs 2
         --federation.progress false)
cifar=(--data.data_dir "$data/cifar10" --data.num_clients 10 --data.server_per_class 50
       --data.val_per_class 50 --data.probe_per_class 20 --federation.rounds 8 --trainer.max_epochs 1
       --federation.progress false)
for algo in fedmoe fedmoe_algorithm1 fedavg fedprox; do
  python -m fedmoe.cli fit --config "experiments/femnist/$algo.yaml" "${femnist[@]}" \
    --trainer.default_root_dir "$runs/femnist/$algo"
done
for algo in fedmoe fedmoe_algorithm1 fedavg fedprox; do
  extra=()
  [[ "$algo" == fedmoe* ]] && extra=(--federation.algorithm.iterations 1)
  python -m fedmoe.cli fit --config "experiments/cifar10/$algo.yaml" "${cifar[@]}" "${extra[@]}" \
    --trainer.default_root_dir "$runs/cifar10/$algo"
done
