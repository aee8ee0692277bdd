"""FEMNIST reader and split, on the 8-writer fixture of conftest.py.

Fixture: writers w00..w07 with 10 + NN training samples and 2 test samples each, except w05 which
has no test part; pixels 0..2 of each row hold (writer number, sample number, 0 train / 1 test).
"""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.data.femnist import FEMNISTDataModule, read_leaf
from fedmoe.errors import DataError


def train_size(w: int) -> int:
    return 10 + w


def module(root: Path, **kwargs) -> FEMNISTDataModule:
    args = dict(num_clients=3, writers_per_client=2, server_writers=1, probe_writers=1)
    args.update(kwargs)
    dm = FEMNISTDataModule(str(root), **args)
    dm.setup()
    return dm


def rows(ds) -> set[tuple[int, int, int]]:
    """(writer, sample, split) of every row of a view, read from the raw pixels."""
    x = ds.x[ds.index].reshape(len(ds), -1)[:, :3].round().long()
    out = {tuple(r) for r in x.tolist()}
    assert len(out) == len(ds)
    return out


def writers(ds) -> set[int]:
    return {w for w, _, _ in rows(ds)}


def test_read_leaf_reads_plain_and_gzip_files_with_any_index(femnist_dir):
    data = read_leaf(femnist_dir / "train")
    assert sorted(data) == [f"w{i:02d}" for i in range(8)]
    x, y = data["w03"]
    assert x.dtype == np.float32 and x.shape == (13, 784)
    assert y.dtype == np.int64 and y.shape == (13,)
    assert "w05" not in read_leaf(femnist_dir / "test")


def test_writers_go_to_clients_server_and_probe_in_sorted_order(femnist_dir):
    s = module(femnist_dir).splits
    assert [writers(d) for d in s.client_train] == [{0, 1}, {2, 3}, {4, 5}]
    assert writers(s.server_train) == {6}
    assert writers(s.probe) == {7}
    assert [writers(d) for d in s.client_test] == [{0, 1}, {2, 3}, {4}]
    assert writers(s.test) == {0, 1, 2, 3, 4}
    assert writers(s.val) == {0, 1, 2, 3, 4, 5}


def test_all_sets_are_disjoint_and_cover_the_client_writers_data(femnist_dir):
    s = module(femnist_dir).splits
    sets = [*map(rows, s.client_train), rows(s.server_train), rows(s.probe), rows(s.val), rows(s.test)]
    assert sum(map(len, sets)) == len(set().union(*sets))
    client_train_rows = set().union(*map(rows, s.client_train)) | rows(s.val)
    assert client_train_rows == {(w, i, 0) for w in range(6) for i in range(train_size(w))}
    assert rows(s.test) == set().union(*map(rows, s.client_test))
    assert all(split == 1 for _, _, split in rows(s.test))
    assert all(split == 0 for _, _, split in rows(s.server_train) | rows(s.probe) | rows(s.val))


def test_sizes_follow_the_validation_fraction(femnist_dir):
    s = module(femnist_dir).splits
    assert len(s.val) == sum(round(0.1 * train_size(w)) for w in range(6))
    assert [len(d) for d in s.client_train] == [
        sum(train_size(w) - round(0.1 * train_size(w)) for w in pair) for pair in ((0, 1), (2, 3), (4, 5))
    ]
    assert [len(d) for d in s.client_test] == [4, 4, 2]
    assert len(s.server_train) == train_size(6) and len(s.probe) == train_size(7)
    assert s.num_classes == 62


def test_images_are_1x28x28_with_train_and_eval_transforms(femnist_dir):
    s = module(femnist_dir).splits
    x, y = s.client_train[0].__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    xe, _ = s.test.__getitems__([0])
    assert torch.allclose(xe, (s.test.x[s.test.index[:1]] - 0.5) / 0.5)


def test_validation_split_is_seeded(femnist_dir):
    a = rows(module(femnist_dir, seed=1).splits.val)
    assert a == rows(module(femnist_dir, seed=1).splits.val)
    assert a != rows(module(femnist_dir, seed=2).splits.val)


def test_shuffle_writers_changes_the_assignment_deterministically(femnist_dir):
    a = [writers(d) for d in module(femnist_dir, shuffle_writers=True).splits.client_train]
    b = [writers(d) for d in module(femnist_dir, shuffle_writers=True).splits.client_train]
    assert a == b and a != [{0, 1}, {2, 3}, {4, 5}]


def test_accepts_the_full_leaf_layout_with_a_data_subfolder(femnist_dir):
    leaf = femnist_dir.parent / "leaf_femnist"
    leaf.mkdir()
    femnist_dir.rename(leaf / "data")
    s = module(leaf).splits
    assert writers(s.probe) == {7}


def test_too_few_writers_error_states_the_arithmetic(femnist_dir):
    expected = r"needs 20 clients x 4 writers \+ 10 server \+ 1 probe = 91 writers, found 8 in"
    with pytest.raises(DataError, match=expected):
        module(femnist_dir, num_clients=20, writers_per_client=4, server_writers=10, probe_writers=1)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"users": ["a"], "num_samples": [1]}),
        json.dumps({"users": ["a"], "user_data": {"a": {"x": [[0.0] * 783], "y": [1]}}}),
        json.dumps({"users": ["a"], "user_data": {"a": {"x": [[0.0] * 784], "y": [1, 2]}}}),
    ],
    ids=["bad-json", "no-user-data", "short-row", "label-count"],
)
def test_malformed_file_error_names_the_file(femnist_dir, content):
    (femnist_dir / "train" / "all_data_99_broken_train_9.json").write_text(content)
    with pytest.raises(DataError, match="all_data_99_broken_train_9.json"):
        module(femnist_dir)


def test_corrupt_gzip_error_names_the_file(femnist_dir):
    (femnist_dir / "train" / "all_data_98_train_9.json.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(DataError, match="all_data_98_train_9.json.gz"):
        module(femnist_dir)


def test_writer_in_two_files_is_an_error(femnist_dir):
    src = femnist_dir / "train" / "all_data_7_niid_0_keep_0_train_9.json"
    (femnist_dir / "train" / "copy.json").write_text(src.read_text())
    with pytest.raises(DataError, match="appears in both"):
        module(femnist_dir)


def test_missing_or_empty_data_dir_says_how_to_get_the_data(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):
        expected = rf"{re.escape(str(path))}.*TalwalkarLab/leaf.*preprocess.sh -s niid --sf 0.05 -k 0 -t sample"
        with pytest.raises(DataError, match=expected):
            module(path)


def test_missing_test_files_is_an_error(femnist_dir):
    for f in (femnist_dir / "test").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="test"):
        module(femnist_dir)


def test_train_file_without_its_test_file_is_an_error_naming_it(femnist_dir):
    (femnist_dir / "test" / "all_data_7_niid_0_keep_0_test_9.json").unlink()
    with pytest.raises(DataError, match=r"lacks all_data_7_niid_0_keep_0_test_9.json\[.gz\] .*allow_missing_test"):
        module(femnist_dir)


def test_missing_test_files_allowed_explicitly_warn_naming_them(femnist_dir, caplog):
    (femnist_dir / "test" / "all_data_7_niid_0_keep_0_test_9.json").unlink()
    with caplog.at_level(logging.WARNING):
        s = module(femnist_dir, allow_missing_test=True).splits
    assert "all_data_7_niid_0_keep_0_test_9" in caplog.text
    assert len(s.client_test[0]) > 0


def test_label_outside_the_classes_names_the_file_writer_and_row(femnist_dir):
    path = femnist_dir / "train" / "all_data_7_niid_0_keep_0_train_9.json"
    doc = json.loads(path.read_text())
    doc["user_data"]["w01"]["y"][4] = 62
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"all_data_7_niid_0_keep_0_train_9.json: writer w01 has label 62 at row 4"):
        module(femnist_dir)


@pytest.mark.parametrize(
    "option, value", [("writers_per_client", 0), ("server_writers", -1), ("val_fraction", 1.0), ("eval_batch_size", 0)]
)
def test_out_of_range_options_are_refused_before_reading(tmp_path, option, value):
    from fedmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=f"data.{option}="):
        FEMNISTDataModule(str(tmp_path / "nowhere"), **{option: value})
