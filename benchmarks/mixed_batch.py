"""Mixed-adapter batch generation against one adapter at a time, on SmolLM2-135M-Instruct.

Four prompts, each routed to a different LoRA expert (r=8, alpha 16 on q_proj and v_proj, B drawn
at random so the experts differ, plus a random rank-4 correction each), greedy decoding of exactly
``--tokens`` new tokens per prompt (``min_new_tokens`` = ``max_new_tokens``):

* batched: :class:`fedmoe.experts.agent.InferenceAgent` in ``batch`` mode: the four prompts
  left-padded into one batch and generated in ONE ``generate`` call, each row its expert's serving
  adapter [s B, U][A; V], dispatched per row by the row-gathered LoRA forward
  (:mod:`fedmoe.models.mixed_lora`, ``--dispatch gathered``, the default) or by PEFT's
  ``adapter_names`` (``--dispatch peft``); without a coordinator the agent re-reads the model's
  experts and rewrites the serving adapters on every call, and stacks the rows' factors once per
  call: counted in its time;
* sequential: per prompt, its expert activated (its LoRA and its correction) and the prompt
  generated alone.

Both sides use the KV cache, fp32, one torch thread. A warm-up of each, then ``--repeats`` timed
runs of each, interleaved; tokens per second = 4 x tokens / seconds (median over repeats), and the
ratio batched / sequential (target >= 2), by the wall clock and by the process's CPU time (one
thread: the CPU time is what the work costs when other processes share the cores).

    OMP_NUM_THREADS=1 python benchmarks/mixed_batch.py [--model runs/models/smollm2-135m] [--tokens 32] [--repeats 3]
        [--dispatch gathered|peft] [--breakdown]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fedmoe") is None:
    sys.path.insert(0, str(REPO / "src"))

import torch

from fedmoe.experts.agent import DISPATCHES, InferenceAgent
from fedmoe.experts.routers import KeywordRouter
from fedmoe.models.causal import ExpertModel, load_causal
from fedmoe.models.mixed_lora import gathered_adapters, stack_rows

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
    parser.add_argument("--breakdown", action="store_true",
                        help="also time one decoding step (KV cache of the prompts) of: 1 row with its expert, "
                             "4 rows mixed (gathered and adapter_names), 4 rows with one adapter, 4 rows of the base; "
                             "and the agent's per-call costs")
    parser.add_argument("--dispatch", choices=DISPATCHES, default="gathered",
                        help="how the batched side serves its mixed rows (gathered: row-gathered LoRA; peft: adapter_names)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides use the same)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = build(args.model)
    # no coordinator: the agent re-reads the model's experts (LoRA + correction) and rewrites their
    # serving adapters on every call, a cost counted in the batched time
    agent = InferenceAgent(model, tok, KeywordRouter.from_dict(TABLE, experts=EXPERTS), None, "batch",
                           max_new_tokens=args.tokens, dispatch=args.dispatch)
    print(f"batched side: dispatch {args.dispatch}; threads {args.threads}; {args.tokens} tokens per prompt", flush=True)
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

    def timed(fn) -> tuple[float, float, int]:
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, tokens

    n_full, n = n, 2  # warm-up: a short run of each side
    timed(batched)
    timed(sequential)
    n = n_full
    rates: dict[str, list[tuple[float, float]]] = {"batched": [], "sequential": []}
    for rep in range(args.repeats):
        for name, fn in (("batched", batched), ("sequential", sequential)):
            wall, cpu, tokens = timed(fn)
            rates[name].append((tokens / wall, tokens / cpu))
            print(f"repeat {rep + 1} {name}: {tokens} tokens in {wall:.2f} s wall ({cpu:.2f} s CPU) = "
                  f"{tokens / wall:.1f} tokens/s wall, {tokens / cpu:.1f} per CPU second", flush=True)
    for i, clock in enumerate(("wall-clock", "CPU-time")):
        b = statistics.median(r[i] for r in rates["batched"])
        s = statistics.median(r[i] for r in rates["sequential"])
        print(f"median tokens/s ({clock}): batched {b:.1f}, sequential {s:.1f}; ratio batched / sequential {b / s:.2f} "
              "(target >= 2.0)")
    if args.breakdown:
        breakdown(model, agent)
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


@torch.no_grad()
def breakdown(model: ExpertModel, agent: InferenceAgent, reps: int = 5) -> None:
    """CPU milliseconds of one decoding step after the prompts (best of ``reps``): what batching
    rows costs by itself, and what mixing adapters adds to it."""
    import copy

    rows = [agent.encode(p) for p in PROMPTS]
    ids, mask = agent._batch(rows)
    one = torch.tensor([rows[0]])
    serving = [e + "__serve" for e in EXPERTS]
    model.activate(EXPERTS[0])

    def step(input_ids, attention_mask, **kw):
        past = model.peft(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kw).past_key_values
        nxt = torch.full((input_ids.shape[0], 1), 5)
        full = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)

        def run():
            model.peft(input_ids=nxt, past_key_values=copy.deepcopy(past), attention_mask=full, use_cache=True, **kw)

        run()
        best = float("inf")
        for _ in range(reps):
            cpu = time.process_time()
            run()
            best = min(best, time.process_time() - cpu)
        return best * 1000

    def gathered():
        with gathered_adapters(model.peft, serving):
            return step(ids, mask)

    cases = [
        ("1 row, its expert active", lambda: step(one, torch.ones_like(one))),
        ("4 rows, 4 experts (adapter_names)", lambda: step(ids, mask, adapter_names=serving)),
        ("4 rows, 4 experts (gathered)", gathered),
        ("4 rows, one expert active", lambda: step(ids, mask)),
    ]
    for label, fn in cases:
        print(f"decoding step, {label}: {fn():.1f} ms CPU", flush=True)
    with model.peft.disable_adapter():
        print(f"decoding step, 4 rows, base only: {step(ids, mask):.1f} ms CPU", flush=True)

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            cpu = time.process_time()
            fn()
            times.append(time.process_time() - cpu)
        return min(times) * 1000

    print(f"per call: serving adapters re-read and rewritten (4 experts) {best(lambda: agent.serve(EXPERTS)):.1f} ms CPU, "
          f"rows' factors stacked {best(lambda: stack_rows(model.peft, serving)):.1f} ms CPU", flush=True)

if __name__ == "__main__":
    main()
