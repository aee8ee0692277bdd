#!/usr/bin/env bash
# Fed-MoE, FedAvg and FedProx on the real FEMNIST and CIFAR-10 samples at CPU scale (docs/results.md).
#   bash experiments/samples.sh [DATA_ROOT] [RUNS_ROOT]
# DATA_ROOT holds femnist/ and cifar10/ (default ../shared/data); runs go to RUNS_ROOT/{femnist,cifar10}/<algo>.
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs/samples}
femnist=(--data.data_dir "$data/femnist" --data.num_clients 20 --data.writers_per_client 4
         --data.server_writers 10 --data.probe_writers 1 --federation.rounds 30 --federation.progress false)
cifar=(--data.data_dir "$data/cifar10" --data.num_clients 10 --data.server_per_class 100
       --data.val_per_class 50 --data.probe_per_class 20 --federation.rounds 12 --federation.progress false)
for algo in fedmoe fedavg fedprox; do
  python -m fedmoe.cli fit --config "experiments/femnist/$algo.yaml" "${femnist[@]}" \
    --trainer.default_root_dir "$runs/femnist/$algo"
done
for algo in fedmoe fedavg fedprox; do
  extra=()
  [ "$algo" = fedmoe ] && extra=(--federation.algorithm.iterations 1)
  python -m fedmoe.cli fit --config "experiments/cifar10/$algo.yaml" "${cifar[@]}" "${extra[@]}" \
    --trainer.default_root_dir "$runs/cifar10/$algo"
done
