"""Row-gathered mixed-adapter LoRA on tiny models: the same forward as PEFT's ``adapter_names`` and
as each row's adapter alone (left padding, different ranks, scalings and target layers, the base
row), a row naming several adapters, generation token for token, GPT-2's ``fan_in_fan_out``, the
layers' forwards restored after errors, and the refusals."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedmoe.errors import ConfigError, DataError
from fedmoe.models.causal import ExpertModel, build_causal_lm, tiny_causal_config
from fedmoe.models.mixed_lora import BASE, gathered_adapters, lora_layers, stack_rows

#: Three adapters of different ranks, scalings and target layers (``c`` adapts no v_proj).
ADAPTERS = {
    "a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "o_proj"]),
    "c": dict(r=3, lora_alpha=3, target_modules=["q_proj"]),
}
ROWS = ["a", "b", "c", BASE, "b"]


def peft_model(adapters=ADAPTERS, dropout: float = 0.0, **extra):
    """A tiny Qwen2 with random (non-zero) A and B in every adapter, in eval mode."""
    base = build_causal_lm(tiny_causal_config("qwen2", 64), seed=0)
    torch.manual_seed(0)
    model = None
    for name, kw in adapters.items():
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=dropout, init_lora_weights=False, **kw, **extra)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.eval()


def left_padded(n: int = len(ROWS)) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 64, (4 + (i * 3) % 5,), generator=gen).tolist() for i in range(n)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, rows


def alone(model, adapter: str, row: list[int]) -> torch.Tensor:
    ids = torch.tensor([row])
    with torch.no_grad():
        if adapter == BASE:
            with model.disable_adapter():
                return model(input_ids=ids).logits[0]
        model.base_model.set_adapter(adapter)
        return model(input_ids=ids).logits[0]


def test_gathered_forward_equals_peft_adapter_names_and_each_rows_adapter_alone():
    model = peft_model()
    ids, mask, rows = left_padded()
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
        with gathered_adapters(model, ROWS):
            ours = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    for i, (adapter, row) in enumerate(zip(ROWS, rows)):
        assert torch.allclose(ours[i, ids.shape[1] - len(row):], alone(model, adapter, row), atol=1e-5)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # the rows really differ by adapter


def test_stacks_pad_ranks_with_zeros_and_fold_the_scaling_into_b():
    model = peft_model()
    stacks = stack_rows(model, ROWS)
    q = next(n for n in stacks if n.endswith("layers.0.self_attn.q_proj"))
    v = next(n for n in stacks if n.endswith("layers.0.self_attn.v_proj"))
    a_rows, b_rows = stacks[q]
    assert a_rows.shape == (5, 32, 4) and b_rows.shape == (5, 4, 32)
    m = model.get_submodule(q)
    for i, adapter in enumerate(ROWS):
        want = torch.zeros(32, 32) if adapter == BASE else m.scaling[adapter] * m.lora_B[adapter].weight @ m.lora_A[adapter].weight
        assert torch.allclose((a_rows[i] @ b_rows[i]).t(), want, atol=1e-6)
    assert a_rows[0, :, 2:].abs().sum() == 0 and b_rows[0, 2:].abs().sum() == 0  # rank 2 padded to 4
    assert stacks[v][0][2].abs().sum() == 0  # "c" adapts no v_proj: its row is zero there
    assert list(stacks) == list(lora_layers(model)) and stack_rows(model, ["c"])[v] is None


def test_a_row_naming_an_expert_and_its_correction_gets_their_sum():
    base = build_causal_lm(tiny_causal_config("qwen2", 64), seed=0)
    model = ExpertModel(base, ("python", "sql"), {"r": 4, "alpha": 8, "init_seed": 0}, correction_rank=2)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.peft.named_parameters())
    with torch.no_grad():
        for e in model.experts:
            for x in model.adapted_layers(e):
                params[x.b_key].copy_(torch.randn(params[x.b_key].shape, generator=gen))
            model.load_corrections(e, {x.name: (torch.randn(params[x.b_key].shape[0], 2, generator=gen),
                                                torch.randn(2, params[x.a_key].shape[1], generator=gen))
                                       for x in model.adapted_layers(e)})
    model.eval()
    ids, mask, rows = left_padded(2)
    with torch.no_grad(), gathered_adapters(model.peft, [("sql", "sql__corr"), ("python", "python__corr")]):
        ours = model.peft(input_ids=ids, attention_mask=mask).logits
    for i, (e, row) in enumerate(zip(("sql", "python"), rows)):
        model.activate(e)
        with torch.no_grad():
            own = model(input_ids=torch.tensor([row])).logits[0]
        assert torch.allclose(ours[i, ids.shape[1] - len(row):], own, atol=1e-5)


def test_generation_with_gathered_adapters_equals_each_row_generated_alone():
    model = peft_model()
    ids, mask, rows = left_padded(4)
    names = ["c", "a", BASE, "b"]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    with torch.no_grad(), gathered_adapters(model, names):
        out = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, ids.shape[1]:]
    for i, (adapter, row) in enumerate(zip(names, rows)):
        one = torch.tensor([row])
        with torch.no_grad():
            if adapter == BASE:
                with model.disable_adapter():
                    own = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **settings)
            else:
                model.base_model.set_adapter(adapter)
                own = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **settings)
        assert out[i].tolist() == own[0, len(row):].tolist()


def test_gpt2_fan_in_fan_out_layers_are_gathered_like_peft():
    from transformers import AutoConfig

    base = build_causal_lm(AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    torch.manual_seed(0)
    cfg = dict(task_type="CAUSAL_LM", target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, **cfg), adapter_name="x")
    model.add_adapter("y", LoraConfig(r=3, lora_alpha=3, **cfg))
    model.eval()
    assert all(m.fan_in_fan_out for m in lora_layers(model).values())
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(input_ids=ids, adapter_names=["y", "x", "y"]).logits
        with gathered_adapters(model, ["y", "x", "y"]):
            ours = model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_layers_forwards_are_restored_after_an_exception_and_a_gate_survives():
    from fedmoe.models.moe_lora import MoELoRA

    model = peft_model()
    ids, mask, _ = left_padded()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(RuntimeError, match="boom"), gathered_adapters(model, ROWS):
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in lora_layers(model).values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    # a patched forward (the per-token gate's) is put back as it was
    base = build_causal_lm(tiny_causal_config("qwen2", 64), seed=0)
    experts = ExpertModel(base, ("python", "sql"), {"r": 2, "alpha": 4, "init_seed": 0}, correction_rank=2).eval()
    gate = MoELoRA(experts)
    patched = {n: vars(m)["forward"] for n, m in lora_layers(experts.peft).items()}
    with pytest.raises(DataError), gathered_adapters(experts.peft, ["sql", "python"]):
        experts.peft(input_ids=ids[:3])
    assert {n: vars(m)["forward"] for n, m in lora_layers(experts.peft).items()} == patched
    gate.remove()


def test_a_forward_with_another_batch_size_is_refused():
    model = peft_model()
    ids, mask, _ = left_padded()
    with gathered_adapters(model, ROWS), pytest.raises(
        DataError, match=r"stacked for 5 rows but a forward has batch size 2; give one adapter per row"
    ):
        model(input_ids=ids[:2], attention_mask=mask[:2])


def test_unknown_adapters_empty_rows_and_adapter_names_inside_the_block_are_refused():
    model = peft_model()
    with pytest.raises(DataError, match=r"adapter 'z' is not in any LoRA layer of the model; adapters: a, b, c"):
        stack_rows(model, ["a", "z"])
    with pytest.raises(ConfigError, match="at least one row"):
        stack_rows(model, [])
    ids, mask, _ = left_padded()
    with gathered_adapters(model, ROWS), pytest.raises(ConfigError, match="passed adapter_names while gathered"):
        model(input_ids=ids, attention_mask=mask, adapter_names=ROWS)


def test_training_mode_with_dropout_is_refused():
    model = peft_model(dropout=0.1).train()
    ids, mask, _ = left_padded()
    with gathered_adapters(model, ROWS), pytest.raises(ConfigError, match=r"training mode with dropout; call model.eval\(\)"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    with torch.no_grad(), gathered_adapters(model, ROWS):
        model(input_ids=ids, attention_mask=mask)


def test_lora_variants_and_lora_biases_are_refused():
    dora = peft_model({"a": dict(r=2, lora_alpha=4, target_modules=["q_proj"])}, use_dora=True)
    with pytest.raises(ConfigError, match=r"adapter 'a' at .*q_proj is a LoRA variant \(DoraLinearVariant\)"):
        stack_rows(dora, ["a"])
    biased = peft_model({"a": dict(r=2, lora_alpha=4, target_modules=["q_proj"])}, lora_bias=True)
    with pytest.raises(ConfigError, match="has a LoRA bias"):
        stack_rows(biased, ["a"])
