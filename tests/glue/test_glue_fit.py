"""Federated LoRA end to end: ``fit`` on GLUE-format fixtures with a tiny BERT built from a config,
every rule through the CLI, the engine's exactness for FedEx-LoRA on a real PEFT model, and the
bad inputs a user can give."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fedmoe.cli import main

WORDS = ["the", "movie", "is", "good", "bad", "a", "very", "not", "fun", "dull", "plot", "it", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_BERT = {
    "model_type": "bert", "vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
}


def sentence(i: int) -> str:
    return " ".join(WORDS[(i * 5 + 2 * k) % len(WORDS)] for k in range(2 + i % 6))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """SST-2 and STS-B in GLUE's TSV layout (60 training and 12 dev rows each) and a BERT tokenizer."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("glue")
    for split, rows in (("train", range(60)), ("dev", range(60, 72))):
        sst = ["sentence\tlabel"] + [f"{sentence(i)}\t{int('good' in sentence(i) or i % 4 == 0)}" for i in rows]
        (root / "SST-2").mkdir(exist_ok=True)
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(sst) + "\n")
        sts = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"] + [
            f"{i}\tg\tf\t2012\t{i}\tnone\tnone\t{sentence(i)}\t{sentence(i + 3)}\t{(i % 11) * 0.5:.2f}" for i in rows
        ]
        (root / "STS-B").mkdir(exist_ok=True)
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(sts) + "\n")
    tok = root / "tokenizer"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}).save_pretrained(str(tok))
    return root


def config(glue_dir: Path, run_dir: Path, rule: str, adapter: dict | None = None, **data) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run_dir), "max_epochs": 1},
        "model": {
            "network": "hf_sequence_classifier", "num_classes": 2,
            "network_kwargs": {"config": TINY_BERT, "adapter": adapter or {"type": "lora", "r": 2, "alpha": 4,
                                                                          "target_modules": ["query", "value"],
                                                                          "init_seed": 0}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            "lr_schedule": "linear", "warmup_ratio": 0.06,
        },
        "data": {"class_path": "fedmoe.data.glue.GLUEDataModule", "init_args": {
            "data_dir": str(glue_dir), "task": "sst2", "tokenizer": str(glue_dir / "tokenizer"), "num_clients": 3,
            "batch_size": 8, "max_length": 32, "min_client_size": 2, **data}},
        "federation": {"rounds": 2, "clients_per_round": min(3, data.get("num_clients", 3)), "progress": False,
                       "algorithm": {"class_path": rule}},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RULES = {
    "fedmoe.algorithms.lora.fedit.FedIT": None,
    "fedmoe.algorithms.lora.fedex.FedExLoRA": None,
    "fedmoe.algorithms.lora.ffa.FFALoRA": None,
    "fedmoe.algorithms.lora.fedsa.FedSALoRA": None,
    "fedmoe.algorithms.lora.flora.FLoRA": None,
    "fedmoe.algorithms.lora.hetlora.HetLoRA": None,
    "fedmoe.algorithms.lora.vera.FedExVeRA": {"type": "vera", "r": 4, "target_modules": ["query", "value"],
                                              "projection_prng_key": 0, "init_seed": 0},
    "fedmoe.algorithms.lora.sorf_vera.SORFVeRA": {"type": "sorf_vera", "r": 4, "dropout": 0.0,
                                                  "target_modules": ["query", "value"], "init_seed": 0},
}


@pytest.mark.parametrize("rule", list(RULES), ids=lambda r: r.rsplit(".", 1)[-1])
def test_every_rule_fits_two_rounds_and_logs_bytes_and_metrics(glue_dir, tmp_path, rule, capsys):
    run = tmp_path / "run"
    partition = {"partition": "dirichlet", "dirichlet_alpha": 0.5} if "FedSA" in rule else {}
    assert main(["fit", "--config", str(config(glue_dir, run, rule, RULES[rule], **partition))]) == 0
    m = pd.read_csv(run / "metrics.csv")
    assert list(m["round"]) == [1, 2]
    assert (m["comm/bytes_up"] > 0).all() and (m["comm/bytes_down"] > 0).all()
    assert m["server/test_acc"].between(0, 1).all() and m["clients/acc_mean"].notna().all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == ["acc", "max"] and summary["rounds"] == 2


def test_only_adapters_and_head_travel(glue_dir, tmp_path):
    """FedIT's upload is the adapters plus the classification head, never the frozen base."""
    run = tmp_path / "run"
    assert main(["fit", "--config", str(config(glue_dir, run, "fedmoe.algorithms.lora.fedit.FedIT"))]) == 0
    from fedmoe.models.text import HFSequenceClassifier

    net = HFSequenceClassifier(2, config=TINY_BERT, adapter={"type": "lora", "r": 2, "alpha": 4,
                                                             "target_modules": ["query", "value"]})
    state = net.state_dict()
    trainable = sum(state[k].numel() * 4 for k in net.trainable_keys())
    m = pd.read_csv(run / "metrics.csv")
    assert m["comm/bytes_up"].iloc[0] == 3 * trainable < 3 * sum(t.numel() * 4 for t in state.values()) / 10


def test_stsb_trains_as_regression_and_picks_the_best_round_by_pearson(glue_dir, tmp_path):
    run = tmp_path / "run"
    path = config(glue_dir, run, "fedmoe.algorithms.lora.fedex.FedExLoRA", task="stsb")
    assert main(["fit", "--config", str(path), "--model.num_classes", "1"]) == 0
    m = pd.read_csv(run / "metrics.csv")
    assert {"server/test_pearson", "server/test_spearman", "server/best_test_pearson"} <= set(m.columns)
    assert json.loads((run / "summary.json").read_text())["monitor"] == ["pearson", "max"]


def test_centralized_run_is_one_client_holding_all_training_data(glue_dir, tmp_path):
    run = tmp_path / "run"
    path = config(glue_dir, run, "fedmoe.algorithms.lora.fedit.FedIT", num_clients=1)
    assert main(["fit", "--config", str(path)]) == 0
    assert pd.read_csv(run / "metrics.csv")["clients"].astype(str).tolist() == ["0", "0"]


def test_fedex_round_in_the_engine_is_exact_on_a_real_peft_model(glue_dir, tmp_path):
    """Effective weights W + s B A after aggregation equal sum_i p_i (client i's effective weights)."""
    from fedmoe.algorithms.lora.fedex import FedExLoRA
    from fedmoe.data.glue import GLUEDataModule
    from fedmoe.federation.loop import FederatedLoop, Federation
    from fedmoe.federation.runner import RunnerSettings
    from fedmoe.models.classifier import Classifier

    torch.manual_seed(0)
    module = Classifier("hf_sequence_classifier", 2, {"config": TINY_BERT, "adapter": {
        "type": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]}},
        optimizer=lambda p: torch.optim.AdamW(p, lr=0.05))
    dm = GLUEDataModule(str(glue_dir), "sst2", str(glue_dir / "tokenizer"), max_length=32, num_clients=3,
                        partition="sizes", client_sizes=[8, 16, 24], batch_size=4)
    algo = FedExLoRA()
    seen = {}
    aggregate = algo.aggregate

    def spy(state, results, ctx):
        seen["before"] = {k: v.clone() for k, v in state["global"].items()}
        seen["results"] = results
        return aggregate(state, results, ctx)

    algo.aggregate = spy
    loop = FederatedLoop(Federation(algorithm=algo, rounds=1, clients_per_round=3, progress=False), module, dm,
                         RunnerSettings(max_epochs=1), run_dir=tmp_path / "run")
    loop.fit()
    after, results = loop.state["global"], seen["results"]
    n = torch.tensor([float(r.num_samples) for r in results])
    p = n / n.sum()
    assert len(set(n.tolist())) == 3
    layers = loop.ctx.adapted_layers()
    assert len(layers) == 4
    for layer in layers:
        W0 = seen["before"][layer.base_key]

        def effective(W, state):
            return W + layer.scaling * state[layer.b_key] @ state[layer.a_key]

        target = sum(pi * effective(W0, r.weights) for pi, r in zip(p, results))
        assert not torch.allclose(effective(W0, after), target, atol=1e-6), "FedIT alone would be exact"
        torch.testing.assert_close(effective(after[layer.base_key], after), target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    (["--data.init_args.task", "mnli"], "\"task\": Expected a typing.Literal['sst2', 'rte', 'cola', 'mrpc', 'stsb', 'qnli']. Got value: mnli"),
    (["--data.init_args.partition", "shards"], "\"partition\": Expected a typing.Literal["),
    (["--model.num_classes", "3"], "num_classes"),
    (["--model.network_kwargs.adapter", "{type: lora, r: 2, target_modules: [nothing_here]}"], "nothing_here"),
    (["--federation.algorithm.class_path", "fedmoe.algorithms.lora.fedex.NoSuchRule"], "NoSuchRule"),
    (["--data.init_args.data_dir", "/nonexistent/glue"], "/nonexistent/glue"),
])
def test_bad_glue_input_is_one_error_line_and_exit_code_2(glue_dir, tmp_path, capsys, override, message):
    path = config(glue_dir, tmp_path / "run", "fedmoe.algorithms.lora.fedex.FedExLoRA")
    assert main(["fit", "--config", str(path), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "Traceback" not in err[0]


def test_a_glue_folder_with_unexpected_columns_is_one_error_line(glue_dir, tmp_path, capsys):
    bad = tmp_path / "glue"
    (bad / "SST-2").mkdir(parents=True)
    for split in ("train", "dev"):
        (bad / "SST-2" / f"{split}.tsv").write_text("text\tstars\nthe movie\t1\n")
    path = config(glue_dir, tmp_path / "run", "fedmoe.algorithms.lora.fedex.FedExLoRA")
    assert main(["fit", "--config", str(path), "--data.init_args.data_dir", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column" in err[0] and "train.tsv" in err[0], err
