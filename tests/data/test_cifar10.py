"""CIFAR-10 reader and split, on conftest.py's pickles: 5 batches, 12 images per class, labels cycling 0..9.

Each image's global index (file order) is stored in red pixels (0, 0) and (0, 1), so class c's images
are c, c + 10, ..., c + 110 and the test batch's are 10000..10029.
"""

import logging
import pickle
import re

import numpy as np
import pytest
import torch

from fedmoe.data.cifar10 import CIFAR10DataModule, read_cifar10
from fedmoe.errors import DataError


def module(root, **kwargs) -> CIFAR10DataModule:
    args = dict(num_clients=4, server_per_class=2, val_per_class=1, probe_per_class=1, min_client_size=10)
    args.update(kwargs)
    dm = CIFAR10DataModule(str(root), **args)
    dm.setup()
    return dm


def ids(ds) -> list[int]:
    x = ds.x[ds.index]
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


def test_reader_keeps_file_order_and_pixel_layout(make_cifar_dir):
    x, y, xt, yt = read_cifar10(make_cifar_dir())
    assert x.shape == (120, 3, 32, 32) and x.dtype == np.uint8
    index = x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 0, 1]
    assert index.tolist() == list(range(120))
    assert (x[:, 1] == 100).all() and (x[:, 2] == 200).all()
    assert y.tolist() == [i % 10 for i in range(120)]
    assert xt.shape == (30, 3, 32, 32) and len(yt) == 30


def test_server_validation_and_probe_are_the_last_images_of_each_class(make_cifar_dir):
    s = module(make_cifar_dir()).splits
    assert sorted(ids(s.server_train)) == sorted([100 + c for c in range(10)] + [110 + c for c in range(10)])
    assert sorted(ids(s.val)) == [90 + c for c in range(10)]
    assert sorted(ids(s.probe)) == [80 + c for c in range(10)]
    for ds, per_class in ((s.server_train, 2), (s.val, 1), (s.probe, 1)):
        assert torch.bincount(ds.targets, minlength=10).tolist() == [per_class] * 10


def test_client_data_is_disjoint_from_server_sets_and_covers_the_rest(make_cifar_dir):
    s = module(make_cifar_dir()).splits
    client = [i for d in (*s.client_train, *s.client_test) for i in ids(d)]
    server = ids(s.server_train) + ids(s.val) + ids(s.probe)
    assert len(set(client)) == len(client) == 80
    assert set(client).isdisjoint(server)
    assert sorted(client + server) == list(range(120))
    assert sorted(ids(s.test)) == list(range(10_000, 10_030))


def test_every_client_gets_min_size_and_holds_out_a_tenth(make_cifar_dir):
    s = module(make_cifar_dir()).splits
    for train, held in zip(s.client_train, s.client_test):
        n = len(train) + len(held)
        assert n >= 10
        assert len(held) == max(1, int(np.floor(0.1 * n + 0.5)))


def test_split_is_deterministic_by_seed(make_cifar_dir):
    root = make_cifar_dir()
    a = [ids(d) for d in module(root, seed=3).splits.client_train]
    assert a == [ids(d) for d in module(root, seed=3).splits.client_train]
    assert a != [ids(d) for d in module(root, seed=4).splits.client_train]


def test_pixels_are_shared_uint8_and_transformed_per_batch(make_cifar_dir):
    s = module(make_cifar_dir()).splits
    assert s.client_train[0].x is s.val.x and s.val.x.dtype == torch.uint8
    x, y = s.client_train[0].__getitems__([0, 1])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    xv, _ = s.val.__getitems__([0])
    assert torch.allclose(xv[0, 1, 5, 5], torch.tensor((100 / 255 - 0.456) / 0.224))
    assert s.num_classes == 10


def test_accepts_the_batches_folder_itself(make_cifar_dir):
    root = make_cifar_dir()
    assert len(module(root / "cifar-10-batches-py").splits.val) == 10


def test_too_few_images_per_class_states_the_arithmetic(make_cifar_dir):
    with pytest.raises(DataError, match=r"10 server \+ 1 validation \+ 1 probe = 12 .*class 0 has 12"):
        module(make_cifar_dir(), server_per_class=10)


def test_too_few_client_images_for_min_size_is_an_error(make_cifar_dir):
    with pytest.raises(DataError, match="min_client_size"):
        module(make_cifar_dir(), num_clients=9)


def test_missing_or_empty_data_dir_says_how_to_get_the_data(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):
        expected = rf"{re.escape(str(path))}.*cifar-10-python\.tar\.gz"
        with pytest.raises(DataError, match=expected):
            module(path)


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        None,
        pickle.dumps({b"data": np.zeros((3, 100), dtype=np.uint8), b"labels": [0, 1, 2]}),
        pickle.dumps({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [0, 1]}),
    ],
    ids=["garbage", "truncated", "wrong-row-length", "label-count"],
)
def test_corrupt_batch_error_names_the_file(make_cifar_dir, content):
    folder = make_cifar_dir() / "cifar-10-batches-py"
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000] if content is None else content)
    with pytest.raises(DataError, match="data_batch_2"):
        module(folder.parent)


def test_missing_test_batch_is_an_error(make_cifar_dir):
    root = make_cifar_dir()
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        module(root)


def test_missing_training_batch_is_an_error_naming_it(make_cifar_dir):
    root = make_cifar_dir()
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_3 .*allow_missing_batches"):
        module(root)


def test_missing_batches_allowed_explicitly_warn_naming_them(make_cifar_dir, caplog):
    root = make_cifar_dir()
    (root / "cifar-10-batches-py" / "data_batch_5").unlink()
    with caplog.at_level(logging.WARNING):
        s = module(root, allow_missing_batches=True).splits
    assert "data_batch_5" in caplog.text
    assert sum(len(d) for d in (*s.client_train, *s.client_test, s.server_train, s.val, s.probe)) == 100


def test_label_outside_the_classes_names_the_file_and_row(make_cifar_dir):
    folder = make_cifar_dir() / "cifar-10-batches-py"
    batch = pickle.loads((folder / "data_batch_4").read_bytes())
    batch[b"labels"][7] = 10
    (folder / "data_batch_4").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_4: label 10 at row 7 is outside 0..9"):
        module(folder.parent)


@pytest.mark.parametrize(
    "option, value, key",
    [("dirichlet_alpha", 0.0, "data.dirichlet_alpha"), ("dirichlet_alpha", float("nan"), "data.dirichlet_alpha"),
     ("batch_size", 0, "data.batch_size"), ("min_client_size", 0, "data.min_client_size"),
     ("client_test_fraction", 1.0, "data.client_test_fraction"), ("probe_per_class", -1, "data.probe_per_class")],
)
def test_out_of_range_options_are_refused_before_reading(tmp_path, option, value, key):
    from fedmoe.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        CIFAR10DataModule(str(tmp_path / "nowhere"), **{option: value})
