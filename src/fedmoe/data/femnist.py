"""FEMNIST from LEAF's JSON files, split naturally by writer (DESIGN.md section 2, Splits)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import torch

from fedmoe.data.federated import ArrayDataset, FederatedDataModule, FederatedSplits
from fedmoe.data.partition import contiguous_groups, holdout
from fedmoe.data.transforms import femnist_eval_transform, femnist_train_transform
from fedmoe.errors import DataError
from fedmoe.validation import check_float, check_int

log = logging.getLogger(__name__)

PIXELS = 28 * 28
NUM_CLASSES = 62
HOW_TO_GET = (
    "get it with LEAF: git clone https://github.com/TalwalkarLab/leaf && cd leaf/data/femnist && "
    "./preprocess.sh -s niid --sf 0.05 -k 0 -t sample, then point data_dir at leaf/data/femnist/data"
)

WriterData = dict[str, tuple[np.ndarray, np.ndarray]]


def leaf_files(folder: str | Path) -> list[Path]:
    """The LEAF JSON files in ``folder`` (plain ``*.json`` and ``*.json.gz``), sorted by name."""
    folder = Path(folder)
    return sorted([*folder.glob("*.json"), *folder.glob("*.json.gz")])


def _load_json(path: Path) -> object:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _read_leaf_file(path: Path) -> WriterData:
    try:
        doc = _load_json(path)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not a readable LEAF JSON file: {e}") from e
    if not isinstance(doc, dict) or "users" not in doc or not isinstance(doc.get("user_data"), dict):
        raise DataError(f"{path} is not LEAF JSON: expected an object with 'users' and 'user_data'")
    out: WriterData = {}
    for writer, data in doc["user_data"].items():
        if not isinstance(data, dict) or "x" not in data or "y" not in data:
            raise DataError(f"{path}: writer {writer} lacks 'x' or 'y'")
        try:
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: writer {writer} has malformed 'x' or 'y' ({e})") from e
        if len(data["x"]) == 0:
            x = x.reshape(0, PIXELS)
        if x.ndim != 2 or x.shape[1] != PIXELS or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{path}: writer {writer} needs 'x' as rows of {PIXELS} floats and one label per row, "
                f"got x {x.shape} and y {y.shape}"
            )
        bad = np.flatnonzero((y < 0) | (y >= NUM_CLASSES))
        if len(bad):
            raise DataError(
                f"{path}: writer {writer} has label {y[bad[0]]} at row {bad[0]}, outside 0..{NUM_CLASSES - 1} "
                f"({len(bad)} such rows); FEMNIST has {NUM_CLASSES} classes"
            )
        out[str(writer)] = (x, y)
    return out


def read_leaf(folder: str | Path) -> WriterData:
    """All writers of the LEAF JSON files in ``folder``: writer id -> (x float32 N x 784, y int64 N).

    A writer found in two files (e.g. a file kept both plain and gzipped) is an error, not merged.
    """
    data: WriterData = {}
    source: dict[str, Path] = {}
    for path in leaf_files(folder):
        for writer, xy in _read_leaf_file(path).items():
            if writer in data:
                raise DataError(f"writer {writer} appears in both {source[writer]} and {path}")
            data[writer], source[writer] = xy, path
    return data


def _leaf_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".json"):
        name = name.removesuffix(suffix)
    return name


def missing_test_counterparts(root: Path) -> list[str]:
    """Train files of ``root/train`` whose test file (the name with ``_train_`` -> ``_test_``, plain
    or gzip) is not in ``root/test``: LEAF writes both for every part of the data."""
    tests = {_leaf_stem(p) for p in leaf_files(root / "test")}
    missing = []
    for path in leaf_files(root / "train"):
        stem = _leaf_stem(path)
        head, sep, tail = stem.rpartition("_train_")
        if sep and f"{head}_test_{tail}" not in tests:
            missing.append(f"{head}_test_{tail}.json[.gz] (for {path.name})")
    return missing


def find_leaf_root(data_dir: str | Path) -> Path:
    """The folder holding ``train/`` with LEAF files: ``data_dir`` itself or its ``data/`` subfolder."""
    base = Path(data_dir)
    for root in (base, base / "data"):
        if leaf_files(root / "train"):
            return root
    raise DataError(f"no FEMNIST train files (LEAF *.json or *.json.gz) in {base}/train; {HOW_TO_GET}")


class FEMNISTDataModule(FederatedDataModule):
    """FEMNIST split by writer: clients, server (D_s) and probe (D_r) get disjoint writers.

    Writers are taken in sorted id order (shuffled with ``seed`` if ``shuffle_writers``): client i gets
    writers ``[writers_per_client * i, writers_per_client * (i + 1))``, the next ``server_writers`` give
    D_s and the next ``probe_writers`` D_r (their LEAF train parts). Each client writer's train part is
    split ``1 - val_fraction`` / ``val_fraction`` into client train and validation; a client's held-out
    set is its writers' LEAF test parts, and the test set is all client writers' test parts.

    Args:
        writers_per_client: writers per client (paper: 30).
        server_writers: writers whose train parts form D_s.
        probe_writers: writers whose train parts form D_r.
        shuffle_writers: shuffle the writer order with ``seed`` instead of sorting by id.
        val_fraction: share of each client writer's train part held out for validation.
        allow_missing_test: accept train files whose LEAF test file is missing (their writers then
            have no held-out data; a warning names the files); by default that is an error.
    """

    def __init__(
        self,
        data_dir: str = "data",
        num_clients: int = 10,
        batch_size: int = 64,
        server_batch_size: int = 64,
        eval_batch_size: int = 512,
        seed: int = 42,
        writers_per_client: int = 30,
        server_writers: int = 10,
        probe_writers: int = 1,
        shuffle_writers: bool = False,
        val_fraction: float = 0.1,
        allow_missing_test: bool = False,
    ) -> None:
        super().__init__(data_dir, num_clients, batch_size, server_batch_size, eval_batch_size, seed)
        check_int("data.writers_per_client", writers_per_client, 1)
        check_int("data.server_writers", server_writers, 0)
        check_int("data.probe_writers", probe_writers, 0)
        check_float("data.val_fraction", val_fraction, 0.0, 1.0, high_open=True)
        self.allow_missing_test = allow_missing_test
        self.writers_per_client = writers_per_client
        self.server_writers = server_writers
        self.probe_writers = probe_writers
        self.shuffle_writers = shuffle_writers
        self.val_fraction = val_fraction

    def _check_sizes(self, available: int, where: Path) -> None:
        need = self.num_clients * self.writers_per_client + self.server_writers + self.probe_writers
        if available < need:
            raise DataError(
                f"FEMNIST split needs {self.num_clients} clients x {self.writers_per_client} writers + "
                f"{self.server_writers} server + {self.probe_writers} probe = {need} writers, "
                f"found {available} in {where}; lower num_clients, writers_per_client, server_writers "
                "or probe_writers"
            )

    def build(self) -> FederatedSplits:
        if not Path(self.data_dir).is_dir():
            raise DataError(f"FEMNIST data folder {self.data_dir} does not exist; {HOW_TO_GET}")
        root = find_leaf_root(self.data_dir)
        train = read_leaf(root / "train")
        self._check_sizes(len(train), root / "train")
        if not leaf_files(root / "test"):
            raise DataError(f"no FEMNIST test files (LEAF *.json or *.json.gz) in {root}/test; {HOW_TO_GET}")
        missing = missing_test_counterparts(root)
        if missing and not self.allow_missing_test:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(
                f"{root}/test lacks {'; '.join(missing[:3])}{more}; restore the LEAF test files, or set "
                "data.allow_missing_test true to run without those writers' test data"
            )
        if missing:
            log.warning("%s/test lacks %s: those writers have no test data (allow_missing_test)", root, "; ".join(missing))
        test = read_leaf(root / "test")

        shuffle_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(2))
        writers = sorted(train)
        if self.shuffle_writers:
            writers = [writers[i] for i in shuffle_rng.permutation(len(writers))]
        groups = contiguous_groups(len(writers), self.writers_per_client, self.num_clients)
        start = self.num_clients * self.writers_per_client
        server = writers[start : start + self.server_writers]
        probe = writers[start + self.server_writers : start + self.server_writers + self.probe_writers]
        clients = [[writers[g] for g in group] for group in groups]

        store = _RowStore()
        client_train, client_test, val_rows = [], [], []
        for client in clients:
            train_rows, test_rows = [], []
            for w in client:
                rows = store.add(*train[w])
                keep, held = holdout(len(rows), self.val_fraction, split_rng)
                train_rows.append(rows[keep])
                val_rows.append(rows[held])
                if w in test:
                    test_rows.append(store.add(*test[w]))
            client_train.append(_cat(train_rows))
            client_test.append(_cat(test_rows))
        server_rows = _cat([store.add(*train[w]) for w in server])
        probe_rows = _cat([store.add(*train[w]) for w in probe])

        x, y = store.tensors()
        train_tf, eval_tf = femnist_train_transform(), femnist_eval_transform()
        return FederatedSplits(
            client_train=[ArrayDataset(x, y, rows, train_tf) for rows in client_train],
            client_test=[ArrayDataset(x, y, rows, eval_tf) for rows in client_test],
            server_train=ArrayDataset(x, y, server_rows, train_tf),
            probe=ArrayDataset(x, y, probe_rows, eval_tf),
            val=ArrayDataset(x, y, _cat(val_rows), eval_tf),
            test=ArrayDataset(x, y, _cat(client_test), eval_tf),
            num_classes=NUM_CLASSES,
        )


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


class _RowStore:
    """Collects writers' arrays into one tensor pair; ``add`` returns the rows they occupy."""

    def __init__(self) -> None:
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        rows = np.arange(self.count, self.count + len(y), dtype=np.int64)
        self.xs.append(x)
        self.ys.append(y)
        self.count += len(y)
        return rows

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.concatenate(self.xs) if self.xs else np.zeros((0, PIXELS), dtype=np.float32)
        y = np.concatenate(self.ys) if self.ys else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(x).reshape(-1, 1, 28, 28), torch.from_numpy(y)
