import os

import pytest
import torch

from fedmoe.errors import CheckpointError
from fedmoe.federation import checkpoint as ck


def test_checkpoint_round_trips_tensors_and_rng(tmp_path):
    path = tmp_path / "c" / "last.ckpt"
    torch.manual_seed(5)
    rng = ck.capture_rng()
    ck.save_checkpoint(path, {"w": torch.arange(4.0), "rng": rng})
    first = torch.rand(3)
    loaded = ck.load_checkpoint(path)
    ck.restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(3), first)
    assert torch.equal(loaded["w"], torch.arange(4.0))


def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ck.save_checkpoint(path, {"round": 1})

    def crash(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, {"round": 2})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["round"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        ck.load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "missing.ckpt")


def test_fingerprint_selects_math_keys_and_names_differences():
    cfg = {"model": {"lr": 1}, "federation": {"rounds": 5, "algorithm": {"lam": 0.1}}, "trainer": {"devices": 1}}
    flat = ck.select_keys(ck.flatten(cfg), ["model", "federation"], ["federation.rounds"])
    assert flat == {"model.lr": 1, "federation.algorithm.lam": 0.1}
    other = dict(flat, **{"federation.algorithm.lam": 0.2})
    assert ck.fingerprint(flat) != ck.fingerprint(other)
    assert ck.diff_keys(flat, other) == ["federation.algorithm.lam"]
    longer = ck.select_keys(ck.flatten({**cfg, "federation": {**cfg["federation"], "rounds": 9}}),
                            ["model", "federation"], ["federation.rounds"])
    assert ck.fingerprint(longer) == ck.fingerprint(flat)
