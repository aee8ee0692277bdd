"""Peak memory of one frozen base serving 8 LoRA experts, each with its correction factors, against
the bytes those tensors need: base parameters + 8 x (adapter + correction).

Every variant runs in a fresh process; its figures are resident-set sizes minus the resident set
after the imports (the Python, torch and transformers runtime, the same for every variant). The
base is loaded first (``--model`` folder, or built from a config with ``--shape``) and the peak of
the load is recorded; then the peak is reset (``/proc/self/clear_refs``) and the serving phase runs:

- ``base``: 8 forwards of a ``--tokens``-token prompt with the base alone, without gradients;
- ``base + 8 experts``: the base wrapped by :class:`fedmoe.models.causal.ExpertModel` with 8 experts
  (LoRA ``--r`` on q, k, v, o and a correction of rank ``--correction-rank``), every expert's adapter
  and correction loaded with nonzero values (as after training and exact aggregation), then one
  forward per expert of the same prompt (serving).

The ratio of record is the serving peak of ``base + 8 experts`` over the base's bytes + 8 x
(adapter + correction) bytes (target <= 1.10). The load peak is printed beside it: loading a bf16
checkpoint into fp32 holds the mapped file and the fp32 copy at once, whatever the number of experts.

    OMP_NUM_THREADS=1 python benchmarks/expert_memory.py --model runs/models/smollm2-135m
    OMP_NUM_THREADS=1 python benchmarks/expert_memory.py --shape qwen2-0.5b
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys

from procstatus import status  # benchmarks/procstatus.py (this script's folder)

EXPERTS = [f"expert{i}" for i in range(8)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHAPES = {  # Qwen2-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151936)
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=4096),
}


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    for package in ("transformers", "peft"):  # imported before the baseline: the runtime is not the model's
        importlib.import_module(package)

    from fedmoe.models.causal import ExpertModel, build_causal_lm, load_causal_lm

    # the baseline: with the imports done and a tiny forward run, so the kernels' one-time buffers are in it
    torch.nn.functional.linear(torch.ones(2, 8), torch.ones(4, 8)).sum()
    baseline = status("VmRSS")
    if args.shape:
        base = build_causal_lm(SHAPES[args.shape], seed=0)
    else:
        base = load_causal_lm(args.model)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    base_bytes += sum(b.numel() * b.element_size() for b in base.buffers())
    out = {"base_bytes": base_bytes, "load_peak": status("VmHWM") - baseline}
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: serving, not loading
        f.write("5")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, args.tokens), generator=g)
    if args.variant == "base":
        base.eval()
        with torch.no_grad():
            for _ in EXPERTS:
                base(input_ids=ids, use_cache=False)
    if args.variant == "experts":
        model = ExpertModel(base, EXPERTS, {"r": args.r, "alpha": 2 * args.r, "target_modules": TARGETS},
                            correction_rank=args.correction_rank)
        adapter_bytes = correction_bytes = 0
        for name in EXPERTS:
            state = {k: torch.randn(t.shape, generator=g) * 0.01 for k, t in model.expert_state(name).items()}
            factors = {
                layer: (torch.randn(u.shape, generator=g) * 0.01, torch.randn(v.shape, generator=g) * 0.01)
                for layer, (u, v) in model.correction_factors(name).items()
            }
            model.load_expert(name, state, factors)
            adapter_bytes += sum(t.numel() * t.element_size() for t in state.values())
            correction_bytes += sum(u.numel() * u.element_size() + v.numel() * v.element_size()
                                    for u, v in factors.values())
            del state, factors
        model.eval()
        with torch.no_grad():
            for name in EXPERTS:
                model.activate(name)
                model(input_ids=ids, use_cache=False)
        out.update(adapter_bytes=adapter_bytes, correction_bytes=correction_bytes)
    out.update(baseline=baseline, peak=status("VmHWM") - baseline, resident=status("VmRSS") - baseline)
    return out


def measure(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--r", str(args.r), "--correction-rank",
           str(args.correction_rank), "--tokens", str(args.tokens)]
    cmd += ["--shape", args.shape] if args.shape else ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/models/smollm2-135m", help="a causal LM folder (save_pretrained)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="build this shape from a config instead")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--correction-rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="prompt length of the serving forwards")
    parser.add_argument("--child", choices=("base", "experts"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        print(json.dumps(child(args)))
        return

    base, experts = measure("base", args), measure("experts", args)
    tensors = base["base_bytes"] + experts["adapter_bytes"] + experts["correction_bytes"]
    what = args.shape or args.model
    print(f"{what}: 8 experts, LoRA r={args.r} on {', '.join(TARGETS)}, correction rank {args.correction_rank}, fp32; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 1")
    print(f"runtime after imports (subtracted): {mib(base['baseline']).strip()} MiB")
    print("                                   MiB")
    print(f"base parameters + buffers       {mib(base['base_bytes'])}")
    print(f"8 adapters                      {mib(experts['adapter_bytes'])}")
    print(f"8 corrections                   {mib(experts['correction_bytes'])}")
    print(f"tensors in all                  {mib(tensors)}")
    print(f"peak while loading the base     {mib(base['load_peak'])}")
    print(f"serving peak, base alone        {mib(base['peak'])}")
    print(f"serving peak, base + 8 experts  {mib(experts['peak'])}   (resident after: {mib(experts['resident']).strip()})")
    print(f"ratio serving peak(base + 8 experts) / (base + 8 adapters' and corrections' bytes): "
          f"{experts['peak'] / tensors:.3f}   (target <= 1.10)")
    print(f"ratio serving peak(base + 8 experts) / (serving peak(base) + 8 adapters' and corrections' bytes): "
          f"{experts['peak'] / (base['peak'] + tensors - base['base_bytes']):.3f}")


if __name__ == "__main__":
    main()
