import os

import pytest
import torch

from fedmoe.errors import CheckpointError, FedMoEError
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
    with pytest.raises(FedMoEError, match=r"cannot write .*last.ckpt: disk full"):
        ck.save_checkpoint(path, {"round": 2})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["round"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        ck.atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o027)
        ck.save_checkpoint(tmp_path / "b.ckpt", {"round": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.ckpt").stat().st_mode & 0o777 == 0o640


def test_temp_files_of_interrupted_writes_are_removed_by_the_next_write(tmp_path):
    stale = [tmp_path / ".last.ckpt.abcd1234.tmp", tmp_path / ".last.ckpt.0123456789ab.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    other = tmp_path / ".metrics.csv.abcd1234.tmp"
    other.write_bytes(b"x")
    ck.save_checkpoint(tmp_path / "last.ckpt", {"round": 1})
    assert sorted(os.listdir(tmp_path)) == [".metrics.csv.abcd1234.tmp", "last.ckpt"]
    assert ck.remove_stale_temp_files(tmp_path) == [other]
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
