"""Evaluation of experts: MBPP reading, prompts and code extraction, pass@1 through the sandbox,
greedy generation on a tiny Qwen2, the domains x models loss table, router accuracy, and the
``evaluate`` command (an experts run folder, bad input as one ``error:`` line with exit code 2)."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from fedmoe.data.instructions import Instruction, read_mbpp, tokenize_instructions, user_message
from fedmoe.errors import ConfigError, DataError
from fedmoe.experts.evaluate_command import load_run_experts, main
from fedmoe.experts.evaluation import (
    CausalGenerator,
    PromptBatches,
    RoutedModel,
    build_program,
    evaluate_mbpp,
    extract_code,
    loss_table,
    markdown_table,
    parse_task_ids,
    perplexity_table,
    read_mbpp_tasks,
    reference_generator,
    router_accuracy,
)
from fedmoe.experts.routers import Route
from fedmoe.experts.sandbox import SandboxLimits
from fedmoe.models.causal import ExpertModel, build_causal_lm, tiny_causal_config
from wordlevel import word_tokenizer as _word_tokenizer

WORDS = "write a python function to add two numbers def add ( a , b ) : return + select from table".split()
for _module in ("pandas", "peft"):  # imported at collection: an import is not a test's time
    importlib.import_module(_module)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 0}
LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=256)

MBPP = [
    {"text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n    return a + b", "task_id": 11,
     "test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
     "challenge_test_list": []},
    {"text": "Write a function to square a number.", "code": "def square(x):\n    return x * x", "task_id": 12,
     "test_setup_code": "", "test_list": ["assert square(3) == 9", "assert square(0) == 0", "assert square(-2) == 4"],
     "challenge_test_list": []},
    {"text": "Write a class Box holding a value.", "code": "class Box:\n    def __init__(self, v):\n        self.v = v",
     "task_id": 13, "test_setup_code": "box = Box(5)", "test_list": ["assert box.v == 5"], "challenge_test_list": []},
]


def word_tokenizer():
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS)


def tiny_experts(names=("python", "sql")) -> ExpertModel:
    base = build_causal_lm(tiny_causal_config("qwen2", 64, initializer_range=0.2), seed=0)
    model = ExpertModel(base, names, LORA, correction_rank=2)
    for i, name in enumerate(names):  # distinct, non-zero experts
        g = torch.Generator().manual_seed(i + 1)
        state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.expert_state(name).items()}
        model.load_expert(name, state)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny():
    """Two distinct experts on a tiny Qwen2, and the word tokenizer (shared: tests leave them as found)."""
    return tiny_experts(), word_tokenizer()


@pytest.fixture
def mbpp_file(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MBPP) + "\n")
    return path


# ------------------------------------------------------------------------------------ data and code


def test_task_ranges_parse_in_order_and_bad_ranges_are_config_errors():
    assert parse_task_ids("11-13") == [11, 12, 13]
    assert parse_task_ids("11-12, 20,12") == [11, 12, 20]
    for bad in ("13-11", "eleven", "11-", ""):
        with pytest.raises(ConfigError, match="tasks"):
            parse_task_ids(bad)


def test_tasks_read_from_jsonl_and_the_sanitized_list_keep_tests_and_setup(mbpp_file, tmp_path):
    tasks = read_mbpp_tasks(mbpp_file, [13, 11])
    assert [t.task_id for t in tasks] == [13, 11]
    assert tasks[0].test_setup_code == "box = Box(5)" and tasks[1].code == "def add(a, b):\n    return a + b"
    sanitized = tmp_path / "sanitized.json"
    sanitized.write_text(json.dumps([{"source_file": "x", "task_id": 2, "prompt": "Add.", "code": "def f(): pass",
                                      "test_imports": ["import math"], "test_list": ["assert f() is None"]}]))
    (task,) = read_mbpp_tasks(sanitized)
    assert (task.text, task.test_setup_code, task.test_list) == ("Add.", "import math", ("assert f() is None",))


def test_a_task_the_file_lacks_is_a_data_error(mbpp_file):
    with pytest.raises(DataError, match=r"has no task 14 \(1 of 2 requested ids missing; it holds ids 11-13"):
        read_mbpp_tasks(mbpp_file, [11, 14])
    with pytest.raises(DataError, match="does not exist"):
        read_mbpp_tasks(mbpp_file.parent / "nope.jsonl")


def test_the_prompt_is_the_experts_training_prompt(mbpp_file):
    task = read_mbpp_tasks(mbpp_file, [11])[0]
    (trained,) = read_mbpp(mbpp_file, [11])
    assert task.prompt() == user_message(trained) == user_message(task.instruction())
    assert task.prompt().endswith("Your code should pass these tests:\n" + "\n".join(MBPP[0]["test_list"]))


@pytest.mark.parametrize("completion, code", [
    ("Here you go:\n```python\ndef f(x):\n    return x\n```\nThis returns x.", "def f(x):\n    return x\n"),
    ("```py\nimport math\n```\nthen\n```python\ndef g():\n    return math.pi\n```", "def g():\n    return math.pi\n"),
    ("```\ndef h():\n    return 1\n", "def h():\n    return 1\n"),  # unclosed fence
    ("Sure! The function is below.\ndef k(a):\n    return a * 2\n", "def k(a):\n    return a * 2\n"),
    ("def m():\n    return 0", "def m():\n    return 0\n"),
    ("```python\nx = 1\n```\n```python\ny = 2\n```", "x = 1\ny = 2\n"),
    ("def w(n):\n    return n\n\nassert w(1) == 1\n```\n\nThe `w` function returns n.", "def w(n):\n    return n\n\nassert w(1) == 1\n"),
])
def test_code_is_extracted_from_fenced_and_unfenced_completions(completion, code):
    assert extract_code(completion) == code


def test_setup_code_runs_after_the_solution_and_before_the_asserts(mbpp_file):
    task = read_mbpp_tasks(mbpp_file, [13])[0]
    assert build_program(task, "class Box: pass\n") == "class Box: pass\n\nbox = Box(5)\n\nassert box.v == 5\n"


# ------------------------------------------------------------------------------------ pass@1


def test_pass_at_1_counts_passing_programs_and_writes_a_record_per_problem(mbpp_file, tmp_path):
    tasks = read_mbpp_tasks(mbpp_file)
    answers = {
        11: "```python\ndef add(a, b):\n    return a + b\n```",  # right
        12: "def square(x):\n    return x + x\n",  # wrong: square(3) == 6
        13: "```python\nclass Box:\n    def __init__(self, v):\n        self.v = v\n```",  # right, uses the setup code
    }
    by_prompt = {t.prompt(): answers[t.task_id] for t in tasks}

    def generate(prompts):
        return [by_prompt[p] for p in prompts]

    seen = []
    report = evaluate_mbpp(tasks, generate, LIMITS, workers=2, batch_size=2, on_record=seen.append)
    assert (report.passed, report.total) == (2, 3) and report.pass_at_1 == pytest.approx(2 / 3)
    assert [r.task_id for r in seen] == [11, 12, 13]
    assert [(r.passed, r.status, r.kind) for r in report.records] == [
        (True, "passed", ""), (False, "failed", "AssertionError"), (True, "passed", "")]
    assert report.kinds() == {"AssertionError": 1}
    lines = [json.loads(x) for x in report.write_jsonl(tmp_path / "out" / "r.jsonl").read_text().splitlines()]
    assert [x["task_id"] for x in lines] == [11, 12, 13] and lines[1]["completion"] == answers[12]
    assert set(lines[0]) >= {"task_id", "passed", "kind", "seconds", "completion"}
    assert "pass@1 0.6667 (2/3)" in report.summary()


def test_a_hanging_completion_is_a_recorded_timeout_not_a_hung_harness(mbpp_file):
    tasks = read_mbpp_tasks(mbpp_file, [11, 12])
    report = evaluate_mbpp(tasks, lambda ps: ["while True:\n    pass\n"] * len(ps), SandboxLimits(timeout_s=0.5))
    assert [r.kind for r in report.records] == ["timeout", "timeout"] and report.pass_at_1 == 0


def test_reference_solutions_all_pass(mbpp_file):
    tasks = read_mbpp_tasks(mbpp_file)
    report = evaluate_mbpp(tasks, reference_generator(tasks), LIMITS, batch_size=8)
    assert report.passed == 3


def test_a_generate_that_drops_prompts_is_a_data_error(mbpp_file):
    with pytest.raises(DataError, match="returned 0 completions for 1 prompts"):
        evaluate_mbpp(read_mbpp_tasks(mbpp_file, [11]), lambda ps: [], LIMITS)


# ------------------------------------------------------------------------------------ generation


def test_greedy_generation_with_an_expert_differs_from_the_base_and_batches_match_single_prompts(tiny):
    model, tok = tiny
    model.activate("sql")
    prompts = ["write a python function to add two numbers", "select a from table"]
    python = CausalGenerator(model, tok, "python", max_new_tokens=6)
    base = CausalGenerator(model, tok, None, max_new_tokens=6)
    batched = python(prompts)
    assert batched == [python([p])[0] for p in prompts]
    assert base(prompts) != batched
    assert model.active == "sql"  # the generator restores the active expert
    with pytest.raises(DataError, match="expert 'docs' is unknown"):
        CausalGenerator(model, tok, "docs")


# ------------------------------------------------------------------------------------ loss table


def heldout_batches(tok, texts):
    examples = [Instruction(q, "", a, "t", f"t:{i}") for i, (q, a) in enumerate(texts)]
    ds = tokenize_instructions(examples, tok, max_length=32)
    return [ds.__getitems__([0, 1]), ds.__getitems__([2])]


def test_the_loss_table_has_a_row_per_domain_and_a_column_per_model_with_heldout_losses(tiny):
    model, tok = tiny
    heldout = {
        "python": heldout_batches(tok, [("write a python function", "def add ( a , b ) : return a + b")] * 3),
        "sql": heldout_batches(tok, [("select from table", "select a from table")] * 3),
    }
    table = loss_table(model, heldout, extra={"routed": lambda batches: model.heldout_loss("sql", batches)})
    assert list(table.index) == ["python", "sql"] and list(table.columns) == ["base", "python", "sql", "routed"]
    for domain, batches in heldout.items():
        for column, expert in (("base", None), ("python", "python"), ("sql", "sql")):
            assert table.loc[domain, column] == pytest.approx(model.heldout_loss(expert, batches))
    assert (table["routed"] == table["sql"]).all() and table.loc["python", "base"] != table.loc["python", "python"]
    assert perplexity_table(table).loc["sql", "base"] == pytest.approx(math.exp(table.loc["sql", "base"]))
    text = markdown_table(table)
    best = sum(int((row.round(3) == round(row.min(), 3)).sum()) for _, row in table.iterrows())
    assert text.splitlines()[0] == "| domain | base | python | sql | routed |" and text.count("**") == 2 * best
    assert f"{table.loc['sql', 'python']:.3f} ({math.exp(table.loc['sql', 'python']):.2f})" in text


def test_the_markdown_table_bolds_every_model_that_shows_the_best_loss():
    import pandas as pd

    table = pd.DataFrame({"a": [1.0, 2.0], "b": [1.0000001, 1.5], "c": [1.2, 1.5006]}, index=["x", "y"])
    rows = markdown_table(table).splitlines()[2:]
    assert rows[0] == "| x | **1.000 (2.72)** | **1.000 (2.72)** | 1.200 (3.32) |"
    assert rows[1] == "| y | 2.000 (7.39) | **1.500 (4.48)** | 1.501 (4.48) |"


# ------------------------------------------------------------------------------------ routed model


class FixedRouter:
    """Routes every prompt to ``pairs``, or by a word of the prompt (``by_word``: word -> pairs)."""

    experts = ("python", "sql")

    def __init__(self, pairs=(("python", 1.0),), by_word=None):
        self.pairs, self.by_word = tuple(pairs), dict(by_word or {})

    def route(self, prompts):
        pick = lambda p: next((v for w, v in self.by_word.items() if w in p), self.pairs)  # noqa: E731
        return [Route(tuple(pick(p))) for p in prompts]


PY = [("write a python function", "def add ( a , b ) : return a + b"), ("add two numbers", "return a + b")]
SQL = [("select from table", "select a from table")]


def prompt_batches(tok, texts, sizes):
    examples = [Instruction(q, "", a, "t", f"t:{i}") for i, (q, a) in enumerate(texts)]
    ds = tokenize_instructions(examples, tok, max_length=32)
    cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    batches = [ds.__getitems__(list(range(cuts[i], cuts[i + 1]))) for i in range(len(sizes))]
    return PromptBatches(batches, [user_message(e) for e in examples]), batches


def test_a_routed_model_sending_every_prompt_to_one_expert_scores_as_that_expert(tiny):
    model, tok = tiny
    held, batches = prompt_batches(tok, PY + SQL, [2, 1])
    before = {e: model.heldout_loss(e, batches) for e in (None, "python", "sql")}
    for expert in ("python", "sql"):
        routed = RoutedModel(model, tok, FixedRouter(((expert, 1.0),)))
        assert routed(held) == pytest.approx(before[expert], rel=1e-5)
        assert [r.experts for r in routed.routes[0]] == [(expert,)] * 3
    assert {e: model.heldout_loss(e, batches) for e in before} == before  # serving adapters leave the experts alone


def test_rows_of_one_batch_are_scored_with_their_own_routes_experts(tiny):
    model, tok = tiny
    held, batches = prompt_batches(tok, PY[:1] + SQL + PY[1:], [3])  # python, sql, python rows in one batch
    routed = RoutedModel(model, tok, FixedRouter(by_word={"select": (("sql", 1.0),)}))
    py, _ = prompt_batches(tok, PY, [2])
    sql, _ = prompt_batches(tok, SQL, [1])
    tokens = lambda b: sum(int((y[:, 1:] != -100).sum()) for _, y in b)  # noqa: E731
    n_py, n_sql = tokens(py), tokens(sql)
    expected = (model.heldout_loss("python", py) * n_py + model.heldout_loss("sql", sql) * n_sql) / (n_py + n_sql)
    assert routed(held) == pytest.approx(expected, rel=1e-5)


def test_a_multi_expert_route_is_scored_with_the_exact_weighted_merge(tiny):
    model, tok = tiny
    held, batches = prompt_batches(tok, PY + SQL, [2, 1])
    weights = {"python": 0.75, "sql": 0.25}
    routed = RoutedModel(model, tok, FixedRouter(tuple(weights.items())))
    # the merge written by hand: one expert with a zero LoRA and the correction U V = sum_e w_e s B_e A_e
    ref = ExpertModel(build_causal_lm(tiny_causal_config("qwen2", 64, initializer_range=0.2), seed=0), ["mix"], LORA,
                      correction_rank=8)
    ref.load_expert("mix", {k: torch.zeros_like(v) for k, v in ref.expert_state("mix").items()}, {
        layer.name: (torch.cat([w * layer.scaling * model.expert_state(e)[lay.b_key]
                                for e, w in weights.items()
                                for lay in model.adapted_layers(e) if lay.name == layer.name], dim=1),
                     torch.cat([model.expert_state(e)[lay.a_key] for e in weights
                                for lay in model.adapted_layers(e) if lay.name == layer.name], dim=0))
        for layer in model.adapted_layers("python")})
    merged = routed(held)
    assert merged == pytest.approx(ref.heldout_loss("mix", batches), rel=1e-5)
    assert merged != pytest.approx(model.heldout_loss("python", batches), rel=1e-3)


def test_a_routed_model_needs_each_rows_prompt():
    with pytest.raises(DataError, match="PromptBatches"):
        RoutedModel.__call__(type("R", (), {})(), [])


# ------------------------------------------------------------------------------------ routers


class KeywordRouter:
    """A hand-made router: sql when the prompt says select, else python at 0.7 and docs at 0.3."""

    def route(self, prompts):
        return [[("sql", 1.0)] if "select" in p else [("python", 0.7), ("docs", 0.3)] for p in prompts]


def test_router_accuracy_is_top_1_against_labels_with_a_confusion_matrix():
    prompts = ["select users", "write a loop", "document this", "select all", "explain select"]
    labels = ["sql", "python", "docs", "sql", "docs"]
    acc = router_accuracy(KeywordRouter(), prompts, labels, batch_size=2)
    assert (acc.correct, acc.total, acc.accuracy) == (3, 5, 0.6)
    assert acc.per_domain == {"sql": 1.0, "python": 1.0, "docs": 0.0}
    assert acc.predictions == ["sql", "python", "python", "sql", "sql"]
    assert acc.confusion.loc["docs", "python"] == 1 and acc.confusion.loc["docs", "sql"] == 1


def test_a_router_routing_to_nothing_counts_as_base_and_bad_routers_are_data_errors():
    class Empty:
        def route(self, prompts):
            return [[] for _ in prompts]

    class Flat:
        def route(self, prompts):
            return ["python" for _ in prompts]

    assert router_accuracy(Empty(), ["a"], ["base"]).accuracy == 1.0
    with pytest.raises(DataError, match=r"list of \(expert, weight\)"):
        router_accuracy(Flat(), ["a"], ["python"])
    with pytest.raises(DataError, match="one label per prompt"):
        router_accuracy(KeywordRouter(), ["a", "b"], ["python"])
    with pytest.raises(DataError, match="no route"):
        router_accuracy(object(), ["a"], ["python"])


# ------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """An experts run folder as the ``experts`` command leaves it: run.json, config.yaml and a store
    holding expert python at version 0 with known non-zero weights, plus a tiny base folder."""
    from fedmoe.experts.command import CoordinatorSettings, LoRASettings, ModelSettings, fingerprint, load_model
    from fedmoe.experts.coordinator import ExpertCoordinator

    root = tmp_path_factory.mktemp("evaluate")
    base = root / "base"
    build_causal_lm(tiny_causal_config("qwen2", 64, initializer_range=0.2), seed=0).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    run = root / "run"
    run.mkdir()
    msettings = ModelSettings(base=str(base), lora=LoRASettings(r=4, alpha=8), correction_rank=4)
    csettings = CoordinatorSettings(rank_budget=4, fsync=False)
    names = ["python", "sql"]
    (run / "run.json").write_text(json.dumps({"fingerprint": fingerprint(msettings, csettings, names), "sessions": []}))
    (run / "config.yaml").write_text("seed: 3\n")
    model, _, _ = load_model(msettings, names, 3)
    g = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=g) for k, v in model.expert_state("python").items()}
    coord = ExpertCoordinator(str(run / "experts"), mode=csettings.mode, rank_budget=4, fsync=False, seed=3)
    coord.register("python", state, model.adapted_layers("python"))
    coord.close()
    mbpp = root / "mbpp.jsonl"
    mbpp.write_text("\n".join(json.dumps(r) for r in MBPP) + "\n")
    return root, state


def test_a_run_folders_stored_expert_is_loaded_into_the_model(run_folder):
    root, state = run_folder
    model, _, described, versions = load_run_experts(root / "run")
    assert versions == {"python": 0} and "LoRA r=4" in described
    got = model.expert_state("python")
    assert all(torch.equal(got[k], state[k]) for k in state)
    before = {p: p.stat().st_mtime_ns for p in (root / "run").rglob("*")}
    load_run_experts(root / "run")
    assert {p: p.stat().st_mtime_ns for p in (root / "run").rglob("*")} == before  # the run folder is only read


def test_the_command_scores_an_expert_of_a_run_folder(run_folder, tmp_path, capsys):
    root, _ = run_folder
    out = tmp_path / "python.jsonl"
    code = main(["mbpp", "--expert-run", str(root / "run"), "--expert", "python", "--data", str(root / "mbpp.jsonl"),
                 "--tasks", "11-12", "--max-new-tokens", "3", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and "expert python (version 0)" in text and "pass@1 0.0000 (0/2)" in text
    assert len(out.read_text().splitlines()) == 2


def test_the_references_command_passes_every_reference_solution(run_folder, capsys):
    root, _ = run_folder
    assert main(["references", "--data", str(root / "mbpp.jsonl"), "--tasks", "11-13"]) == 0
    out = capsys.readouterr().out
    assert "pass@1 1.0000 (3/3)" in out and "task 13: passed" in out


def test_saved_completions_are_rescored_without_generating(run_folder, tmp_path, capsys):
    root, _ = run_folder
    saved = tmp_path / "saved.jsonl"
    saved.write_text(json.dumps({"task_id": 12, "completion": "def square(x):\n    return x ** 2\n```\nDone."}) + "\n"
                     + json.dumps({"task_id": 11, "completion": "def add(a, b):\n    return a - b"}) + "\n")
    assert main(["score", "--completions", str(saved), "--data", str(root / "mbpp.jsonl"), "--quiet"]) == 0
    assert "pass@1 0.5000 (1/2)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["mbpp", "--model", "/no/such/model", "--tasks", "11"], "causal LM folder '/no/such/model' does not exist"),
    (["mbpp", "--model", "{base}", "--tasks", "11-9"], "the range 11-9 is empty"),
    (["mbpp", "--model", "{base}", "--tasks", "11-20"], "has no task 14"),
    (["mbpp", "--expert-run", "{run}", "--expert", "sql", "--tasks", "11"], "expert 'sql' is not stored in"),
    (["mbpp", "--expert-run", "{base}", "--tasks", "11"], "is not an experts run folder (no run.json)"),
    (["mbpp", "--model", "{base}", "--expert", "python", "--tasks", "11"], "--expert needs --expert-run"),
    (["references", "--tasks", "11", "--workers", "0"], "workers must be an integer >= 1"),
    (["mbpp", "--tasks", "11", "--max-new-tokens", "x"], "invalid int value"),
    (["score", "--completions", "{base}/none.jsonl"], "completions file"),
])
def test_bad_input_is_one_error_line_and_exit_code_2(run_folder, capsys, args, message):
    root, _ = run_folder
    args = [a.format(base=root / "base", run=root / "run") for a in args] + ["--data", str(root / "mbpp.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # (after any progress bar)
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1] and message in errors[0]


def test_the_cli_dispatches_evaluate_to_the_mbpp_command(tmp_path, capsys):
    from fedmoe.cli import main as cli_main

    import json

    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps({"text": "Add.", "code": "def f(a):\n    return a", "task_id": 11,
                                "test_list": ["assert f(1) == 1"]}) + "\n")
    assert cli_main(["evaluate", "mbpp", "--model", str(tmp_path / "none"), "--data", str(data), "--tasks", "11"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: causal LM folder") and "does not exist" in err[-1]
