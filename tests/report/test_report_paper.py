"""``python -m fedmoe.report RUNS --paper``: the paper's table beside fabricated run folders."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedmoe import paper
from fedmoe.report import main, paper_table

ROOT = Path(__file__).resolve().parents[2]
FEMNIST = "fedmoe.data.femnist.FEMNISTDataModule"
CIFAR = "fedmoe.data.cifar10.CIFAR10DataModule"
ALGORITHMS = {name: f"fedmoe.algorithms.{name.lower()}.{name}" for name in ("FedMoE", "FedAvg", "FedProx")}


def _run(path, data_class=FEMNIST, clients=50, algorithm="FedMoE", val=(2.0, 1.0, 1.5), test=(0.3, 0.8, 0.9),
         planned=100, data_dir="data/femnist"):
    """A run folder as fit writes it: config.yaml, metrics.csv (one row per round), summary.json."""
    path.mkdir(parents=True)
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(path), "max_epochs": 1},
        "data": {"class_path": data_class, "init_args": {"data_dir": data_dir, "num_clients": clients}},
        "federation": {"rounds": planned, "clients_per_round": 5,
                       "algorithm": {"class_path": ALGORITHMS.get(algorithm, algorithm), "init_args": {}}},
    }
    (path / "config.yaml").write_text("# The resolved config of this run.\n" + yaml.safe_dump(config))
    rows = ["round,server/val_loss,server/test_acc,clients/acc_mean,time/round_s"]
    rows += [f"{r},{v},{a},0.5,1.0" for r, (v, a) in enumerate(zip(val, test), 1)]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (path / "summary.json").write_text(json.dumps({"algorithm": algorithm.rsplit(".", 1)[-1], "monitor": ["loss", "min"]}))
    return str(path)


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def test_runs_are_matched_to_cells_by_data_set_clients_and_algorithm(tmp_path):
    runs = [
        _run(tmp_path / "femnist_50_fedmoe"),
        _run(tmp_path / "femnist_100_fedavg", clients=100, algorithm="FedAvg"),
        _run(tmp_path / "cifar_50_fedprox", data_class=CIFAR, algorithm="FedProx", data_dir="data/cifar10"),
        _run(tmp_path / "sent140", data_class="fedmoe.data.sent140.Sent140DataModule", clients=100),
        _run(tmp_path / "yelp", data_class="fedmoe.data.yelp.YelpDataModule", clients=100, algorithm="FedAvg"),
    ]
    table, notes, by_dataset = paper_table(runs)
    ran = table[table["run"] != "not run"]
    got = {(r["data set"], r["clients"], r["algorithm"]): Path(r["run"]).name for _, r in ran.iterrows()}
    assert got == {
        ("FEMNIST", 50, "FedMoE"): "femnist_50_fedmoe",
        ("FEMNIST", 100, "FedAvg"): "femnist_100_fedavg",
        ("CIFAR-10", 50, "FedProx"): "cifar_50_fedprox",
        ("Sent140", 100, "FedMoE"): "sent140",
        ("Yelp", 100, "FedAvg"): "yelp",
    }
    assert notes == [] and sorted(by_dataset) == ["cifar10", "femnist", "sent140", "yelp"]


def test_ours_is_the_test_accuracy_at_the_best_validation_round_and_difference_is_ours_minus_paper(tmp_path):
    run = _run(tmp_path / "a", val=(2.0, 1.0, 1.5), test=(0.3, 0.8, 0.9))
    table, _, _ = paper_table([run])
    row = table[table["run"] == run].iloc[0]
    assert row["paper acc"] == 86.03 and row["ours"] == pytest.approx(80.0)
    assert row["difference"] == pytest.approx(80.0 - 86.03) and row["rounds"] == 3 and row["planned rounds"] == 100


def test_baseline_rows_have_no_paper_accuracy_and_no_difference(tmp_path):
    run = _run(tmp_path / "avg", algorithm="FedAvg")
    row = paper_table([run])[0].set_index("run").loc[run]
    assert pd.isna(row["paper acc"]) and pd.isna(row["difference"]) and row["ours"] == pytest.approx(80.0)


def test_every_cell_keeps_a_row_and_an_unrun_cell_shows_the_command_that_runs_it(tmp_path):
    table, _, _ = paper_table([_run(tmp_path / "a")])
    assert len(table) == len(paper.CELLS) == 18 and (table["run"] == "not run").sum() == 17
    row = table[(table["data set"] == "CIFAR-10") & (table["clients"] == 100) & (table["algorithm"] == "FedProx")].iloc[0]
    assert row["command"] == ("python -m fedmoe.cli fit --config experiments/cifar10/fedprox.yaml --config "
                              "experiments/cifar10/paper_100.yaml --data.data_dir <folder> "
                              "--trainer.default_root_dir runs/paper/cifar10_100/fedprox")


def test_two_runs_of_one_cell_give_two_rows_in_the_order_given(tmp_path):
    a = _run(tmp_path / "fedmoe", test=(0.3, 0.8, 0.9))
    b = _run(tmp_path / "fedmoe_algorithm1", test=(0.1, 0.5, 0.6))
    table, _, _ = paper_table([a, b])
    cell = table[(table["data set"] == "FEMNIST") & (table["clients"] == 50) & (table["algorithm"] == "FedMoE")]
    assert list(cell["run"]) == [a, b] and list(cell["ours"].round(2)) == [80.0, 50.0]


def test_the_command_reruns_the_run_from_its_own_config_into_a_new_folder(tmp_path):
    run = _run(tmp_path / "my run")
    row = paper_table([run])[0].set_index("run").loc[run]
    assert row["command"] == (f"python -m fedmoe.cli fit --config '{run}/config.yaml' "
                              f"--trainer.default_root_dir '{run}_rerun'")


def test_report_prints_and_saves_markdown_csv_and_a_curve_per_data_set(tmp_path, capsys):
    runs = [_run(tmp_path / "fm"), _run(tmp_path / "fa", algorithm="FedAvg", test=(0.3, 0.85, 0.9)),
            _run(tmp_path / "cf", data_class=CIFAR, algorithm="FedMoE", test=(0.5, 0.7, 0.71), data_dir="c")]
    out = tmp_path / "out"
    assert main([*runs, "--paper", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = (out / "paper.md").read_text()
    assert printed.startswith(saved.rstrip("\n")) and f"wrote {out / 'paper.md'}" in printed
    rows = _table_rows(saved)
    assert rows[0][:9] == ["FEMNIST", "50", "FedMoE", "86.03", "80.00", "-6.03", "3", "100", runs[0]]
    assert rows[1][:8] == ["FEMNIST", "50", "FedAvg", "", "85.00", "", "3", "100"]
    assert rows[6][:6] == ["CIFAR-10", "50", "FedMoE", "65.52", "70.00", "+4.48"]
    assert paper.SOURCE in saved and "![paper_femnist](paper_femnist.png)" in saved
    csv = pd.read_csv(out / "paper.csv")
    assert list(csv.columns) == ["data set", "clients", "algorithm", "paper acc", "ours", "difference", "rounds",
                                 "planned rounds", "run", "command"]
    assert len(csv) == 18 and csv.loc[0, "difference"] == pytest.approx(-6.03) and pd.isna(csv.loc[1, "paper acc"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["paper_cifar10.png", "paper_femnist.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_an_unfinished_run_shows_rounds_run_and_planned(tmp_path, capsys):
    run = _run(tmp_path / "a", planned=100)
    assert main([run, "--paper", "--out", str(tmp_path / "out")]) == 0
    assert _table_rows(capsys.readouterr().out)[0][6:8] == ["3", "100"]


def test_a_run_without_test_accuracy_has_an_empty_ours_and_a_note(tmp_path):
    run = _run(tmp_path / "a")
    (Path(run) / "metrics.csv").write_text("round,server/val_loss\n1,2.0\n")
    table, notes, _ = paper_table([run])
    assert pd.isna(table.set_index("run").loc[run, "ours"])
    assert notes == [f"{run} has no server test accuracy at a validated round in metrics.csv: its 'ours' is empty"]


def test_a_run_matching_no_cell_is_a_clear_line_not_a_crash(tmp_path, capsys):
    digits = _run(tmp_path / "quickstart", data_class="fedmoe.data.digits.DigitsDataModule", clients=10, data_dir=None)
    twenty = _run(tmp_path / "femnist20", clients=20)
    assert main([digits, twenty, "--paper", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (f"- {digits} matches no paper cell (fedmoe.data.digits.DigitsDataModule, 10 clients, FedMoE); the "
            "paper's cells are FEMNIST 50/100, CIFAR-10 50/100, Sent140 100, Yelp 100, each with FedMoE, FedAvg, "
            "FedProx") in out
    assert f"- {twenty} matches no paper cell (FEMNIST, 20 clients, FedMoE)" in out
    assert "no run matches a paper cell" in out and not list((tmp_path / "out").glob("*.png"))
    assert all(row[8] == "not run" for row in _table_rows(out))


def test_an_algorithm_without_a_cell_is_unmatched(tmp_path):
    run = _run(tmp_path / "lora", algorithm="fedmoe.algorithms.lora.fedex.FedExLoRA")
    _, notes, by_dataset = paper_table([run])
    assert "FedExLoRA); the paper's cells" in notes[0] and by_dataset == {}


def test_data_set_comes_from_the_data_module_else_from_the_data_folder():
    assert paper.dataset_of("fedmoe.data.cifar10.CIFAR10DataModule", "anything/femnist") == "cifar10"
    assert paper.dataset_of("fedmoe.data.sent140.Sent140CSVDataModule") == "sent140"
    assert paper.dataset_of("fedmoe.data.digits.DigitsDataModule", "data/femnist") is None
    assert paper.dataset_of("mypkg.Leaf", "/femnist_project/data/cifar-10-batches-py") == "cifar10"
    assert paper.dataset_of("mypkg.Tweets", "/data/Sentiment140/") == "sent140"
    assert paper.dataset_of("mypkg.Other", "/data/mnist") is None


def test_the_paper_cells_are_the_published_fedmoe_numbers_and_baselines_are_empty():
    fedmoe = {(c.dataset, c.clients): c.accuracy for c in paper.CELLS if c.algorithm == "FedMoE"}
    assert fedmoe == {("femnist", 50): 86.03, ("femnist", 100): 82.58, ("cifar10", 50): 65.52,
                      ("cifar10", 100): 60.73, ("sent140", 100): 78.10, ("yelp", 100): 53.46}
    assert all(c.accuracy is None for c in paper.CELLS if c.algorithm != "FedMoE")


@pytest.mark.parametrize(("dataset", "clients"), [("femnist", 50), ("femnist", 100), ("cifar10", 50), ("cifar10", 100)])
def test_each_vision_cell_has_an_overlay_with_its_clients_and_presets_on_the_same_data_module(dataset, clients):
    overlay = yaml.safe_load((ROOT / paper.OVERLAYS[(dataset, clients)]).read_text())
    assert overlay["data"]["init_args"]["num_clients"] == clients and overlay["federation"]["rounds"] == 100
    assert set(overlay) == {"data", "federation"}  # never the run folder or the algorithm: those stay the preset's
    classes = {yaml.safe_load((ROOT / f"experiments/{dataset}/{name}").read_text())["data"]["class_path"]
               for name in paper.ALGORITHMS.values()}
    assert len(classes) == 1 and paper.dataset_of(classes.pop()) == dataset


def test_a_run_folder_without_metrics_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path), "--paper", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} is not a run folder (no metrics.csv)\n"


def test_a_run_folder_without_config_is_one_error_line(tmp_path, capsys):
    run = _run(tmp_path / "a")
    (Path(run) / "config.yaml").unlink()
    assert main([run, "--paper", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} has no config.yaml") and err.count("\n") == 1


@pytest.mark.parametrize(("name", "text", "message"), [
    ("config.yaml", "data: [unclosed\n", "cannot be read as YAML"),
    ("config.yaml", "- a list\n", "is not a YAML mapping"),
    ("metrics.csv", "", "cannot be read as a CSV table"),
    ("metrics.csv", "round,server/test_acc\n", "has no rounds"),
    ("metrics.csv", "epoch,acc\n1,0.5\n", "has no rounds"),
])
def test_an_unreadable_config_or_metrics_file_is_one_error_line_naming_it(tmp_path, capsys, name, text, message):
    run = _run(tmp_path / "a")
    (Path(run) / name).write_text(text)
    assert main([run, "--paper", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {Path(run) / name} {message}") and err.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--paper", "--lora"], "error: --paper cannot be combined with --lora"),
    (["--paper", "--plot", "x.png"], "error: --paper cannot be combined with --plot"),
    (["--out", "folder"], "error: --out names the folder of the --paper files"),
])
def test_options_that_do_not_go_with_paper_are_one_error_line(tmp_path, capsys, args, message):
    run = _run(tmp_path / "a")
    assert main([run, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_an_out_folder_that_is_a_file_is_one_error_line(tmp_path, capsys):
    run = _run(tmp_path / "a")
    (tmp_path / "out").write_text("")
    assert main([run, "--paper", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'out'} is a file, not a folder")


def test_without_out_the_files_go_to_runs_paper_table(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    assert main([run, "--paper"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "paper_table").iterdir()) == ["paper.csv", "paper.md",
                                                                                    "paper_femnist.png"]
