"""The per-token MoE-LoRA gate on a tiny Qwen2: one-hot equivalence with PEFT, gradients in router-only
and joint training, the Switch balance loss, top-k renormalisation, dense/sparse routing and maturity,
gate save/load and FedAvg, growth without disturbing the old experts, generation with a KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe.algorithms.fusion import weighted_average
from fedmoe.errors import CheckpointError, DataError
from fedmoe.models.causal import ExpertModel, build_causal_lm, correction_name, tiny_causal_config
from fedmoe.models.moe_lora import OFF_LOGIT, MoELoRA, train_gate

pytest.importorskip("peft")  # imported at collection: its import is not a test's time

VOCAB = 64
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 0}
TOKENS = torch.tensor([[5, 9, 11, 3, 7, 20, 8, 2], [4, 6, 30, 31, 12, 13, 40, 41]])
NAMES = ("python", "sql", "docs")


def experts(names=NAMES, **lora) -> ExpertModel:
    """Experts with non-zero B and a non-zero correction each, so that every expert differs."""
    model = ExpertModel(build_causal_lm(tiny_causal_config("qwen2", VOCAB)), names, {**LORA, **lora}, correction_rank=2)
    gen = torch.Generator().manual_seed(1)
    params = dict(model.peft.named_parameters())
    for i, name in enumerate(names):
        factors = {}
        with torch.no_grad():
            for layer in model.adapted_layers(name):
                b = params[layer.b_key]
                b.copy_(torch.randn(b.shape, generator=gen))
                d_out, d_in = model.peft.get_submodule(layer.name).base_layer.weight.shape
                factors[layer.name] = (torch.randn(d_out, 1, generator=gen), torch.randn(1, d_in, generator=gen) * 0.1)
        model.load_corrections(name, factors)
    model.eval()
    return model


def peft_logits(model: ExpertModel, expert: str | None) -> torch.Tensor:
    model.activate(expert)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def gate_logits(moe: MoELoRA, **batch) -> torch.Tensor:
    with torch.no_grad():
        return moe(input_ids=TOKENS, **batch).logits


def bias_only(moe: MoELoRA, biases) -> None:
    """Every layer's gate: zero weights and the given per-layer biases (constant routing)."""
    with torch.no_grad():
        for gate, b in zip(moe.gates, biases):
            gate.weight.zero_()
            gate.bias.copy_(torch.tensor(b, dtype=torch.float32))


# ------------------------------------------------------------------------------- equivalence


def test_forced_one_hot_gate_reproduces_pefts_single_adapter_output_with_its_correction():
    model = experts()
    reference = {name: peft_logits(model, name) for name in NAMES}
    moe = MoELoRA(model, top_k=2, mode="dense")
    for name in NAMES:
        moe.force = name
        assert torch.allclose(gate_logits(moe), reference[name], atol=1e-5)
    assert not torch.allclose(reference["python"], reference["sql"], atol=1e-3)


def test_a_top1_gate_whose_weights_pick_one_expert_equals_that_adapter_too():
    model = experts()
    reference = peft_logits(model, "sql")
    moe = MoELoRA(model, top_k=1, mode="sparse")
    moe.set_expert_bias("sql", 50.0)
    assert torch.allclose(gate_logits(moe), reference, atol=1e-5)


def test_remove_restores_pefts_forward_and_install_reapplies_the_gate():
    model = experts()
    reference = peft_logits(model, "python")
    moe = MoELoRA(model, mode="dense")
    mixed = gate_logits(moe)
    assert not torch.allclose(mixed, reference, atol=1e-3)
    moe.remove()
    assert not moe.installed and torch.equal(peft_logits(model, "python"), reference)
    moe.install()
    assert torch.equal(gate_logits(moe), mixed)
    model.activate(None)  # PEFT's disabled adapters still give the base alone
    with torch.no_grad():
        base = model(input_ids=TOKENS).logits
    moe.remove()
    assert torch.equal(peft_logits(model, None), base)


def test_training_one_expert_while_a_gate_is_installed_is_refused_until_it_is_removed():
    model = experts()
    moe = MoELoRA(model, mode="dense")
    labels = TOKENS.clone()
    batch = ({"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)}, labels)
    with pytest.raises(DataError, match="gate.*remove"):
        model.train_steps("sql", [batch], steps=1)
    moe.remove()
    result = model.train_steps("sql", [batch], steps=1)
    assert result.steps == 1


def test_a_second_gate_on_the_same_layers_is_refused():
    model = experts()
    MoELoRA(model)
    with pytest.raises(DataError, match=r"already has a patched forward .*remove\(\) that gate first"):
        MoELoRA(model)


def test_bad_settings_are_data_errors():
    model = experts()
    with pytest.raises(DataError, match=r"expert 'java' is unknown"):
        MoELoRA(model, experts=("python", "java"))
    with pytest.raises(DataError, match=r"top_k=0 must be a positive integer"):
        MoELoRA(model, top_k=0)
    with pytest.raises(DataError, match=r"gate mode='soft' is unknown"):
        MoELoRA(model, mode="soft")
    moe = MoELoRA(model, experts=("python", "sql"))
    with pytest.raises(DataError, match=r"expert 'docs' is not in the gate; gated experts: python, sql"):
        moe.force = "docs"


# ------------------------------------------------------------------------------- gradients


def _grads(moe: MoELoRA, joint: bool) -> dict[str, torch.Tensor | None]:
    moe.set_trainable(joint)
    moe.train()
    out = moe(input_ids=TOKENS, labels=TOKENS)
    (out.loss + moe.balance_loss()).backward()
    return {n: p.grad for n, p in moe.named_parameters()}


def test_router_only_training_sends_gradients_to_the_gate_alone():
    moe = MoELoRA(experts(), mode="dense")
    grads = _grads(moe, joint=False)
    gate = {n: g for n, g in grads.items() if n.startswith("gates.")}
    assert len(gate) == 2 * len(moe.layer_names) and all(g is not None and g.abs().sum() > 0 for g in gate.values())
    assert all(g is None for n, g in grads.items() if not n.startswith("gates."))


def test_joint_training_also_trains_the_expert_factors_never_corrections_or_base():
    moe = MoELoRA(experts(), mode="dense")
    grads = _grads(moe, joint=True)
    lora = {n: g for n, g in grads.items() if ".lora_" in n and "__corr" not in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    assert all(grads[n] is not None for n in grads if n.startswith("gates."))
    frozen = [n for n in grads if not n.startswith("gates.") and n not in lora]
    assert any(correction_name("python") in n for n in frozen) and any("base_layer" in n for n in frozen)
    assert all(grads[n] is None for n in frozen)


def test_sparse_top1_sends_no_gradient_to_unrouted_experts():
    moe = MoELoRA(experts(), top_k=1, mode="sparse")
    bias_only(moe, [[5.0, 0.0, 0.0]] * len(moe.layer_names))
    grads = _grads(moe, joint=True)
    assert all(grads[n] is None or grads[n].abs().sum() == 0 for n in grads if ".lora_B.sql." in n)
    assert all(grads[n].abs().sum() > 0 for n in grads if ".lora_B.python." in n)


def test_train_gate_router_only_moves_the_gate_and_leaves_the_experts():
    moe = MoELoRA(experts(), mode="auto", mature_steps=2)
    before = moe.model.peft.state_dict()
    gate_before = moe.gate_state()
    batch = ({"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)}, TOKENS)
    losses = train_gate(moe, [batch], steps=3, lr=1e-2, balance_coef=0.01)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    after = moe.model.peft.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(gate_before[k], v) for k, v in moe.gate_state().items())
    assert moe.steps == {name: 3 for name in NAMES} and moe.routing() == "sparse" and not moe.training


def test_train_gate_joint_changes_the_experts_but_not_their_corrections():
    model = experts()
    moe = MoELoRA(model, mode="dense")
    corr = model.correction_factors("python")
    state = model.expert_state("python")
    batch = ({"input_ids": TOKENS}, TOKENS)
    train_gate(moe, [batch], steps=2, lr=1e-2, balance_coef=0.0, joint=True)
    assert any(not torch.equal(state[k], v) for k, v in model.expert_state("python").items())
    assert all(torch.equal(corr[k][0], u) and torch.equal(corr[k][1], v) for k, (u, v) in model.correction_factors("python").items())


def test_train_gate_refuses_empty_batches_and_bad_steps():
    moe = MoELoRA(experts())
    with pytest.raises(DataError, match=r"training batches are empty"):
        train_gate(moe, [], steps=1)
    with pytest.raises(DataError, match=r"steps=0 must be a positive integer"):
        train_gate(moe, [], steps=0)


# -------------------------------------------------------------------------------- balancing


def test_balance_loss_equals_the_hand_computed_switch_loss():
    moe = MoELoRA(experts(names=("python", "sql")), balance_coef=0.1)
    moe._clear_stats()
    # 4 tokens, E = 2: top-1 = [0, 0, 1, 0] -> f = [3/4, 1/4]; P = mean of the softmaxes.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.5 - 1e-3]])
    moe._record(logits)
    p = torch.softmax(logits, -1).mean(0)
    expected_one = 0.1 * 2 * (0.75 * p[0] + 0.25 * p[1])
    assert torch.isclose(moe.balance_loss(), expected_one)
    moe._record(torch.zeros(4, 2))  # second layer: ties go to expert 0, f = [1, 0], P = [1/2, 1/2]
    assert torch.isclose(moe.balance_loss(), (expected_one + 0.1 * 2 * 0.5) / 2)
    assert torch.isclose(moe.balance_loss(coef=1.0), (expected_one / 0.1 + 1.0) / 2)


def test_balance_loss_through_the_model_averages_layers_and_is_c_for_uniform_routing():
    moe = MoELoRA(experts(), balance_coef=0.01)
    n = len(moe.layer_names)
    bias_only(moe, [[0.0, 0.0, 0.0]] * n)
    moe(input_ids=TOKENS)  # statistics come from forwards with gradients enabled
    assert torch.isclose(moe.balance_loss(), torch.tensor(0.01))
    biases = [[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]] * (n // 2)
    bias_only(moe, biases)
    moe(input_ids=TOKENS)
    per_layer = [3.0 / 5.0, 1.0 / 3.0] * (n // 2)  # P of each layer's top-1 expert
    assert torch.isclose(moe.balance_loss(), torch.tensor(0.01 * 3 * sum(per_layer) / n))
    assert moe.balance_loss() > 0.01


def test_padding_tokens_do_not_count_in_the_balance_statistics():
    moe = MoELoRA(experts(names=("python", "sql")), balance_coef=1.0)
    moe._clear_stats()
    moe._token_mask = torch.tensor([[1, 1, 0]])
    moe._record(torch.tensor([[[0.0, 1.0], [0.0, 1.0], [9.0, 0.0]]]))
    moe._token_mask = None
    p1 = torch.softmax(torch.tensor([0.0, 1.0]), -1)[1]
    assert torch.isclose(moe.balance_loss(), 2 * p1)


def test_balance_loss_before_any_forward_with_gradients_is_a_data_error():
    moe = MoELoRA(experts())
    gate_logits(moe)  # under no_grad: no statistics
    with pytest.raises(DataError, match=r"balance_loss\(\) needs a forward of the gated model with gradients enabled"):
        moe.balance_loss()


# ---------------------------------------------------------------------------------- routing


def test_sparse_weights_are_the_softmax_renormalised_over_the_top_k():
    moe = MoELoRA(experts(names=("python", "sql", "docs")), top_k=2, mode="sparse")
    logits = torch.tensor([[2.0, -1.0, 1.0], [0.0, 3.0, 0.5]])
    w = moe.gate_weights(logits)
    full = torch.softmax(logits, -1)
    top = torch.zeros_like(full).scatter(-1, logits.topk(2, -1).indices, 1.0)
    assert torch.allclose(w, full * top / (full * top).sum(-1, keepdim=True))
    assert torch.equal((w > 0).sum(-1), torch.tensor([2, 2])) and torch.allclose(w.sum(-1), torch.ones(2))
    assert w[0, 1] == 0 and w[1, 0] == 0


def test_dense_mode_while_an_expert_is_new_then_sparse_once_all_are_mature():
    moe = MoELoRA(experts(), top_k=1, mode="auto", mature_steps=5)
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert moe.routing() == "dense" and not moe.is_mature("python")
    assert torch.allclose(moe.gate_weights(logits), torch.softmax(logits, -1))
    moe.record_steps(5)
    assert moe.routing() == "sparse" and moe.is_mature("docs")
    assert torch.equal(moe.gate_weights(logits), torch.tensor([[1.0, 0.0, 0.0]]))
    moe.mode = "dense"
    assert moe.routing() == "dense"
    dense = gate_logits(moe)
    moe.mode = "sparse"
    assert not torch.allclose(gate_logits(moe), dense, atol=1e-4)


# ------------------------------------------------------------------------- save, load, FedAvg


def test_gate_save_load_round_trip_and_the_same_experts_in_another_order(tmp_path):
    model = experts()
    moe = MoELoRA(model, mode="dense", seed=1)
    moe.record_steps(7)
    out = gate_logits(moe)
    moe.save_gate(tmp_path / "gate.safetensors")
    moe.remove()
    other = MoELoRA(model, mode="dense", seed=2)
    assert not torch.allclose(gate_logits(other), out, atol=1e-4)
    other.load_gate(tmp_path / "gate.safetensors")
    assert torch.equal(gate_logits(other), out) and other.steps == {n: 7 for n in NAMES}
    other.remove()
    permuted = MoELoRA(model, experts=("docs", "python", "sql"), mode="dense", seed=3)
    permuted.load_gate(tmp_path / "gate.safetensors")
    assert torch.allclose(gate_logits(permuted), out, atol=1e-6)


def test_pefts_own_save_and_load_of_an_expert_work_with_the_gate_installed(tmp_path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    source = MoELoRA(experts(), mode="dense")
    source.force = "sql"
    expected = gate_logits(source)
    source.model.peft.save_pretrained(tmp_path, selected_adapters=["sql"])
    saved = load_file(str(tmp_path / "sql" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k and "gate" not in k for k in saved)
    target_model = ExpertModel(build_causal_lm(tiny_causal_config("qwen2", VOCAB)), NAMES, LORA, correction_rank=2)
    target_model.load_corrections("sql", source.model.correction_factors("sql"))
    target = MoELoRA(target_model, mode="dense")
    set_peft_model_state_dict(target_model.peft, saved, adapter_name="sql")
    target.force = "sql"
    assert torch.allclose(gate_logits(target), expected, atol=1e-6)


def test_a_gate_for_another_set_of_experts_is_refused_naming_both(tmp_path):
    model = experts()
    moe = MoELoRA(model, experts=("python", "sql"))
    moe.save_gate(tmp_path / "gate.safetensors")
    moe.remove()
    other = MoELoRA(model)
    with pytest.raises(DataError, match=r"is for experts \['python', 'sql'\] but this gate has experts \['python', 'sql', 'docs'\]"):
        other.load_gate(tmp_path / "gate.safetensors")


def test_missing_or_foreign_gate_files_are_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    moe = MoELoRA(experts())
    with pytest.raises(CheckpointError, match=r"gate checkpoint .*nowhere.safetensors does not exist"):
        moe.load_gate(tmp_path / "nowhere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"junk.safetensors is unreadable"):
        moe.load_gate(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"other.safetensors is not a gate checkpoint"):
        moe.load_gate(tmp_path / "other.safetensors")


def test_fedavg_of_two_gates_is_the_weighted_mean_of_their_states():
    model = experts()
    a = MoELoRA(model, seed=1)
    state_a = a.gate_state()
    a.remove()
    b = MoELoRA(model, seed=2)
    state_b = b.gate_state()
    b.load_gate_state(weighted_average([state_a, state_b], [1.0, 3.0]))
    assert all(torch.allclose(v, 0.25 * state_a[k] + 0.75 * state_b[k]) for k, v in b.gate_state().items())
    assert set(state_a) == {f"{n}.{p}" for n in b.layer_names for p in ("weight", "bias")}


def test_a_gate_state_with_wrong_keys_or_shapes_is_refused():
    moe = MoELoRA(experts())
    state = moe.gate_state()
    key = next(iter(state))
    with pytest.raises(DataError, match=r"gate state misses"):
        moe.load_gate_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(DataError, match=r"has shape \(1,\), the gate's is"):
        moe.load_gate_state({**state, key: torch.zeros(1)})


# ----------------------------------------------------------------------------------- growth


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_growing_a_column_leaves_the_old_experts_outputs_unchanged(mode):
    model = experts()  # docs has its adapters (and a non-zero delta) but is not gated yet
    moe = MoELoRA(model, experts=("python", "sql"), top_k=1, mode=mode, seed=4)
    before = gate_logits(moe)
    forced = {}
    for name in ("python", "sql"):
        moe.force = name
        forced[name] = gate_logits(moe)
    moe.force = None
    moe.add_expert("docs")
    assert moe.experts == NAMES and moe.steps["docs"] == 0
    assert torch.equal(gate_logits(moe), before)
    for name in ("python", "sql"):
        moe.force = name
        assert torch.equal(gate_logits(moe), forced[name])
    moe.force = "docs"
    assert not torch.allclose(gate_logits(moe), before, atol=1e-3)


def test_a_grown_expert_with_a_finite_bias_learns_routes_in_dense_mode_and_stays_out_of_sparse_top_k():
    model = experts()
    moe = MoELoRA(model, experts=("python", "sql"), top_k=1, mode="sparse", seed=4)
    sparse = gate_logits(moe)
    moe.add_expert("docs", bias=-4.0)
    assert torch.equal(gate_logits(moe), sparse)  # tiny gate logits stay far above -4
    moe.mode = "dense"
    grads = _grads(moe, joint=False)
    assert all(grads[f"gates.{i}.bias"][2] != 0 for i in range(len(moe.layer_names)))


def _add_adapters_after_construction(model: ExpertModel, name: str) -> None:
    """What ``ExpertModel.add_expert(name)`` does: PEFT adapters ``name`` and ``name__corr`` with the
    model's configs, a zero correction, the active expert's gradients restored."""
    import copy

    first = model.experts[0]
    model.peft.add_adapter(name, copy.deepcopy(model.peft.peft_config[first]))
    model.peft.add_adapter(correction_name(name), copy.deepcopy(model.peft.peft_config[correction_name(first)]))
    model.experts = (*model.experts, name)
    model.load_corrections(name, None)
    model.activate(model.active)


def test_growth_after_adding_the_adapters_to_a_gated_model_keeps_the_gate_and_old_outputs():
    model = experts(names=("python", "sql"))
    moe = MoELoRA(model, top_k=1, mode="dense", seed=4)
    moe.set_trainable(joint=True)
    before = gate_logits(moe)
    _add_adapters_after_construction(model, "docs")
    assert moe.installed and torch.equal(gate_logits(moe), before)
    moe.add_expert("docs")
    assert torch.equal(gate_logits(moe), before)
    trainable = {n for n, p in model.peft.named_parameters() if p.requires_grad}
    assert any(".docs." in n for n in trainable) and not any("__corr" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if ".lora_B.docs." in n:
                p.normal_()
    moe.force = "docs"
    forced = gate_logits(moe)
    moe.remove()
    assert torch.allclose(forced, peft_logits(model, "docs"), atol=1e-5)


def test_growing_with_an_expert_the_model_lacks_or_already_gated_is_refused():
    model = experts(names=("python", "sql"))
    moe = MoELoRA(model)
    with pytest.raises(DataError, match=r"expert 'docs' is unknown"):
        moe.add_expert("docs")
    with pytest.raises(DataError, match=r"expert 'sql' is already in the gate"):
        moe.add_expert("sql")
    assert moe.gates[0].weight.shape[0] == 2 and OFF_LOGIT < -1e3


# ------------------------------------------------------------------------------- generation


def test_generation_with_the_kv_cache_gives_the_same_tokens_as_without():
    moe = MoELoRA(experts(), top_k=2, mode="sparse", init_std=0.5)
    moe.eval()
    prompt = TOKENS[:, :4]
    kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "max_new_tokens": 8, "do_sample": False,
              "pad_token_id": 0}
    with torch.no_grad():
        cached = moe.generate(**kwargs, use_cache=True)
        plain = moe.generate(**kwargs, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached, plain)
    moe.remove()
    moe.model.activate("python")
    with torch.no_grad():
        single = moe.model.peft.generate(**kwargs, use_cache=True)
    assert not torch.equal(single, cached)
