"""Yelp in the yelp_review_full schema from tiny Parquet and CSV fixtures: splits by majority class
and by category, per-class server sets, disjoint probe and test, and bad input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from fedmoe.data.yelp import YelpDataModule, read_yelp_file
from fedmoe.errors import DataError
from tests.wordlevel import word_tokenizer

WORDS = ["great", "food", "awful", "service", "slow", "tasty", "cheap", "never", "again", "love"]
CATEGORIES = ["Restaurants", "Bars", "Shopping"]


def review(i: int) -> str:
    return " ".join(WORDS[(i + 7 * k) % len(WORDS)] for k in range(2 + i % 6))


def frame(n: int, offset: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"label": [i % 5 for i in range(n)], "text": [review(i + offset) for i in range(n)],
                         "category": [CATEGORIES[(i // 5) % 3] for i in range(n)]})


def write(folder: Path, n: int = 400, fmt: str = "parquet", test: int = 50, df: pd.DataFrame | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train = frame(n) if df is None else df
    for name, data in (("train", train), ("test", frame(test, offset=10_000) if test else None)):
        if data is None:
            continue
        if fmt == "parquet":
            data.to_parquet(folder / f"{name}.parquet")
        else:
            data.to_csv(folder / f"{name}.csv", index=False)


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    word_tokenizer(WORDS, chat=False, chat_specials=False).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def module(folder: Path, tokenizer_dir: Path, **kwargs) -> YelpDataModule:
    settings = dict(data_dir=str(folder), tokenizer=str(tokenizer_dir), num_clients=5, server_per_class=8,
                    probe_per_class=3, val_per_class=4, max_length=16)
    return YelpDataModule(**{**settings, **kwargs})


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parquet_and_csv_read_the_same_reviews(tmp_path, fmt):
    write(tmp_path, n=20, fmt=fmt, test=0)
    df = read_yelp_file(next(tmp_path.glob("train.*")), need_category=True)
    assert df["label"].tolist() == [i % 5 for i in range(20)]
    assert df["text"].tolist() == [review(i) for i in range(20)] and df["category"].iloc[5] == "Bars"


def test_sets_are_disjoint_with_per_class_server_probe_and_validation(tmp_path, tokenizer_dir):
    write(tmp_path)
    dm = module(tmp_path, tokenizer_dir)
    dm.setup()
    s = dm.splits
    assert torch.bincount(s.server_train.targets).tolist() == [8] * 5
    assert torch.bincount(s.probe.targets).tolist() == [3] * 5 and torch.bincount(s.val.targets).tolist() == [4] * 5
    rows = torch.cat([s.server_train.index, s.probe.index, s.val.index, *[d.index for d in s.client_train + s.client_test]])
    assert len(rows) == len(torch.unique(rows))
    assert len(s.test) == 50 and s.num_classes == 5 and s.test.input_ids is not s.probe.input_ids


def test_majority_split_gives_client_i_a_majority_of_class_i_mod_5(tmp_path, tokenizer_dir):
    write(tmp_path)
    dm = module(tmp_path, tokenizer_dir, client_size=40, client_test_fraction=0.0)
    dm.setup()
    for i, d in enumerate(dm.splits.client_train):
        counts = torch.bincount(d.targets, minlength=5)
        assert len(d) == 40 and int(counts.argmax()) == i % 5
        assert 0.55 * 40 - 1 <= int(counts[i % 5]) <= 0.65 * 40


def test_category_split_gives_each_client_one_category(tmp_path, tokenizer_dir):
    write(tmp_path)
    dm = module(tmp_path, tokenizer_dir, partition="category", num_clients=3, client_test_fraction=0.0)
    dm.setup()
    categories = read_yelp_file(tmp_path / "train.parquet")["category"].to_numpy()
    seen = [set(categories[d.index.numpy()]) for d in dm.splits.client_train]
    assert seen == [{"Bars"}, {"Restaurants"}, {"Shopping"}]  # sorted names dealt to clients 0, 1, 2


def test_category_shared_when_there_are_fewer_categories_than_clients(tmp_path, tokenizer_dir):
    write(tmp_path)
    dm = module(tmp_path, tokenizer_dir, partition="category", num_clients=6, client_test_fraction=0.0)
    dm.setup()
    categories = read_yelp_file(tmp_path / "train.parquet")["category"].to_numpy()
    seen = [set(categories[d.index.numpy()]) for d in dm.splits.client_train]
    assert seen[0] == seen[3] == {"Bars"} and not set(dm.splits.client_train[0].index.tolist()) & set(
        dm.splits.client_train[3].index.tolist())


def test_without_a_test_file_test_is_held_out_per_class(tmp_path, tokenizer_dir):
    write(tmp_path, test=0)
    dm = module(tmp_path, tokenizer_dir)
    dm.setup()
    s = dm.splits
    assert torch.bincount(s.test.targets).tolist() == [4] * 5
    assert not set(s.test.index.tolist()) & set(s.probe.index.tolist())


def test_file_without_the_expected_columns_is_an_error_naming_it(tmp_path, tokenizer_dir):
    write(tmp_path, df=pd.DataFrame({"stars": [1, 2], "review": ["a", "b"]}), test=0)
    with pytest.raises(DataError, match=r"train.parquet: expected columns label, text .*missing label, text; found stars, review"):
        module(tmp_path, tokenizer_dir).setup()


def test_category_partition_needs_the_category_column(tmp_path, tokenizer_dir):
    write(tmp_path, fmt="csv", df=frame(50).drop(columns="category"), test=0)
    with pytest.raises(DataError, match=r"train.csv: expected columns label, text, category .*missing category"):
        module(tmp_path, tokenizer_dir, partition="category").setup()


@pytest.mark.parametrize("bad,shown", [(5, "5"), (-1, "-1"), ("four", "'four'")])
def test_label_out_of_range_is_an_error_naming_the_row(tmp_path, tokenizer_dir, bad, shown):
    df = frame(10)
    df["label"] = df["label"].astype(object)
    df.loc[6, "label"] = bad
    write(tmp_path, fmt="csv", df=df, test=0)
    with pytest.raises(DataError, match=rf"train.csv: column 'label' has {shown} on row 7 \(1 such rows\)"):
        module(tmp_path, tokenizer_dir).setup()


def test_empty_client_after_splitting_is_an_error(tmp_path, tokenizer_dir):
    df = frame(200)
    df.loc[:, "category"] = "Restaurants"
    df.loc[199, "category"] = "Bars"
    write(tmp_path, df=df, test=0)
    with pytest.raises(DataError, match=r"client \d+ is empty after splitting .*data.num_clients=4.*category"):
        module(tmp_path, tokenizer_dir, partition="category", num_clients=4, server_per_class=2, val_per_class=2,
               probe_per_class=2).setup()


def test_missing_train_file_is_an_error_listing_the_folder(tmp_path, tokenizer_dir):
    (tmp_path / "yelp").mkdir()
    (tmp_path / "yelp" / "reviews.json").write_text("{}")
    with pytest.raises(DataError, match=r"no train\*.parquet or train\*.csv\[.gz\] in .*yelp \(it holds: reviews.json\)"):
        module(tmp_path / "yelp", tokenizer_dir).setup()


def test_too_few_reviews_of_a_class_for_the_server_set_is_an_error(tmp_path, tokenizer_dir):
    write(tmp_path, n=30, test=0)
    with pytest.raises(DataError, match=r"data.server_per_class needs 8 samples of class 0 but only 6"):
        module(tmp_path, tokenizer_dir).setup()
