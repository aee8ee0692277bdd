"""FederatedDataModule: every data set as client datasets plus the server's sets.

A data set module subclasses :class:`FederatedDataModule` and implements :meth:`build`, which reads
files and returns :class:`FederatedSplits`. Samples are held as tensors in :class:`ArrayDataset`
views that share one storage; augmentation runs on whole batches with torch ops.

A client's local training draws its shuffling and augmentation from its own generator, seeded from
(run seed, round, client id) alone (:func:`client_generator`), so its batches do not depend on which
clients trained before it, in this process or another one.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fedmoe.errors import DataError
from fedmoe.validation import check_int

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class ArrayDataset(Dataset):
    """Rows ``index`` of shared tensors ``x`` and ``y``, with an optional batch transform.

    ``__getitems__`` returns a whole batch ``(x, y)`` at once, so a DataLoader with
    :func:`batch_collate` does no per-sample Python work and augmentation is vectorised.

    With a ``generator`` (:meth:`with_generator`), each batch's transform runs with torch's global
    CPU RNG set to a seed drawn from that generator and restored afterwards, so augmentation that
    draws from the global RNG (as :mod:`fedmoe.data.transforms` does) follows the generator instead.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None = None,
        transform: BatchTransform | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y
        self.index = torch.arange(len(y)) if index is None else torch.as_tensor(index, dtype=torch.long)
        self.transform = transform
        self.generator = generator

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.index[torch.as_tensor(indices, dtype=torch.long)]
        x = self.x[rows]
        if self.transform is not None:
            with seeded_global_rng(self.generator):
                x = self.transform(x)
        return x, self.y[rows]

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the rows in this view, in order."""
        return self.y[self.index]

    def subset(self, positions: torch.Tensor, transform: BatchTransform | None | str = "same") -> "ArrayDataset":
        """A view on some rows of this view (positions are relative to it)."""
        t = self.transform if transform == "same" else transform
        return ArrayDataset(self.x, self.y, self.index[torch.as_tensor(positions, dtype=torch.long)], t, self.generator)

    def with_transform(self, transform: BatchTransform | None) -> "ArrayDataset":
        """The same rows with another batch transform."""
        return ArrayDataset(self.x, self.y, self.index, transform, self.generator)

    def with_generator(self, generator: torch.Generator | None) -> "ArrayDataset":
        """The same rows (a shallow copy of this view, of its own class) whose transform draws its
        randomness from ``generator``."""
        view = copy.copy(self)
        view.generator = generator
        return view

    def to(self, device: torch.device | str, copies: dict | None = None) -> "ArrayDataset":
        """This view (rows, transform, generator) over ``x`` and ``y`` on ``device``: its batches and
        their augmentation come out there, while the random draws stay on the CPU generator, so the
        batches are those of this view to float rounding. ``copies``, a dict the caller keeps, holds
        the storages already moved: the views of one data set then share one copy on the device."""
        device = torch.device(device)
        if self.x.device == device and self.y.device == device:
            return self
        cache = {} if copies is None else copies
        view = copy.copy(self)
        for name in ("x", "y"):
            t = getattr(self, name)
            key = (id(t), str(device))
            entry = cache.get(key)
            if entry is None or entry[0] is not t:  # an id reused by a newer tensor is a miss
                entry = cache[key] = (t, t.to(device))
            setattr(view, name, entry[1])
        return view


def seeded_global_rng(generator: torch.Generator | None):
    """A context in which torch's global CPU RNG is seeded from ``generator`` (one draw) and restored
    on exit; a no-op context without a generator. CUDA generators are left alone: the batch
    transforms draw on the CPU."""
    if generator is None:
        return nullcontext()
    return _SeededGlobalRNG(int(torch.randint(0, 2**62, (), generator=generator)))


class _SeededGlobalRNG:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = torch.get_rng_state()
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self.saved)


def client_seed(seed: int, round: int, client_id: int, stream: int = 0) -> int:
    """A 62-bit seed that depends on (run seed, round, client id, stream) alone.

    ``stream`` separates independent uses by one client in one round (0: data order and
    augmentation, 1: the model's own randomness such as dropout).
    """
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(round), int(client_id), int(stream)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))


def client_generator(seed: int, round: int, client_id: int) -> torch.Generator:
    """The CPU generator of a client's data order and augmentation in a round."""
    return torch.Generator().manual_seed(client_seed(seed, round, client_id))


def batch_collate(batch):
    """Collate for datasets whose ``__getitems__`` already returns a batch."""
    return batch


class EmptyDataset(Dataset):
    """A set with no rows: a split that a task does not have (evaluating it gives NaN metrics)."""

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int):
        raise IndexError(f"index {i} of an empty dataset")


@dataclass
class FederatedSplits:
    """All sets of a federated task. Server sets are disjoint from every client's data.

    Only ``client_train`` is required: a task without held-out client data, server training data,
    a probe set, validation or test leaves them out (empty sets: no training or evaluation on
    them), and ``num_classes`` defaults to one more than the largest integer label of the clients'
    ``targets``.
    """

    client_train: list[Dataset]
    client_test: list[Dataset] = field(default_factory=list)
    server_train: Dataset = field(default_factory=EmptyDataset)
    probe: Dataset = field(default_factory=EmptyDataset)
    val: Dataset = field(default_factory=EmptyDataset)
    test: Dataset = field(default_factory=EmptyDataset)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not self.client_test:
            self.client_test = [EmptyDataset() for _ in self.client_train]
        if len(self.client_test) != len(self.client_train):
            raise DataError(
                f"FederatedSplits has {len(self.client_train)} client_train sets but {len(self.client_test)} "
                "client_test sets; give one held-out set per client, or none"
            )
        if self.num_classes is None:
            self.num_classes = _classes_from_targets(self.client_train)


def _classes_from_targets(datasets: list[Dataset]) -> int:
    """One more than the largest integer label of ``datasets``' ``targets``."""
    top = -1
    for d in datasets:
        t = getattr(d, "targets", None)
        if t is None or not isinstance(t, torch.Tensor) or t.is_floating_point() or t.numel() == 0:
            continue
        top = max(top, int(t.max()))
    if top < 0:
        raise DataError(
            "FederatedSplits.num_classes is not given and the client sets have no integer targets to count "
            "classes from; set num_classes in the data module's build()"
        )
    return top + 1


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

    def train_loader(
        self, dataset: Dataset, batch_size: int | None = None, generator: torch.Generator | None = None
    ) -> DataLoader:
        """A shuffling loader. Order and augmentation come from ``generator`` when given (datasets
        with ``with_generator`` pass it to their transform), else from torch's global RNG, which
        checkpoints capture, so runs resume exactly either way."""
        if generator is not None and hasattr(dataset, "with_generator"):
            dataset = dataset.with_generator(generator)
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=True, collate_fn=_collate_for(dataset),
            generator=generator,
        )

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """An ordered loader. Its own generator keeps it from drawing the global RNG (every
        DataLoader iterator draws a base seed), so evaluating never changes a run's training."""
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=_collate_for(dataset),
            generator=torch.Generator(),
        )

    def client_train_loader(self, client_id: int, round: int = 0, seed: int = 0) -> DataLoader:
        """Client ``client_id``'s training loader for ``round`` of a run seeded ``seed``: its order and
        augmentation depend on these three alone (:func:`client_generator`)."""
        self.setup()
        return self.train_loader(self.splits.client_train[client_id], generator=client_generator(seed, round, client_id))

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self.eval_loader(self.splits.test)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self.eval_loader(self.splits.val)


def _collate_for(dataset: Dataset):
    return batch_collate if hasattr(dataset, "__getitems__") else None
