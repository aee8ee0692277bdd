import json

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
