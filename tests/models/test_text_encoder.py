"""Text clients for Fed-MoE: a Hugging Face backbone, masked mean pooling and a linear head, built
tiny from configs (no downloads)."""

from __future__ import annotations

import importlib
import pytest
import torch

from fedmoe.errors import DataError, FedMoEError
from fedmoe.models.classifier import Classifier
from fedmoe.models.moe import ServerMoE, server_loss
from fedmoe.models.networks import build_network
from fedmoe.models.text_encoder import TextEncoder, check_vocabulary
from tests.wordlevel import word_tokenizer

# Imported at collection: a slow first import is not a test's time.
importlib.import_module("transformers.models.bert.modeling_bert")
importlib.import_module("transformers.models.gpt2.modeling_gpt2")

CONFIGS = {
    "bert": {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32,
             "bos_token_id": 2, "eos_token_id": 2},
}


def encoder(model_type: str = "bert", num_classes: int = 3, seed: int = 0, **kwargs) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(num_classes, config=dict(CONFIGS[model_type]), **kwargs).eval()


def batch(ids: list[list[int]], pad: int = 0, side: str = "right", extra: int = 0) -> dict[str, torch.Tensor]:
    """Sequences padded to the longest plus ``extra`` positions, on ``side``."""
    width = max(map(len, ids)) + extra
    rows, masks = [], []
    for seq in ids:
        fill = [pad] * (width - len(seq))
        rows.append(seq + fill if side == "right" else fill + seq)
        masks.append([1] * len(seq) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(seq))
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}


@pytest.mark.parametrize("model_type,side", [("bert", "right"), ("bert", "left"), ("gpt2", "right"), ("gpt2", "left")])
def test_padding_changes_nothing(model_type, side):
    net = encoder(model_type)
    alone = net(batch([[5, 6, 7]]))
    padded = net(batch([[5, 6, 7], [8, 9, 10, 11, 12, 13]], side=side, extra=3))
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)


def test_pooling_is_the_mean_over_real_tokens():
    net = encoder("bert")
    x = batch([[5, 6], [7, 8, 9]])
    hidden = net.backbone(**x).last_hidden_state
    expected = hidden[0, :2].mean(0)
    torch.testing.assert_close(net.pooled(x)[0], expected)


def test_registered_network_serves_as_client_through_the_classifier():
    module = Classifier(network="text_encoder", num_classes=2, network_kwargs={"config": CONFIGS["gpt2"]})
    assert isinstance(module.net, TextEncoder)
    gate = module.build_network(3)
    assert gate.head.out_features == 3
    x = batch([[5, 6, 7], [8, 9]])
    loss = module.training_step((x, torch.tensor([0, 1])), 0)
    loss.backward()
    assert module.net.head.weight.grad is not None


def test_server_moe_routes_dict_batches_to_text_experts_behind_a_smaller_gate():
    experts = [encoder("bert", 2, seed=s).train() for s in range(3)]
    small = dict(CONFIGS["bert"], hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    torch.manual_seed(5)
    gate, noise = TextEncoder(3, config=dict(small)), TextEncoder(3, config=dict(small))
    moe = ServerMoE(experts, [encoder("bert", 2, seed=9)], gate, noise, top_k=1).train()
    x = batch([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]])
    targets = torch.tensor([0, 1, 1, 0])
    out = moe(x)
    assert out.logits.shape == (4, 2) and out.gates.shape == (4, 3)
    loss, _ = server_loss(out, targets, moe)
    loss.backward()
    assert gate.head.weight.grad is not None
    assert sum(p.numel() for p in gate.parameters()) < sum(p.numel() for p in experts[0].parameters())


def test_sparse_dispatch_gives_each_text_expert_its_own_samples_unchanged_by_padding():
    experts = [encoder("bert", 2, seed=s) for s in range(2)]
    torch.manual_seed(3)
    gate = TextEncoder(2, config=dict(CONFIGS["bert"]))
    moe = ServerMoE(experts, [], gate, None, top_k=1, gate_value="code").eval()
    x = batch([[5, 6, 7], [8, 9, 10, 11, 12]])
    out = moe(x)
    first = int(out.topk[0, 0])
    torch.testing.assert_close(out.logits[:1], experts[first](batch([[5, 6, 7]])), atol=1e-5, rtol=1e-5)


def test_freeze_backbone_trains_the_head_only():
    net = encoder("bert", freeze_backbone=True)
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_loads_a_saved_backbone_folder(tmp_path):
    source = encoder("bert")
    source.backbone.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    loaded = TextEncoder(3, pretrained=str(tmp_path / "model")).eval()
    loaded.head.load_state_dict(source.head.state_dict())
    x = batch([[5, 6, 7]])
    torch.testing.assert_close(loaded(x), source(x))


def test_missing_model_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="model folder .*nowhere.* does not exist"):
        TextEncoder(2, pretrained=str(tmp_path / "nowhere"))


def test_needs_exactly_one_of_pretrained_or_config():
    with pytest.raises(FedMoEError, match="exactly one of 'pretrained'"):
        TextEncoder(2)


def test_tokenizer_larger_than_the_embeddings_is_an_error(tmp_path):
    tok = word_tokenizer([f"w{i}" for i in range(60)], chat=False, chat_specials=False)
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(DataError, match=r"tokenizer .*tok has 64 tokens but the model's embeddings hold 50"):
        TextEncoder(2, config=dict(CONFIGS["bert"]), tokenizer=str(tmp_path / "tok"))
    small = word_tokenizer(["a", "b"], chat=False, chat_specials=False)
    check_vocabulary(encoder("bert"), small)


def test_missing_tokenizer_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer folder .*absent.* does not exist"):
        TextEncoder(2, config=dict(CONFIGS["bert"]), tokenizer=str(tmp_path / "absent"))


def test_token_ids_past_the_embeddings_are_an_error_naming_the_tokenizer_key():
    with pytest.raises(DataError, match=r"token id 70 is outside the model's 50 embeddings.*data.tokenizer"):
        encoder("bert")(batch([[5, 70]]))


def test_build_network_by_name_passes_the_kwargs():
    net = build_network("text_encoder", 4, config=dict(CONFIGS["gpt2"]), dropout=0.1)
    assert isinstance(net, TextEncoder) and net.head.out_features == 4 and net.dropout.p == 0.1
