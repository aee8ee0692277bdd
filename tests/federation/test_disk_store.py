"""The disk-backed client store: one safetensors file per client and round, a manifest in the
checkpoint, resumes that ignore files written after it, and one-line errors for bad folders and files."""

import os
from pathlib import Path

import pytest
import torch

from fedmoe.algorithms.fedmoe import FedMoE
from fedmoe.data.digits import DigitsDataModule
from fedmoe.errors import CheckpointError
from fedmoe.federation import store as store_module
from fedmoe.federation.checkpoint import load_checkpoint
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.federation.store import ClientStore
from fedmoe.models.classifier import Classifier

ROOT = Path(__file__).resolve().parents[2]


def adam_state(seed: int) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "n": torch.tensor(7)}


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_disk_store_round_trips_weights_and_optimizer_states_losslessly(tmp_path):
    s = ClientStore(root=tmp_path / "clients")
    w = {"b": torch.randn(3, 4) / 3, "a": torch.randn(2), "steps": torch.tensor(5)}
    s.put_weights(4, w, version=1)
    s.put_optimizer(4, adam_state(0), version=1)
    got = s.get_weights(4)
    assert list(got) == ["b", "a", "steps"]  # the state dict's order is kept
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in w.items())
    opt, ref = s.get_optimizer(4), adam_state(0)
    assert opt["param_groups"] == ref["param_groups"] and isinstance(opt["param_groups"][0]["betas"], tuple)
    assert all(torch.equal(opt["state"][i][k], v) for i, st in ref["state"].items() for k, v in st.items())
    assert s.get_weights(5) is None and s.get_optimizer(5) is None
    assert files(tmp_path / "clients") == ["c4.optimizer.v1.safetensors", "c4.weights.v1.safetensors"]
    assert set(s.weights) == {4} and len(s.optimizers) == 1


def test_disk_store_lowers_precision_only_when_asked(tmp_path):
    s = ClientStore("bfloat16", root=tmp_path)
    s.put_weights(0, {"w": torch.tensor([1.0001]), "n": torch.tensor(3)}, version=1)
    assert s.weights[0]["w"].dtype == torch.bfloat16 and s.weights[0]["n"].dtype == torch.int64
    assert s.get_weights(0)["w"].dtype == torch.float32


def test_disk_store_reads_clients_from_disk_not_memory(tmp_path):
    s = ClientStore(root=tmp_path)
    s.put_weights(1, weights(1.0), version=1)
    (tmp_path / "c1.weights.v1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"c1\.weights\.v1\.safetensors is missing"):
        s.get_weights(1)


def test_checkpoint_state_is_a_manifest_that_ignores_newer_files(tmp_path):
    s = ClientStore(root=tmp_path)
    s.put_weights(0, weights(1.0), version=1)
    state = s.state_dict()
    s.commit()
    s.put_weights(0, weights(2.0), version=2)  # written after the checkpoint
    entry = state["files"]["weights"][0]
    assert entry["file"] == "c0.weights.v1.safetensors" and entry["version"] == 1
    assert entry["bytes"] == (tmp_path / entry["file"]).stat().st_size and len(entry["sha256"]) == 64
    assert not any(isinstance(v, torch.Tensor) for v in state["files"]["weights"][0].values())
    resumed = ClientStore(root=tmp_path)
    resumed.load_state_dict(state)
    resumed.verify()
    assert torch.equal(resumed.get_weights(0)["w"], weights(1.0)["w"])


def test_versions_no_longer_referenced_by_the_latest_checkpoint_are_removed(tmp_path):
    s = ClientStore(root=tmp_path)
    s.put_weights(0, weights(1.0), version=1)
    s.put_weights(1, weights(1.0), version=1)
    s.commit()  # a checkpoint of round 1
    s.put_weights(0, weights(2.0), version=2)
    assert "c0.weights.v1.safetensors" in files(tmp_path)  # still referenced by the checkpoint
    s.put_weights(0, weights(3.0), version=3)
    assert "c0.weights.v2.safetensors" not in files(tmp_path)  # referenced by nothing
    (tmp_path / "c5.weights.v9.safetensors").write_bytes(b"left by a killed run")
    (tmp_path / "notes.txt").write_text("not ours")
    s.commit()
    assert files(tmp_path) == ["c0.weights.v3.safetensors", "c1.weights.v1.safetensors", "notes.txt"]


def test_rewriting_a_version_after_a_resume_keeps_the_new_file(tmp_path):
    s = ClientStore(root=tmp_path)
    s.put_weights(0, weights(1.0), version=3)
    s.put_weights(0, weights(2.0), version=3)
    assert files(tmp_path) == ["c0.weights.v3.safetensors"]
    assert torch.equal(s.get_weights(0)["w"], weights(2.0)["w"])


def test_memory_and_disk_states_restore_into_each_other(tmp_path):
    mem = ClientStore()
    mem.put_weights(2, weights(1.5))
    mem.put_optimizer(2, adam_state(1))
    disk = ClientStore(root=tmp_path / "clients")
    disk.load_state_dict(mem.state_dict())
    assert not (tmp_path / "clients").exists()  # restoring writes nothing
    state = disk.state_dict()  # writes them into the store folder first
    assert state["files"]["weights"][2]["bytes"] > 0
    assert files(tmp_path / "clients") == ["c2.optimizer.v0.safetensors", "c2.weights.v0.safetensors"]
    back = ClientStore()
    back.load_state_dict(state)
    assert torch.equal(back.get_weights(2)["w"], weights(1.5)["w"])
    assert torch.equal(back.get_optimizer(2)["state"][0]["exp_avg"], adam_state(1)["state"][0]["exp_avg"])


def test_a_manifest_from_another_run_folder_is_copied_into_this_one(tmp_path):
    first = ClientStore(root=tmp_path / "a" / "clients")
    first.put_weights(0, weights(4.0), version=2)
    state = first.state_dict()
    second = ClientStore(root=tmp_path / "b" / "clients")
    second.load_state_dict(state, folder=tmp_path / "a" / "clients")
    second.state_dict()
    second.commit()
    assert files(tmp_path / "b" / "clients") == ["c0.weights.v2.safetensors"]
    assert files(tmp_path / "a" / "clients") == ["c0.weights.v2.safetensors"]  # never touched
    assert second.state_dict()["files"]["weights"][0]["sha256"] == state["files"]["weights"][0]["sha256"]


@pytest.mark.parametrize("damage", ["missing", "flipped", "truncated"])
def test_missing_or_corrupt_client_file_is_a_checkpoint_error_naming_it(tmp_path, damage):
    s = ClientStore(root=tmp_path)
    s.put_weights(3, weights(1.0), version=2)
    state = s.state_dict()
    path = tmp_path / "c3.weights.v2.safetensors"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "flipped":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.write_bytes(data[:-4])
    resumed = ClientStore(root=tmp_path)
    resumed.load_state_dict(state)
    expected = "is missing" if damage == "missing" else "is corrupt"
    with pytest.raises(CheckpointError, match=rf"client store file {path} {expected}"):
        resumed.verify()
    with pytest.raises(CheckpointError, match=rf"{path} {expected}"):
        resumed.get_weights(3)


def _read_only(folder: Path, monkeypatch) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: report the folder as a read-only mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))


def test_unwritable_store_folder_is_a_checkpoint_error_naming_it(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _read_only(folder, monkeypatch)
    try:
        with pytest.raises(CheckpointError, match=rf"client store folder {folder}/clients is not writable"):
            ClientStore(root=folder / "clients").check_writable()
    finally:
        folder.chmod(0o755)
    ClientStore().check_writable()  # the memory store writes nothing


def test_a_failed_client_file_write_is_a_checkpoint_error_naming_the_file(tmp_path, monkeypatch):
    s = ClientStore(root=tmp_path)

    def full(path, write):
        raise store_module.FedMoEError(f"cannot write {path}: No space left on device; check the folder")

    monkeypatch.setattr(store_module, "atomic_write_bytes", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*c0\.weights\.v1\.safetensors: No space"):
        s.put_weights(0, weights(1.0), version=1)


# -- in the round loop ------------------------------------------------------------------------------


def _loop(run_dir, rounds=2, store="disk", **fed):
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    federation = Federation(algorithm=FedMoE(num_routed=2), rounds=rounds, clients_per_round=2, progress=False,
                            client_eval=False, write_logs=False, persistent_optimizer=True, client_store=store, **fed)
    return FederatedLoop(federation, module, DigitsDataModule(num_clients=4), RunnerSettings(max_epochs=1),
                         run_dir=run_dir, seed=0, config={"k": 1})


def _assert_same(a: FederatedLoop, b: FederatedLoop) -> None:
    for key, value in a.state["moe"].items():
        assert torch.equal(value, b.state["moe"][key]), key
    assert set(a.store.weights) == set(b.store.weights) and set(a.store.optimizers) == set(b.store.optimizers)
    for cid in a.store.weights:
        assert all(torch.equal(v, b.store.weights[cid][k]) for k, v in a.store.weights[cid].items()), cid
        sa, sb = a.store.optimizers[cid]["state"], b.store.optimizers[cid]["state"]
        assert all(torch.equal(v, sb[i][k]) for i, st in sa.items() for k, v in st.items()), cid
    drop_time = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop_time(a.history) == drop_time(b.history)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> FederatedLoop:
    """An uninterrupted 3-round run with the disk store (read, never changed, by the tests)."""
    loop = _loop(tmp_path_factory.mktemp("full") / "run", rounds=3)
    loop.fit()
    return loop


def test_disk_store_run_equals_memory_store_run_and_its_checkpoint_holds_no_client_tensors(tmp_path, full):
    mem = _loop(tmp_path / "mem", rounds=3, store="memory")
    mem.fit()
    _assert_same(mem, full)
    ckpt = load_checkpoint(full.ckpt_path)["store"]
    listed = sorted(e["file"] for kind in ckpt["files"].values() for e in kind.values())
    assert listed == files(full.run_dir / "clients")  # exactly the referenced versions are kept
    assert full.ckpt_path.stat().st_size < mem.ckpt_path.stat().st_size


def test_run_killed_while_writing_the_store_resumes_bit_identical_ignoring_newer_files(tmp_path, monkeypatch, full):
    run = tmp_path / "run"
    crashing = _loop(run, rounds=3)
    real = store_module.atomic_write_bytes
    writes = []

    def killed_on_the_second_write_of_round_3(path, write):
        if ".v3." in Path(path).name:
            writes.append(Path(path).name)
            if len(writes) == 2:
                raise KeyboardInterrupt("killed")
        real(path, write)

    monkeypatch.setattr(store_module, "atomic_write_bytes", killed_on_the_second_write_of_round_3)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.undo()
    assert crashing.round == 2 and load_checkpoint(crashing.ckpt_path)["round"] == 2
    newer = run / "clients" / writes[0]
    assert newer.is_file()  # written after the checkpoint; the resumed run must not read it
    cid = int(writes[0].split(".")[0][1:])
    assert cid in load_checkpoint(crashing.ckpt_path)["store"]["files"]["weights"], "the test needs a client seen before"
    resumed = _loop(run, rounds=3)
    resumed.fit(ckpt_path=resumed.ckpt_path)
    _assert_same(full, resumed)


def test_checkpoint_every_two_rounds_keeps_the_versions_it_references(tmp_path, full):
    run = tmp_path / "run"
    first = _loop(run, rounds=3, checkpoint_every=2, checkpoint_last=False)
    first.fit()  # checkpoint at round 2; round 3's files are newer than it
    resumed = _loop(run, rounds=3)
    resumed.fit(ckpt_path=resumed.ckpt_path)
    _assert_same(full, resumed)


def test_resuming_with_a_corrupt_client_file_fails_before_training(tmp_path):
    _loop(tmp_path / "run", rounds=1).fit()
    victim = sorted((tmp_path / "run" / "clients").iterdir())[0]
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    resumed = _loop(tmp_path / "run", rounds=2)
    with pytest.raises(CheckpointError, match=rf"{victim} is corrupt"):
        resumed.fit(ckpt_path=resumed.ckpt_path)
    assert resumed.round == 1 and len(resumed.history) == 1


def test_cli_reports_a_missing_client_file_as_one_error_line(tmp_path, capsys):
    from fedmoe.cli import main

    args = ["fit", "--config", str(ROOT / "experiments" / "quickstart.yaml"), "--trainer.default_root_dir",
            str(tmp_path / "run"), "--trainer.max_epochs", "1", "--federation.progress", "false",
            "--federation.client_store", "disk", "--federation.clients_per_round", "2",
            "--trainer.logger", "false", "--federation.client_eval", "false"]
    assert main([*args, "--federation.rounds", "1"]) == 0
    victim = sorted((tmp_path / "run" / "clients").iterdir())[0]
    victim.unlink()
    capsys.readouterr()
    assert main([*args, "--federation.rounds", "2", "--ckpt_path", "last"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: client store file ") and str(victim) in err[0], err


def test_fit_with_a_read_only_store_folder_fails_before_the_first_round(tmp_path, monkeypatch):
    loop = _loop(tmp_path / "run", rounds=1)
    _read_only(tmp_path / "run" / "clients", monkeypatch)
    try:
        with pytest.raises(CheckpointError, match=rf"client store folder {tmp_path}/run/clients is not writable"):
            loop.fit()
    finally:
        (tmp_path / "run" / "clients").chmod(0o755)
    assert loop.round == 0 and files(tmp_path / "run") == ["clients"] and files(tmp_path / "run" / "clients") == []


def test_a_memory_store_checkpoint_resumes_with_the_disk_store_bit_identical(tmp_path, full):
    run = tmp_path / "run"
    _loop(run, rounds=2, store="memory").fit()
    resumed = _loop(run, rounds=3)
    resumed.fit(ckpt_path=resumed.ckpt_path)
    _assert_same(full, resumed)
    ckpt = load_checkpoint(resumed.ckpt_path)["store"]
    assert ckpt["backend"] == "disk" and "weights" not in ckpt
    listed = sorted(e["file"] for kind in ckpt["files"].values() for e in kind.values())
    assert listed == files(run / "clients")
