"""Shared test settings (offline, deterministic) and tiny on-disk fixtures in the real FEMNIST
(LEAF JSON) and CIFAR-10 (python pickle) formats."""

from __future__ import annotations

import os
import gzip
import json
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LEAF_TRAIN_FILES = {
    "all_data_0_niid_0_keep_0_train_9.json.gz": ["w03", "w00", "w05"],
    "all_data_7_niid_0_keep_0_train_9.json": ["w01", "w02", "w07"],
    "all_data_31_niid_0_keep_0_train_9.json.gz": ["w04", "w06"],
}
LEAF_TEST_FILES = {
    "all_data_0_niid_0_keep_0_test_9.json.gz": ["w03", "w00"],
    "all_data_7_niid_0_keep_0_test_9.json": ["w01", "w02", "w07"],
    "all_data_31_niid_0_keep_0_test_9.json.gz": ["w04", "w06"],
}
LEAF_TEST_SIZE = 2


def leaf_train_size(writer: str) -> int:
    """Writer wNN has 10 + NN training samples."""
    return 10 + int(writer[1:])


def leaf_writer_data(writer: str, split: int, n: int) -> dict:
    """Rows whose first three pixels say (writer number, sample number, split: 0 train / 1 test)."""
    x = np.full((n, 784), 0.5)
    x[:, 0] = int(writer[1:])
    x[:, 1] = np.arange(n)
    x[:, 2] = split
    return {"x": x.tolist(), "y": [(int(writer[1:]) * 7 + i) % 62 for i in range(n)]}


def write_leaf_file(path: Path, user_data: dict) -> None:
    """One LEAF JSON file, gzipped when the name ends in .gz."""
    doc = {"users": list(user_data), "num_samples": [len(d["y"]) for d in user_data.values()], "user_data": user_data}
    text = json.dumps(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


@pytest.fixture
def femnist_dir(tmp_path: Path) -> Path:
    """8 writers over non-contiguous, mixed plain/gzip files; w05 has no test part."""
    root = tmp_path / "femnist"
    for name, writers in LEAF_TRAIN_FILES.items():
        write_leaf_file(root / "train" / name, {w: leaf_writer_data(w, 0, leaf_train_size(w)) for w in writers})
    for name, writers in LEAF_TEST_FILES.items():
        write_leaf_file(root / "test" / name, {w: leaf_writer_data(w, 1, LEAF_TEST_SIZE) for w in writers})
    return root


CIFAR_PER_CLASS_PER_BATCH = (3, 3, 2, 2, 2)
"""Images per class in data_batch_1..5 (12 per class in all)."""
CIFAR_TEST_PER_CLASS = 3


def cifar_batch(first_index: int, per_class: int) -> dict:
    """A pickle-layout batch; labels cycle 0..9 and each image's global index is in red pixels (0, 0) and (0, 1)."""
    n = 10 * per_class
    index = first_index + np.arange(n)
    img = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    img[:, 0, 0, 0] = index // 256
    img[:, 0, 0, 1] = index % 256
    img[:, 1] = 100
    img[:, 2] = 200
    return {
        b"batch_label": b"training batch",
        b"labels": [int(i % 10) for i in range(n)],
        b"data": img.reshape(n, 3072),
        b"filenames": [b"img_%d.png" % i for i in index],
    }


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def make_cifar_dir(tmp_path: Path) -> Callable[..., Path]:
    """Builds ``<root>/cifar-10-batches-py`` with the five training batches (12 images per class in
    all, labels cycling 0..9 in file order) and a test batch."""

    def make(per_class_per_batch: tuple[int, ...] = CIFAR_PER_CLASS_PER_BATCH) -> Path:
        folder = tmp_path / "cifar" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        first = 0
        for b, per_class in enumerate(per_class_per_batch):
            write_pickle(folder / f"data_batch_{b + 1}", cifar_batch(first, per_class))
            first += 10 * per_class
        write_pickle(folder / "test_batch", cifar_batch(10_000, CIFAR_TEST_PER_CLASS))
        return folder.parent

    return make

