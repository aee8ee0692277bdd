"""The Fed-MoE presets: each experiments/<data set>/fedmoe*.yaml sets exactly the options that
docs/fedmoe.md tabulates for its column (the released folder, or Algorithm 1 as written)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedmoe.algorithms.fedmoe import FedMoE

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "fedmoe.md"

ALGORITHM1 = {
    "num_routed": 5, "num_main": 1, "top_k": 1, "lam": 0.1, "gate_value": "probability",
    "alpha_clamp": False, "noisy_gate": True, "load": "count", "entropy_mode": "paper",
    "confidence": "probability", "relevance_gate": "soft", "relevance_norm": "sum", "relevance_temperature": 1.0,
    "expert_update": "moving", "main_update": "moving", "main_epochs": 0, "server_epochs": 1,
    "server_schedule": "every_iteration", "train_experts_on_server": False, "train_noise": True,
    "gate_lr": 1e-4, "alpha_lr": 1e-3, "server_weight_decay": 5e-4, "server_eps": 1e-6,
    "server_lr_schedule": "constant", "stage_c": "paper", "client_update": "moving", "common_init": True,
    "keep_best_iteration": True, "server_optimizer": "adam", "server_momentum": 0.0,
}
"""Algorithm 1 as written: the same options for every data set (the class defaults)."""

FEMNIST_SETTINGS = {"iterations": 1, "alpha_init": 0.5, "w_ent": 0.1, "w_aux": 1.0, "label_smoothing": 0.0}
CIFAR_SETTINGS = {"iterations": 5, "alpha_init": 0.9, "w_ent": 1e-3, "w_aux": 0.1, "label_smoothing": 0.1}

FOLDER_BASE = {k: v for k, v in ALGORITHM1.items() if k != "server_momentum"}  # Adam: no momentum option
FEMNIST_FOLDER = {
    **FOLDER_BASE, **FEMNIST_SETTINGS,
    "gate_value": "code", "load": "code", "entropy_mode": "code", "relevance_gate": "gates",
    "expert_update": "replace", "main_update": "mean", "server_schedule": "pretrain_only",
    "gate_lr": 3e-5, "alpha_lr": 3e-5, "server_weight_decay": 0.0, "server_eps": 1e-8,
    "stage_c": "code", "client_update": "replace", "common_init": False, "keep_best_iteration": False,
}
CIFAR_FOLDER = {
    **FOLDER_BASE, **CIFAR_SETTINGS,
    "gate_value": "code", "load": "code", "entropy_mode": "code", "confidence": "logit", "relevance_gate": "gates",
    "main_update": "mean", "main_epochs": 20, "main_lr": 1e-4, "server_epochs": 5,
    "train_experts_on_server": True, "expert_lr": 1e-4, "main_server_lr": 5e-5, "train_noise": False,
    "alpha_lr": 5e-7, "server_lr_schedule": "cosine", "server_lr_period": 500,
    "stage_c": "code", "common_init": False, "keep_best_iteration": False,
}

PRESETS = {
    "femnist/fedmoe.yaml": ("FEMNIST", "FEMNIST", FEMNIST_FOLDER, {"sampling": "per_group", "persistent_optimizer": True}),
    "femnist/fedmoe_algorithm1.yaml": ("Algorithm 1", "FEMNIST", {**ALGORITHM1, **FEMNIST_SETTINGS},
                                       {"sampling": "uniform", "persistent_optimizer": False}),
    "cifar10/fedmoe.yaml": ("CIFAR-10", "CIFAR-10", CIFAR_FOLDER, {"sampling": "per_group", "persistent_optimizer": True}),
    "cifar10/fedmoe_algorithm1.yaml": ("Algorithm 1", "CIFAR-10", {**ALGORITHM1, **CIFAR_SETTINGS},
                                       {"sampling": "uniform", "persistent_optimizer": False}),
}
"""Preset -> (its column in docs/fedmoe.md, its data set, its algorithm options, its federation keys)."""

FEDERATION_ROWS = {"sampling", "persistent_optimizer"}
"""Table rows that are ``federation.*`` keys rather than algorithm options."""


def load_preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "experiments" / name).read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_exactly_the_options_of_its_column(name):
    _, _, options, federation = PRESETS[name]
    config = load_preset(name)
    algorithm = config["federation"]["algorithm"]
    assert algorithm["class_path"] == "fedmoe.algorithms.fedmoe.FedMoE"
    assert algorithm["init_args"] == options
    for key, value in federation.items():
        assert config["federation"][key] == value, key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_options_build_the_algorithm(name):
    algo = FedMoE(**load_preset(name)["federation"]["algorithm"]["init_args"])
    assert algo.num_routed == 5 and algo.num_main == 1


def test_folder_presets_differ_from_algorithm1_where_the_issue_says():
    femnist, cifar = FEMNIST_FOLDER, CIFAR_FOLDER
    # FEMNIST: --a never used; Q the forward's one-hot gate; independent initialisations
    assert (femnist["expert_update"], femnist["main_update"], femnist["client_update"]) == ("replace", "mean", "replace")
    assert femnist["relevance_gate"] == "gates" and femnist["common_init"] is False
    # CIFAR: lambda T = 5 times per round; E_0 the plain mean trained 20 epochs; experts trained on D_s
    assert cifar["iterations"] == 5 and cifar["expert_update"] == "moving"
    assert cifar["main_update"] == "mean" and cifar["main_epochs"] == 20 and cifar["train_experts_on_server"]


def test_preset_data_folders_match_the_baselines():
    for folder in ("femnist", "cifar10"):
        baseline = load_preset(f"{folder}/fedavg.yaml")["data"]
        for name in (f"{folder}/fedmoe.yaml", f"{folder}/fedmoe_algorithm1.yaml"):
            data = load_preset(name)["data"]
            assert data["class_path"] == baseline["class_path"]
            assert data["init_args"]["data_dir"] == baseline["init_args"]["data_dir"]
            assert data["init_args"]["num_clients"] == baseline["init_args"]["num_clients"]


# -- docs/fedmoe.md ------------------------------------------------------------------------------


def doc_table() -> tuple[list[str], dict[str, list[str]]]:
    """The option table of docs/fedmoe.md: its column headers and, per option, its cells."""
    header, rows = None, {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "option":
            header = cells
            continue
        name = re.fullmatch(r"`([a-z_0-9.]+)`", cells[0])
        if header is None or name is None:
            continue
        rows[name.group(1).split(".")[-1]] = cells[1:]
    assert header is not None, "docs/fedmoe.md has no table headed '| option |'"
    return header, rows


def cell_value(cell: str, dataset: str) -> str:
    """A cell's value: the backticked value tagged ``(<dataset>)`` where the cell has per-data-set
    values (Algorithm 1's settings), else its first backticked value ('' where it has none)."""
    tagged = dict((tag, value) for value, tag in re.findall(r"`([^`]*)` \(([^)]*)\)", cell))
    if dataset in tagged:
        return tagged[dataset]
    token = re.search(r"`([^`]*)`", cell)
    return token.group(1) if token else ""


def same(doc_value: str, value) -> bool:
    if isinstance(value, bool):
        return doc_value == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(doc_value) == pytest.approx(float(value))
        except ValueError:
            return False
    return doc_value == value


def test_doc_table_has_the_algorithm1_and_four_folder_columns():
    header, _ = doc_table()
    assert header[1:6] == ["Algorithm 1", "FEMNIST", "CIFAR-10", "Sent140", "Yelp"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_doc_table_agrees_with_each_preset(name):
    column, dataset, options, federation = PRESETS[name]
    header, rows = doc_table()
    index = header.index(column) - 1
    for key, value in {**options, **federation}.items():
        assert key in rows, f"docs/fedmoe.md has no row for {key}"
        doc_value = cell_value(rows[key][index], dataset)
        assert same(doc_value, value), f"{key}: docs say {doc_value!r}, {name} has {value!r}"


def test_doc_cells_with_per_data_set_values_are_read_per_data_set():
    cell = "`1` (FEMNIST), `5` (CIFAR-10)"
    assert cell_value(cell, "FEMNIST") == "1" and cell_value(cell, "CIFAR-10") == "5"
    assert cell_value("`code` moe.py:309-322 (k = 1)", "FEMNIST") == "code"


def test_doc_table_covers_every_training_option():
    _, rows = doc_table()
    missing = set(FedMoE.training_options) - set(rows)
    assert not missing, f"options missing from docs/fedmoe.md: {sorted(missing)}"
