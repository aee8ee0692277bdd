"""GLUE readers, tokenisation, splits, metrics and bad input, on tiny TSVs in each task's exact layout
(CoLA without a header, MRPC with a UTF-8 BOM) and a tiny BERT tokenizer saved to a temporary folder.

Row i of a fixture file has the sentence ``sentence(i)`` and the label ``label(task, i)``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmoe.data.federated import batch_collate
from fedmoe.data.glue import GLUEDataModule, TokenDataset, glue_task, read_glue_tsv
from fedmoe.data.partition import dirichlet, fixed_sizes
from fedmoe.errors import DataError

WORDS = ["the", "movie", "is", "good", "bad", "a", "man", "dog", "runs", "plays", "guitar", "very", "not", "it", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FOLDERS = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "mrpc": "MRPC", "stsb": "STS-B", "qnli": "QNLI"}
PAIR_TASKS = ("rte", "mrpc", "stsb", "qnli")
N_TRAIN, N_DEV = 120, 12


def sentence(i: int) -> str:
    """1 to 9 words, so sequence lengths vary from row to row."""
    return " ".join(WORDS[(i + 3 * k) % len(WORDS)] for k in range(1 + (i * 7) % 9))


def label(task: str, i: int) -> str:
    """Unbalanced classes (two thirds class 1); STS-B scores 0.0 .. 5.0 in steps of 0.5."""
    if task == "stsb":
        return f"{(i % 11) * 0.5:.3f}"
    positive = i % 3 != 0
    if task in ("rte", "qnli"):
        return "not_entailment" if positive else "entailment"
    return "1" if positive else "0"


def class_id(task: str, i: int) -> float:
    return float(label(task, i)) if task == "stsb" else float(i % 3 != 0)


def row(task: str, i: int) -> str:
    a, b, y = sentence(i), sentence(i + 5), label(task, i)
    return {
        "sst2": f"{a} \t{y}",
        "rte": f"{i}\t{a}\t{b}\t{y}",
        "cola": f"gj04\t{y}\t{'' if y == '1' else '*'}\t{a}",
        "mrpc": f"{y}\t{1000 + i}\t{2000 + i}\t{a}\t{b}",
        "stsb": f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{y}",
        "qnli": f"{i}\t{a}?\t{b}\t{y}",
    }[task]


HEADERS = {
    "sst2": "sentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "cola": None,
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "qnli": "index\tquestion\tsentence\tlabel",
}


def write_tsv(path: Path, task: str, rows: range, header: str | None = "default") -> Path:
    header = HEADERS[task] if header == "default" else header
    lines = ([header] if header is not None else []) + [row(task, i) for i in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_task(root: Path, task: str, n_train: int = N_TRAIN, n_dev: int = N_DEV) -> Path:
    """``root/<Folder>/{train,dev}.tsv``; dev rows are numbered after the training rows."""
    folder = root / FOLDERS[task]
    write_tsv(folder / "train.tsv", task, range(n_train))
    write_tsv(folder / "dev.tsv", task, range(n_train, n_train + n_dev))
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["?"])}
    folder = tmp_path_factory.mktemp("tokenizer")
    BertTokenizerFast(vocab=vocab).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def make(tmp_path, tokenizer_dir):
    """Builds a module over fixture files of ``task`` (written once per test) and sets it up."""

    def build(task: str = "sst2", setup: bool = True, **kwargs) -> GLUEDataModule:
        root = tmp_path / "glue"
        if not (root / FOLDERS[task]).is_dir():
            write_task(root, task)
        args = dict(data_dir=str(root), task=task, tokenizer=str(tokenizer_dir), min_client_size=5)
        args.update(kwargs)
        dm = GLUEDataModule(**args)
        if setup:
            dm.setup()
        return dm

    return build


def rows_of(ds: TokenDataset) -> list[int]:
    return ds.index.tolist()


def error(match: str):
    return pytest.raises(DataError, match=match)


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("task", list(FOLDERS))
def test_reader_returns_each_tasks_texts_and_labels_in_file_order(tmp_path, task):
    path = write_task(tmp_path, task) / FOLDERS[task] / "train.tsv"
    ex = read_glue_tsv(path, glue_task(task))
    assert len(ex) == N_TRAIN
    suffix = {"qnli": "?", "sst2": " "}.get(task, "")  # SST-2 keeps the space before the tab, as the real files have it
    assert ex.texts[0] == [sentence(i) + suffix for i in range(N_TRAIN)]
    if task in PAIR_TASKS:
        assert len(ex.texts) == 2 and ex.texts[1] == [sentence(i + 5) for i in range(N_TRAIN)]
    else:
        assert len(ex.texts) == 1
    assert ex.labels.tolist() == [class_id(task, i) for i in range(N_TRAIN)]
    assert ex.labels.dtype == (np.float32 if task == "stsb" else np.int64)


def test_rte_and_qnli_map_entailment_to_class_0():
    assert glue_task("rte").classes == ("entailment", "not_entailment")
    assert glue_task("QNLI").classes == ("entailment", "not_entailment")


def test_cola_has_no_header_so_its_first_line_is_an_example(tmp_path):
    path = write_tsv(tmp_path / "CoLA" / "train.tsv", "cola", range(3))
    assert path.read_text().startswith("gj04\t0\t*\t")
    ex = read_glue_tsv(path, glue_task("cola"))
    assert ex.texts[0] == [sentence(0), sentence(1), sentence(2)] and ex.labels.tolist() == [0, 1, 1]


def test_mrpc_byte_order_mark_does_not_rename_the_quality_column(tmp_path):
    path = write_tsv(tmp_path / "MRPC" / "train.tsv", "mrpc", range(4))
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality")
    assert read_glue_tsv(path, glue_task("mrpc")).labels.tolist() == [0, 1, 1, 0]


def test_gzip_files_and_the_task_folder_itself_are_accepted(tmp_path, tokenizer_dir):
    folder = tmp_path / "SST-2"
    for name, rows in (("train", range(40)), ("dev", range(40, 44))):
        text = write_tsv(tmp_path / f"{name}.tsv", "sst2", rows).read_bytes()
        folder.mkdir(exist_ok=True)
        with gzip.open(folder / f"{name}.tsv.gz", "wb") as f:
            f.write(text)
    dm = GLUEDataModule(str(folder), task="sst2", tokenizer=tokenizer_dir)  # a Path works too
    dm.setup()
    assert len(dm.splits.test) == 4 and sum(len(d) for d in dm.splits.client_train) > 0


# ---------------------------------------------------------------- tokenisation and batches


def test_single_sentences_are_tokenised_in_file_order(make, tokenizer):
    s = make("sst2", max_train_samples=None).splits
    x, _ = s.test.__getitems__([0])
    assert x["input_ids"][0].tolist() == tokenizer(sentence(N_TRAIN))["input_ids"]
    assert set(x["token_type_ids"].unique().tolist()) == {0}


@pytest.mark.parametrize("task", PAIR_TASKS)
def test_sentence_pairs_are_tokenised_as_pairs(make, tokenizer, task):
    s = make(task).splits
    x, _ = s.test.__getitems__([2])
    i = N_TRAIN + 2
    first = sentence(i) + ("?" if task == "qnli" else "")
    want = tokenizer(first, sentence(i + 5))
    assert x["input_ids"][0].tolist() == want["input_ids"]
    assert x["token_type_ids"][0].tolist() == want["token_type_ids"]
    assert x["input_ids"][0].tolist().count(tokenizer.sep_token_id) == 2


def test_batches_are_padded_to_their_own_longest_sequence(make, tokenizer):
    test = make("sst2").splits.test
    lengths = [len(tokenizer(sentence(N_TRAIN + i))["input_ids"]) for i in range(N_DEV)]
    assert test.token_lengths.tolist() == lengths
    short = [i for i in range(N_DEV) if lengths[i] < max(lengths)][:3]
    x, y = test.__getitems__(short)
    width = max(lengths[i] for i in short)
    assert x["input_ids"].shape == x["attention_mask"].shape == (3, width) < test.input_ids.shape
    assert x["attention_mask"].sum(1).tolist() == [lengths[i] for i in short]
    assert (x["input_ids"][x["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert x["input_ids"].dtype == x["attention_mask"].dtype == torch.long


def test_sequences_are_truncated_to_max_length(make):
    s = make("rte", max_length=6).splits
    assert s.test.input_ids.shape[1] == 6 and s.test.token_lengths.max() == 6
    x, _ = s.client_train[0].__getitems__(list(range(4)))
    assert x["input_ids"].shape[1] <= 6


def test_left_padded_sequences_are_cut_from_the_right():
    ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8], [0, 0, 0, 9]], dtype=torch.int32)
    ds = TokenDataset(ids, torch.tensor([2, 4, 1]), torch.tensor([0, 1, 0]), padding_side="left")
    x, y = ds.__getitems__([0, 2])
    assert x["input_ids"].tolist() == [[7, 8], [0, 9]]
    assert x["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert "token_type_ids" not in x and y.tolist() == [0, 0]


def test_a_left_padding_tokenizer_without_pad_token_pads_with_eos(make, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", *WORDS])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "causal_tok"
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(str(folder))
    dm = make("sst2", tokenizer=str(folder))
    assert dm.pad_token_id == 0
    test = dm.splits.test
    lengths = test.token_lengths.tolist()
    i, j = lengths.index(min(lengths)), lengths.index(max(lengths))
    x, _ = test.__getitems__([i, j])
    assert x["input_ids"][0, -lengths[i]:].tolist() == [WORDS.index(w) + 2 for w in sentence(N_TRAIN + i).split()]
    assert x["attention_mask"][0].tolist() == [0] * (lengths[j] - lengths[i]) + [1] * lengths[i]
    assert "token_type_ids" not in x


def test_loaders_yield_dict_batches_through_batch_collate(make):
    dm = make("mrpc", batch_size=16)
    loader = dm.client_train_loader(0)
    assert loader.collate_fn is batch_collate
    x, y = next(iter(loader))
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"} and len(y) == 16
    assert len(next(iter(dm.test_dataloader()))[1]) == N_DEV


def test_labels_are_int64_classes_or_float32_scores(make):
    cls, reg = make("cola"), make("stsb")
    assert cls.num_classes == 2 and cls.splits.test.targets.dtype == torch.int64
    assert reg.num_classes == 1 and reg.splits.test.targets.dtype == torch.float32
    assert reg.splits.test.targets.tolist() == [class_id("stsb", N_TRAIN + i) for i in range(N_DEV)]


# ---------------------------------------------------------------- splits


def all_parts(s) -> list[list[int]]:
    return [rows_of(s.val)] + [rows_of(d) for d in (*s.client_train, *s.client_test)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(partition="iid"),
        dict(partition="dirichlet", dirichlet_alpha=0.5),
        dict(partition="sizes", client_sizes=[50, 40, 18]),
        dict(partition="sizes", client_sizes=[30, 5], num_clients=2),
    ],
    ids=["iid", "dirichlet", "sizes-all", "sizes-some"],
)
def test_val_and_client_parts_are_disjoint_and_cover_the_training_pool(make, kwargs):
    s = make("sst2", **kwargs).splits
    parts = all_parts(s)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))
    assert len(s.val) == 12  # round(0.1 * 120)
    sizes = kwargs.get("client_sizes")
    if sizes is None or sum(sizes) == N_TRAIN - 12:
        assert sorted(flat) == list(range(N_TRAIN))
    else:
        assert len(flat) == 12 + sum(sizes)
        assert [len(a) + len(b) for a, b in zip(s.client_train, s.client_test)] == sizes
    assert all(len(d) == 0 for d in (s.probe, s.server_train))


def test_validation_and_client_test_parts_are_stratified(make):
    s = make("sst2", partition="iid", client_test_fraction=0.3).splits
    assert torch.bincount(s.val.targets).tolist() == [4, 8]  # 40 / 80 of 120
    for train, held in zip(s.client_train, s.client_test):
        n0 = int((train.targets == 0).sum() + (held.targets == 0).sum())
        assert abs(int((held.targets == 0).sum()) - 0.3 * n0) <= 1


def test_dirichlet_redraws_until_every_client_has_min_client_size(make):
    pool_labels = np.array([i % 3 != 0 for i in range(108)], dtype=np.int64)
    first_draw = dirichlet(pool_labels, 4, 0.1, np.random.default_rng(0), min_size=0)
    assert min(len(p) for p in first_draw) < 15  # the first draw would leave a client too small ...
    retried = dirichlet(pool_labels, 4, 0.1, np.random.default_rng(0), min_size=15)
    assert min(len(p) for p in retried) >= 15  # ... so it is redrawn
    s = make("sst2", partition="dirichlet", dirichlet_alpha=0.1, num_clients=4, min_client_size=15, seed=0).splits
    assert min(len(a) + len(b) for a, b in zip(s.client_train, s.client_test)) >= 15
    assert sorted(i for p in all_parts(s) for i in p) == list(range(N_TRAIN))


def test_dirichlet_that_cannot_reach_min_client_size_is_a_data_error(make):
    with error("min_client_size"):
        make("sst2", partition="dirichlet", num_clients=4, min_client_size=40)


def test_stsb_dirichlet_split_bins_scores(make):
    s = make("stsb", partition="dirichlet", dirichlet_alpha=1.0, min_client_size=5).splits
    flat = [i for p in all_parts(s) for i in p]
    assert sorted(flat) == list(range(N_TRAIN))


def test_split_is_deterministic_by_seed(make):
    a = all_parts(make("rte", partition="dirichlet", seed=3).splits)
    assert a == all_parts(make("rte", partition="dirichlet", seed=3).splits)
    assert a != all_parts(make("rte", partition="dirichlet", seed=4).splits)


def test_max_samples_take_seeded_subsamples(make, tokenizer):
    dm = make("sst2", max_train_samples=50, max_eval_samples=5, seed=1)
    s = dm.splits
    assert s.client_train[0].input_ids.shape[0] == 50 and len(s.test) == 5
    assert sorted(i for p in all_parts(s) for i in p) == list(range(50))
    again = make("sst2", max_train_samples=50, max_eval_samples=5, seed=1).splits
    assert torch.equal(again.test.input_ids, s.test.input_ids)
    assert torch.equal(again.client_train[1].targets, s.client_train[1].targets)


def test_fixed_sizes_partition_draws_disjoint_parts():
    parts = fixed_sizes(20, [3, 5, 2], np.random.default_rng(0))
    assert [len(p) for p in parts] == [3, 5, 2]
    flat = np.concatenate(parts)
    assert len(set(flat.tolist())) == 10 and flat.max() < 20
    assert all((np.diff(p) > 0).all() for p in parts)


# ---------------------------------------------------------------- metrics


def test_monitor_is_each_tasks_metric():
    want = {"sst2": "acc", "rte": "acc", "qnli": "acc", "cola": "mcc", "mrpc": "f1", "stsb": "pearson"}
    for task, name in want.items():
        assert GLUEDataModule(task=task).monitor == (name, "max")


def test_cola_metrics_are_cross_entropy_accuracy_and_mcc():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    y = torch.tensor([1, 1, 1, 0, 0, 0])  # predictions 0,1,1,0,1,0: TP 2, FN 1, TN 2, FP 1
    m = GLUEDataModule(task="cola").metrics(logits, y)
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, y).item())
    assert m["acc"] == pytest.approx(4 / 6) and m["mcc"] == pytest.approx(1 / 3)


def test_mrpc_metrics_add_f1_of_the_paraphrase_class():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([1, 1, 1, 0, 0])  # TP 2, FP 1, FN 1
    m = GLUEDataModule(task="mrpc").metrics(logits, y)
    assert set(m) == {"loss", "acc", "f1"} and m["f1"] == pytest.approx(2 / 3) and m["acc"] == pytest.approx(0.6)


def test_stsb_metrics_are_mse_pearson_and_spearman():
    out = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([1.0, 2.0, 4.0])
    m = GLUEDataModule(task="stsb").metrics(out, y)
    assert set(m) == {"loss", "pearson", "spearman"}
    assert m["loss"] == pytest.approx(1 / 3) and m["pearson"] == pytest.approx(9 / 84**0.5)
    assert m["spearman"] == pytest.approx(1.0)


def test_stsb_metrics_refuse_more_than_one_output_per_example():
    with pytest.raises(ValueError, match=r"one output per example: got outputs \(3, 2\) for 3 targets"):
        GLUEDataModule(task="stsb").metrics(torch.zeros(3, 2), torch.zeros(3))


def test_sst2_metrics_are_loss_and_accuracy_only():
    m = GLUEDataModule(task="sst2").metrics(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([1, 0]))
    assert set(m) == {"loss", "acc"} and m["acc"] == 0.5


# ---------------------------------------------------------------- bad input


def test_unknown_task_names_the_choices():
    with error(r"unknown GLUE task 'mnli'; choose one of sst2, rte, cola, mrpc, stsb, qnli"):
        GLUEDataModule(task="mnli")


def test_missing_glue_folder(tmp_path, tokenizer_dir):
    with error(f"GLUE folder {re.escape(str(tmp_path / 'nope'))} does not exist"):
        GLUEDataModule(str(tmp_path / "nope"), task="rte", tokenizer=str(tokenizer_dir)).setup()


def test_missing_task_folder_lists_what_the_root_holds(tmp_path, tokenizer_dir):
    write_task(tmp_path, "sst2")
    with error(r"no GLUE RTE files in .* \(it holds: SST-2\)"):
        GLUEDataModule(str(tmp_path), task="rte", tokenizer=str(tokenizer_dir)).setup()


def test_missing_train_file_names_the_files_that_exist(tmp_path, tokenizer_dir):
    write_tsv(tmp_path / "QNLI" / "dev.tsv", "qnli", range(5))
    with error(r"QNLI folder .* has no train.tsv \(it holds: dev.tsv\)"):
        GLUEDataModule(str(tmp_path), task="qnli", tokenizer=str(tokenizer_dir)).setup()


def test_unexpected_columns_name_expected_and_found(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", "rte", range(3), header="index\tpremise\thypothesis\tlabel")
    with error(r"t.tsv: expected columns sentence1, sentence2, label for RTE, found index, premise, hypothesis, label"):
        read_glue_tsv(path, glue_task("rte"))


def test_cola_with_the_wrong_number_of_columns(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", "sst2", range(3))
    with error(r"t.tsv: expected 4 tab-separated columns without a header .* for CoLA, found 2"):
        read_glue_tsv(path, glue_task("cola"))


@pytest.mark.parametrize(
    "task, bad, shown",
    [("rte", "neutral", "entailment, not_entailment"), ("sst2", "2", "0, 1"), ("stsb", "7.5", r"\[0, 5\]"),
     ("stsb", "n/a", r"\[0, 5\]"), ("cola", "", "0, 1")],
)
def test_labels_outside_the_tasks_label_set(tmp_path, task, bad, shown):
    path = write_tsv(tmp_path / "t.tsv", task, range(4))
    lines = path.read_text().splitlines()
    i = 3 if HEADERS[task] else 2  # the third example
    cells = lines[i].split("\t")
    cells[1 if task == "cola" else -1] = bad
    lines[i] = "\t".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with error(rf"t.tsv: column .* has '{re.escape(bad)}' on line {i + 1} \(1 bad rows\); .* labels are .*{shown}"):
        read_glue_tsv(path, glue_task(task))


def test_rows_with_extra_fields_and_empty_files(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", "sst2", range(3))
    path.write_text(path.read_text() + "extra\t1\tfield\n")
    with error(r"t.tsv is not a GLUE SST-2 TSV: .*Expected 2 fields"):
        read_glue_tsv(path, glue_task("sst2"))
    (tmp_path / "e.tsv").write_text("")
    with error(r"e.tsv is empty"):
        read_glue_tsv(tmp_path / "e.tsv", glue_task("sst2"))


def test_tokenizer_missing_unset_or_unloadable(make, tmp_path):
    with error(r"tokenizer folder .*nowhere' does not exist"):
        make("sst2", tokenizer=str(tmp_path / "nowhere"))
    with error(r"data.tokenizer is not set"):
        make("sst2", tokenizer="")
    (tmp_path / "empty").mkdir()
    with error(r"tokenizer folder .*empty holds no loadable tokenizer"):
        make("sst2", tokenizer=str(tmp_path / "empty"))
    with error(r"tokenizer folder 'package:no_such_tokenizer_pkg': Python package .* is not installed"):
        make("sst2", tokenizer="package:no_such_tokenizer_pkg")


def test_client_left_empty_after_holding_out_its_test_part(make):
    with error(r"client 0 has no training samples .* of its 1;"):
        make("sst2", partition="sizes", client_sizes=[1, 5], num_clients=2, client_test_fraction=0.5)


def test_client_sizes_beyond_the_pool_or_not_one_per_client(make):
    with error(r"client_sizes=\[100, 10\] sum to 110 samples but only 108 are left"):
        make("sst2", partition="sizes", client_sizes=[100, 10], num_clients=2)
    with error(r"one size per client \(num_clients=3\), got 2"):
        make("sst2", partition="sizes", client_sizes=[10, 10])
    with error(r"one size per client \(num_clients=3\), got none"):
        make("sst2", partition="sizes")
    with error(r"client_sizes is set but partition is 'iid'"):
        make("sst2", client_sizes=[10, 10, 10])
    with error(r"every client size >= 1"):
        make("sst2", partition="sizes", client_sizes=[10, 0, 10])


def test_bad_lengths_sample_limits_and_partition_names(make):
    with error(r"max_length must be >= 1, got 0"):
        make("sst2", max_length=0)
    with error(r"max_train_samples must be >= 1 \(or null for all samples\), got 0"):
        make("sst2", max_train_samples=0)
    with error(r"unknown partition 'pathological'; choose iid, dirichlet or sizes"):
        make("sst2", partition="pathological")
