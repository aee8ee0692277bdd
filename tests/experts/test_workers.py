"""Heterogeneous workers on a tiny Qwen2: worker specs and their bad input, the simulated clock
(reproducible, speeds, latency, failures, staleness), every push accounted for, the wall clock."""

from __future__ import annotations

import json
import threading

import peft  # noqa: F401  (imported at collection: its import is not a test's time)
import pytest
import torch
from torch.utils.data import DataLoader

from fedmoe.data.federated import batch_collate
from fedmoe.data.instructions import Instruction, tokenize_instructions
from fedmoe.errors import ConfigError
from fedmoe.experts import ExpertCoordinator
from fedmoe.experts.clocks import SimulatedClock, WallClock, make_clock
from fedmoe.experts.workers import (
    DEFAULT_EXPERTS,
    DEFAULT_WORKERS,
    ModelPool,
    WorkerSpec,
    load_workers_json,
    parse_worker,
    replicate,
    resolve_workers,
    run_federation,
    workers_from_records,
)
from fedmoe.models.causal import ExpertModel, build_causal_lm, tiny_causal_config
from wordlevel import word_tokenizer as _word_tokenizer

WORDS = "write a python function to add two numbers def add ( a , b ) : return + select * from table where".split()
EXAMPLES = {
    "python": [("write a python function to add two numbers", "def add ( a , b ) : return a + b"),
               ("write a function to add a", "def add ( a ) : return a + a")],
    "sql": [("write select from table", "select * from table"),
            ("select a from table where b", "select a from table where b")],
}


def word_tokenizer():
    """This file's words (:func:`wordlevel.word_tokenizer`)."""
    return _word_tokenizer(WORDS)


TOKENIZER = word_tokenizer()


def expert_model(rank: int = 8) -> ExpertModel:
    base = build_causal_lm(tiny_causal_config("qwen2", 64, initializer_range=0.2), seed=0)
    return ExpertModel(base, ["python", "sql"], {"r": 4, "alpha": 8, "dropout": 0.0, "init_seed": 0}, correction_rank=rank)


def loader(domain: str, shift: int = 0) -> DataLoader:
    pairs = EXAMPLES[domain][shift:] + EXAMPLES[domain][:shift]
    examples = [Instruction(i, "", o, "t", f"t:{k}") for k, (i, o) in enumerate(pairs)]
    return DataLoader(tokenize_instructions(examples, TOKENIZER, 64), batch_size=1, collate_fn=batch_collate)


def data_for(workers) -> dict[str, DataLoader]:
    return {w.id: loader(w.specialty, i % 2) for i, w in enumerate(workers)}


FLEET = [
    WorkerSpec("fast", "python", speed=2.0),
    WorkerSpec("slow", "python", speed=1.0, latency=0.5),
    WorkerSpec("db", "sql", speed=1.0, failure_rate=0.5),
]


def simulate(workers=FLEET, duration=4.0, mode="fedasync", flush=False, **coord):
    coordinator = ExpertCoordinator(None, mode=mode, rank_budget=8, **coord)
    history = run_federation(coordinator, expert_model(), workers, data_for(workers), SimulatedClock(), duration,
                             steps_per_update=1, lr=1e-2, seed=3, flush=flush)
    return coordinator, history


# ------------------------------------------------------------------------------------ specs


def test_worker_strings_parse_as_id_expert_speed():
    assert parse_worker("WorkerX:python:0.8") == WorkerSpec("WorkerX", "python", 0.8)
    spec = WorkerSpec("w", "sql", 2, 0.1, 0.25, "cuda:1")
    assert (spec.speed, spec.latency, spec.failure_rate, spec.device) == (2.0, 0.1, 0.25, "cuda:1")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("w1:python", r"--worker 'w1:python' has 2 field\(s\); use ID:EXPERT:SPEED"),
        ("w1:python:fast", r"worker 'w1' field 'speed' is 'fast', not a number"),
        ("w1:python:0", r"worker 'w1' field 'speed' must be a finite number > 0, got 0.0"),
        ("w1:python:nan", r"worker 'w1' field 'speed' must be a finite number > 0"),
        (":python:1", r"worker '' field 'id' must be letters"),
        ("w1::1", r"worker 'w1' field 'specialty' must name an expert"),
    ],
)
def test_malformed_worker_strings_name_the_worker_and_field(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_worker(text)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"latency": -1}, r"worker 'w' field 'latency' must be a finite number >= 0"),
        ({"failure_rate": 1.5}, r"worker 'w' field 'failure_rate' must be a probability in \[0, 1\]"),
        ({"speed": True}, r"worker 'w' field 'speed' must be a finite number > 0, got True"),
        ({"device": "gpu0"}, r"worker 'w' field 'device' must be cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_worker_fields_name_the_worker_and_field(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        WorkerSpec("w", "python", **kwargs)


def test_worker_json_lists_load(tmp_path):
    path = tmp_path / "workers.json"
    path.write_text(json.dumps([
        {"id": "a", "specialty": "python", "speed": 1.5, "latency": 0.2, "failure_rate": 0.1},
        {"id": "b", "specialty": "sql"},
    ]))
    assert load_workers_json(path) == [WorkerSpec("a", "python", 1.5, 0.2, 0.1), WorkerSpec("b", "sql")]


@pytest.mark.parametrize(
    ("records", "needle"),
    [
        ({"id": "a"}, r"expected a non-empty JSON list of \{id, specialty, speed"),
        ([], r"expected a non-empty JSON list"),
        (["a:python:1"], r"entry 0 is a str; expected an object"),
        ([{"id": "a"}], r"worker 'a' has no field 'specialty'"),
        ([{"specialty": "python"}], r"worker '#0' has no field 'id'"),
        ([{"id": "a", "specialty": "python", "sped": 2}], r"worker 'a' has unknown field 'sped'; fields: id, specialty"),
        ([{"id": "a", "specialty": "python", "speed": "2"}], r"worker 'a' field 'speed' must be a finite number > 0, got '2'"),
        ([{"id": "a", "specialty": ["python"]}], r"worker 'a' field 'specialty' must be a string"),
        ([{"id": 7, "specialty": "python"}], r"worker 7 field 'id' must be a string"),
    ],
)
def test_worker_json_not_matching_the_schema_names_the_worker_and_field(tmp_path, records, needle):
    path = tmp_path / "workers.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ConfigError, match=needle):
        load_workers_json(path)


def test_missing_or_broken_worker_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"worker file .*nowhere.json does not exist"):
        load_workers_json(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ConfigError, match=r"worker file .*bad.json is not JSON"):
        load_workers_json(tmp_path / "bad.json")


def test_unknown_expert_and_repeated_ids_are_refused_and_reference_names_resolve():
    experts = ("python", "sql", "docs")
    assert resolve_workers([parse_worker("w:python_expert:1")], experts)[0].specialty == "python"
    with pytest.raises(ConfigError, match=r"worker 'w' field 'specialty': unknown expert 'rust'; experts: python, sql, docs"):
        resolve_workers([WorkerSpec("w", "rust")], experts)
    with pytest.raises(ConfigError, match=r"worker 'w' field 'id' repeats"):
        resolve_workers([WorkerSpec("w", "sql"), WorkerSpec("w", "python")], experts)
    with pytest.raises(ConfigError, match=r"no workers"):
        resolve_workers([], experts)


def test_default_fleet_is_the_reference_simulations_five_workers_on_three_experts():
    assert len(DEFAULT_WORKERS) == 5 and DEFAULT_EXPERTS == ("python", "sql", "docs")
    assert resolve_workers(DEFAULT_WORKERS, DEFAULT_EXPERTS) == list(DEFAULT_WORKERS)
    assert {w.specialty for w in DEFAULT_WORKERS} == set(DEFAULT_EXPERTS)
    assert workers_from_records([{"id": w.id, "specialty": w.specialty, "speed": w.speed} for w in DEFAULT_WORKERS]) == list(DEFAULT_WORKERS)


# ------------------------------------------------------------------------------------ simulated clock


def test_a_simulated_run_is_reproducible_tensor_for_tensor():
    (c1, h1), (c2, h2) = simulate(), simulate()
    assert h1.events == h2.events and len(h1.events) > 5
    for name in ("python", "sql"):
        s1, s2 = c1.snapshot(name), c2.snapshot(name)
        assert s1.version == s2.version > 0
        assert all(torch.equal(s1.adapter[k], s2.adapter[k]) for k in s1.adapter)
        assert all(torch.equal(s1.correction[n][0], s2.correction[n][0]) for n in s1.correction)
    assert any(ev.staleness for ev in h1.events)  # the stale mixes left corrections that were compared


def test_jobs_cost_steps_over_speed_plus_latency_and_faster_workers_push_more():
    _, history = simulate(duration=4.0)
    per = history.per_worker()
    fast = [ev.time for ev in history.events if ev.worker == "fast"]
    slow = [ev.time for ev in history.events if ev.worker == "slow"]
    assert fast == [0.5 * k for k in range(1, 9)]  # 1 step / speed 2
    assert slow == [1.5, 3.0, 4.5]  # 1 step + 0.5 s latency; the job started at 3.0 < 4 still pushes
    assert per["fast"]["applied"] > per["slow"]["applied"]
    tokens = [ev.response_tokens for ev in history.events if ev.worker == "fast"]
    assert tokens[0] != tokens[1] and tokens[::2] == [tokens[0]] * 4  # each job continues the worker's data
    times = [(ev.time, ["fast", "slow", "db"].index(ev.worker)) for ev in history.events]
    assert times == sorted(times)  # event order: time, then worker position


def test_failures_are_drawn_per_worker_counted_and_push_nothing():
    coordinator, history = simulate(duration=4.0)
    db = [ev for ev in history.events if ev.worker == "db"]
    failed = [ev for ev in db if ev.status == "failed"]
    assert len(db) == 4 and 0 < len(failed) < 4
    assert all(ev.version is None and ev.loss is None for ev in failed)
    assert coordinator.metrics("sql")["applied"] == {"db": len(db) - len(failed)}
    assert coordinator.version("sql") == len(db) - len(failed)
    always = [WorkerSpec("p", "python"), WorkerSpec("x", "sql", failure_rate=1.0)]
    coordinator, history = simulate(always, duration=3.0)
    assert history.per_worker()["x"] == {"failed": 3} and coordinator.version("sql") == 0
    assert coordinator.counts()["pushed"] == 3


def test_a_stale_push_records_its_staleness():
    pair = [WorkerSpec("a", "python"), WorkerSpec("b", "python")]
    _, history = simulate(pair, duration=1.0)
    assert [(ev.worker, ev.base_version, ev.version, ev.staleness) for ev in history.events] == [
        ("a", 0, 1, 0), ("b", 0, 2, 1)
    ]


@pytest.mark.parametrize(
    ("mode", "coord", "expect"),
    [
        ("sync", {"round_size": 2}, "pending"),
        ("fedbuff", {"buffer_size": 3}, "pending"),
        ("fedasync", {"history": 1}, "refused"),  # a stale base version is no longer kept: refused, counted
    ],
)
def test_every_push_is_accounted_for_by_the_coordinator(mode, coord, expect):
    coordinator, history = simulate(FLEET, duration=3.0, mode=mode, **coord)
    counts, mine = coordinator.counts(), history.counts()
    assert counts["pushed"] == counts["applied"] + counts["pending"] + counts["refused"] == mine["pushed"]
    assert counts["refused"] == mine["refused"]  # receipts said pending for updates a later round applied
    assert mine[expect] > 0
    refused = [ev for ev in history.events if ev.status == "refused"]
    assert all("cannot be reconciled" in ev.reason for ev in refused)


def test_flush_applies_the_partial_rounds_left_at_the_end():
    coordinator, history = simulate(FLEET, duration=3.0, mode="sync", flush=True, round_size=4)
    assert coordinator.counts()["pending"] == 0
    assert history.counts()["flushed"] >= 1


# ------------------------------------------------------------------------------------ clocks, models


def test_simulated_clock_orders_events_by_time_then_position():
    clock, seen = SimulatedClock(step_cost=0.5), []

    def proc(name, waits):
        for w in waits:
            seen.append((clock.now(), name))
            yield w
        seen.append((clock.now(), name))

    clock.run([proc("a", [1.0, 1.0]), proc("b", [2.0]), proc("c", [0.5, 1.5])])
    assert seen == [(0.0, "a"), (0.0, "b"), (0.0, "c"), (0.5, "c"), (1.0, "a"), (2.0, "a"), (2.0, "b"), (2.0, "c")]
    assert clock.delay(steps=3, speed=2.0, latency=0.25, measured=9.0) == 0.75 + 0.25


def test_wall_clock_slows_slow_workers_runs_threads_and_reraises_a_workers_error():
    clock = WallClock()
    assert clock.delay(steps=1, speed=0.5, latency=0.1, measured=2.0) == pytest.approx(2.1)
    assert clock.delay(steps=1, speed=4.0, latency=0.1, measured=2.0) == pytest.approx(0.1)
    names = set()

    def ok():
        while not clock.stopped():
            names.add(threading.current_thread().name)
            yield 0.01

    def bad():
        yield 0.01
        raise RuntimeError("worker crashed")

    with pytest.raises(RuntimeError, match="worker crashed"):
        clock.run([ok(), bad()])
    assert names == {"fedmoe-worker-0"} and clock.stopped()
    with pytest.raises(ConfigError, match=r"torch_threads must be an integer >= 1"):
        WallClock(0)



@pytest.mark.parametrize("copies", [True, False], ids=["model-per-worker", "one-shared-model"])
def test_a_wall_clock_run_with_two_threads_completes_and_loses_no_update(copies):
    model = expert_model()
    pair = [WorkerSpec("a", "python"), WorkerSpec("b", "sql", speed=0.5, latency=0.01)]
    pool = ModelPool.per_worker(model, pair) if copies else model
    coordinator = ExpertCoordinator(None, mode="fedasync", rank_budget=8)
    threads = torch.get_num_threads()
    history = run_federation(coordinator, pool, pair, data_for(pair), WallClock(), 0.3, steps_per_update=1, lr=1e-2)
    assert torch.get_num_threads() == threads
    assert history.clock == "wall" and all(ev.status == "applied" for ev in history.events)
    per = history.per_worker()
    assert per["a"]["applied"] >= 1 and per["b"]["applied"] >= 1
    assert coordinator.counts() == {"pushed": len(history.events), "applied": len(history.events), "pending": 0, "refused": 0}
    assert coordinator.version("python") == per["a"]["applied"] and coordinator.version("sql") == per["b"]["applied"]


def test_per_worker_copies_share_the_frozen_base_but_not_the_adapters():
    model = expert_model()
    copy_ = replicate(model)
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    for n, p in copy_.named_parameters():
        if "lora_" in n:
            assert p.data_ptr() != dict(model.named_parameters())[n].data_ptr()
        else:
            assert p is base[n]
    pool = ModelPool.per_device(model, [WorkerSpec("a", "python"), WorkerSpec("b", "sql")])
    assert pool.model("a") is pool.model("b") is model  # one CPU: one shared model, workers take turns


def test_bad_run_settings_are_config_errors():
    coordinator = ExpertCoordinator(None, rank_budget=8)
    workers = [WorkerSpec("a", "python")]
    with pytest.raises(ConfigError, match=r"worker 'a' has no data"):
        run_federation(coordinator, expert_model(), workers, {}, SimulatedClock(), 1.0)
    with pytest.raises(ConfigError, match=r"correction_rank=4 is below the coordinator's rank_budget \+ rank_slack = 8"):
        run_federation(coordinator, expert_model(rank=4), workers, data_for(workers), SimulatedClock(), 1.0)
    with pytest.raises(ConfigError, match=r"worker 'a' field 'device' is 'cuda:99', but this machine has \d+ CUDA"):
        run_federation(coordinator, expert_model(), [WorkerSpec("a", "python", device="cuda:99")], {"a": []},
                       SimulatedClock(), 1.0)
    with pytest.raises(ConfigError, match=r"duration must be a finite number of seconds > 0"):
        run_federation(coordinator, expert_model(), workers, data_for(workers), SimulatedClock(), 0)
    with pytest.raises(ConfigError, match=r"clock 'lunar' is unknown"):
        make_clock("lunar")
    with pytest.raises(ConfigError, match=r"step_cost must be a finite number > 0"):
        SimulatedClock(0)


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_worker_on_a_gpu_trains_there_and_pushes_the_same_update_as_on_the_cpu():
    """One worker per device: the pool replicates the model onto the GPU, the worker trains there and
    the coordinator (on the CPU) applies its update; the result matches the same job on the CPU."""
    results = {}
    for device in ("cpu", "cuda:0"):
        workers = [WorkerSpec("w", "python", device=device)]
        coordinator = ExpertCoordinator(None, mode="fedasync", rank_budget=8)
        model = expert_model()
        pool = ModelPool.per_device(model, workers)
        assert next(pool.model("w").parameters()).device.type == device.split(":")[0]
        history = run_federation(coordinator, pool, workers, data_for(workers), SimulatedClock(), 2.0,
                                 steps_per_update=1, lr=1e-2, seed=3)
        assert history.counts()["applied"] == 2
        snap = coordinator.snapshot("python")
        assert all(t.device.type == "cpu" for t in snap.adapter.values())
        results[device] = snap.adapter
    for key, value in results["cpu"].items():
        torch.testing.assert_close(results["cuda:0"][key], value, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_workers_on_the_gpu_and_the_cpu_train_concurrently_under_the_wall_clock():
    workers = [WorkerSpec("g", "python", device="cuda:0"), WorkerSpec("c", "sql", device="cpu")]
    coordinator = ExpertCoordinator(None, mode="fedasync", rank_budget=8)
    pool = ModelPool.per_device(expert_model(), workers)
    assert pool.model("g") is not pool.model("c")  # one model per device
    history = run_federation(coordinator, pool, workers, data_for(workers), WallClock(), 3.0,
                             steps_per_update=1, lr=1e-2, seed=3)
    per = history.per_worker()
    assert per["g"]["applied"] >= 1 and per["c"]["applied"] >= 1
    assert coordinator.counts()["pushed"] == coordinator.counts()["applied"]
