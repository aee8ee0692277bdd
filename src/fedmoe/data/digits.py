"""Quickstart data: scikit-learn's bundled 8x8 digits, split by label skew (no download needed)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from fedmoe.data.federated import ArrayDataset, FederatedDataModule, FederatedSplits
from fedmoe.data.partition import dirichlet, holdout, stratified_holdout
from fedmoe.validation import check_float, check_int

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SERVER_FRACTION = 0.1
PROBE_FRACTION = 0.05
VAL_FRACTION = 0.1
CLIENT_TEST_FRACTION = 0.1


class DigitsDataModule(FederatedDataModule):
    """scikit-learn's 1,797 digits (pixels / 16, 1 x 8 x 8), small enough for a one-minute CPU run.

    Stratified, as fractions of the whole: 20% test, 10% D_s, 5% D_r, 10% validation; the rest goes
    to clients by Dirichlet(``dirichlet_alpha``), each client holding out 10% as its own test set.
    ``data_dir`` is unused (the data ships with scikit-learn). No augmentation.
    """

    def __init__(
        self,
        data_dir: str = "data",
        num_clients: int = 10,
        batch_size: int = 32,
        server_batch_size: int = 64,
        eval_batch_size: int = 512,
        seed: int = 42,
        dirichlet_alpha: float = 0.5,
        min_client_size: int = 10,
    ) -> None:
        super().__init__(data_dir, num_clients, batch_size, server_batch_size, eval_batch_size, seed)
        check_float("data.dirichlet_alpha", dirichlet_alpha, 0.0, low_open=True)
        check_int("data.min_client_size", min_client_size, 1)
        self.dirichlet_alpha = dirichlet_alpha
        self.min_client_size = min_client_size

    def build(self) -> FederatedSplits:
        digits = load_digits()
        x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
        labels = digits.target.astype(np.int64)
        n = len(labels)
        rng = np.random.default_rng(self.seed)

        rest = np.arange(n)
        held_out = []
        for fraction in (TEST_FRACTION, SERVER_FRACTION, PROBE_FRACTION, VAL_FRACTION):
            count = int(np.floor(fraction * n + 0.5))
            keep, held = stratified_holdout(labels[rest], count / len(rest), rng)
            held_out.append(rest[held])
            rest = rest[keep]
        test, server, probe, val = held_out

        parts = dirichlet(labels[rest], self.num_clients, self.dirichlet_alpha, rng, self.min_client_size)
        client_train, client_test = [], []
        for positions in parts:
            rows = rest[positions]
            keep, held = holdout(len(rows), CLIENT_TEST_FRACTION, rng)
            client_train.append(rows[keep])
            client_test.append(rows[held])

        y = torch.from_numpy(labels)
        return FederatedSplits(
            client_train=[ArrayDataset(x, y, rows) for rows in client_train],
            client_test=[ArrayDataset(x, y, rows) for rows in client_test],
            server_train=ArrayDataset(x, y, server),
            probe=ArrayDataset(x, y, probe),
            val=ArrayDataset(x, y, val),
            test=ArrayDataset(x, y, test),
            num_classes=NUM_CLASSES,
        )
