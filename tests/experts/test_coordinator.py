"""The expert coordinator: exact sync / FedAsync / FedBuff on effective weights, compression, refusals,
concurrency, persistence and resume."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from fedmoe.algorithms.asynchronous import Staleness
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import CheckpointError, ConfigError
from fedmoe.experts import ExpertCoordinator, Update

LAYERS = [
    LoRALayer("l0", "l0.base", "l0.lora_A.weight", "l0.lora_B.weight", 2.0),
    LoRALayer("l1", "l1.base", "l1.lora_A.weight", "l1.lora_B.weight", 0.5),
]


def adapter(seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g, dtype=dtype)
            for layer in LAYERS for k, s in ((layer.a_key, (4, 8)), (layer.b_key, (16, 4)))}


def effective(snap) -> dict[str, torch.Tensor]:
    return {layer.name: snap.delta(layer.name) for layer in LAYERS}


def worker_effective(snap, weights) -> dict[str, torch.Tensor]:
    """A worker's model: the correction of the version it pulled plus its trained adapter."""
    out = {}
    for layer in LAYERS:
        u, v = snap.correction[layer.name]
        out[layer.name] = u @ v + layer.scaling * weights[layer.b_key] @ weights[layer.a_key]
    return out


def close(a, b):
    """Equal to float64 tolerance (torch.allclose: torch.testing's first call costs a second of imports)."""
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-10), (k, (a[k] - b[k]).abs().max().item())


def coordinator(tmp_path=None, **kw) -> ExpertCoordinator:
    c = ExpertCoordinator(str(tmp_path) if tmp_path is not None else None, **kw)
    c.register("python", adapter(0), LAYERS)
    return c


def test_fedasync_mix_of_effective_weights_is_exact_also_for_a_stale_update():
    c = coordinator(mode="fedasync", mix=0.5, staleness="reference", rank_budget=1000)
    pulled = [c.snapshot("python")]
    for i in range(1, 4):
        c.push(Update("python", "w", pulled[-1].version, adapter(i)))
        pulled.append(c.snapshot("python"))
    stale = pulled[1]  # version 1, while the expert is at version 3
    before = effective(c.snapshot("python"))
    new = adapter(9)
    receipt = c.push(Update("python", "late", stale.version, new))
    w = 0.5 / (1 + 0.1 * 2)
    assert receipt.status == "applied" and receipt.staleness == 2 and receipt.version == 4
    x_new = worker_effective(stale, new)
    close(effective(c.snapshot("python")), {k: (1 - w) * before[k] + w * x_new[k] for k in before})


def test_fedbuff_applies_the_weighted_buffer_exactly():
    c = coordinator(mode="fedbuff", buffer_size=2, server_lr=0.7, staleness=Staleness("polynomial", a=1.0))
    v0 = c.snapshot("python")
    c.push(Update("python", "a", 0, adapter(1)))
    c.push(Update("python", "b", 0, adapter(2)))  # flush: version 1
    v1 = c.snapshot("python")
    before = effective(v1)
    r1 = c.push(Update("python", "c", 0, adapter(3)))  # stale by 1
    r2 = c.push(Update("python", "d", 1, adapter(4)))
    assert (r1.status, r2.status, r2.version) == ("pending", "applied", 2)
    x3, x4 = worker_effective(v0, adapter(3)), worker_effective(v1, adapter(4))
    base0, base1 = effective(v0), effective(v1)
    target = {k: before[k] + 0.7 / 2 * (0.5 * (x3[k] - base0[k]) + 1.0 * (x4[k] - base1[k])) for k in before}
    close(effective(c.snapshot("python")), target)


def test_per_expert_round_sizes_close_each_experts_rounds_at_its_own_count():
    c = coordinator(mode="sync", rule="fedex", round_size=3, round_sizes={"python": 1})
    c.push(Update("python", "a", 0, adapter(1)))
    assert c.version("python") == 1 and c.metrics("python")["pending"] == 0
    assert c.config()["round_sizes"] == {"python": 1}


def test_a_round_size_below_one_for_an_expert_is_refused():
    with pytest.raises(ConfigError, match=r"round_sizes\['python'\] must be an integer >= 1"):
        coordinator(mode="sync", round_sizes={"python": 0})


def test_sync_round_with_fedex_equals_the_weighted_mean_of_worker_models():
    c = coordinator(mode="sync", rule="fedex", round_size=3)
    c.push(Update("python", "a", 0, adapter(1)))
    c.push(Update("python", "b", 0, adapter(2)))
    c.push(Update("python", "c", 0, adapter(3)))  # round 1
    v1 = c.snapshot("python")
    ups = [(adapter(4), 1), (adapter(5), 3)]
    for i, (w, n) in enumerate(ups):
        c.push(Update("python", f"w{i}", 1, w, num_samples=n))
    assert c.metrics("python")["pending"] == 2
    c.flush("python")
    models = [worker_effective(v1, w) for w, _ in ups]
    close(effective(c.snapshot("python")), {k: 0.25 * models[0][k] + 0.75 * models[1][k] for k in models[0]})


def test_sync_round_with_fedit_is_not_exact():
    c = coordinator(mode="sync", rule="fedit", round_size=2)
    c.push(Update("python", "a", 0, adapter(1)))
    c.push(Update("python", "b", 0, adapter(2)))
    got = effective(c.snapshot("python"))
    v0 = {layer.name: torch.zeros(16, 8, dtype=torch.float64) for layer in LAYERS}
    want = {k: 0.5 * (v0[k] + worker_effective(c.snapshot("python"), adapter(1))[k]) for k in v0}
    assert not torch.allclose(got["l0"], want["l0"])


def test_compression_keeps_the_rank_budget_and_reports_the_energy_it_drops():
    exact = coordinator(mode="fedasync", mix=0.5, staleness="constant", rank_budget=1000)
    cut = coordinator(mode="fedasync", mix=0.5, staleness="constant", rank_budget=6)
    for i in range(1, 3):
        for c in (exact, cut):
            c.push(Update("python", "w", c.version("python"), adapter(i)))
    m = cut.metrics("python")
    assert max(m["rank"].values()) <= 6 and m["compressions"] >= 1
    assert exact.metrics("python")["energy_dropped"] == 0.0
    # one compression, at the second update (rank 8 > 6): the dropped energy is ||exact - cut||_F^2
    assert m["compressions"] == 1
    for layer in LAYERS:
        gap = torch.linalg.matrix_norm(exact.snapshot("python").delta(layer.name) - cut.snapshot("python").delta(layer.name))
        assert m["energy_dropped_by_layer"][layer.name] == pytest.approx(gap.item() ** 2, rel=1e-8)


BAD = [
    (lambda: Update("sql", "w", 0, adapter(1)), "unknown expert"),
    (lambda: Update("python", "w", 0, {k: v for k, v in adapter(1).items() if "l1.lora_A" not in k}), "lacks"),
    (lambda: Update("python", "w", 0, {**adapter(1), "extra": torch.zeros(2)}), "unexpected key"),
    (lambda: Update("python", "w", 0, {**adapter(1), "l0.lora_A.weight": torch.zeros(5, 8)}), "shape"),
    (lambda: Update("python", "w", 0, {**adapter(1), "l0.lora_B.weight": torch.full((16, 4), float("nan"))}), "NaN"),
    (lambda: Update("python", "w", 0, {**adapter(1), "l0.lora_B.weight": torch.zeros(16, 4, dtype=torch.int64)}), "floating"),
    (lambda: Update("python", "w", 7, adapter(1)), "cannot be reconciled"),
    (lambda: Update("python", "w", 0, adapter(1), num_samples=0), "num_samples"),
    (lambda: Update("python", "w", "0", adapter(1)), "base_version"),
]


@pytest.mark.parametrize("make, needle", BAD, ids=[n for _, n in BAD])
def test_each_bad_update_is_refused_logged_and_counted(tmp_path, caplog, make, needle):
    c = coordinator(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedmoe.experts"):
        receipt = c.push(make())
    assert receipt.status == "refused" and needle in receipt.reason
    assert needle in caplog.text
    assert c.counts() == {"pushed": 1, "applied": 0, "pending": 0, "refused": 1}
    assert c.version("python") == 0


def test_a_base_version_older_than_the_history_is_refused():
    c = coordinator(mode="fedasync", history=2)
    for _ in range(3):
        c.push(Update("python", "w", c.version("python"), adapter(1)))
    receipt = c.push(Update("python", "slow", 0, adapter(2)))
    assert receipt.status == "refused" and "keeps versions 2..3" in receipt.reason
    assert c.metrics("python")["refused"] == {"slow": 1}


def test_no_update_is_lost_under_sixteen_concurrent_threads(tmp_path):
    c = ExpertCoordinator(str(tmp_path), mode="fedasync", rank_budget=8, snapshot_every=10, fsync=False)
    for name in ("python", "sql"):
        c.register(name, adapter(0), LAYERS)
    receipts, lock = [], threading.Lock()

    def work(i: int) -> None:
        name = ("python", "sql")[i % 2]
        for j in range(6):
            snap = c.snapshot(name)
            weights = adapter(100 * i + j) if (i + j) % 5 else {}  # every fifth update is bad
            r = c.push(Update(name, f"w{i}", snap.version, weights))
            with lock:
                receipts.append(r)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = c.counts()
    assert counts["pushed"] == 96 == len(receipts)
    assert counts["applied"] + counts["refused"] == counts["pushed"]
    assert counts["refused"] == sum(r.status == "refused" for r in receipts) > 0
    for name in ("python", "sql"):
        ok = sorted((r for r in receipts if r.expert == name and r.status == "applied"), key=lambda r: r.seq)
        assert [r.seq for r in ok] == list(range(1, len(ok) + 1))
        assert all(a.version < b.version for a, b in zip(ok, ok[1:]))
        assert c.version(name) == len(ok)


def _state(c: ExpertCoordinator) -> tuple:
    s = c.snapshot("python")
    return s.version, s.adapter, s.correction, c.metrics("python")


def _same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert all(torch.equal(a[2][n][0], b[2][n][0]) and torch.equal(a[2][n][1], b[2][n][1]) for n in a[2])
    drop = ("bytes_out", "bytes_persisted")
    assert {k: v for k, v in a[3].items() if k not in drop} == {k: v for k, v in b[3].items() if k not in drop}


@pytest.mark.parametrize("mode", ["fedasync", "fedbuff", "sync"])
def test_resume_reproduces_the_state_exactly(tmp_path, mode):
    kw = dict(mode=mode, rank_budget=6, buffer_size=3, round_size=3, history=4, snapshot_every=4)
    c = coordinator(tmp_path, **kw)
    for i in range(1, 11):
        c.push(Update("python", f"w{i % 3}", max(0, c.version("python") - i % 2), adapter(i)))
    c.push(Update("python", "bad", 0, {}))
    before = _state(c)
    c.close()
    _same(_state(ExpertCoordinator(str(tmp_path), **kw)), before)


def test_a_torn_last_record_is_dropped_and_every_acknowledged_update_survives(tmp_path, caplog):
    kw = dict(mode="fedasync", rank_budget=6, snapshot_every=100)
    c = coordinator(tmp_path, **kw)
    for i in range(1, 4):
        c.push(Update("python", "w", c.version("python"), adapter(i)))
    acknowledged = _state(c)
    c.push(Update("python", "w", 3, adapter(4)))
    c.close()
    index = next((tmp_path / "python").glob("log-*.jsonl"))
    text = index.read_bytes()
    index.write_bytes(text[: text.rstrip(b"\n").rfind(b"\n") + 1 + 10])  # kill inside the last JSON line
    with caplog.at_level(logging.WARNING, logger="fedmoe.experts"):
        resumed = ExpertCoordinator(str(tmp_path), **kw)
    assert "torn log record" in caplog.text
    _same(_state(resumed), acknowledged)
    # the log goes on after the cut
    resumed.push(Update("python", "w", 3, adapter(4)))
    resumed.close()
    assert ExpertCoordinator(str(tmp_path), **kw).version("python") == 4


def test_a_store_written_with_other_settings_is_refused_naming_them(tmp_path):
    coordinator(tmp_path, mode="fedasync", mix=0.5).close()
    with pytest.raises(CheckpointError, match="mix"):
        ExpertCoordinator(str(tmp_path), mode="fedasync", mix=0.4)


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"mode": "gossip"}, "mode"), ({"rule": "fedsa"}, "fedsa"), ({"mix": 1.5}, "mix"), ({"buffer_size": 0}, "buffer_size"),
     ({"history": 0}, "history"), ({"staleness": "seed"}, "preset")],
)
def test_bad_settings_raise_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ExpertCoordinator(None, **kwargs)


def test_registering_a_bad_adapter_names_the_problem():
    c = ExpertCoordinator(None)
    with pytest.raises(ConfigError, match="lora_A"):
        c.register("python", {k: v for k, v in adapter(0).items() if "l0.lora_A" not in k}, LAYERS)
    with pytest.raises(ConfigError, match="folder"):
        c.register("../x", adapter(0), LAYERS)
    c.register("python", adapter(0), LAYERS)
    with pytest.raises(ConfigError, match="already registered"):
        c.register("python", {k: v[:2] if "lora_A" in k else v[:, :2] for k, v in adapter(0).items()}, LAYERS)


def test_sync_round_with_flora_moves_the_exact_sum_into_the_correction_and_restarts_the_adapter():
    c = coordinator(mode="sync", rule="flora", round_size=2)
    v0 = c.snapshot("python")
    ups = [(adapter(1), 2), (adapter(2), 1)]
    for i, (w, n) in enumerate(ups):
        c.push(Update("python", f"w{i}", 0, w, num_samples=n))
    snap = c.snapshot("python")
    models = [worker_effective(v0, w) for w, _ in ups]
    corr_only = {x.name: snap.correction[x.name][0] @ snap.correction[x.name][1] for x in LAYERS}
    close(corr_only, {k: 2 / 3 * models[0][k] + 1 / 3 * models[1][k] for k in models[0]})
    assert all(torch.count_nonzero(snap.adapter[x.b_key]) == 0 for x in LAYERS)


def test_ffa_refuses_an_update_that_trained_the_frozen_a():
    c = coordinator(mode="sync", rule="ffa")
    moved = {**adapter(0), "l0.lora_B.weight": torch.zeros(16, 4, dtype=torch.float64)}
    assert c.push(Update("python", "ok", 0, moved)).status == "pending"
    receipt = c.push(Update("python", "bad", 0, adapter(1)))
    assert receipt.status == "refused" and "frozen" in receipt.reason


def test_hetlora_accepts_lower_ranks_and_refuses_mismatched_ones():
    c = coordinator(mode="sync", rule="hetlora", round_size=2)
    low = {k: (v[:2] if "lora_A" in k else v[:, :2]) for k, v in adapter(1).items()}
    assert c.push(Update("python", "small", 0, low)).status == "pending"
    bad = {**adapter(2), "l0.lora_A.weight": adapter(2)["l0.lora_A.weight"][:3]}
    assert "rank" in c.push(Update("python", "bad", 0, bad)).reason
    assert c.push(Update("python", "full", 0, adapter(3))).status == "applied"


def test_blob_bytes_written_before_a_kill_without_their_index_line_are_dropped(tmp_path):
    kw = dict(mode="fedasync", snapshot_every=100)
    c = coordinator(tmp_path, **kw)
    c.push(Update("python", "w", 0, adapter(1)))
    acknowledged = _state(c)
    c.close()
    blob = next((tmp_path / "python").glob("log-*.bin"))
    with open(blob, "ab") as f:  # the next record's tensors reached the disk, its index line did not
        f.write(b"\x00" * 300)
    resumed = ExpertCoordinator(str(tmp_path), **kw)
    _same(_state(resumed), acknowledged)
    assert resumed.push(Update("python", "w", 1, adapter(2))).seq == 2
    resumed.close()
    _same(_state(ExpertCoordinator(str(tmp_path), **kw)), _state(resumed))


def test_snapshot_is_a_copy_the_caller_may_change():
    c = coordinator()
    snap = c.snapshot("python")
    snap.adapter["l0.lora_A.weight"].zero_()
    assert torch.count_nonzero(c.snapshot("python").adapter["l0.lora_A.weight"]) > 0
