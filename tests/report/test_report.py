import json

import pytest

from fedmoe.report import main, summarise


def _run(path, val_losses, test_accs, algorithm="FedAvg"):
    path.mkdir()
    rows = ["round,server/val_loss,server/test_acc,clients/acc_mean,time/round_s,time/eval_s"]
    for r, (v, a) in enumerate(zip(val_losses, test_accs), 1):
        rows.append(f"{r},{v},{a},0.5,60,0")
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (path / "summary.json").write_text(json.dumps({"algorithm": algorithm}))
    return path


def test_summary_reports_test_accuracy_at_the_best_validation_round(tmp_path):
    run = _run(tmp_path / "a", [2.0, 1.0, 1.5], [0.3, 0.6, 0.7])
    row = summarise([run]).iloc[0]
    assert row["best val round"] == 2 and row["test acc (best val)"] == 0.6
    assert row["test acc (last)"] == 0.7 and row["test acc (max)"] == 0.7 and row["minutes"] == 3.0


def test_report_prints_a_markdown_table_and_plots(tmp_path, capsys):
    a = _run(tmp_path / "a", [2.0, 1.0], [0.3, 0.6])
    b = _run(tmp_path / "b", [1.0, 2.0], [0.5, 0.4], "FedMoE")
    assert main([str(a), str(b), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| run | algorithm") and len(out) == 4 and "FedMoE" in out[3]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_best_round_follows_the_runs_monitored_metric(tmp_path):
    run = _run(tmp_path / "a", [2.0, 1.0, 1.5], [0.3, 0.6, 0.7])
    rows = (run / "metrics.csv").read_text().splitlines()
    rows[0] += ",server/val_mcc"
    rows[1:] = [row + f",{v}" for row, v in zip(rows[1:], [0.1, 0.2, 0.4])]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run / "summary.json").write_text(json.dumps({"algorithm": "FedExLoRA", "monitor": ["mcc", "max"]}))
    row = summarise([run]).iloc[0]
    assert row["best val round"] == 3 and row["test acc (best val)"] == 0.7


def test_lora_table_gives_rank_bytes_and_score_per_run(tmp_path, capsys):
    runs = []
    for r in (4, 16):
        run = tmp_path / f"r{r}"
        run.mkdir()
        (run / "metrics.csv").write_text(
            "round,server/val_acc,server/test_acc,comm/bytes_up,comm/bytes_down\n"
            f"1,0.5,0.55,{1000 * r},{2000 * r}\n2,0.7,0.65,{1000 * r},{2000 * r}\n"
        )
        (run / "summary.json").write_text(json.dumps({"algorithm": "FedExLoRA", "monitor": ["acc", "max"]}))
        (run / "config.yaml").write_text(
            "model:\n  network_kwargs:\n    adapter: lora\n    r: %d\n"
            "federation:\n  algorithm:\n    class_path: fedmoe.algorithms.lora.fedex.FedExLoRA\n" % r
        )
        runs.append(str(run))
    assert main(runs + ["--lora"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| rule | adapter | r |" in out[0]
    assert "FedExLoRA | lora | 16 | 0.0160 | 0.0320 | 0.6500 | 2" in out[3]
    assert main(runs + ["--lora", "--at", "1", "--mean-from", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| best val round | test acc, round 1 | test acc, mean of rounds 1-2 |" in out[0]
    assert "| 0.6500 | 2 | 0.5500 | 0.6000 |" in out[3]


def test_lora_table_gives_per_client_bytes_where_runs_have_clients_csv(tmp_path, capsys):
    runs = []
    for name in ("with", "without"):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.csv").write_text("round,server/val_acc,server/test_acc,comm/bytes_up,comm/bytes_down\n"
                                         "1,0.5,0.55,3000,6000\n")
        (run / "summary.json").write_text(json.dumps({"algorithm": "HetLoRA", "monitor": ["acc", "max"]}))
        runs.append(str(run))
    (tmp_path / "with" / "clients.csv").write_text(
        "round,client,status,samples,steps,train_loss,bytes_down,bytes_up\n"
        "1,0,ok,5,1,0.7,1000000,500000\n1,1,ok,5,1,0.7,3000000,2500000\n")
    assert main(runs + ["--lora"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "| MB up / client | MB up / client (max) | MB down / client | MB down / client (max) |" in out[0]
    assert "| 1.5000 | 2.5000 | 2.0000 | 3.0000 |" in out[2] and "| nan | nan | nan | nan |" in out[3]


def _clients_csv(run, rows):
    (run / "clients.csv").write_text("round,client,status,samples,steps,train_loss,bytes_down,bytes_up,heldout_acc\n"
                                     + "\n".join(rows) + "\n")


def test_clients_table_gives_each_clients_rounds_bytes_and_last_results(tmp_path, capsys):
    run = _run(tmp_path / "a", [2.0, 1.0, 1.5], [0.3, 0.6, 0.7])
    _clients_csv(run, ["1,0,ok,5,1,0.9,1000000,500000,0.4", "1,1,ok,7,2,0.8,1000000,500000,0.5",
                       "2,1,failed,,,,1000000,0,", "3,0,ok,5,1,0.6,2000000,500000,0.7"])
    assert main([str(run), "--clients"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("| run | client | rounds | dropped | samples | MB down | MB up | train loss (last) | "
                      "held-out acc (last) |")
    assert out[2].endswith("| 0 | 2 | 0 | 5 | 3.0000 | 1.0000 | 0.6000 | 0.7000 |")
    assert out[3].endswith("| 1 | 2 | 1 | 7 | 2.0000 | 0.5000 | 0.8000 | 0.5000 |")


@pytest.mark.parametrize("args, message", [
    ([], "has no clients.csv"),
    (["--lora"], "--lora and --clients are different tables"),
    (["--plot", "x.png"], "--clients prints a table only"),
    (["--at", "2"], "--at and --mean-from go with the run table or --lora"),
])
def test_clients_table_refusals_are_one_error_line(tmp_path, capsys, args, message):
    run = _run(tmp_path / "a", [2.0], [0.3])
    assert main([str(run), "--clients", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_clients_csv_that_is_not_the_table_fit_writes_is_one_error_line(tmp_path, capsys):
    run = _run(tmp_path / "a", [2.0], [0.3])
    (run / "clients.csv").write_text("a,b\n1,2\n")
    assert main([str(run), "--clients"]) == 2
    assert "clients.csv is not a table with columns round, client, status" in capsys.readouterr().err


def test_at_and_mean_from_add_the_test_metric_at_rounds_and_its_late_mean(tmp_path, capsys):
    run = _run(tmp_path / "a", [2.0, 1.0, 1.5, 1.2], [0.3, 0.6, 0.7, 0.8])
    row = summarise([run], at=[2, 4, 9], mean_from=3).iloc[0]
    assert row["test acc, round 2"] == 0.6 and row["test acc, round 4"] == 0.8
    assert row["test acc, round 9"] != row["test acc, round 9"]  # a round the run never reached: NaN
    assert row["test acc, mean of rounds 3-4"] == 0.75
    assert main([str(run), "--at", "1,3", "--mean-from", "2"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "| test acc, round 1 | test acc, round 3 | test acc, mean of rounds 2-4 |" in head


@pytest.mark.parametrize("args, message", [
    (["--at", "8,a"], "--at takes round numbers of 1 or more"),
    (["--at", "0"], "--at takes round numbers of 1 or more"),
    (["--mean-from", "x"], "--mean-from takes round numbers of 1 or more"),
    (["--mean-from", "3,4"], "--mean-from takes one round number"),
    (["--at", "3", "--experts"], "--at and --mean-from go with the run table or --lora"),
])
def test_bad_round_options_are_one_error_line(tmp_path, capsys, args, message):
    run = _run(tmp_path / "a", [2.0, 1.0], [0.3, 0.6])
    assert main([str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def _experts_run(path, mode, losses):
    """An experts run folder: config.yaml and metrics_python.csv with evals and applied jobs."""
    path.mkdir()
    (path / "config.yaml").write_text(f"coordinator:\n  mode: {mode}\n")
    head = "time,session,worker,status,base_version,version,staleness,train_loss,heldout_loss"
    rows = [head, f"0,0,,eval,,0,,,{losses[0]}"]
    for i, loss in enumerate(losses[1:], 1):
        rows.append(f"{4 * i},0,w{i % 2},applied,{i - 1 - i % 2},{i},{i % 2},1.0,")
        rows.append(f"{4 * i},0,,eval,,{i},,,{loss}")
    (path / "metrics_python.csv").write_text("\n".join(rows) + "\n")
    return str(path)


def test_experts_report_tabulates_each_run_and_plots_loss_over_time(tmp_path, capsys):
    runs = [_experts_run(tmp_path / "a", "fedasync", [1.2, 1.1, 1.0]), _experts_run(tmp_path / "b", "sync", [1.2, 1.15])]
    png = tmp_path / "modes.png"
    assert main(runs + ["--experts", "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | expert | jobs | versions | refused | failed | staleness mean | staleness max |")
    assert lines[2].startswith("| fedasync (a) | python | 2 | 2 | 0 | 0 | 0.5000 | 1 | 1.2000 | 1.0000 | -0.2000 | 8.0000 |")
    assert lines[3].startswith("| sync (b) | python | 1 | 1 | 0 | 0 | 1.0000 | 1 | 1.2000 | 1.1500 |")
    assert png.stat().st_size > 0


def test_experts_report_on_a_folder_without_expert_csvs_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--experts"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} is not an experts run folder (no metrics_<expert>.csv)"
