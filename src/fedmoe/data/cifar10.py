"""CIFAR-10 from the python pickle batches, split by label skew (DESIGN.md section 2, Splits)."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from fedmoe.data.federated import ArrayDataset, FederatedDataModule, FederatedSplits
from fedmoe.data.partition import dirichlet, holdout
from fedmoe.data.transforms import cifar_eval_transform, cifar_train_transform
from fedmoe.errors import DataError
from fedmoe.validation import check_float, check_int

log = logging.getLogger(__name__)

NUM_CLASSES = 10
NUM_TRAIN_BATCHES = 5
FOLDER = "cifar-10-batches-py"
HOW_TO_GET = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there "
    f"(tar xzf cifar-10-python.tar.gz gives {FOLDER}/)"
)


def _batch_number(path: Path) -> int:
    match = re.fullmatch(r"data_batch_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def train_batches(folder: Path) -> list[Path]:
    """``data_batch_<k>`` files in ``folder``, in numeric order of k."""
    return sorted((p for p in folder.glob("data_batch_*") if _batch_number(p) >= 0), key=_batch_number)


def find_cifar_dir(data_dir: str | Path) -> Path:
    """The folder with the batches: ``data_dir/cifar-10-batches-py`` or ``data_dir`` itself."""
    base = Path(data_dir)
    for folder in (base / FOLDER, base):
        if train_batches(folder):
            return folder
    raise DataError(f"no CIFAR-10 batches (data_batch_*) in {base} or {base / FOLDER}; {HOW_TO_GET}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch as (x uint8 N x 3 x 32 x 32, y int64 N)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-10 pickle batch: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    try:
        x = np.asarray(batch[b"data"])
        y = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed b'data' or b'labels' ({e})") from e
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
        raise DataError(
            f"{path}: expected b'data' uint8 N x 3072 and N labels, got {x.dtype} {x.shape} and {y.shape} labels"
        )
    bad = np.flatnonzero((y < 0) | (y >= NUM_CLASSES))
    if len(bad):
        raise DataError(
            f"{path}: label {y[bad[0]]} at row {bad[0]} is outside 0..{NUM_CLASSES - 1} "
            f"({len(bad)} such rows); the file is not CIFAR-10's"
        )
    return x.reshape(-1, 3, 32, 32), y


def missing_train_batches(folder: Path) -> list[str]:
    """Names of CIFAR-10's five training batches that ``folder`` lacks."""
    return [f"data_batch_{k}" for k in range(1, NUM_TRAIN_BATCHES + 1) if not (folder / f"data_batch_{k}").is_file()]


def read_cifar10(
    data_dir: str | Path, allow_missing_batches: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training batches (concatenated in order 1..5) and the test batch: ``(x_train, y_train, x_test, y_test)``.

    A folder without all five training batches is an error, unless ``allow_missing_batches``, which
    reads those present and warns naming the missing ones.
    """
    folder = find_cifar_dir(data_dir)
    missing = missing_train_batches(folder)
    if missing and not allow_missing_batches:
        raise DataError(
            f"CIFAR-10 folder {folder} lacks {', '.join(missing)} (CIFAR-10 has data_batch_1 to "
            f"data_batch_{NUM_TRAIN_BATCHES}); restore them, or set data.allow_missing_batches true to use "
            "the batches that are there"
        )
    if missing:
        log.warning("CIFAR-10 folder %s lacks %s: training on the other batches (allow_missing_batches)",
                    folder, ", ".join(missing))
    parts = [read_cifar_batch(p) for p in train_batches(folder)]
    test_path = folder / "test_batch"
    if not test_path.is_file():
        raise DataError(f"no CIFAR-10 test_batch in {folder}; {HOW_TO_GET}")
    x_test, y_test = read_cifar_batch(test_path)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test


class CIFAR10DataModule(FederatedDataModule):
    """CIFAR-10 with per-class server, validation and probe sets and a Dirichlet split over clients.

    Per class, in file order: the last ``server_per_class`` images form D_s, the ``val_per_class``
    before them the validation set and the ``probe_per_class`` before those D_r. The remaining images go
    to clients by :func:`~fedmoe.data.partition.dirichlet`; each client holds out ``client_test_fraction``
    of its data as its own test set. The test set is ``test_batch``.

    Args:
        server_per_class: images per class in D_s (paper: 1000).
        val_per_class: images per class in the validation set (500).
        probe_per_class: images per class in D_r (20).
        dirichlet_alpha: concentration of the per-class client shares.
        min_client_size: fewest samples a client may get before holding out its test part.
        client_test_fraction: share of each client's data held out for client evaluation.
        allow_missing_batches: train on the batches present when some of ``data_batch_1..5`` are
            missing (a warning names them); by default a missing batch is an error.
    """

    def __init__(
        self,
        data_dir: str = "data",
        num_clients: int = 10,
        batch_size: int = 64,
        server_batch_size: int = 64,
        eval_batch_size: int = 512,
        seed: int = 42,
        server_per_class: int = 1000,
        val_per_class: int = 500,
        probe_per_class: int = 20,
        dirichlet_alpha: float = 1.0,
        min_client_size: int = 10,
        client_test_fraction: float = 0.1,
        allow_missing_batches: bool = False,
    ) -> None:
        super().__init__(data_dir, num_clients, batch_size, server_batch_size, eval_batch_size, seed)
        for key, value in (("server_per_class", server_per_class), ("val_per_class", val_per_class),
                           ("probe_per_class", probe_per_class)):
            check_int(f"data.{key}", value, 0)
        check_float("data.dirichlet_alpha", dirichlet_alpha, 0.0, low_open=True)
        check_int("data.min_client_size", min_client_size, 1)
        check_float("data.client_test_fraction", client_test_fraction, 0.0, 1.0, high_open=True)
        self.allow_missing_batches = allow_missing_batches
        self.server_per_class = server_per_class
        self.val_per_class = val_per_class
        self.probe_per_class = probe_per_class
        self.dirichlet_alpha = dirichlet_alpha
        self.min_client_size = min_client_size
        self.client_test_fraction = client_test_fraction

    def _server_rows(self, y: np.ndarray, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(server, val, probe, client pool) row indices, cut per class from the end in file order."""
        s, v, p = self.server_per_class, self.val_per_class, self.probe_per_class
        if min(s, v, p) < 0:
            raise DataError("server_per_class, val_per_class and probe_per_class must be >= 0")
        sets: list[list[np.ndarray]] = [[], [], [], []]
        for c in range(NUM_CLASSES):
            rows = np.flatnonzero(y == c)
            n = len(rows)
            if n <= s + v + p:
                raise DataError(
                    f"CIFAR-10 split needs more than {s} server + {v} validation + {p} probe = {s + v + p} "
                    f"training images per class, but class {c} has {n} in {where}; "
                    "lower server_per_class, val_per_class or probe_per_class"
                )
            cuts = [n - s, n - s - v, n - s - v - p]
            sets[0].append(rows[cuts[0] :])
            sets[1].append(rows[cuts[1] : cuts[0]])
            sets[2].append(rows[cuts[2] : cuts[1]])
            sets[3].append(rows[: cuts[2]])
        server, val, probe, pool = (np.sort(np.concatenate(part)) for part in sets)
        return server, val, probe, pool

    def build(self) -> FederatedSplits:
        if not Path(self.data_dir).is_dir():
            raise DataError(f"CIFAR-10 data folder {self.data_dir} does not exist; {HOW_TO_GET}")
        x_train, y_train, x_test, y_test = read_cifar10(self.data_dir, self.allow_missing_batches)
        server, val, probe, pool = self._server_rows(y_train, find_cifar_dir(self.data_dir))

        part_rng, hold_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(2))
        parts = dirichlet(y_train[pool], self.num_clients, self.dirichlet_alpha, part_rng, self.min_client_size)
        client_train, client_test = [], []
        for positions in parts:
            rows = pool[positions]
            keep, held = holdout(len(rows), self.client_test_fraction, hold_rng)
            client_train.append(rows[keep])
            client_test.append(rows[held])

        x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
        train_tf, eval_tf = cifar_train_transform(), cifar_eval_transform()
        return FederatedSplits(
            client_train=[ArrayDataset(x, y, rows, train_tf) for rows in client_train],
            client_test=[ArrayDataset(x, y, rows, eval_tf) for rows in client_test],
            server_train=ArrayDataset(x, y, server, train_tf),
            probe=ArrayDataset(x, y, probe, eval_tf),
            val=ArrayDataset(x, y, val, eval_tf),
            test=ArrayDataset(torch.from_numpy(x_test), torch.from_numpy(y_test), None, eval_tf),
            num_classes=NUM_CLASSES,
        )
