"""Checkpoints written in a background thread: a consistent snapshot, atomic and fsynced as before,
errors raised in the loop, and runs (text clients included) that resume bit-identically."""

from __future__ import annotations

import importlib
import json
import threading

import pytest
import torch

from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.data.digits import DigitsDataModule
from fedmoe.data.sent140 import Sent140DataModule
from fedmoe.errors import FedMoEError
from fedmoe.federation import checkpoint as ck
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from tests.data.test_sent140 import tweet, write_test, write_training
from tests.wordlevel import word_tokenizer

# Imported at collection: a slow first import is not a test's time.
importlib.import_module("transformers.models.bert.modeling_bert")


def _held_writes(monkeypatch) -> threading.Event:
    """Background writes wait for the returned event before writing."""
    release = threading.Event()
    real = ck.save_checkpoint

    def held(path, payload):
        assert release.wait(10), "the test never released the write"
        real(path, payload)

    monkeypatch.setattr(ck, "save_checkpoint", held)
    return release


def test_background_write_holds_the_state_of_submit_time(tmp_path, monkeypatch):
    release = _held_writes(monkeypatch)
    weights = {"w": torch.zeros(4)}
    history = [{"round": 1}]
    writer = ck.BackgroundWriter()
    writer.submit(tmp_path / "last.ckpt", {"global": weights, "history": history})
    weights["w"].add_(1.0)
    history.append({"round": 2})
    release.set()
    writer.wait()
    saved = ck.load_checkpoint(tmp_path / "last.ckpt")
    assert torch.equal(saved["global"]["w"], torch.zeros(4)) and saved["history"] == [{"round": 1}]
    assert not writer.pending and writer.cpu_seconds > 0


def test_failed_background_write_keeps_the_previous_checkpoint_and_raises_once(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    writer = ck.BackgroundWriter()
    writer.submit(path, {"round": 1})
    writer.wait()

    def crash(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    after = []
    writer.submit(path, {"round": 2}, then=lambda: after.append("summary"))
    with pytest.raises(FedMoEError, match=r"cannot write .*last.ckpt: disk full"):
        writer.wait()
    writer.wait()  # reported once
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["round"] == 1 and after == []
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_wait_interrupted_by_ctrl_c_leaves_the_write_pending(tmp_path, monkeypatch):
    release = _held_writes(monkeypatch)
    writer = ck.BackgroundWriter()
    writer.submit(tmp_path / "last.ckpt", {"round": 1})
    thread, join = writer._thread, writer._thread.join

    def ctrl_c(*args, **kwargs):
        thread.join = join
        raise KeyboardInterrupt

    thread.join = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        writer.wait()
    assert writer.pending
    release.set()
    writer.wait()
    assert not writer.pending and ck.load_checkpoint(tmp_path / "last.ckpt")["round"] == 1


def _digits_loop(run_dir, rounds: int, **fed) -> FederatedLoop:
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    federation = Federation(algorithm=FedAvg(), rounds=rounds, clients_per_round=2, eval_every=None, eval_last=False,
                            client_eval=False, progress=False, **fed)
    return FederatedLoop(federation, module, DigitsDataModule(num_clients=4), RunnerSettings(max_epochs=1, logger=False),
                         run_dir=run_dir, seed=0, config={"k": 1})


def test_a_round_does_not_wait_for_its_checkpoint(tmp_path, monkeypatch):
    release = _held_writes(monkeypatch)
    loop = _digits_loop(tmp_path / "run", rounds=2)
    loop.setup()
    loop.state = loop.algo.init_server(loop.template, loop.ctx)
    loop.round = 1
    loop.checkpoint()  # returns while the write is held
    assert loop.saved_round is None and not loop.ckpt_path.exists()
    release.set()
    loop.settle_checkpoint()
    assert loop.saved_round == 1 and ck.load_checkpoint(loop.ckpt_path)["round"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1


def test_a_checkpoint_larger_than_a_rounds_uploads_is_written_in_the_loop(tmp_path, monkeypatch):
    loop = _digits_loop(tmp_path / "run", rounds=1)
    loop.setup()
    loop.state = loop.algo.init_server(loop.template, loop.ctx)
    loop.state["extra"] = [{k: v.clone() for k, v in loop.template.items()} for _ in range(2)]  # 3 models > 2 uploads
    loop.round = 1
    loop.checkpoint()
    assert loop.saved_round == 1 and ck.load_checkpoint(loop.ckpt_path)["round"] == 1


def test_interrupted_run_lands_its_pending_checkpoint_then_resumes_bit_identical(tmp_path, monkeypatch):
    full = _digits_loop(tmp_path / "full", rounds=2)
    full.fit()
    crashing = _digits_loop(tmp_path / "run", rounds=2)
    real_round, real_save = crashing.run_round, ck.save_checkpoint

    def slow_save(path, payload):  # still writing round 1 when round 2 is interrupted
        threading.Event().wait(0.2)
        real_save(path, payload)

    def interrupted_in_round_2(r):
        if r == 2:
            raise KeyboardInterrupt("killed")
        return real_round(r)

    monkeypatch.setattr(ck, "save_checkpoint", slow_save)
    crashing.run_round = interrupted_in_round_2
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    monkeypatch.undo()
    assert crashing.saved_round == 1 and ck.load_checkpoint(crashing.ckpt_path)["round"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1
    resumed = _digits_loop(tmp_path / "run", rounds=2)
    resumed.fit(ckpt_path=resumed.ckpt_path)
    for key, value in full.state["global"].items():
        assert torch.equal(value, resumed.state["global"][key]), key


def test_failed_background_checkpoint_fails_the_run_and_leaves_the_one_before(tmp_path, monkeypatch):
    loop = _digits_loop(tmp_path / "run", rounds=2)
    real = torch.save

    def full_disk_in_round_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("round") == 2:
            raise OSError("disk full")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_in_round_2)
    with pytest.raises(FedMoEError, match=r"cannot write .*last.ckpt: disk full"):
        loop.fit()
    monkeypatch.undo()
    assert loop.saved_round == 1 and ck.load_checkpoint(loop.ckpt_path)["round"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1


TINY_BERT = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


def _text_loop(tmp_path, run_dir, rounds: int) -> FederatedLoop:
    data = tmp_path / "sent140"
    if not data.is_dir():
        data.mkdir()
        write_training(data, n=120)
        write_test(data, n=12)
        words = sorted({w for i in range(50) for w in tweet(i).split()})
        word_tokenizer(words, chat=False, chat_specials=False).save_pretrained(tmp_path / "tok")
    dm = Sent140DataModule(data_dir=str(data), tokenizer=str(tmp_path / "tok"), num_clients=3, server_per_class=[5, 5],
                           probe_per_class=2, val_per_class=4, max_length=16, client_size=12, batch_size=4)
    torch.manual_seed(0)
    module = Classifier("text_encoder", 2, network_kwargs={"config": dict(TINY_BERT), "dropout": 0.1},
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    federation = Federation(algorithm=FedAvg(), rounds=rounds, clients_per_round=3, eval_every=None, eval_last=False,
                            client_eval=False, progress=False)
    return FederatedLoop(federation, module, dm, RunnerSettings(max_epochs=1, logger=False), run_dir=run_dir,
                         seed=0, config={"k": 1})


def test_text_clients_resume_bit_identical_from_a_background_checkpoint(tmp_path):
    full = _text_loop(tmp_path, tmp_path / "full", rounds=2)
    full.fit()
    assert full.checkpoint_cpu_seconds > 0, "the text round's checkpoints should go to the background"
    _text_loop(tmp_path, tmp_path / "run", rounds=1).fit()
    resumed = _text_loop(tmp_path, tmp_path / "run", rounds=2)
    resumed.fit(ckpt_path=resumed.ckpt_path)
    for key, value in full.state["global"].items():
        assert torch.equal(value, resumed.state["global"][key]), key
    drop_time = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop_time(full.history) == drop_time(resumed.history)
