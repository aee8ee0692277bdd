"""Mixed-adapter batch generation against one adapter at a time, on SmolLM2-135M-Instruct.

Four prompts, each routed to a different LoRA expert (r=8, alpha 16 on q_proj and v_proj, B drawn
at random so the experts differ, plus a random rank-4 correction each), greedy decoding of exactly
``--tokens`` new tokens per prompt (``min_new_tokens`` = ``max_new_tokens``):

* batched: :class:`fedmoe.experts.agent.InferenceAgent` in ``batch`` mode: the four prompts
  left-padded into one batch and generated in ONE ``generate`` call with PEFT's ``adapter_names``,
  each row its expert's serving adapter [s B, U][A; V] (without a coordinator the agent re-reads
  the model's experts and rewrites the serving adapters on every call: counted in its time);
* sequential: per prompt, its expert activated (its LoRA and its correction) and the prompt
  generated alone.

Both sides use the KV cache, fp32, one torch thread. A warm-up of each, then ``--repeats`` timed
runs of each, interleaved; tokens per second = 4 x tokens / seconds (median over repeats), and the
ratio batched / sequential (target >= 2).

    OMP_NUM_THREADS=1 python benchmarks/mixed_batch.py [--model runs/models/smollm2-135m] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fedmoe") is None:
    sys.path.insert(0, str(REPO / "src"))

import torch

from fedmoe.experts.agent import InferenceAgent
from fedmoe.experts.routers import KeywordRouter
from fedmoe.models.causal import ExpertModel, load_causal

EXPERTS = ("python", "sql", "docs", "shell")
PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write an SQL query selecting every user older than 30.",
    "Write a docstring for a function that parses a CSV file.",
    "Write a shell command that counts the lines of every file in a folder.",
)
TABLE = {"experts": {"python": ["fibonacci"], "sql": ["sql"], "docs": ["docstring"], "shell": ["shell"]}, "default": "python"}


def build(model_dir: str) -> tuple[ExpertModel, object]:
    base, tok = load_causal(model_dir, dtype="float32")
    model = ExpertModel(base, EXPERTS, {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_seed": 0},
                        correction_rank=4)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.peft.named_parameters())
    with torch.no_grad():
        for e in EXPERTS:
            layers = model.adapted_layers(e)
            for x in layers:
                params[x.b_key].copy_(torch.randn(params[x.b_key].shape, generator=gen) * 0.01)
            model.load_corrections(e, {
                x.name: (torch.randn(params[x.b_key].shape[0], 4, generator=gen) * 0.01,
                         torch.randn(4, params[x.a_key].shape[1], generator=gen) * 0.01)
                for x in layers
            })
    model.eval()
    return model, tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "runs" / "models" / "smollm2-135m"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = build(args.model)
    # no coordinator: the agent re-reads the model's experts (LoRA + correction) and rewrites their
    # serving adapters on every call, a cost counted in the batched time
    agent = InferenceAgent(model, tok, KeywordRouter.from_dict(TABLE, experts=EXPERTS), None, "batch",
                           max_new_tokens=args.tokens)
    routes = agent.router.route(list(PROMPTS))
    assert [r.top for r in routes] == list(EXPERTS), routes
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = args.tokens

    def batched() -> int:
        answers = agent.generate(list(PROMPTS), max_new_tokens=n, min_new_tokens=n)
        return sum(len(p.tokens) for a in answers for p in a.parts)

    def sequential() -> int:
        total = 0
        for prompt, expert in zip(PROMPTS, EXPERTS):
            ids = torch.tensor([agent.encode(prompt)])
            model.activate(expert)
            with torch.no_grad():
                out = model.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=pad, use_cache=True,
                                          temperature=None, top_p=None, top_k=None)
            total += out.shape[1] - ids.shape[1]
        return total

    def timed(fn) -> tuple[float, int]:
        start = time.perf_counter()
        tokens = fn()
        return time.perf_counter() - start, tokens

    timed(batched)
    timed(sequential)
    rates: dict[str, list[float]] = {"batched": [], "sequential": []}
    for rep in range(args.repeats):
        for name, fn in (("batched", batched), ("sequential", sequential)):
            seconds, tokens = timed(fn)
            rates[name].append(tokens / seconds)
            print(f"repeat {rep + 1} {name}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tokens/s", flush=True)
    b, s = statistics.median(rates["batched"]), statistics.median(rates["sequential"])
    print(f"median tokens/s: batched {b:.1f}, sequential {s:.1f}; ratio batched / sequential {b / s:.2f} (target >= 2.0)")


if __name__ == "__main__":
    main()
