import numpy as np
import pytest
import torch

from fedmoe.data.digits import DigitsDataModule


@pytest.fixture(scope="module")
def splits():
    dm = DigitsDataModule()
    dm.setup()
    return dm.splits


def rows(ds) -> list[int]:
    return ds.index.tolist()


def test_held_out_sets_have_their_fractions_of_the_whole(splits):
    assert (len(splits.test), len(splits.server_train), len(splits.probe), len(splits.val)) == (359, 180, 90, 180)
    clients = sum(len(d) for d in (*splits.client_train, *splits.client_test))
    assert clients == 1797 - 359 - 180 - 90 - 180


def test_all_sets_are_disjoint_and_cover_every_image(splits):
    views = [*splits.client_train, *splits.client_test, splits.server_train, splits.probe, splits.val, splits.test]
    everything = [i for v in views for i in rows(v)]
    assert sorted(everything) == list(range(1797))


def test_test_set_is_stratified(splits):
    counts = torch.bincount(splits.test.targets, minlength=10).numpy()
    totals = torch.bincount(splits.test.y, minlength=10).numpy()
    assert np.all(np.abs(counts - 0.2 * totals) < 1)


def test_every_client_has_training_and_held_out_data(splits):
    assert len(splits.client_train) == 10
    for train, held in zip(splits.client_train, splits.client_test):
        assert len(train) + len(held) >= 10
        assert len(train) > 0 and len(held) > 0


def test_images_are_scaled_1x8x8_without_augmentation(splits):
    x, y = splits.client_train[0].__getitems__([0, 1])
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
    assert float(splits.test.x.max()) == 1.0 and float(splits.test.x.min()) == 0.0
    assert torch.equal(x, splits.client_train[0].__getitems__([0, 1])[0])
    assert splits.num_classes == 10


def test_split_is_deterministic_by_seed(splits):
    again = DigitsDataModule()
    again.setup()
    other = DigitsDataModule(seed=7)
    other.setup()
    assert [rows(d) for d in again.splits.client_train] == [rows(d) for d in splits.client_train]
    assert [rows(d) for d in other.splits.client_train] != [rows(d) for d in splits.client_train]


def test_default_batch_size_is_32():
    assert DigitsDataModule().batch_size == 32
