"""Instruction data: Code Alpaca and MBPP readers, the keyword domain classifier, per-domain worker
splits, response-only labels and padded batches, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from fedmoe.data.instructions import (
    DOMAIN_RULES,
    IGNORE_INDEX,
    Instruction,
    by_domain,
    classify,
    encode_example,
    matching_rule,
    plain_prompt,
    read_code_alpaca,
    read_mbpp,
    split_domains,
    tokenize_instructions,
)
from fedmoe.errors import DataError
from wordlevel import word_tokenizer as _word_tokenizer

WORDS = "write a python function to add two numbers def add ( a , b ) : return + # Instruction Response Input".split()


def word_tokenizer(chat: bool = True):
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS, chat=chat)


def ex(instruction: str, output: str = "", input: str = "", domain: str | None = None) -> Instruction:
    return Instruction(instruction, input, output, "test", "test:0", domain)


ADD = ex("write a python function to add two numbers", "def add ( a , b ) : return a + b")


# ------------------------------------------------------------------------------------ readers


def write_alpaca(path: Path, records) -> Path:
    text = json.dumps(records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


ALPACA = [
    {"instruction": "Write a SQL query to list users.", "input": "", "output": "SELECT * FROM users;"},
    {"instruction": "Reverse a list.", "input": "x = [1, 2]", "output": "def rev(x):\n    return x[::-1]"},
]


@pytest.mark.parametrize("name", ["code_alpaca.json", "code_alpaca_2k.json.gz"])
def test_code_alpaca_reads_plain_and_gzip_lists(tmp_path, name):
    got = read_code_alpaca(write_alpaca(tmp_path / name, ALPACA))
    assert [(e.instruction, e.input, e.output) for e in got] == [tuple(r.values()) for r in ALPACA]
    assert [e.uid for e in got] == ["code_alpaca:0", "code_alpaca:1"]
    assert [classify(e) for e in got] == ["sql", "python"]


def test_mbpp_reads_problems_as_python_with_tests_as_input(tmp_path):
    rows = [
        {"text": "Write a function to add.", "code": "def add(a, b):\r\n    return a + b", "task_id": 7,
         "test_setup_code": "", "test_list": ["assert add(1, 2) == 3"], "challenge_test_list": []},
        {"text": "Write a function to negate.", "code": "def neg(a):\r\n    return -a", "task_id": 8,
         "test_setup_code": "", "test_list": ["assert neg(1) == -1"], "challenge_test_list": []},
    ]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_mbpp(path)
    assert [e.uid for e in got] == ["mbpp:7", "mbpp:8"]
    assert got[0].input == "Your code should pass these tests:\nassert add(1, 2) == 3"
    assert got[0].output == "def add(a, b):\n    return a + b"
    assert classify(got[0]) == "python"
    assert [e.uid for e in read_mbpp(path, task_ids=[8])] == ["mbpp:8"]


def test_code_alpaca_that_does_not_parse_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": ')
    with pytest.raises(DataError, match=r"broken.json is not a Code Alpaca JSON list"):
        read_code_alpaca(path)


def test_code_alpaca_record_missing_a_field_names_record_and_field(tmp_path):
    path = write_alpaca(tmp_path / "ca.json", [ALPACA[0], {"instruction": "x", "input": ""}])
    with pytest.raises(DataError, match=r"ca.json: record 1 has no field 'output'"):
        read_code_alpaca(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"MBPP file .*nope.jsonl does not exist"):
        read_mbpp(tmp_path / "nope.jsonl")


def test_mbpp_bad_line_and_missing_field_name_the_line(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text('{"text": "t", "code": "c", "task_id": 1, "test_list": []}\nnot json\n')
    with pytest.raises(DataError, match=r"mbpp.jsonl: line 2 is not JSON"):
        read_mbpp(path)
    path.write_text('{"text": "t", "task_id": 1, "test_list": []}\n')
    with pytest.raises(DataError, match=r"line 1 has no field 'code'"):
        read_mbpp(path)


# --------------------------------------------------------------------------------- classifier


@pytest.mark.parametrize(
    ("example", "domain", "rule"),
    [
        (ex("Write a MySQL query to count rows.", "SELECT COUNT(*) FROM t;"), "sql", "names-sql"),
        (ex("Delete the old rows.", "DELETE FROM logs WHERE day < 3;"), "sql", "sql-statement"),
        (ex("Add a docstring to this function.", "def f():\n    '''Does f.'''"), "docs", "asks-for-docs"),
        (ex("Explain what a closure in JavaScript is.",
            "A closure is a function that keeps the variables of the scope it was made in."),
         "docs", "question-prose-answer"),
        (ex("Write a JavaScript function to add two numbers.", "function add(a, b) { return a + b; }"),
         "other", "names-other-language"),
        (ex("Print hello in Python.", "print('hello')"), "python", "names-python"),
        (ex("Sum a list.", "def total(xs):\n    return sum(xs)"), "python", "python-syntax"),
        (ex("Analyse the survey.", "The data shows that most users visit twice a week and stay for an hour or more."),
         "docs", "prose-answer"),
    ],
)
def test_classifier_rules_in_order(example, domain, rule):
    assert classify(example) == domain
    assert matching_rule(example).name == rule


def test_first_matching_rule_wins_sql_before_python():
    both = ex("Run a SQL query from Python.", "import sqlite3\ncur.execute('SELECT 1')")
    assert classify(both) == "sql"
    assert [r.name for r in DOMAIN_RULES].index("names-sql") < [r.name for r in DOMAIN_RULES].index("names-python")


def test_unmatched_is_other_and_a_fixed_domain_overrides_the_rules():
    assert classify(ex("Sort it.", "[1, 2]")) == "other"
    assert matching_rule(ex("Sort it.", "[1, 2]")) is None
    assert classify(ex("Sort it.", "[1, 2]", domain="python")) == "python"


def test_by_domain_groups_every_example_once():
    items = [ex("Print in Python.", "print(1)"), ex("Sort it.", "[1]"), ex("Use SQL.", "SELECT 1")]
    groups = by_domain(items)
    assert {k: len(v) for k, v in groups.items()} == {"python": 1, "sql": 1, "docs": 0, "other": 1}


# -------------------------------------------------------------------------------------- splits


def _corpus(n: int) -> dict[str, list[Instruction]]:
    return {
        "python": [Instruction(f"p{i}", "", "print(1)", "t", f"p:{i}", "python") for i in range(n)],
        "sql": [Instruction(f"s{i}", "", "SELECT 1", "t", f"s:{i}", "sql") for i in range(n // 2)],
    }


def test_iid_split_gives_disjoint_worker_parts_and_a_heldout_set_per_domain():
    splits = split_domains(_corpus(40), {"python": 3, "sql": 2}, heldout_fraction=0.25, seed=1)
    for domain, n in (("python", 40), ("sql", 20)):
        s = splits[domain]
        uids = [e.uid for part in s.workers for e in part] + [e.uid for e in s.heldout]
        assert sorted(uids) == sorted(e.uid for e in _corpus(40)[domain])
        assert len(s.heldout) == round(0.25 * n)
    assert [len(p) for p in splits["python"].workers] == [10, 10, 10]
    again = split_domains(_corpus(40), {"python": 3, "sql": 2}, heldout_fraction=0.25, seed=1)
    assert [e.uid for e in again["sql"].heldout] == [e.uid for e in splits["sql"].heldout]


def test_dirichlet_split_keeps_every_example_once():
    splits = split_domains(_corpus(60), {"python": 2}, partition="dirichlet", dirichlet_alpha=0.3, min_size=5)
    s = splits["python"]
    assert min(len(p) for p in s.workers) >= 5
    assert len({e.uid for p in s.workers for e in p} | {e.uid for e in s.heldout}) == 60


def test_empty_domain_is_a_data_error_naming_it():
    with pytest.raises(DataError, match=r"domain 'docs' has no examples; domains with data: python \(40\), sql \(20\)"):
        split_domains(_corpus(40), {"python": 1, "docs": 1})


def test_too_few_examples_for_the_workers_is_a_data_error():
    with pytest.raises(DataError, match=r"domain 'sql' has 2 training examples .* too few for 5 workers"):
        split_domains(_corpus(6), {"sql": 5}, heldout_fraction=0.34)


# -------------------------------------------------------------------------------- tokenisation


def test_chat_template_labels_mask_every_prompt_token():
    tok = word_tokenizer(chat=True)
    ids, labels = encode_example(tok, ADD, max_length=64)
    prompt = tok.apply_chat_template([{"role": "user", "content": ADD.instruction}], add_generation_prompt=True,
                                     tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[n_prompt - 1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|end|>")  # the end of turn is learned
    assert tok.decode(ids[n_prompt:-1]).split() == ADD.output.split()


def test_plain_format_without_a_template_ends_the_response_with_eos():
    tok = word_tokenizer(chat=False)
    ids, labels = encode_example(tok, ADD, max_length=64)
    n_prompt = len(tok(plain_prompt(ADD), add_special_tokens=True)["input_ids"])
    assert "### Instruction:" in plain_prompt(ADD) and plain_prompt(ADD).endswith("### Response:\n")
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id


def test_input_goes_into_the_prompt_and_long_responses_are_cut():
    tok = word_tokenizer(chat=False)
    with_input = ex("add two numbers", "return a + b", input="a , b")
    assert "### Input:\na , b" in plain_prompt(with_input)
    ids, labels = encode_example(tok, with_input, max_length=64)
    n_prompt = sum(1 for y in labels if y == IGNORE_INDEX)
    cut = encode_example(tok, with_input, max_length=n_prompt + 2)
    assert cut == (ids[: n_prompt + 2], labels[: n_prompt + 2])
    assert encode_example(tok, with_input, max_length=n_prompt) is None


def test_long_examples_can_be_dropped_instead_of_cut_so_every_response_keeps_its_end():
    tok = word_tokenizer(chat=False)
    long, short = ex("add two numbers", "return a + b"), ex("add two numbers", "a")
    n_prompt = sum(1 for y in encode_example(tok, long, max_length=64)[1] if y == IGNORE_INDEX)
    fits = n_prompt + 2  # the short response and its EOS fit, the long one does not
    assert encode_example(tok, long, max_length=fits, long="drop") is None
    assert encode_example(tok, short, max_length=fits, long="drop")[0][-1] == tok.eos_token_id
    ds = tokenize_instructions([long, short], tok, max_length=fits, long="drop")
    assert len(ds) == 1 and ds.dropped == 1
    assert len(tokenize_instructions([long, short], tok, max_length=fits)) == 2  # cut keeps both


def test_batches_are_right_padded_with_masked_labels():
    tok = word_tokenizer()
    short = ex("add two numbers", "a + b")
    ds = tokenize_instructions([ADD, short], tok, max_length=64)
    (x, y), single = ds.__getitems__([0, 1]), ds[1]
    lengths = [len(encode_example(tok, e, 64)[0]) for e in (ADD, short)]
    assert x["input_ids"].shape == y.shape == (2, max(lengths))
    assert x["attention_mask"].sum(1).tolist() == lengths
    pad = x["attention_mask"] == 0
    assert bool((x["input_ids"][pad] == tok.pad_token_id).all()) and bool((y[pad] == IGNORE_INDEX).all())
    assert torch.equal(single[0]["input_ids"], x["input_ids"][1, : lengths[1]])
    assert ds.num_response_tokens == int((y != IGNORE_INDEX).sum())


def test_examples_that_leave_no_room_for_a_response_are_dropped_and_counted():
    tok = word_tokenizer(chat=False)
    long_prompt = ex(" ".join(["add"] * 40), "a + b")
    ds = tokenize_instructions([ADD, long_prompt], tok, max_length=30)
    assert (len(ds), ds.dropped) == (1, 1)
    with pytest.raises(DataError, match=r"none of 1 instruction examples fits max_length=30"):
        tokenize_instructions([long_prompt], tok, max_length=30)


def test_chat_template_asked_for_but_missing_is_a_data_error():
    with pytest.raises(DataError, match=r"template='chat' but the tokenizer has no chat_template"):
        encode_example(word_tokenizer(chat=False), ADD, template="chat")
