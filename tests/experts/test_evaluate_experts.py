"""``evaluate experts`` on a tiny Qwen2 experts run made here: the run's data rebuilt from its
config.yaml, router accuracy, the domains x models loss table with the routed models, the files it
writes, ``evaluate mbpp`` through a router, and bad input as one ``error:`` line with exit code 2."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import math

import pytest

from fedmoe.experts.evaluate_command import main, read_run_config, rebuild_run_data, run_data_settings
from fedmoe.models.causal import build_causal_lm, load_causal_tokenizer, tiny_causal_config
from wordlevel import word_tokenizer as _word_tokenizer

for _module in ("pandas", "peft"):  # imported at collection: an import is not a test's time
    importlib.import_module(_module)
WORDS = ("write a python function to add two numbers def add ( a , b ) : return + select * from table where "
         "sql query users for the app assert ==").split()
# python: the keyword router sends every prompt to python alone (a "python" or no pattern: the default);
# sql: every prompt names SQL and python, so the keyword router sends it to python + sql (python first)
ALPACA = [
    {"instruction": "Write a python function to add two numbers", "input": "", "output": "def add ( a , b ) : return a + b"},
    {"instruction": "Write a python function to add a", "input": "", "output": "def add ( a ) : return a + a"},
    {"instruction": "Write a SQL query to select users for the python app", "input": "", "output": "SELECT * from users"},
    {"instruction": "Write a SQL query to select from table for the python app", "input": "", "output": "SELECT a from table"},
    {"instruction": "Write a SQL query on table for the python app", "input": "", "output": "SELECT * from table where b"},
    {"instruction": "Write a SQL query for users for the python app", "input": "", "output": "SELECT a from users where a"},
]
MBPP = [
    {"text": "Write a function to add two numbers", "code": "def add ( a , b ) :\r\n  return a + b", "task_id": i,
     "test_list": ["assert add ( a , b ) == a + b"]}
    for i in (1, 2, 3, 4, 11, 12)
]


def word_tokenizer():
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS)


def quiet(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(map(str, argv)))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny experts run (python: 2 workers, sql: 1; 2 s of the simulated clock) and its evaluation
    with every router: ``(root, run_dir, out_dir, printed)``."""
    from fedmoe.cli import main as cli_main

    root = tmp_path_factory.mktemp("evaluate-experts")
    base = root / "base"
    build_causal_lm(tiny_causal_config("qwen2", 64, initializer_range=0.2), seed=0).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    (root / "alpaca.json").write_text(json.dumps(ALPACA))
    (root / "mbpp.jsonl").write_text("\n".join(json.dumps(r) for r in MBPP) + "\n")
    (root / "experts.yaml").write_text(
        f"model:\n  base: {base}\n  lora: {{r: 4, alpha: 8}}\n  correction_rank: 8\n"
        f"data:\n  code_alpaca: {root / 'alpaca.json'}\n  mbpp: {root / 'mbpp.jsonl'}\n"
        "  heldout_fraction: 0.25\n  max_length: 32\n  batch_size: 2\n"
        "coordinator:\n  mode: fedasync\n  rank_budget: 8\n  fsync: false\n"
        "clock:\n  name: simulated\n"
        "experts: [python, sql]\nduration: 2\nlr: 0.05\neval_every: 2\nmax_new_tokens: 2\nseed: 1\n"
    )
    run_dir = root / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli_main(["experts", "--config", str(root / "experts.yaml"), "--run_dir", str(run_dir),
                         "--worker", "fast:python:2", "--worker", "slow:python:1", "--worker", "db:sql:1"])
    assert code == 0
    out_dir = root / "evaluation"
    code, printed, err = quiet("experts", "--run", run_dir, "--out", out_dir, "--router-epochs", "20",
                               "--router-rounds", "5")
    assert code == 0, err
    return root, run_dir, out_dir, printed


def read_table(path):
    with open(path, newline="") as f:
        return {r["domain"]: {k: float(v) for k, v in r.items() if k != "domain"} for r in csv.DictReader(f)}


def test_the_tables_have_a_row_per_domain_and_a_column_per_model_including_each_routed_model(run):
    _, _, out_dir, printed = run
    losses = read_table(out_dir / "loss_table.csv")
    assert list(losses) == ["python", "sql"]
    assert list(losses["python"]) == ["base", "python", "sql", "routed:keyword", "routed:learned",
                                      "routed:learned-fedavg"]
    assert all(v > 0 and math.isfinite(v) for row in losses.values() for v in row.values())
    ppl = read_table(out_dir / "perplexity.csv")
    assert all(ppl[d][m] == pytest.approx(math.exp(losses[d][m]), rel=1e-5) for d in losses for m in losses[d])
    with open(out_dir / "router_accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["router"], r["domain"]) for r in rows] == [
        (n, d) for n in ("keyword", "learned", "learned-fedavg") for d in ("python", "sql", "overall")]
    for r in rows:
        assert float(r["accuracy"]) == pytest.approx(int(r["correct"]) / int(r["total"]))
    summary = (out_dir / "summary.md").read_text()
    assert "| router | python | sql | overall |" in summary
    assert "| domain | base | python | sql | routed:keyword | routed:learned | routed:learned-fedavg |" in summary
    assert (out_dir / "router_learned.safetensors").is_file() and (out_dir / "router_learned-fedavg.safetensors").is_file()
    assert "rebuilding the run's data" in printed and "held-out loss (perplexity):" in printed


def test_keyword_router_accuracy_is_the_hand_checked_one(run):
    # held out: round(0.25 * 6) = 2 python prompts (all routed to python), round(0.25 * 4) = 1 sql
    # prompt (it names python too: python + sql, python first, so wrong)
    _, _, out_dir, printed = run
    with open(out_dir / "router_accuracy.csv", newline="") as f:
        keyword = {r["domain"]: (int(r["correct"]), int(r["total"])) for r in csv.DictReader(f) if r["router"] == "keyword"}
    assert keyword == {"python": (2, 2), "sql": (0, 1), "overall": (2, 3)}
    assert "keyword: router accuracy 0.6667 (2/3); python 1.000, sql 0.000" in printed
    assert "routes of keyword: python: python 2; sql: python+sql 1" in printed


def test_the_routed_column_equals_the_chosen_experts_loss_when_every_prompt_routes_to_it(run):
    _, _, out_dir, _ = run
    losses = read_table(out_dir / "loss_table.csv")
    # every scored python prompt goes to python alone: the routed model is the python expert
    assert losses["python"]["routed:keyword"] == pytest.approx(losses["python"]["python"], rel=1e-5)
    # the sql prompt goes to the exact half-half merge of python and sql: neither expert alone
    merged = losses["sql"]["routed:keyword"]
    assert merged != pytest.approx(losses["sql"]["sql"], rel=1e-4) and merged != pytest.approx(losses["sql"]["python"], rel=1e-4)
    for name in ("learned", "learned-fedavg"):  # top-1: each domain's loss is one of the experts' or between them
        for d, row in losses.items():
            lo, hi = min(row["python"], row["sql"]), max(row["python"], row["sql"])
            assert lo * (1 - 1e-5) <= row[f"routed:{name}"] <= hi * (1 + 1e-5)


def test_base_and_expert_columns_are_the_runs_own_held_out_losses(run):
    _, run_dir, out_dir, _ = run
    ours, theirs = read_table(out_dir / "loss_table.csv"), read_table(run_dir / "heldout_losses.csv")
    assert list(theirs) == list(ours)
    for d, row in theirs.items():
        for m, v in row.items():
            assert ours[d][m] == pytest.approx(v, rel=1e-5)  # the same held-out sets, rebuilt


def test_the_rebuilt_data_gives_each_worker_its_own_domains_prompts(run):
    root, run_dir, _, _ = run
    doc = read_run_config(run_dir)
    data = rebuild_run_data(doc, load_causal_tokenizer(root / "base"))
    assert [w.id for w in data.workers] == ["fast", "slow", "db"] and data.seed == 1
    assert {len(data.train_prompts[w]) for w in ("fast", "slow")} == {2} and len(data.train_prompts["db"]) == 3
    assert all("SQL" in p for p in data.train_prompts["db"] + data.heldout_prompts["sql"])
    mbpp = "Write a function to add two numbers\n\nYour code should pass these tests:\nassert add ( a , b ) == a + b"
    python = [r["instruction"] for r in ALPACA[:2]] + [mbpp] * 4  # MBPP tasks 1-4: 11 and 12 are the test split
    assert sorted(data.heldout_prompts["python"] + data.train_prompts["fast"] + data.train_prompts["slow"]) == sorted(python)
    prompts, labels = data.labelled_heldout()
    assert labels == ["python", "python", "sql"] and len(prompts) == 3


def test_data_changed_since_the_run_is_reported_against_the_runs_own_table(run, tmp_path):
    import shutil

    _, run_dir, _, printed = run
    assert "the base and expert losses equal the run's own" in printed
    copy = shutil.copytree(run_dir, tmp_path / "run")
    changed = tmp_path / "alpaca.json"
    changed.write_text(json.dumps([{**r, "output": r["output"] + " where a"} for r in ALPACA]))
    doc = read_run_config(copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(doc["data"]["code_alpaca"], str(changed)))
    code, out, err = quiet("experts", "--run", copy, "--router", "keyword")
    assert code == 0, err
    assert "WARNING: " in out and "losses differ from the run's" in out
    assert (copy / "evaluation" / "summary.md").is_file()  # the default output folder


def test_a_saved_config_without_mbpp_tasks_trained_on_every_mbpp_problem():
    assert run_data_settings({"data": {"mbpp": "m.jsonl"}}).mbpp_tasks is None
    assert run_data_settings({"data": {"mbpp_tasks": "1-10"}}).mbpp_tasks == "1-10"


def test_mbpp_through_the_keyword_router_generates_with_the_routed_expert(run):
    root, run_dir, _, _ = run
    code, out, err = quiet("mbpp", "--expert-run", run_dir, "--router", "keyword", "--data", root / "mbpp.jsonl",
                           "--tasks", "11-12", "--max-new-tokens", "2", "--batch-size", "2", "--quiet")
    assert code == 0, err
    assert "the routed model of" in out and "the reference keyword table" in out
    assert "pass@1 0.0000 (0/2)" in out and "routes: python 2" in out


def test_mbpp_through_a_saved_learned_router(run):
    root, run_dir, out_dir, _ = run
    code, out, err = quiet("mbpp", "--expert-run", run_dir, "--router", "learned", "--router-checkpoint",
                           out_dir / "router_learned.safetensors", "--data", root / "mbpp.jsonl", "--tasks", "11",
                           "--max-new-tokens", "2", "--quiet")
    assert code == 0, err
    assert "learned router" in out and "(0/1)" in out and "routes: " in out


def test_mbpp_trains_the_learned_router_on_the_runs_data_without_a_checkpoint(run):
    root, run_dir, _, _ = run
    code, out, err = quiet("mbpp", "--expert-run", run_dir, "--router", "learned-fedavg", "--router-rounds", "2",
                           "--data", root / "mbpp.jsonl", "--tasks", "11", "--max-new-tokens", "2", "--quiet")
    assert code == 0, err
    assert "embedded 7 training prompts of 3 workers" in out and "learned-fedavg: FedAvg over 3 workers, 2 rounds" in out


@pytest.mark.parametrize("args, message", [
    (["experts", "--run", "{root}/nowhere"], "run folder {root}/nowhere does not exist"),
    (["experts", "--run", "{root}/base"], "is not an experts run folder (no run.json)"),
    (["experts", "--run", "{bare}"], "has no config.yaml"),
    (["experts", "--run", "{run}", "--router", "magic"], "argument --router: invalid choice: 'magic'"),
    (["experts", "--run", "{run}", "--router-epochs", "0"], "--router-epochs must be >= 1"),
    (["mbpp", "--router", "keyword", "--tasks", "11"], "--router needs --expert-run"),
    (["mbpp", "--expert-run", "{run}", "--router", "keyword", "--router-checkpoint", "x", "--tasks", "11"],
     "--router-checkpoint is a learned router's"),
    (["mbpp", "--expert-run", "{run}", "--router", "learned", "--router-checkpoint", "{root}/none.safetensors",
      "--tasks", "11"], "router checkpoint {root}/none.safetensors does not exist"),
])
def test_bad_input_is_one_error_line_and_exit_code_2(run, tmp_path, args, message):
    root, run_dir, _, _ = run
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text((run_dir / "run.json").read_text())
    fill = {"root": root, "run": run_dir, "bare": bare}
    args = [a.format(**fill) for a in args] + (["--data", str(root / "mbpp.jsonl")] if args[0] == "mbpp" else [])
    code, _, err = quiet(*args)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1
    assert message.format(**fill) in lines[-1]
