"""Hugging Face sequence classifiers with PEFT adapters, built tiny from configs."""

from __future__ import annotations

import peft  # noqa: F401  (imported at collection: its 5-8 s import is not a test's time)
import pytest
import torch
import torch.nn.functional as F

from fedmoe.errors import DataError, FedMoEError
from fedmoe.models.classifier import Classifier
from fedmoe.models.networks import build_network
from fedmoe.models.text import HFSequenceClassifier, check_tokenizer, tiny_config

ARCHS = ["bert", "roberta", "gpt2", "llama", "qwen2"]
HEADS = {"bert": "classifier", "roberta": "classifier", "gpt2": "score", "llama": "score", "qwen2": "score"}


def _net(model_type: str, num_classes: int = 3, **adapter) -> HFSequenceClassifier:
    return HFSequenceClassifier(num_classes, config=tiny_config(model_type), adapter={"init_seed": 0, **adapter})


def _batch(pad_id: int, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, 4:] = pad_id
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "label": torch.zeros(batch)}


@pytest.mark.parametrize("model_type", ARCHS)
def test_each_architecture_forwards_a_dict_batch_to_logits(model_type):
    net = _net(model_type)
    logits = net(_batch(net.config.pad_token_id))
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", ARCHS)
def test_only_adapters_and_head_are_trainable(model_type):
    net = _net(model_type)
    keys = net.trainable_keys()
    head = f".{HEADS[model_type]}.modules_to_save.default."
    assert keys and all(".lora_A." in k or ".lora_B." in k or head in k for k in keys)
    assert any(head in k for k in keys)
    assert {r.a_key for r in net.adapted_layers()} | {r.b_key for r in net.adapted_layers()} <= keys
    net(_batch(net.config.pad_token_id)).sum().backward()
    with_grad = {k for k, p in net.named_parameters() if p.grad is not None}
    assert with_grad <= keys and any(head in k for k in with_grad)


def test_last_token_heads_pool_the_last_non_pad_token():
    net = _net("gpt2").eval()
    batch = _batch(net.config.pad_token_id)
    short = {k: v[:1, :4] for k, v in batch.items() if v.dim() == 2}
    torch.testing.assert_close(net(batch)[:1], net(short))


def test_pad_id_defaults_to_eos_and_follows_the_argument():
    assert _net("llama").config.pad_token_id == 2
    net = HFSequenceClassifier(2, config=tiny_config("llama"), pad_token_id=0)
    assert net.config.pad_token_id == 0


def test_pad_id_outside_the_vocabulary_is_an_error():
    config = tiny_config("gpt2", bos_token_id=50256, eos_token_id=50256)
    with pytest.raises(FedMoEError, match="pad_token_id=50256 is outside the vocabulary of 100 tokens"):
        HFSequenceClassifier(2, config=config)


def test_regression_head_has_one_output_and_mse_loss():
    module = Classifier(network="hf_sequence_classifier", num_classes=1, network_kwargs={"config": tiny_config("bert")}).eval()
    x = _batch(0)
    y = torch.tensor([0.5, 2.0, 4.5])
    logits = module.net(x)
    assert logits.shape == (3, 1)
    loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.mse_loss(logits.squeeze(-1), y))


def test_classification_loss_stays_cross_entropy():
    module = Classifier(network="hf_sequence_classifier", num_classes=3, network_kwargs={"config": tiny_config("bert")}).eval()
    x, y = _batch(0), torch.tensor([0, 2, 1])
    torch.testing.assert_close(module.training_step((x, y), 0), F.cross_entropy(module.net(x), y))


def test_registry_builds_the_network_by_name():
    net = build_network("hf_sequence_classifier", 2, config=tiny_config("qwen2"))
    assert isinstance(net, HFSequenceClassifier)


def test_two_builds_with_the_same_arguments_have_the_same_keys_and_weights():
    a, b = _net("roberta"), _net("roberta")
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_init_seed_sets_the_adapter_init_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = _net("bert", init_seed=1)
    assert torch.equal(torch.rand(1), expected)
    b = _net("bert", init_seed=2)
    key = a.adapted_layers()[0].a_key
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])


def test_from_pretrained_loads_the_saved_weights(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = tiny_config("bert")
    saved = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config, num_labels=2))
    saved.save_pretrained(tmp_path)
    net = HFSequenceClassifier(2, pretrained=str(tmp_path), adapter={"type": "none"})
    loaded = net.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.state_dict().items())
    lora = HFSequenceClassifier(2, pretrained=str(tmp_path))
    base = lora.state_dict()[lora.adapted_layers()[0].base_key]
    assert torch.equal(base, saved.state_dict()["bert.encoder.layer.0.attention.self.query.weight"])


def test_from_pretrained_with_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"model folder .*nowhere'? does not exist") as err:
        HFSequenceClassifier(2, pretrained=str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)


def test_from_pretrained_with_a_folder_without_a_model_is_an_error(tmp_path):
    with pytest.raises(DataError, match="holds no config.json"):
        HFSequenceClassifier(2, pretrained=str(tmp_path))


def test_from_pretrained_with_a_head_of_another_size_is_an_error(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**tiny_config("bert"), num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="saved classification head does not have num_classes=5 outputs") as err:
        HFSequenceClassifier(5, pretrained=str(tmp_path))
    assert "\n" not in str(err.value)


def test_target_modules_matching_nothing_is_a_one_line_error():
    with pytest.raises(DataError, match=r"adapter.target_modules \['q_proj'\] match no Linear or Conv1D layer.*query") as err:
        _net("bert", target_modules=["query", "q_proj"])
    assert "\n" not in str(err.value)


def test_needs_exactly_one_of_pretrained_and_config():
    with pytest.raises(FedMoEError, match="exactly one of 'pretrained'"):
        HFSequenceClassifier(2)


def test_config_without_model_type_is_an_error():
    config = tiny_config("bert")
    del config["model_type"]
    with pytest.raises(FedMoEError, match="needs a 'model_type'"):
        HFSequenceClassifier(2, config=config)


def test_adapter_none_trains_the_whole_model():
    net = _net("bert", type="none")
    assert net.adapted_layers() == []
    assert net.trainable_keys() == {k for k, _ in net.named_parameters()}


def test_bfloat16_base_keeps_float32_adapters():
    net = HFSequenceClassifier(2, config=tiny_config("qwen2"), torch_dtype="bfloat16")
    record = net.adapted_layers()[0]
    state = net.state_dict()
    assert state[record.base_key].dtype == torch.bfloat16 and state[record.a_key].dtype == torch.float32
    assert net(_batch(2)).shape == (3, 2)


def test_unknown_torch_dtype_is_an_error():
    with pytest.raises(FedMoEError, match="torch_dtype='fp8' is unknown"):
        HFSequenceClassifier(2, config=tiny_config("bert"), torch_dtype="fp8")


class _Tokenizer:
    def __init__(self, size: int, pad: int | None) -> None:
        self.size, self.pad_token_id = size, pad

    def __len__(self) -> int:
        return self.size


def test_tokenizer_larger_than_the_embeddings_is_an_error():
    net = _net("bert")
    assert net.vocab_size == 100
    check_tokenizer(net, _Tokenizer(100, 0))
    with pytest.raises(DataError, match="has 101 tokens but the model's embeddings hold 100"):
        check_tokenizer(net, _Tokenizer(101, 0))


def test_tokenizer_padding_with_another_id_than_a_last_token_head_pools_by_is_an_error():
    with pytest.raises(DataError, match=r"pads with id 0 but the model pools by pad_token_id=2; set network_kwargs.pad_token_id: 0"):
        check_tokenizer(_net("qwen2"), _Tokenizer(50, 0))


def test_tokenizer_from_a_folder_is_checked(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="w0", unk_token="w1").save_pretrained(tmp_path)
    with pytest.raises(DataError, match=f"tokenizer at {tmp_path} has 120 tokens"):
        check_tokenizer(_net("bert"), tmp_path)
    with pytest.raises(DataError, match="tokenizer folder .* does not exist"):
        check_tokenizer(_net("bert"), tmp_path / "missing")


def test_pretrained_from_a_package_that_is_not_installed_is_a_one_line_error():
    with pytest.raises(DataError, match="package 'no_such_models_pkg' is not installed"):
        HFSequenceClassifier(2, pretrained="package:no_such_models_pkg")


def test_last_token_head_without_pad_or_eos_id_is_an_error():
    config = tiny_config("llama", eos_token_id=None)
    with pytest.raises(FedMoEError, match="a llama classifier needs network_kwargs.pad_token_id"):
        HFSequenceClassifier(2, config=config)


def test_zero_classes_is_an_error():
    with pytest.raises(FedMoEError, match="num_classes=0 must be at least 1"):
        HFSequenceClassifier(0, config=tiny_config("bert"))
