"""The inference agent on a tiny Qwen2: serving adapters equal each expert's forward (correction
included), a mixed batch (one generate call, one adapter per row, gathered or through PEFT's
adapter_names) equals each prompt generated alone with its expert, exact weighted merges, refresh on
new versions, reads that do not wait on other experts' updates and never block pushes, the gate
hook, the reference's sample tasks."""

from __future__ import annotations

import threading
import time

import peft
import pytest
import torch

from fedmoe.errors import ConfigError, DataError
from fedmoe.experts import ExpertCoordinator, Update
from fedmoe.experts.agent import SEED_TASKS, SERVE_SUFFIX, InferenceAgent, run_sample_tasks, serving_factors
from fedmoe.experts.routers import REFERENCE_TABLE, KeywordRouter
from fedmoe.models.causal import ExpertModel, build_causal_lm, tiny_causal_config
from fedmoe.models.mixed_lora import lora_layers
from wordlevel import word_tokenizer as _word_tokenizer

PEFT = peft.__version__  # imported at collection: its import is not a test's time
ROUTES = REFERENCE_TABLE
EXPERTS = ("python", "sql", "docs")
WORDS = ("write a python function to sort list script query the 'users' database how do i use new "
         "calculate_metrics ? select rows from table add docstring explain").split()
TABLE = {"experts": {"python": ["python"], "sql": ["select", "query"], "docs": ["docstring", "explain"]},
         "default": "python"}
PROMPTS = ["write a python function", "select rows from table", "add docstring", "explain the query"]


def word_tokenizer():
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS, split="spaces")


def experts_model(rank: int = 3) -> ExpertModel:
    """Three experts with random B and a non-zero rank-2 correction each, all different."""
    base = build_causal_lm(tiny_causal_config("qwen2", 64), seed=0)
    model = ExpertModel(base, EXPERTS, {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 0}, correction_rank=rank)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.peft.named_parameters())
    with torch.no_grad():
        for e in EXPERTS:
            for layer in model.adapted_layers(e):
                params[layer.b_key].copy_(torch.randn(params[layer.b_key].shape, generator=gen) * 0.5)
            factors = {
                layer.name: (torch.randn(params[layer.b_key].shape[0], 2, generator=gen) * 0.3,
                             torch.randn(2, params[layer.a_key].shape[1], generator=gen) * 0.3)
                for layer in model.adapted_layers(e)
            }
            model.load_corrections(e, factors)
    model.eval()
    return model


def agent_for(model, combine="batch", coordinator=None, **kwargs) -> InferenceAgent:
    return InferenceAgent(model, word_tokenizer(), KeywordRouter.from_dict(TABLE), coordinator, combine, **kwargs)


def expert_logits(model: ExpertModel, expert: str, ids: torch.Tensor) -> torch.Tensor:
    model.activate(expert)
    with torch.no_grad():
        return model(input_ids=ids).logits


def alone(model: ExpertModel, agent: InferenceAgent, expert: str, prompt: str, n: int) -> list[int]:
    """Greedy generation of one prompt with the expert active (its LoRA and its correction)."""
    ids = torch.tensor([agent.encode(prompt)])
    model.activate(expert)
    with torch.no_grad():
        out = model.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  pad_token_id=0, use_cache=True)
    return agent._cut(out[:, ids.shape[1]:])[0]


# ------------------------------------------------------------------------------------ exactness


def test_serving_adapter_equals_the_experts_forward_with_its_correction():
    model = experts_model()
    agent = agent_for(model)
    agent.serve(EXPERTS)
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    for e in EXPERTS:
        with torch.no_grad():
            served = model.peft(input_ids=ids, adapter_names=[e + SERVE_SUFFIX]).logits
        assert torch.allclose(served, expert_logits(model, e, ids), atol=1e-5)
        assert not torch.allclose(expert_logits(model, "python", ids), expert_logits(model, "sql", ids), atol=1e-3)
    modules = dict(model.peft.named_modules())
    for layer in model.adapted_layers("sql"):
        m = modules[layer.name]
        delta = m.lora_B["sql" + SERVE_SUFFIX].weight @ m.lora_A["sql" + SERVE_SUFFIX].weight
        assert torch.allclose(delta, model.effective_delta("sql", layer.name), atol=1e-6)


def test_reading_the_models_experts_equals_the_serving_factors_of_their_state_and_correction():
    model = experts_model()
    agent = agent_for(model)
    for e in EXPERTS:
        version, factors = agent.read(e)
        want = serving_factors(model.adapted_layers(e), model.expert_state(e), model.correction_factors(e))
        assert version is None and list(factors) == list(want)
        for name, (b, a) in want.items():
            assert torch.equal(factors[name][0], b) and torch.equal(factors[name][1], a)


@pytest.mark.parametrize("dispatch", ["gathered", "peft"])
def test_mixed_batch_matches_each_prompt_generated_alone_with_its_expert(dispatch):
    model = experts_model()
    agent = agent_for(model, dispatch=dispatch)
    answers = agent.generate(PROMPTS[:3], max_new_tokens=6, min_new_tokens=6)
    assert [a.experts for a in answers] == [("python",), ("sql",), ("docs",)]
    for prompt, ans in zip(PROMPTS, answers):
        (part,) = ans.parts
        assert part.tokens == alone(model, agent, part.experts[0], prompt, 6)
        assert len(part.tokens) == 6
    # logits: the left-padded mixed batch against each prompt alone, at every prompt position
    rows = [agent.encode(p) for p in PROMPTS[:3]]
    ids, mask = agent._batch(rows)
    with torch.no_grad():
        mixed = model.peft(input_ids=ids, attention_mask=mask, adapter_names=[e + SERVE_SUFFIX for e in EXPERTS]).logits
    for i, (row, e) in enumerate(zip(rows, EXPERTS)):
        own = expert_logits(model, e, torch.tensor([row]))[0]
        assert torch.allclose(mixed[i, ids.shape[1] - len(row):], own, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["gathered", "peft"])
def test_mixed_batch_is_one_generate_call_with_one_adapter_per_row(monkeypatch, dispatch):
    model = experts_model()
    agent = agent_for(model, dispatch=dispatch)
    calls = []
    real = model.peft.generate
    layers = lora_layers(model.peft)

    def spy(*args, **kwargs):
        calls.append((kwargs.get("adapter_names"), all("forward" in vars(m) for m in layers.values())))
        return real(*args, **kwargs)

    monkeypatch.setattr(model.peft, "generate", spy)
    answers = agent.generate(PROMPTS, max_new_tokens=3)
    rows = ["python__serve", "sql__serve", "docs__serve", "sql__serve", "docs__serve"]
    assert calls == ([(None, True)] if dispatch == "gathered" else [(rows, False)])
    assert not any("forward" in vars(m) for m in layers.values())  # the gathered forwards are removed after
    assert [p.experts for p in answers[3].parts] == [("sql",), ("docs",)]  # a multi-expert route: one row per expert
    assert answers[3].route.weights == (0.5, 0.5)


def test_one_expert_batch_skips_per_row_dispatch_and_restores_the_models_adapters(monkeypatch):
    model = experts_model()
    agent = agent_for(model)
    model.activate("sql")
    agent.serve(["python"])
    before = list(model.peft.base_model.active_adapters)
    grads = {n: p.requires_grad for n, p in model.peft.named_parameters()}
    rows = [agent.encode(p) for p in ("write a python function", "python script")]
    ids, mask = agent._batch(rows)
    with torch.no_grad():
        ref = model.peft.generate(input_ids=ids, attention_mask=mask, adapter_names=["python" + SERVE_SUFFIX] * 2,
                                  max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    calls = []
    real = model.peft.generate

    def spy(*args, **kwargs):
        calls.append((kwargs.get("adapter_names"), list(model.peft.base_model.active_adapters)))
        return real(*args, **kwargs)

    monkeypatch.setattr(model.peft, "generate", spy)
    answers = agent.generate(["write a python function", "python script"], max_new_tokens=5, min_new_tokens=5)
    assert calls == [(None, ["python" + SERVE_SUFFIX])]
    assert [a.parts[0].tokens for a in answers] == agent._cut(ref[:, ids.shape[1]:])
    assert list(model.peft.base_model.active_adapters) == before
    assert {n: p.requires_grad for n, p in model.peft.named_parameters()} == grads


def test_merge_is_the_exact_weighted_sum_of_the_experts_deltas():
    model = experts_model()
    agent = agent_for(model, "merge")
    answers = agent.generate(PROMPTS, max_new_tokens=3)
    (part,) = answers[3].parts
    assert part.experts == ("sql", "docs") and part.weights == (0.5, 0.5) and part.adapter.startswith("merged")
    modules = dict(model.peft.named_modules())
    for layer in model.adapted_layers("sql"):
        m = modules[layer.name]
        delta = m.lora_B[part.adapter].weight @ m.lora_A[part.adapter].weight * m.scaling[part.adapter]
        want = 0.5 * model.effective_delta("sql", layer.name) + 0.5 * model.effective_delta("docs", layer.name)
        assert torch.allclose(delta, want, atol=1e-6)
    # the same forward as PEFT's own exact merge (add_weighted_adapter, combination_type="cat")
    model.peft.add_weighted_adapter(["sql", "sql__corr", "docs", "docs__corr"], [0.5] * 4, "pefts_cat", "cat")
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        ours = model.peft(input_ids=ids, adapter_names=[part.adapter]).logits
        theirs = model.peft(input_ids=ids, adapter_names=["pefts_cat"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert [p.adapter for p in answers[0].parts] == ["python__serve"]  # a single-expert route: its serving adapter


def test_gathered_and_peft_dispatch_give_the_same_tokens_with_merged_and_serving_adapters_mixed():
    model = experts_model()
    prompts = ["explain the query", "write a python function", "select rows from table"]
    gathered = agent_for(model, "merge").generate(prompts, max_new_tokens=5, min_new_tokens=5)
    theirs = agent_for(model, "merge", dispatch="peft").generate(prompts, max_new_tokens=5, min_new_tokens=5)
    assert [p.adapter.startswith("merged") for a in gathered for p in a.parts] == [True, False, False]
    assert [p.tokens for a in gathered for p in a.parts] == [p.tokens for a in theirs for p in a.parts]


def test_gathered_generation_that_raises_leaves_the_models_forwards_and_adapters_as_they_were(monkeypatch):
    model = experts_model()
    agent = agent_for(model)
    model.activate("docs")
    before = list(model.peft.base_model.active_adapters)

    def broken(*args, **kwargs):
        raise RuntimeError("generate failed")

    monkeypatch.setattr(model.peft, "generate", broken)
    with pytest.raises(RuntimeError, match="generate failed"):
        agent.generate(PROMPTS[:2], max_new_tokens=2)
    assert not any("forward" in vars(m) for m in lora_layers(model.peft).values())
    assert list(model.peft.base_model.active_adapters) == before
    monkeypatch.undo()
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expert_logits(model, "docs", ids))


def test_merged_adapters_beyond_the_cache_are_deleted_after_use():
    model = experts_model()
    agent = agent_for(model, "merge", max_merges=1)
    answers = agent.generate(["explain the query", "python docstring", "python query"], max_new_tokens=2)
    assert [len(a.route) for a in answers] == [2, 2, 2]
    names = [a.parts[0].adapter for a in answers]
    assert len(set(names)) == 3
    assert [n in model.peft.peft_config for n in names] == [False, False, True]


# ------------------------------------------------------------------------------------ coordinator


def registered(model: ExpertModel, **kwargs) -> ExpertCoordinator:
    coord = ExpertCoordinator(mode="fedasync", mix=0.5, staleness="constant", **kwargs)
    for e in EXPERTS:
        coord.register(e, model.expert_state(e), model.adapted_layers(e))
    return coord


def trained(model: ExpertModel, expert: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen) for k, v in model.expert_state(expert).items()}


def test_serving_adapter_follows_the_coordinators_versions():
    model = experts_model()
    coord = registered(model)
    agent = agent_for(model, coordinator=coord)
    first = agent.generate(["select rows"], max_new_tokens=2)[0].parts[0]
    assert first.versions == (0,)
    receipt = coord.push(Update("sql", "w1", 0, trained(model, "sql", 5)))
    assert receipt.status == "applied" and receipt.version == 1
    second = agent.generate(["select rows"], max_new_tokens=2)[0].parts[0]
    assert second.versions == (1,)
    snap = coord.snapshot("sql")
    modules = dict(model.peft.named_modules())
    for layer in snap.layers:  # the served delta is version 1's, correction (FedAsync's residual) included
        m = modules[layer.name]
        assert torch.allclose(m.lora_B["sql__serve"].weight @ m.lora_A["sql__serve"].weight, snap.delta(layer.name), atol=1e-5)
    assert any(coord.snapshot("sql").correction[x.name][0].abs().sum() > 0 for x in snap.layers)
    # the model's own expert adapters are untouched by serving
    assert all(torch.equal(model.expert_state("sql")[k], v) for k, v in experts_model().expert_state("sql").items())


def test_reads_proceed_while_another_experts_update_is_in_progress(tmp_path):
    model = experts_model()
    coord = registered(model, root=str(tmp_path / "store"), fsync=False)
    agent = agent_for(model, coordinator=coord)
    entered, release = threading.Event(), threading.Event()
    real_append = coord.store.append

    def slow_append(name, record, tensors=None):
        if name == "sql":
            entered.set()
            release.wait(10)
        return real_append(name, record, tensors) if tensors is not None else real_append(name, record)

    coord.store.append = slow_append
    pusher = threading.Thread(target=coord.push, args=(Update("sql", "w1", 0, trained(model, "sql", 5)),))
    pusher.start()
    try:
        assert entered.wait(10)  # the sql update holds sql's lock, persisting
        start = time.perf_counter()
        answer = agent.generate(["write a python function"], max_new_tokens=2)[0]
        assert answer.parts[0].versions == (0,) and time.perf_counter() - start < 5
        assert pusher.is_alive()  # still in progress: the python read did not wait for it
    finally:
        release.set()
        pusher.join(10)
    assert agent.generate(["select rows"], max_new_tokens=2)[0].parts[0].versions == (1,)


def test_generation_holds_no_lock_that_a_push_needs(monkeypatch):
    model = experts_model()
    coord = registered(model)
    agent = agent_for(model, coordinator=coord)
    receipts = []
    real = model.peft.generate

    def generate_while_pushing(*args, **kwargs):
        t = threading.Thread(target=lambda: receipts.append(coord.push(Update("python", "w1", 0, trained(model, "python", 3)))))
        t.start()
        t.join(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(model.peft, "generate", generate_while_pushing)
    agent.generate(["write a python function"], max_new_tokens=2)
    assert [r.status for r in receipts] == ["applied"]


# ------------------------------------------------------------------------------------ gate, tasks, errors


class FakeGate:
    """Records the batch and appends the token 9 (a TokenGate)."""

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids, attention_mask, kwargs))
        return torch.cat([input_ids, torch.full((input_ids.shape[0], kwargs["max_new_tokens"]), 9)], dim=1)


def test_gate_mode_delegates_one_row_per_prompt_after_loading_current_snapshots():
    model = experts_model()
    coord = registered(model, rank_budget=3)  # the model's correction rank: its corrections load into the model
    coord.push(Update("sql", "w1", 0, trained(model, "sql", 5)))
    gate = FakeGate()
    agent = agent_for(model, "gate", coordinator=coord, gate=gate)
    answers = agent.generate(PROMPTS, max_new_tokens=2)
    (ids, mask, kwargs), = gate.calls
    assert ids.shape[0] == 4 and mask[:, -1].all() and kwargs["max_new_tokens"] == 2
    assert answers[3].parts[0].adapter == "gate" and answers[3].parts[0].versions == (1, 0)
    assert answers[0].parts[0].tokens == [9, 9]
    snap = coord.snapshot("sql")
    assert all(torch.equal(model.expert_state("sql")[k], snap.adapter[k]) for k in snap.adapter)


def test_gate_mode_with_a_one_hot_moe_lora_gate_matches_the_mixed_batch():
    from fedmoe.models.moe_lora import MoELoRA

    model = experts_model()
    gate = MoELoRA(model)
    gate.force = "sql"
    gated = agent_for(model, "gate", gate=gate).generate(["select rows from table"], max_new_tokens=5, min_new_tokens=5)
    batched = agent_for(model).generate(["select rows from table"], max_new_tokens=5, min_new_tokens=5)
    assert gated[0].parts[0].tokens == batched[0].parts[0].tokens


def test_run_sample_tasks_prints_which_experts_served_each(capsys):
    model = experts_model()
    agent = InferenceAgent(model, word_tokenizer(), KeywordRouter.from_file(ROUTES, experts=EXPERTS), registered(model))
    answers = run_sample_tasks(agent, max_new_tokens=2)
    assert [a.experts for a in answers] == [("python",), ("python", "sql"), ("python", "docs")]
    out = capsys.readouterr().out
    for label, prompt in SEED_TASKS:
        assert f"[{label}] {prompt}" in out
    assert "served by sql v0" in out and "served by docs v0" in out and out.count("served by python v0") == 3


def test_agent_refuses_a_router_expert_the_model_lacks_and_bad_modes():
    model = experts_model()
    router = KeywordRouter.from_dict({"experts": {"python": ["python"], "rust": ["rust"]}, "default": "python"})
    with pytest.raises(DataError, match="router expert 'rust' is not an expert of the model; model experts: python, sql, docs"):
        InferenceAgent(model, word_tokenizer(), router)
    assert agent_for(model).generate([]) == []
    with pytest.raises(ConfigError, match="combine mode 'stitch' is unknown"):
        agent_for(model, "stitch")
    with pytest.raises(ConfigError, match="needs a gate object"):
        agent_for(model, "gate")
    with pytest.raises(ConfigError, match="agent dispatch 'bgmv' is unknown; use one of gathered, peft"):
        agent_for(model, dispatch="bgmv")
