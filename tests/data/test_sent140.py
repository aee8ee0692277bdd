"""Sent140 from tiny fixtures in both formats: the raw Sentiment140 CSV (latin-1, 6 columns, no
header, gzip) and LEAF JSON; splits, tokenisation once per run, and bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fedmoe.data.text as text_module
from fedmoe.data.sent140 import Sent140DataModule, read_leaf_sent140, read_sent140_csv
from fedmoe.errors import DataError
from tests.wordlevel import word_tokenizer

WORDS = ["good", "bad", "day", "café", "sad", "happy", "not", "so", "very", "today"]


def tweet(i: int) -> str:
    return " ".join(WORDS[(i + 3 * k) % len(WORDS)] for k in range(1 + i % 5))


def csv_text(rows: list[tuple]) -> str:
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return out.getvalue()


def write_training(folder: Path, n: int = 240, users: int = 12, gz: bool = True, polarity=None) -> Path:
    """n tweets, alternating polarity 0/4 (or ``polarity(i)``), user i mod ``users``."""
    rows = [((polarity or (lambda i: 4 * (i % 2)))(i), 1000 + i, "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY",
             f"user{i % users}", tweet(i)) for i in range(n)]
    data = csv_text(rows).encode("latin-1")
    path = folder / ("training.sample.csv.gz" if gz else "training.sample.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_test(folder: Path, n: int = 30) -> Path:
    rows = [((0, 2, 4)[i % 3], 9000 + i, "Mon May 11 03:17:40 UTC 2009", "kindle2", f"t{i}", tweet(i)) for i in range(n)]
    path = folder / "testdata.manual.2009.06.14.csv"
    path.write_bytes(csv_text(rows).encode("latin-1"))
    return path


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    words = sorted({w for i in range(50) for w in tweet(i).split()})
    tok = word_tokenizer(words, chat=False, chat_specials=False)
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def module(folder: Path, tokenizer_dir: Path, **kwargs) -> Sent140DataModule:
    settings = dict(data_dir=str(folder), tokenizer=str(tokenizer_dir), num_clients=4, server_per_class=[10, 12],
                    probe_per_class=5, val_per_class=6, max_length=16)
    return Sent140DataModule(**{**settings, **kwargs})


def test_raw_csv_is_read_as_latin1_with_polarity_mapped_to_classes(tmp_path):
    path = write_training(tmp_path, n=6)
    df = read_sent140_csv(path)
    assert df["label"].tolist() == [0, 1, 0, 1, 0, 1]
    assert df["text"].tolist() == [tweet(i) for i in range(6)] and "café" in " ".join(df["text"])
    assert df["user"].tolist()[:2] == ["user0", "user1"]


def test_manual_test_file_drops_neutral_tweets(tmp_path):
    df = read_sent140_csv(write_test(tmp_path, 9), allow_neutral=True)
    assert df["label"].tolist() == [0, 1] * 3
    assert df["text"].tolist() == [tweet(i) for i in range(9) if i % 3 != 1]


def test_leaf_json_gives_users_texts_and_labels(tmp_path):
    blob = {"users": ["u1", "u2"], "num_samples": [2, 1],
            "user_data": {"u1": {"x": [["1", "date", "NO_QUERY", "u1", "good day"], ["2", "d", "q", "u1", "bad"]], "y": [1, 0]},
                          "u2": {"x": [["3", "d", "q", "u2", "so sad"]], "y": [0]}}}
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(blob).encode()))
    df = read_leaf_sent140([tmp_path / "a.json.gz"])
    assert df.to_dict("list") == {"user": ["u1", "u1", "u2"], "text": ["good day", "bad", "so sad"], "label": [1, 0, 0]}


def test_leaf_folders_build_a_module(tmp_path, tokenizer_dir):
    for split, n in (("train", 200), ("test", 20)):
        (tmp_path / "leaf" / split).mkdir(parents=True)
        users = {f"u{k}": {"x": [["i", "d", "q", f"u{k}", tweet(i)] for i in range(k, n, 10)],
                           "y": [i % 2 for i in range(k, n, 10)]} for k in range(10)}
        (tmp_path / "leaf" / split / "all_data.json").write_text(json.dumps({"users": list(users), "user_data": users}))
    dm = module(tmp_path / "leaf", tokenizer_dir, partition="users", min_user_samples=10, num_clients=3,
                server_per_class=5, probe_per_class=2, val_per_class=2)
    dm.setup()
    assert len(dm.splits.client_train) == 3 and len(dm.splits.test) == 20


def test_splits_are_disjoint_with_a_balanced_server_set_and_the_test_file(tmp_path, tokenizer_dir):
    write_training(tmp_path)
    write_test(tmp_path)
    dm = module(tmp_path, tokenizer_dir)
    dm.setup()
    s = dm.splits
    assert torch.bincount(s.server_train.targets).tolist() == [10, 12]
    assert torch.bincount(s.probe.targets).tolist() == [5, 5] and torch.bincount(s.val.targets).tolist() == [6, 6]
    sets = [s.server_train.index, s.probe.index, s.val.index] + [d.index for d in s.client_train + s.client_test]
    rows = torch.cat(sets)
    assert len(rows) == len(torch.unique(rows))
    assert len(s.test) == 20 and s.num_classes == 2
    x, y = s.client_train[0].__getitems__([0, 1])
    assert set(x) == {"input_ids", "attention_mask"} and x["attention_mask"].sum(1).min() >= 1


def test_majority_split_gives_client_i_seventy_percent_of_class_i_mod_2(tmp_path, tokenizer_dir):
    write_training(tmp_path)
    dm = module(tmp_path, tokenizer_dir, client_test_fraction=0.0, client_size=40)
    dm.setup()
    shares = [float(d.targets.float().mean()) for d in dm.splits.client_train]
    assert shares == pytest.approx([0.3, 0.7, 0.3, 0.7])


def test_users_partition_makes_each_client_one_user_with_enough_tweets(tmp_path, tokenizer_dir):
    write_training(tmp_path, n=240, users=12)
    dm = module(tmp_path, tokenizer_dir, partition="users", min_user_samples=10, client_test_fraction=0.0)
    dm.setup()
    texts = read_sent140_csv(tmp_path / "training.sample.csv.gz")
    users = texts["user"].to_numpy()
    for d in dm.splits.client_train:
        assert len(set(users[d.index.numpy()])) == 1 and len(d) >= 10


def test_too_few_users_with_enough_tweets_is_an_error_naming_the_keys(tmp_path, tokenizer_dir):
    write_training(tmp_path, n=240, users=200)
    with pytest.raises(DataError, match=r"data.num_clients.*data.min_user_samples.*only 0 have"):
        module(tmp_path, tokenizer_dir, partition="users").setup()


def test_dirichlet_partition_covers_the_pool(tmp_path, tokenizer_dir):
    write_training(tmp_path)
    dm = module(tmp_path, tokenizer_dir, partition="dirichlet", dirichlet_alpha=1.0, min_client_size=5)
    dm.setup()
    total = sum(len(a) + len(b) for a, b in zip(dm.splits.client_train, dm.splits.client_test))
    assert total == 240 - 22 - 10 - 12 - 12  # the pool after server, probe, validation and test (no test file)


def test_without_a_test_file_the_test_set_is_held_out_per_class(tmp_path, tokenizer_dir):
    write_training(tmp_path)
    dm = module(tmp_path, tokenizer_dir)
    dm.setup()
    s = dm.splits
    assert torch.bincount(s.test.targets).tolist() == [6, 6]
    others = torch.cat([s.server_train.index, s.probe.index, s.val.index, *[d.index for d in s.client_train]])
    assert not set(s.test.index.tolist()) & set(others.tolist())


def test_tokenisation_runs_once_per_run_and_the_cache_skips_it(tmp_path, tokenizer_dir, monkeypatch):
    write_training(tmp_path)
    write_test(tmp_path)
    calls = []
    real = text_module.load_data_tokenizer

    def counting(spec):
        tok = real(spec)
        original = type(tok).__call__

        class Counting(type(tok)):
            def __call__(self, *args, **kwargs):
                calls.append(len(args[0]))
                return original(self, *args, **kwargs)

        tok.__class__ = Counting
        return tok

    monkeypatch.setattr(text_module, "load_data_tokenizer", counting)
    first = module(tmp_path, tokenizer_dir, token_cache=str(tmp_path / "cache"))
    first.setup()
    assert calls == [240, 20]  # all training tweets in one call, the test file in another
    second = module(tmp_path, tokenizer_dir, token_cache=str(tmp_path / "cache"))
    second.setup()
    assert calls == [240, 20]
    a, b = first.splits.client_train[1], second.splits.client_train[1]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.index, b.index)


def test_csv_without_six_columns_is_an_error_naming_the_file(tmp_path, tokenizer_dir):
    (tmp_path / "training.csv").write_text('"0","hello"\n"4","bye"\n')
    with pytest.raises(DataError, match=r"training.csv: expected the 6 Sentiment140 columns.*found 2"):
        module(tmp_path, tokenizer_dir).setup()


def test_polarity_out_of_range_is_an_error_naming_the_line(tmp_path, tokenizer_dir):
    write_training(tmp_path, n=10, gz=False, polarity=lambda i: 3 if i == 7 else 0)
    with pytest.raises(DataError, match=r"column 'polarity' has '3' on line 8 \(1 such rows\)"):
        module(tmp_path, tokenizer_dir).setup()


def test_leaf_label_out_of_range_is_an_error(tmp_path):
    blob = {"users": ["u"], "user_data": {"u": {"x": [["1", "d", "q", "u", "hi"]], "y": [2]}}}
    (tmp_path / "a.json").write_text(json.dumps(blob))
    with pytest.raises(DataError, match=r"column 'y' has 2 on row 1.*0..1"):
        read_leaf_sent140([tmp_path / "a.json"])


def test_missing_tokenizer_folder_is_an_error_naming_the_key(tmp_path):
    write_training(tmp_path)
    with pytest.raises(DataError, match=r"data.tokenizer: tokenizer folder .*nowhere.* does not exist"):
        module(tmp_path, tmp_path / "nowhere").setup()


def test_empty_client_after_splitting_is_an_error(tmp_path, tokenizer_dir):
    write_training(tmp_path, n=240, users=240)
    with pytest.raises(DataError, match=r"client 0 is empty after splitting .* data.num_clients=4"):
        module(tmp_path, tokenizer_dir, partition="users", min_user_samples=1, client_test_fraction=0.5).setup()


def test_missing_folder_and_files_are_errors_naming_them(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match=r"Sent140 folder .*absent \(data.data_dir\) does not exist"):
        module(tmp_path / "absent", tokenizer_dir).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no Sentiment140 training\*.csv"):
        module(tmp_path / "empty", tokenizer_dir).setup()


def test_split_depends_on_the_seed_only(tmp_path, tokenizer_dir):
    write_training(tmp_path)
    a, b = module(tmp_path, tokenizer_dir), module(tmp_path, tokenizer_dir)
    a.setup()
    b.setup()
    assert all(np.array_equal(x.index, y.index) for x, y in zip(a.splits.client_train, b.splits.client_train))
