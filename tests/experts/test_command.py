"""The ``experts`` command end to end on a tiny Qwen2 saved to a folder: the three phases, the
metrics CSVs and TensorBoard events, every push accounted for, resume on the same run folder, and
bad input as one ``error:`` line with exit code 2."""

from __future__ import annotations

import csv
import json

import peft  # noqa: F401  (imported at collection: its import is not a test's time)
import pytest

from fedmoe.cli import main
from fedmoe.experts.command import _gather_workers
from fedmoe.models.causal import build_causal_lm, tiny_causal_config
from wordlevel import word_tokenizer as _word_tokenizer

WORDS = ("write a python function to add two numbers def add ( a , b ) : return + select * from table where "
         "sql query users").split()
ALPACA = [
    {"instruction": "Write a python function to add two numbers", "input": "", "output": "def add ( a , b ) : return a + b"},
    {"instruction": "Write a python function to add a", "input": "", "output": "def add ( a ) : return a + a"},
    {"instruction": "Write a SQL query to select users", "input": "", "output": "SELECT * from users"},
    {"instruction": "Write a SQL query to select from table", "input": "", "output": "SELECT a from table where b"},
    {"instruction": "Write a SQL query on table", "input": "", "output": "SELECT * from table"},
    {"instruction": "Write a SQL query for users where a", "input": "", "output": "SELECT a from users where a"},
]
MBPP = [
    {"text": "Write a function to add two numbers", "code": "def add ( a , b ) :\r\n  return a + b", "task_id": i,
     "test_list": ["add ( a , b )"]}
    for i in range(1, 5)
]


def word_tokenizer():
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Qwen2 folder (with its word tokenizer), Code Alpaca and MBPP fixtures, a config file."""
    root = tmp_path_factory.mktemp("experts")
    base = root / "base"
    build_causal_lm(tiny_causal_config("qwen2", 64, initializer_range=0.2), seed=0).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    (root / "alpaca.json").write_text(json.dumps(ALPACA))
    (root / "mbpp.jsonl").write_text("\n".join(json.dumps(r) for r in MBPP) + "\n")
    config = root / "experts.yaml"
    config.write_text(
        f"model:\n  base: {base}\n  lora: {{r: 4, alpha: 8}}\n  correction_rank: 8\n"
        f"data:\n  code_alpaca: {root / 'alpaca.json'}\n  mbpp: {root / 'mbpp.jsonl'}\n"
        "  heldout_fraction: 0.25\n  max_length: 32\n  batch_size: 2\n"
        "coordinator:\n  mode: fedasync\n  rank_budget: 8\n  fsync: false\n"
        "clock:\n  name: simulated\n"
        "experts: [python, sql]\nduration: 3\nlr: 0.01\neval_every: 2\nmax_new_tokens: 3\n"
    )
    return root


ARGS = ["--worker", "fast:python:2", "--worker", "slow:python:1", "--worker=db:sql:1"]


def run(files, run_dir, *extra, capsys=None):
    code = main(["experts", "--config", str(files / "experts.yaml"), "--run_dir", str(run_dir), *ARGS, *extra])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


def rows(run_dir, expert):
    with open(run_dir / f"metrics_{expert}.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first(files, tmp_path_factory):
    """One run of the command (shared by the tests below, which read it in file order)."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("run") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["experts", "--config", str(files / "experts.yaml"), "--run_dir", str(run_dir), *ARGS])
    assert code == 0, err.getvalue()
    return run_dir, out.getvalue()


def test_a_run_prints_registration_training_and_inference_phases(first):
    _, text = first
    phases = [text.index(f"== Phase {i}:") for i in (1, 2, 3)]
    assert phases == sorted(phases)
    assert "worker fast: expert python, speed 2 (a job 0.50s)" in text and "worker db: expert sql" in text
    assert "expert python: version 0," in text and "held-out examples" in text
    assert "fast -> python: applied v0 -> v1 (staleness 0)" in text
    assert "== Phase 3: inference on sample prompts (keyword router, batch) ==" in text
    # the reference table without docs (not trained here): python, python + sql, python (the default)
    for label, route in (("pure Python", ["python"]), ("Python + SQL", ["python", "sql"]), ("Python + docs", ["python"])):
        lines = text[text.index(f"[{label}]"):].splitlines()
        assert lines[1].startswith("    route: " + ", ".join(f"{e} {1 / len(route):.2f}" for e in route))
        served = [ln.split("served by ")[1].split(":")[0] for ln in lines[2:2 + len(route)]]
        assert [s.split(" v")[0] for s in served] == route and all(" v" in s for s in served)


def test_every_push_is_in_the_metrics_csv_with_held_out_losses_and_bytes(first):
    run_dir, text = first
    python, sql = rows(run_dir, "python"), rows(run_dir, "sql")
    jobs = [r for r in python if r["status"] != "eval"]  # fast every 0.5 s, slow every 1 s, until t >= 3
    assert sum(r["worker"] == "fast" for r in jobs) == 6 and sum(r["worker"] == "slow" for r in jobs) == 3
    assert all(r["status"] == "applied" for r in jobs)
    assert [int(r["version"]) for r in jobs] == list(range(1, 10))
    assert [r["status"] for r in python if r["status"] == "eval"] == ["eval", "eval"]
    assert float(python[0]["heldout_loss"]) > 0 and python[-1]["version"] == "9"
    assert sum(1 for r in python if r["heldout_loss"]) == 2 + 4  # start, end, versions 2, 4, 6, 8
    assert sum(r["status"] == "applied" for r in sql) == 3
    assert "this session: 12 pushed = 12 applied + 0 refused + 0 pending" in text
    assert int(python[-1]["bytes_in"]) > 0 and int(python[-1]["bytes_persisted"]) > 0
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "experts" / "python").is_dir()


def test_the_end_of_training_writes_the_domains_by_models_held_out_loss_table(first):
    run_dir, text = first
    with open(run_dir / "heldout_losses.csv", newline="") as f:
        table = {r["domain"]: r for r in csv.DictReader(f)}
    assert sorted(table) == ["python", "sql"] and list(table["python"]) == ["domain", "base", "python", "sql"]
    # an expert's own domain row matches the last held-out loss its CSV recorded at the end
    assert float(table["python"]["python"]) == pytest.approx(float(rows(run_dir, "python")[-1]["heldout_loss"]), rel=1e-5)
    assert float(table["sql"]["sql"]) == pytest.approx(float(rows(run_dir, "sql")[-1]["heldout_loss"]), rel=1e-5)
    assert all(float(v) > 0 for r in table.values() for k, v in r.items() if k != "domain")
    assert "held-out loss, domains (rows) x models (columns)" in text


def test_a_rerun_on_the_same_folder_resumes_the_experts_and_the_clock(first, files, capsys):
    run_dir, _ = first
    code, out = run(files, run_dir, capsys=capsys)
    assert code == 0, out.err
    assert "expert python: version 9 (resumed, session 2)" in out.out
    python = rows(run_dir, "python")
    assert python[-1]["version"] == "18" and python[-1]["session"] == "1"
    assert float(python[-1]["time"]) >= 6.0  # the clock continues from the first session's end
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    evals = [r for r in python if r["status"] == "eval"]  # session 0 start, end; session 1 start, end
    assert evals[2]["version"] == evals[1]["version"] == "9"
    assert evals[2]["heldout_loss"] == evals[1]["heldout_loss"]  # the same expert on the same held-out set


def test_a_rerun_with_other_settings_is_one_error_line(first, files, capsys):
    run_dir, _ = first
    code, out = run(files, run_dir, "--coordinator.mix", "0.3", capsys=capsys)
    assert code == 2 and out.err.count("\n") == 1
    assert "error: run folder" in out.err and "coordinator.mix=0.6 (now 0.3)" in out.err


def test_a_rerun_on_edited_data_files_is_refused_and_on_moved_copies_resumes(files, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "alpaca.json").write_text((files / "alpaca.json").read_text())
    args = ("--data.code_alpaca", str(data / "alpaca.json"), "--duration", "1")
    code, out = run(files, tmp_path / "run", *args, capsys=capsys)
    assert code == 0, out.err
    moved = tmp_path / "moved.json"
    moved.write_text((data / "alpaca.json").read_text())
    code, out = run(files, tmp_path / "run", "--data.code_alpaca", str(moved), "--duration", "1", capsys=capsys)
    assert code == 0, out.err
    (data / "alpaca.json").write_text(json.dumps(ALPACA[:-1]))
    code, out = run(files, tmp_path / "run", *args, capsys=capsys)
    assert code == 2 and out.err.count("\n") == 1
    assert "error: run folder" in out.err and "data.sha256.code_alpaca=" in out.err


def test_a_run_recorded_before_data_fingerprints_still_resumes(first, files, capsys, tmp_path):
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(first[0], run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    del record["fingerprint"]["data"]
    (run_dir / "run.json").write_text(json.dumps(record))
    code, out = run(files, run_dir, "--duration", "1", capsys=capsys)
    assert code == 0, out.err


def test_sync_mode_leaves_pending_updates_persisted_and_counted(files, tmp_path, capsys):
    code, out = run(files, tmp_path / "run", "--coordinator.mode", "sync", "--coordinator.round_size", "4",
                    "--duration", "1.5", capsys=capsys)
    assert code == 0, out.err
    assert "pending from v0 (waits for its round)" in out.out
    assert "this session: 7 pushed = 4 applied + 0 refused + 3 pending" in out.out
    assert "expert python: version 1, applied 4, refused 0, pending 1" in out.out


def test_sync_round_size_zero_makes_a_round_one_update_per_worker_of_the_expert(files, tmp_path, capsys):
    code, out = run(files, tmp_path / "run", "--coordinator.mode", "sync", "--coordinator.round_size", "0", capsys=capsys)
    assert code == 0, out.err
    assert "a round = one update per worker of the expert" in out.out
    sql = [r for r in rows(tmp_path / "run", "sql") if r["status"] == "applied"]
    assert sql and all(r["staleness"] == "0" for r in sql)  # one worker: every update closes its round at once
    assert [int(r["version"]) for r in sql] == list(range(1, len(sql) + 1))


def test_failed_jobs_from_a_worker_file_are_printed_and_counted(files, tmp_path, capsys):
    path = tmp_path / "workers.json"
    path.write_text(json.dumps([
        {"id": "p", "specialty": "python", "speed": 2.0, "latency": 0.5},
        {"id": "q", "specialty": "sql", "failure_rate": 0.85},
    ]))
    code = main(["experts", "--config", str(files / "experts.yaml"), "--run_dir", str(tmp_path / "run"),
                 "--worker-json", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "worker p: expert python, speed 2 (a job 0.50s), latency 0.5s" in out.out
    sql = [r for r in rows(tmp_path / "run", "sql") if r["status"] != "eval"]
    failed = sum(r["status"] == "failed" for r in sql)
    assert len(sql) == 3 and 0 < failed < 3 and out.out.count("q -> sql: failed (a drawn failure") == failed
    python = [r for r in rows(tmp_path / "run", "python") if r["status"] != "eval"]
    assert [r["time"] for r in python] == ["1", "2", "3"]  # 1 step at speed 2 + 0.5 s latency
    assert f"{3 - failed + 3} pushed = {3 - failed + 3} applied" in out.out


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--worker", "w:rust:1"], "worker 'w' field 'specialty': unknown expert 'rust'; experts: python, sql"),
        (["--worker", "w:python"], "--worker 'w:python' has 2 field(s); use ID:EXPERT:SPEED"),
        (["--worker", "w:python:fast"], "worker 'w' field 'speed' is 'fast', not a number"),
        (["--model.base", "/nowhere/model"], "causal LM folder '/nowhere/model' does not exist or is not a folder"),
        (["--duration", "0"], "--duration must be a finite number of seconds > 0"),
        (["--router.table", "/nowhere/routes.yaml"], "router.table /nowhere/routes.yaml does not exist"),
        (["--router.kind", "learned"], "router.kind=learned needs router.checkpoint"),
        (["--coordinator.mode", "lazy"], 'Parser key "coordinator.mode"'),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(files, tmp_path, capsys, extra, needle):
    code = main(["experts", "--config", str(files / "experts.yaml"), "--run_dir", str(tmp_path / "run"), *ARGS, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err
    assert not (tmp_path / "run" / "experts").exists()  # nothing written


@pytest.mark.parametrize(
    ("records", "needle"),
    [
        ([{"id": "a", "specialty": "python", "sped": 2}], "worker 'a' has unknown field 'sped'"),
        ({"id": "a"}, "expected a non-empty JSON list"),
        ([{"id": "a", "specialty": "python", "speed": -1}], "worker 'a' field 'speed' must be a finite number > 0"),
    ],
)
def test_worker_json_not_matching_the_schema_is_one_error_line(files, tmp_path, capsys, records, needle):
    path = tmp_path / "workers.json"
    path.write_text(json.dumps(records))
    code = main(["experts", "--config", str(files / "experts.yaml"), "--run_dir", str(tmp_path / "run"),
                 "--worker-json", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err


def test_a_tokenizer_that_does_not_fit_the_model_is_one_error_line(files, tmp_path, capsys):
    code = main(["experts", "--config", str(files / "experts.yaml"), "--run_dir", str(tmp_path / "run"),
                 "--model.base", "null", "--model.config", '{"model_type": "qwen2", "vocab_size": 16}',
                 "--model.tokenizer", str(files / "base"), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "embeds only 16 tokens; use the model's own tokenizer" in err
    assert not (tmp_path / "run" / "experts").exists()


def test_repeated_worker_flags_become_one_list():
    assert _gather_workers(["--duration", "3", "--worker", "a:python:1", "--worker=b:sql:2"]) == [
        "--duration", "3", "--worker", '["a:python:1", "b:sql:2"]'
    ]

def test_mbpp_training_data_leaves_out_the_standard_test_split_by_default(tmp_path):
    from fedmoe.experts.command import DataSettings, load_domains

    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps({**MBPP[0], "task_id": t}) for t in (5, 11, 300, 510, 511, 974)) + "\n")
    ids = lambda settings: sorted(int(e.uid.split(":")[1]) for e in load_domains(settings, 0)["python"])  # noqa: E731
    assert ids(DataSettings(mbpp=str(path))) == [5, 511, 974]
    assert ids(DataSettings(mbpp=str(path), mbpp_tasks=None)) == [5, 11, 300, 510, 511, 974]


def test_the_saved_config_keeps_explicit_nulls_so_a_rerun_from_it_trains_on_the_same_data(files, tmp_path, capsys):
    code, out = run(files, tmp_path / "run", "--data.mbpp_tasks", "null", "--duration", "1", capsys=capsys)
    assert code == 0, out.err
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert "mbpp_tasks" in saved["data"] and saved["data"]["mbpp_tasks"] is None
