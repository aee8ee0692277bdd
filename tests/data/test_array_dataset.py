"""ArrayDataset views moved to another device: the same rows, transform and generator, one shared copy."""

import torch

from fedmoe.data.federated import ArrayDataset


def _views():
    x, y = torch.arange(40.0).reshape(10, 1, 2, 2), torch.arange(10)
    return ArrayDataset(x, y, torch.tensor([1, 3, 5])), ArrayDataset(x, y, torch.tensor([0, 2]))


def test_a_view_already_on_the_device_is_returned_as_it_is():
    a, _ = _views()
    assert a.to("cpu") is a


def test_views_of_one_storage_share_one_copy_on_the_device_and_keep_their_rows():
    a, b = _views()
    copies: dict = {}
    gen = torch.Generator().manual_seed(0)
    a = a.with_generator(gen)
    ma, mb = a.to("meta", copies), b.to("meta", copies)
    assert ma.x.device.type == "meta" and ma.y.device.type == "meta"
    assert ma.x is mb.x and ma.y is mb.y and len(copies) == 2
    assert torch.equal(ma.index, a.index) and ma.generator is gen and ma.transform is a.transform
    assert a.x.device.type == "cpu"  # the original view is untouched


def test_a_cache_entry_for_another_tensor_with_the_same_id_is_not_used():
    a, _ = _views()
    stale = torch.zeros(1, device="meta")
    copies = {(id(a.x), "meta"): (torch.zeros(1), stale)}
    moved = a.to("meta", copies)
    assert moved.x is not stale and moved.x.shape == a.x.shape
