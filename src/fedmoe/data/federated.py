"""FederatedDataModule: every data set as client datasets plus the server's sets.

A data set module subclasses :class:`FederatedDataModule` and implements :meth:`build`, which reads
files and returns :class:`FederatedSplits`. Samples are held as tensors in :class:`ArrayDataset`
views that share one storage; augmentation runs on whole batches with torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fedmoe.validation import check_int

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class ArrayDataset(Dataset):
    """Rows ``index`` of shared tensors ``x`` and ``y``, with an optional batch transform.

    ``__getitems__`` returns a whole batch ``(x, y)`` at once, so a DataLoader with
    :func:`batch_collate` does no per-sample Python work and augmentation is vectorised.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None = None,
        transform: BatchTransform | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y
        self.index = torch.arange(len(y)) if index is None else torch.as_tensor(index, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.index[torch.as_tensor(indices, dtype=torch.long)]
        x = self.x[rows]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[rows]

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the rows in this view, in order."""
        return self.y[self.index]

    def subset(self, positions: torch.Tensor, transform: BatchTransform | None | str = "same") -> "ArrayDataset":
        """A view on some rows of this view (positions are relative to it)."""
        t = self.transform if transform == "same" else transform
        return ArrayDataset(self.x, self.y, self.index[torch.as_tensor(positions, dtype=torch.long)], t)

    def with_transform(self, transform: BatchTransform | None) -> "ArrayDataset":
        """The same rows with another batch transform."""
        return ArrayDataset(self.x, self.y, self.index, transform)


def batch_collate(batch):
    """Collate for datasets whose ``__getitems__`` already returns a batch."""
    return batch


@dataclass
class FederatedSplits:
    """All sets of a federated task. Server sets are disjoint from every client's data."""

    client_train: list[Dataset]
    client_test: list[Dataset]
    server_train: Dataset
    probe: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


class FederatedDataModule(L.LightningDataModule):
    """Base class: per-client train/held-out sets, server train (D_s), probe (D_r), val and test.

    Args:
        data_dir: folder holding the data set files.
        num_clients: number of federated clients N.
        batch_size: local (client) training batch size.
        server_batch_size: batch size of server-side training (Fed-MoE's gate).
        eval_batch_size: batch size for evaluation and prediction.
        seed: seed of the split (independent of ``seed_everything``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        num_clients: int = 10,
        batch_size: int = 64,
        server_batch_size: int = 64,
        eval_batch_size: int = 512,
        seed: int = 42,
    ) -> None:
        super().__init__()
        check_int("data.num_clients", num_clients, 1)
        for key, value in (("batch_size", batch_size), ("server_batch_size", server_batch_size),
                           ("eval_batch_size", eval_batch_size)):
            check_int(f"data.{key}", value, 1)
        self.data_dir = data_dir
        self.num_clients = num_clients
        self.batch_size = batch_size
        self.server_batch_size = server_batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.splits: FederatedSplits | None = None

    #: The validation metric that picks the best round, and whether lower or higher is better.
    monitor: tuple[str, str] = ("loss", "min")

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Evaluation metrics of a model's outputs: mean cross-entropy ``loss`` and accuracy ``acc``.

        Data sets with other metrics (GLUE's Matthews correlation, F1, Pearson) override this and
        :attr:`monitor`.
        """
        return {
            "loss": F.cross_entropy(outputs, targets).item(),
            "acc": (outputs.argmax(1) == targets).float().mean().item(),
        }

    def build(self) -> FederatedSplits:
        """Read the files and split them; raise :class:`fedmoe.errors.DataError` on bad input."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.build()

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.splits.num_classes

    def client_num_samples(self, client_id: int) -> int:
        self.setup()
        return len(self.splits.client_train[client_id])

    def train_loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        """A shuffling loader (shuffle order drawn from torch's global RNG, so runs resume exactly)."""
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=True, collate_fn=_collate_for(dataset)
        )

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """An ordered loader. Its own generator keeps it from drawing the global RNG (every
        DataLoader iterator draws a base seed), so evaluating never changes a run's training."""
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=_collate_for(dataset),
            generator=torch.Generator(),
        )

    def client_train_loader(self, client_id: int) -> DataLoader:
        self.setup()
        return self.train_loader(self.splits.client_train[client_id])

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self.eval_loader(self.splits.test)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.eval_loader(self.splits.val)


def _collate_for(dataset: Dataset):
    return batch_collate if hasattr(dataset, "__getitems__") else None
