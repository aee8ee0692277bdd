"""Cost of the per-token MoE-LoRA gate (fedmoe.models.moe_lora) on SmolLM2-135M, fp32, one thread.

Rows (same model, same batch of 4 x 128 random tokens, loss = next-token cross-entropy):

- ``single LoRA``: PEFT with one plain LoRA adapter (r = 8 on q_proj, v_proj) active, its factors
  trained: the reference;
- ``single expert``: one expert of the ExpertModel active (its LoRA r = 8 plus its frozen
  correction, rank budget 8), as a worker trains it;
- ``gate, router only``: the gate over 4 such experts, top-2 sparse routing, gate trainable, loss
  plus the balance loss;
- ``gate, joint``: the same with the 4 experts' LoRA factors trainable too.

Each row is forward + backward (gradients zeroed between), repeats interleaved row by row after one
warm-up, medians of wall and process CPU time reported (CPU time is the steadier figure when other
processes share the cores); the line of record is the ratio gate (joint) / single LoRA, target <= 1.15.
Then greedy generation of 16 new tokens (prompt of 32 tokens) through the gate with the KV cache
and without, and with one expert and no gate (cache on) for reference (interleaved, medians), and
whether the gate's two runs gave the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/moe_lora_gate.py --model runs/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedmoe.models.causal import ExpertModel, load_causal_lm
from fedmoe.models.moe_lora import MoELoRA

EXPERTS = ("e0", "e1", "e2", "e3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/models/smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--gen-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    base = load_causal_lm(args.model, "float32")
    spec = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "init_seed": 0}
    model = ExpertModel(base, EXPERTS, spec, correction_rank=8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if ".lora_B." in name:  # non-zero experts and corrections, as after training
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    moe = MoELoRA(model, top_k=2, mode="sparse", init_std=0.5)
    moe.remove()
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.length), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}

    def single_lora() -> None:
        model.peft.base_model.set_adapter("e0")
        model.peft(**batch).loss.backward()

    def single_expert() -> None:
        model.activate("e0")
        model.peft(**batch).loss.backward()

    def gated(joint: bool):
        def run() -> None:
            moe.install()
            moe.set_trainable(joint)
            try:
                (moe(**batch).loss + moe.balance_loss()).backward()
            finally:
                moe.remove()
        return run

    rows = {"single LoRA": single_lora, "single expert": single_expert,
            "gate, router only": gated(False), "gate, joint": gated(True)}
    model.train()
    times: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for rep in range(args.repeats + 1):
        for name, fn in rows.items():
            model.peft.zero_grad(set_to_none=True)
            moe.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if rep:
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
        if rep:
            print(f"repeat {rep}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in rows), flush=True)
    medians = {n: statistics.median(t) for n, t in times.items()}
    cpu_medians = {n: statistics.median(t) for n, t in cpu.items()}
    print(f"forward+backward, batch {args.batch} x {args.length}, medians of {args.repeats} (wall; process CPU):")
    for name, m in medians.items():
        c = cpu_medians[name]
        print(f"  {name:22s} {m:.3f} s ({m / medians['single LoRA']:.2f}x); CPU {c:.3f} s ({c / cpu_medians['single LoRA']:.2f}x)")

    model.eval()
    moe.install()
    moe.set_trainable(False)
    prompt = torch.randint(3, vocab, (1, 32), generator=gen)
    kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "max_new_tokens": 16,
              "min_new_tokens": 16, "do_sample": False, "pad_token_id": base.config.eos_token_id}
    gen_times: dict[str, list[float]] = {"cache": [], "no cache": [], "single": []}
    outputs = {}
    with torch.no_grad():
        for rep in range(args.gen_repeats + 1):
            for run in gen_times:
                if run == "single":
                    moe.remove()
                    model.activate("e0")
                start = time.perf_counter()
                outputs[run] = moe.generate(**kwargs, use_cache=run != "no cache")
                if rep:
                    gen_times[run].append(time.perf_counter() - start)
                moe.install()
    same = torch.equal(outputs["cache"], outputs["no cache"])
    with_cache, without, single = (statistics.median(t) for t in gen_times.values())
    print(f"generation of 16 tokens through the gate, medians of {args.gen_repeats}: use_cache=True {with_cache:.2f} s, "
          f"use_cache=False {without:.2f} s (same tokens: {same}); one expert without the gate, use_cache=True "
          f"{single:.2f} s")
    paired = statistics.median(g / s for g, s in zip(times["gate, joint"], times["single LoRA"]))
    print(f"moe_lora_gate ratio (gate joint / single LoRA, forward+backward, median): "
          f"{medians['gate, joint'] / medians['single LoRA']:.2f} (CPU time: "
          f"{cpu_medians['gate, joint'] / cpu_medians['single LoRA']:.2f}; median of per-repeat ratios: {paired:.2f})")


if __name__ == "__main__":
    main()
