"""The ``experts`` command: federated LoRA experts on one frozen causal LM, in three phases.

``python -m fedmoe.cli experts --config experiments/qwen/experts.yaml [--section.key value ...]``

1. Registration and spin-up: the base model and tokenizer are loaded from local folders (or a tiny
   model is built from ``model.config``), the instruction data (Code Alpaca, MBPP) is assigned to
   domains by :func:`fedmoe.data.instructions.classify` and split over the workers of each expert,
   with a held-out part per domain; the experts, workers and their data are printed.
2. Federated training: :func:`fedmoe.experts.workers.run_federation` for ``duration`` seconds of
   the clock; one line per job (applied, pending, refused, failed), then the counts per expert and
   worker.
3. Inference on the reference simulation's three sample prompts (pure Python, Python + SQL,
   Python + docs) through :class:`fedmoe.experts.agent.InferenceAgent`: a router (the keyword
   table :data:`fedmoe.experts.routers.REFERENCE_TABLE`, another table, or a trained learned
   router) sends each prompt to one or several experts, read from the coordinator's current
   snapshots, and every (prompt, expert) row is generated greedily in one batch (PEFT's
   ``adapter_names``) or through an exact weighted merge of the routed experts.

The reference simulation's flags are kept: ``--duration SECONDS``, repeated ``--worker
ID:EXPERT:SPEED`` (they replace the config's ``worker`` list) and ``--worker-json FILE`` (a list
of {id, specialty, speed, latency, failure_rate, device}); with neither, its fleet
(:data:`~fedmoe.experts.workers.DEFAULT_WORKERS`: 5 workers on python, sql, docs). SPEED is a rate:
a job of ``steps_per_update`` steps costs steps / speed (times ``clock.step_cost`` on the simulated
clock), so 2 is twice as fast; the reference script multiplied a sleep by its factor, so its 0.5
(fast) is 2 here.

The run folder (``run_dir``) holds the coordinator's store (``experts/``: every applied update,
persisted before it is acknowledged), ``config.yaml`` (the last session's resolved config),
``run.json`` (settings fingerprint, sessions), one ``metrics_<expert>.csv`` per expert (a row per
job and per held-out evaluation) and TensorBoard events (``tensorboard/``: per expert its version,
training loss per job, held-out loss on its domain every ``eval_every`` versions and at the start
and end of a session, staleness histogram, applied / refused per worker, bytes moved). Running the
command again on the same folder resumes: every expert continues from its last applied update and
the clock's time continues from the previous session's end (the same splits and held-out sets;
new data order and failure draws: session k uses seed + k; an interrupted session records where
its clock stopped). A folder written with other model, expert or coordinator settings is refused
with one error line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmoe.errors import CheckpointError, ConfigError, DataError, FedMoEError


SAMPLE_PROMPTS: tuple[tuple[str, str], ...] = (
    ("pure Python", "Write a Python function that returns the n-th Fibonacci number."),
    ("Python + SQL", "Write Python code that runs a SQL query selecting every user older than 30 from a SQLite table."),
    ("Python + docs", "Add docstrings to a Python function that parses a CSV file, documenting its arguments."),
)
INTERRUPTED = 130
CSV_FIELDS = (
    "time", "session", "worker", "status", "base_version", "version", "staleness", "train_loss", "heldout_loss",
    "steps", "response_tokens", "bytes_in", "bytes_out", "bytes_persisted", "reason",
)


# ------------------------------------------------------------------------------------ settings


@dataclass
class LoRASettings:
    """Each expert's trainable LoRA.

    Args:
        r: rank.
        alpha: scaling numerator (s = alpha / r).
        dropout: LoRA dropout.
        target_modules: adapted modules (default: the architecture's, q_proj and v_proj for Qwen2 and Llama).
        init_seed: seeds the adapters' initialisation (every expert starts the same on every run).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    init_seed: int = 0


@dataclass
class ModelSettings:
    """The frozen base shared by every expert.

    Args:
        base: a local model folder (``save_pretrained``) or ``package:NAME``; nothing is downloaded.
        config: instead of ``base``, a tiny model built from a config: ``{model_type: qwen2,
            vocab_size: N, ...}`` over :func:`fedmoe.models.causal.tiny_causal_config` (tests, smoke runs).
        tokenizer: tokenizer folder (default: ``base``); required with ``config``.
        dtype: the base's dtype; float32 by default (bfloat16 is about 2x faster on CPUs with
            AVX-512 BF16 and much slower on those without).
        lora: the experts' LoRA.
        correction_rank: room for each expert's frozen correction factors (>= coordinator.rank_budget + rank_slack).
    """

    base: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoRASettings = field(default_factory=LoRASettings)
    correction_rank: int = 32


@dataclass
class DataSettings:
    """The workers' private instruction data and the held-out sets.

    Args:
        code_alpaca: Code Alpaca JSON list (``.json`` or ``.json.gz``), domains by keyword classifier.
        mbpp: MBPP ``.jsonl`` (every problem is python).
        mbpp_tasks: the MBPP task ids trained on (``"1-10,511-974"``: the prompt, validation and
            training splits, so that pass@1 on the standard test split 11-510 is on unseen problems);
            null: every problem in the file.
        heldout_fraction: fraction of each domain held out for evaluation.
        max_length: tokens per example (responses are cut from the end).
        batch_size: examples per training batch of a worker.
        max_per_domain: keep at most this many examples per domain (a seeded sample; CPU runs).
        max_heldout: score at most this many held-out examples per domain.
        partition: ``iid`` or ``dirichlet`` split of a domain over its workers.
        dirichlet_alpha: concentration of the Dirichlet split over sub-topics.
        template: ``auto`` (the tokenizer's chat template when it has one), ``chat`` or ``plain``.
        long_examples: a training example longer than ``max_length``: ``cut`` (its response cut from
            the end, the end-of-turn token with it) or ``drop`` (left out, so every trained response
            ends as the model should stop). Held-out examples are always cut.
    """

    code_alpaca: str | None = None
    mbpp: str | None = None
    mbpp_tasks: str | None = "1-10,511-974"
    heldout_fraction: float = 0.1
    max_length: int = 256
    batch_size: int = 4
    max_per_domain: int | None = None
    max_heldout: int | None = 32
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    template: Literal["auto", "chat", "plain"] = "auto"
    long_examples: Literal["cut", "drop"] = "cut"


@dataclass
class CoordinatorSettings:
    """The versioned expert coordinator (:class:`fedmoe.experts.coordinator.ExpertCoordinator`);
    its store is ``run_dir/experts``.

    Args:
        mode: ``sync`` (rounds per expert), ``fedasync`` (x <- (1 - w) x + w x_new exactly) or ``fedbuff``.
        rule: sync aggregation rule: fedex, fedit, ffa, hetlora, flora.
        staleness: s(d) preset: constant, polynomial ((d + 1)^-0.5), hinge, reference (1 / (1 + 0.1 d)).
        mix: FedAsync's w = mix * s(staleness).
        buffer_size: FedBuff's K updates per step.
        server_lr: FedBuff's server learning rate.
        round_size: updates per sync round; 0: one update per worker of the expert (each expert's
            round then waits for as many updates as it has workers).
        rank_budget: rank each expert's correction is compressed to (truncated SVD).
        rank_slack: compress only above rank_budget + rank_slack.
        history: versions kept to reconcile stale updates (older ones are refused, counted).
        snapshot_every: log records between snapshots of an expert.
        fsync: fsync every record (off: a killed process loses nothing, a power cut may).
    """

    mode: Literal["sync", "fedasync", "fedbuff"] = "fedasync"
    rule: Literal["fedex", "fedit", "ffa", "hetlora", "flora"] = "fedex"
    staleness: Literal["constant", "polynomial", "hinge", "reference"] = "polynomial"
    mix: float = 0.6
    buffer_size: int = 4
    server_lr: float = 1.0
    round_size: int = 2
    rank_budget: int = 32
    rank_slack: int = 0
    history: int = 32
    snapshot_every: int = 100
    fsync: bool = True


@dataclass
class RouterSettings:
    """The inference phase's router and how routed experts are combined (:mod:`fedmoe.experts.agent`).

    Args:
        kind: ``keyword`` (a table of regular expressions per expert) or ``learned`` (a classifier on
            the frozen base's prompt embedding, from ``checkpoint``).
        table: the keyword table (YAML or JSON); None: the reference simulation's rules. Experts the
            run has not trained are left out of it.
        checkpoint: a learned router saved with ``LearnedRouter.save``.
        combine: ``batch`` (one row per routed expert, all in one generate call) or ``merge`` (one
            row per prompt, the routed experts merged exactly with their route weights).
    """

    kind: Literal["keyword", "learned"] = "keyword"
    table: str | None = None
    checkpoint: str | None = None
    combine: Literal["batch", "merge"] = "batch"


@dataclass
class ClockSettings:
    """The clock the workers run under (:mod:`fedmoe.experts.clocks`).

    Args:
        name: ``simulated`` (deterministic event queue: a job costs steps / speed * step_cost +
            latency simulated seconds) or ``wall`` (real threads and time).
        step_cost: simulated seconds of one optimizer step at speed 1.
        torch_threads: torch threads during a wall-clock run.
    """

    name: Literal["simulated", "wall"] = "simulated"
    step_cost: float = 1.0
    torch_threads: int = 1


def experts(
    model: ModelSettings,
    data: DataSettings,
    coordinator: CoordinatorSettings,
    clock: ClockSettings,
    router: RouterSettings,
    experts: list[str] = ["python", "sql", "docs"],  # noqa: B006 (jsonargparse reads the default)
    duration: float = 15.0,
    steps_per_update: int = 1,
    lr: float = 2e-4,
    seed: int = 0,
    run_dir: str = "runs/experts",
    eval_every: int = 5,
    flush: bool = False,
    max_new_tokens: int = 16,
    prompts: list[str] | None = None,
) -> None:
    """Federated LoRA experts on one frozen causal LM (module docstring of fedmoe.experts.command).

    Args:
        experts: the experts (domains of the data classifier: python, sql, docs).
        duration: seconds of the clock the federation runs for (a started job still finishes and pushes).
        steps_per_update: optimizer steps of one worker job.
        lr: the workers' AdamW learning rate.
        seed: data splits and held-out sets; data order and failures use seed + k in session k of a run folder.
        run_dir: the run folder (store, metrics CSVs, TensorBoard events); rerun on it to resume.
        eval_every: held-out loss of an expert each time its version passes a multiple of this.
        flush: apply the partial sync rounds / FedBuff buffers left at the end (else they stay
            pending in the store and a rerun continues them).
        max_new_tokens: tokens generated per sample prompt in the inference phase.
        prompts: the inference prompts (default: the reference simulation's three tasks).
    """


# ------------------------------------------------------------------------------------ parsing


def _worker_help() -> str:
    return (
        "a worker ID:EXPERT:SPEED, repeatable; replaces the config's worker list. SPEED is a rate: a job's "
        "compute time = steps_per_update / SPEED (x clock.step_cost when simulated), so 2 is twice as fast "
        "(the reference script multiplied a sleep by its factor: its 0.5 is 2 here). Default fleet: "
        "Worker-1-Fast:python:2, Worker-2-Slow:python:0.5, Worker-3-SQL:sql:1, Worker-4-Docs:docs:0.667, "
        "Worker-5-Python:python:1"
    )


def build_parser():
    """The command's jsonargparse parser: ``--config``, the sections of :func:`experts`, ``--worker``
    and ``--worker-json``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    class Parser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            if os.environ.get("JSONARGPARSE_DEBUG"):
                return ArgumentParser.error(self, message, ex)
            lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
            skip = ("Does not validate", "Subtypes:", "Errors:", "Given value type")
            detail = [ln for ln in lines[1:] if not ln.startswith(skip)][:1]
            raise ConfigError(" ".join([*lines[:1], *detail]) + " (see --help)")

    parser = Parser(
        prog="python -m fedmoe.cli experts",
        description="Federated LoRA experts on one frozen causal LM: registration, federated training, inference.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (e.g. experiments/qwen/experts.yaml)")
    parser.add_function_arguments(experts, as_group=False)
    parser.add_argument("--worker", type=list[str] | None, default=None, help=_worker_help())
    parser.add_argument(
        "--worker-json", "--worker_json", dest="worker_json", type=str | None, default=None,
        help="a JSON file: a list of {id, specialty, speed, latency, failure_rate, device} (only id and specialty "
             "required); used when no --worker is given",
    )
    return parser


def _gather_workers(argv: Sequence[str]) -> list[str]:
    """The command line with its repeated ``--worker X`` turned into one ``--worker [X, ...]``."""
    out, workers, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--worker":
            if i + 1 >= len(argv):
                raise ConfigError("--worker needs a value ID:EXPERT:SPEED (e.g. w1:python:0.8)")
            workers.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--worker="):
            workers.append(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    if workers:
        out += ["--worker", json.dumps(workers)]
    return out


# ------------------------------------------------------------------------------------ pieces


def fleet(worker: Sequence[str] | None, worker_json: str | None, expert_names: Sequence[str]):
    """The workers: ``--worker`` strings, else the ``--worker-json`` file, else the reference fleet;
    checked against the experts."""
    from fedmoe.experts.workers import DEFAULT_WORKERS, load_workers_json, parse_worker, resolve_workers

    if worker:
        specs = [parse_worker(w) for w in worker]
    elif worker_json:
        specs = load_workers_json(worker_json)
    else:
        specs = list(DEFAULT_WORKERS)
    return resolve_workers(specs, list(expert_names))


def load_model(settings: ModelSettings, expert_names: Sequence[str], seed: int):
    """``(ExpertModel, tokenizer, description)`` from the model section; the tokenizer must fit."""
    from fedmoe.models.causal import (
        ExpertModel,
        build_causal_lm,
        check_tokenizer_fits,
        load_causal,
        load_causal_tokenizer,
        tiny_causal_config,
    )

    if (settings.base is None) == (settings.config is None):
        raise ConfigError("give exactly one of model.base (a local model folder) and model.config (a tiny model)")
    if settings.base is not None:
        base, tok = load_causal(settings.base, settings.tokenizer, settings.dtype)
        where = settings.base
    else:
        if not settings.tokenizer:
            raise ConfigError("model.config builds a model without a tokenizer: give model.tokenizer (a folder)")
        cfg = dict(settings.config)
        kind = cfg.pop("model_type", "qwen2")
        try:
            base = build_causal_lm(tiny_causal_config(kind, **cfg), seed=seed, dtype=settings.dtype)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.config does not build a model: {str(e).splitlines()[0]}") from None
        tok = load_causal_tokenizer(settings.tokenizer)
        check_tokenizer_fits(base, tok, None, settings.tokenizer)
        where = f"{kind} built from model.config"
    lora = {k: v for k, v in asdict(settings.lora).items() if v is not None}
    model = ExpertModel(base, list(expert_names), lora, correction_rank=settings.correction_rank)
    model.eval()
    params = sum(p.numel() for p in base.parameters())
    targets = sorted({layer.name.rsplit(".", 1)[-1] for layer in model.adapted_layers(expert_names[0])})
    text = (
        f"base {where} ({type(base).__name__}, {params / 1e6:.1f}M parameters, {settings.dtype}); "
        f"LoRA r={settings.lora.r} alpha={settings.lora.alpha:g} on {', '.join(targets)}; "
        f"correction rank {settings.correction_rank}"
    )
    return model, tok, text


def load_domains(settings: DataSettings, seed: int) -> dict[str, list]:
    """Examples per domain from the configured files (at most ``max_per_domain``, a seeded sample)."""
    from fedmoe.data.instructions import by_domain, read_code_alpaca, read_mbpp

    if not settings.code_alpaca and not settings.mbpp:
        raise ConfigError("no data: give data.code_alpaca and/or data.mbpp (local files)")
    examples = []
    if settings.code_alpaca:
        examples += read_code_alpaca(settings.code_alpaca)
    if settings.mbpp:
        from fedmoe.experts.evaluation import parse_task_ids

        examples += read_mbpp(settings.mbpp, parse_task_ids(settings.mbpp_tasks) if settings.mbpp_tasks else None)
    groups = by_domain(examples)
    if settings.max_per_domain is not None:
        if settings.max_per_domain < 1:
            raise ConfigError(f"data.max_per_domain must be >= 1 or null, got {settings.max_per_domain}")
        for k, (name, items) in enumerate(sorted(groups.items())):
            if len(items) > settings.max_per_domain:
                rng = np.random.default_rng([seed, 7919, k])
                keep = np.sort(rng.choice(len(items), settings.max_per_domain, replace=False))
                groups[name] = [items[i] for i in keep]
    return groups


def _loader(dataset, batch_size: int, shuffle_seed: int | None = None):
    import torch
    from torch.utils.data import DataLoader

    from fedmoe.data.federated import batch_collate

    gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=gen is not None, generator=gen, collate_fn=batch_collate)


@dataclass
class Prepared:
    """Everything phase 1 builds."""

    train: dict[str, Any]  # worker id -> its batches
    heldout: dict[str, Any]  # expert -> held-out batches
    sizes: dict[str, tuple[int, int]]  # worker id -> (examples, response tokens)
    heldout_sizes: dict[str, int]


def prepare_data(settings: DataSettings, workers, tokenizer, seed: int, order_seed: int | None = None) -> Prepared:
    """Split each trained expert's domain over its workers (plus a held-out part) with ``seed`` and
    tokenise; ``order_seed`` (default ``seed``) shuffles each worker's batches. A resumed session keeps
    ``seed`` (the same held-out sets) and draws a new ``order_seed``."""
    from fedmoe.data.instructions import split_domains, tokenize_instructions

    for key, value, ok in (
        ("batch_size", settings.batch_size, settings.batch_size >= 1),
        ("max_length", settings.max_length, settings.max_length >= 2),
        ("heldout_fraction", settings.heldout_fraction, 0 < settings.heldout_fraction < 1),
    ):
        if not ok:
            raise ConfigError(f"data.{key}={value!r} is out of range")
    groups = load_domains(settings, seed)
    counts = Counter(w.specialty for w in workers)
    order = [e for e in dict.fromkeys(w.specialty for w in workers)]
    splits = split_domains(groups, {e: counts[e] for e in order}, settings.heldout_fraction, settings.partition,
                           settings.dirichlet_alpha, seed=seed)
    train, sizes, position = {}, {}, Counter()
    for i, w in enumerate(workers):
        part = splits[w.specialty].workers[position[w.specialty]]
        position[w.specialty] += 1
        ds = tokenize_instructions(part, tokenizer, settings.max_length, settings.template, settings.long_examples)
        train[w.id] = _loader(ds, settings.batch_size, shuffle_seed=(seed if order_seed is None else order_seed) * 1009 + i)
        sizes[w.id] = (len(ds), ds.num_response_tokens)
    heldout, heldout_sizes = {}, {}
    for e in order:
        held = splits[e].heldout[: settings.max_heldout] if settings.max_heldout else splits[e].heldout
        if not held:
            raise DataError(f"domain {e!r} has no held-out example; raise data.heldout_fraction or add data")
        ds = tokenize_instructions(held, tokenizer, settings.max_length, settings.template)
        heldout[e] = _loader(ds, settings.batch_size)
        heldout_sizes[e] = len(ds)
    return Prepared(train, heldout, sizes, heldout_sizes)


# ------------------------------------------------------------------------------------ run folder


def fingerprint(
    model: ModelSettings, coordinator: CoordinatorSettings, expert_names: Sequence[str], data: DataSettings | None = None
) -> dict:
    """The settings a run folder's experts depend on (a resumed run must match them): the model,
    the coordinator and, with ``data``, the data settings and the SHA-256 of each data file (the
    files' contents, not their paths: a moved copy resumes, an edited one is refused)."""
    m = asdict(model)
    if m["base"] and not str(m["base"]).startswith("package:"):
        m["base"] = str(Path(m["base"]).resolve())
    if m["tokenizer"] and not str(m["tokenizer"]).startswith("package:"):
        m["tokenizer"] = str(Path(m["tokenizer"]).resolve())
    c = {k: v for k, v in asdict(coordinator).items() if k not in ("fsync", "snapshot_every")}
    out = {"experts": list(expert_names), "model": m, "coordinator": c}
    if data is not None:
        d = {k: v for k, v in asdict(data).items() if k not in DATA_FILES}
        d["sha256"] = {key: _sha256(getattr(data, key)) for key in DATA_FILES}
        out["data"] = d
    return out


#: The data settings that name files (fingerprinted by content).
DATA_FILES = ("code_alpaca", "mbpp")


def _sha256(path: str | None) -> str | None:
    """The file's SHA-256 (None without a file: reading it reports that, later)."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and not (prefix + k).endswith("model.config"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class RunFolder:
    """``run.json`` of a run folder: the settings fingerprint and the sessions (time offsets, seeds)."""

    def __init__(self, root: Path, fp: dict) -> None:
        self.root = root
        self.path = root / "run.json"
        if root.exists() and not root.is_dir():
            raise ConfigError(f"run_dir {root} is a file, not a folder; choose another --run_dir")
        self.state: dict = {"fingerprint": fp, "sessions": []}
        if self.path.is_file():
            try:
                state = json.loads(self.path.read_text(encoding="utf-8"))
                old = state["fingerprint"]
                sessions = list(state["sessions"])
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path} is not a run record of the experts command; choose another --run_dir") from None
            a, b = _flat(old), _flat(fp)
            if "data" not in old:  # recorded before data was fingerprinted: compare the rest
                b = {k: v for k, v in b.items() if not k.startswith("data.")}
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                shown = ", ".join(f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in diff[:3])
                raise CheckpointError(
                    f"run folder {root} holds experts trained with other settings: {shown}; rerun with its settings "
                    f"(--config {root / 'config.yaml'}) or choose another --run_dir"
                )
            self.state["sessions"] = sessions
        elif (root / "experts").is_dir() and any((root / "experts").iterdir()):
            raise CheckpointError(f"run folder {root} holds an expert store but no run.json; choose another --run_dir")

    @property
    def session(self) -> int:
        return len(self.state["sessions"])

    @property
    def offset(self) -> float:
        return max((float(s.get("end", s["start"])) for s in self.state["sessions"]), default=0.0)

    def begin(self, clock: str, duration: float) -> None:
        self.state["sessions"].append({"start": self.offset, "clock": clock, "duration": duration})
        self.write()

    def end(self, now: float, counts: Mapping[str, int]) -> None:
        self.state["sessions"][-1].update(end=self.offset_of_last() + now, counts=dict(counts))
        self.write()

    def offset_of_last(self) -> float:
        return float(self.state["sessions"][-1]["start"])

    def write(self) -> None:
        from fedmoe.federation.checkpoint import atomic_write_text

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.state, indent=1))


# ------------------------------------------------------------------------------------ logging


class Recorder:
    """TensorBoard events and a CSV per expert, fed by ``run_federation(on_event=...)``; prints a line
    per job. Evaluates an expert's held-out loss each time its version passes a multiple of
    ``eval_every`` (inside the worker's model lease: never while a worker trains on that model)."""

    def __init__(self, root: Path, coordinator, pool, model, heldout: Mapping[str, Any], eval_every: int,
                 session: int, offset: float, out=None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.root, self.coord, self.pool, self.model = root, coordinator, pool, model
        self.heldout, self.eval_every = dict(heldout), int(eval_every)
        self.session, self.offset = session, offset
        self.out = out or sys.stdout
        self.writer = SummaryWriter(str(root / "tensorboard"))
        self.files: dict[str, Any] = {}
        self.csv: dict[str, Any] = {}
        self.pushes: dict[str, int] = {}
        self.evaluated: dict[str, int] = {}
        self.last_loss: dict[str, float] = {}
        self.closed = False
        for name in self.heldout:
            path = root / f"metrics_{name}.csv"
            new = not path.is_file() or path.stat().st_size == 0
            f = open(path, "a", newline="", encoding="utf-8")
            self.files[name], self.csv[name] = f, csv.DictWriter(f, CSV_FIELDS)
            if new:
                self.csv[name].writeheader()
            m = coordinator.metrics(name)
            self.pushes[name] = sum(m["applied"].values()) + sum(m["refused"].values()) + m["pending"]

    def evaluate(self, expert: str, model=None) -> float:
        """The expert's current snapshot loaded into ``model``, scored on its domain's held-out set."""
        m = model if model is not None else self.model
        snap = self.coord.snapshot(expert, copy=False)
        m.load_expert(expert, snap.adapter, snap.correction)
        loss = m.heldout_loss(expert, _on_device(self.heldout[expert], next(m.parameters()).device))
        self.evaluated[expert] = snap.version
        self.last_loss[expert] = loss
        self.writer.add_scalar(f"{expert}/heldout_loss", loss, snap.version)
        return loss

    def _row(self, expert: str, now: float, **values: Any) -> None:
        m = self.coord.metrics(expert)
        row = {"time": f"{self.offset + now:.6g}", "session": self.session, "bytes_in": m["bytes_in"],
               "bytes_out": m["bytes_out"], "bytes_persisted": m["bytes_persisted"]}
        row.update({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in values.items()})
        self.csv[expert].writerow(row)
        self.files[expert].flush()
        step = m["version"]
        for key in ("bytes_in", "bytes_out", "bytes_persisted"):
            self.writer.add_scalar(f"{expert}/{key}", m[key], step)

    def checkpoint_eval(self, now: float, label: str) -> None:
        """Held-out loss of every expert now (session start and end): an ``eval`` row each."""
        for name in self.heldout:
            loss = self.evaluate(name)
            version = self.evaluated[name]
            self._row(name, now, worker="", status="eval", version=version, heldout_loss=loss)
            self.print(f"  {label} held-out loss of {name} (version {version}): {loss:.4f}")

    def __call__(self, ev) -> None:
        if self.closed:  # a wall-clock worker finishing its job after an interrupt
            return
        expert = ev.expert
        if ev.status == "flushed":
            self.print(f"  [{self.offset + ev.time:9.2f}s] {expert}: partial round applied at the end -> v{ev.version}")
            self._row(expert, ev.time, worker="", status="flushed", version=ev.version)
            return
        self.pushes[expert] += 0 if ev.status == "failed" else 1
        step = self.pushes[expert]
        if ev.loss is not None:
            self.writer.add_scalar(f"{expert}/train_loss", ev.loss, step)
        if ev.version is not None:
            self.writer.add_scalar(f"{expert}/version", ev.version, step)
        if ev.staleness is not None:
            self.writer.add_scalar(f"{expert}/staleness", ev.staleness, step)
        heldout = None
        version = ev.version
        if ev.status == "applied" and version is not None and (
            version // self.eval_every > self.evaluated.get(expert, 0) // self.eval_every
        ):
            with self.pool.lease(ev.worker) as m:
                heldout = self.evaluate(expert, m)
        self._row(expert, ev.time, worker=ev.worker, status=ev.status, base_version=ev.base_version, version=version,
                  staleness=ev.staleness, train_loss=ev.loss, heldout_loss=heldout, steps=ev.steps,
                  response_tokens=ev.response_tokens, reason=ev.reason)
        self.print(_event_line(ev, self.offset) + ("" if heldout is None else f", held-out {heldout:.4f}"))

    def finish(self) -> None:
        """The end-of-session summaries: staleness histograms, applied / refused per worker."""
        for name in self.heldout:
            m = self.coord.metrics(name)
            stale = [int(d) for d, n in m["staleness"].items() for _ in range(n)]
            if stale:
                self.writer.add_histogram(f"{name}/staleness_histogram", np.array(stale), m["version"])
            for kind in ("applied", "refused"):
                for worker, n in m[kind].items():
                    self.writer.add_scalar(f"{name}/{kind}/{worker}", n, m["version"])
        self.close()

    def close(self) -> None:
        self.closed = True
        self.writer.flush()
        self.writer.close()
        for f in self.files.values():
            f.close()

    def print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _on_device(batches, device):
    """The ``(inputs, labels)`` batches moved to ``device`` as they are read."""
    for inputs, labels in batches:
        if device.type != "cpu":
            inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
        yield inputs, labels


def _event_line(ev, offset: float) -> str:
    head = f"  [{offset + ev.time:9.2f}s] {ev.worker} -> {ev.expert}: "
    if ev.status == "failed":
        return head + "failed (a drawn failure: nothing pushed)"
    if ev.status == "refused":
        return head + f"refused ({ev.reason})"
    tail = f"loss {ev.loss:.4f}" if ev.loss is not None else ""
    if ev.status == "pending":
        return head + f"pending from v{ev.base_version} (waits for its round), {tail}"
    return head + f"applied v{ev.base_version} -> v{ev.version} (staleness {ev.staleness}), {tail}"


# ------------------------------------------------------------------------------------ evaluation


def cross_domain_losses(model, coordinator, heldout: Mapping[str, Any], experts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Held-out loss of the base and of every expert's current version on every domain's held-out set:
    ``{domain: {"base": loss, expert: loss, ...}}`` (the domains x experts table,
    :func:`fedmoe.experts.evaluation.loss_table`)."""
    from fedmoe.experts.evaluation import loss_table

    device = next(model.parameters()).device
    for name in experts:
        snap = coordinator.snapshot(name, copy=False)
        model.load_expert(name, snap.adapter, snap.correction)
    table = loss_table(model, {d: _OnDevice(b, device) for d, b in heldout.items()}, [None, *experts])
    return {domain: {str(m): float(v) for m, v in row.items()} for domain, row in table.iterrows()}


class _OnDevice:
    """Re-iterable batches moved to ``device`` as they are read."""

    def __init__(self, batches, device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self):
        return _on_device(self.batches, self.device)


def write_loss_table(path: Path, table: Mapping[str, Mapping[str, float]]) -> None:
    """The domains x models table as CSV (``domain,base,<expert>...``), written atomically."""
    from fedmoe.federation.checkpoint import atomic_write_text

    models = list(next(iter(table.values())))
    lines = [",".join(["domain", *models])]
    lines += [",".join([domain, *(f"{row[m]:.6g}" for m in models)]) for domain, row in table.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def format_loss_table(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Fixed-width lines of the table, the best model of each domain starred."""
    models = list(next(iter(table.values())))
    width = max(8, *(len(m) + 2 for m in models))
    lines = ["domain".ljust(8) + "".join(m.rjust(width) for m in models)]
    for domain, row in table.items():
        best = min(row, key=row.get)
        cells = "".join((f"{row[m]:.4f}" + ("*" if m == best else " ")).rjust(width) for m in models)
        lines.append(domain.ljust(8) + cells)
    return lines


# ------------------------------------------------------------------------------------ inference


def build_inference_router(settings: RouterSettings, available: Sequence[str], model, tokenizer,
                           check_only: bool = False):
    """The phase-3 router over the experts that exist (trained now or resumed): a keyword table keeps
    only their rows (its default falls back to the first of them), a learned router must know them.
    ``check_only``: check the settings and files without the model (None returned for a learned one)."""
    from fedmoe.experts.routers import (
        REFERENCE_TABLE,
        KeywordRouter,
        LearnedRouter,
        PromptEmbedder,
        read_keyword_table,
    )

    if settings.kind == "learned":
        if not settings.checkpoint:
            raise ConfigError("router.kind=learned needs router.checkpoint (a file written by LearnedRouter.save)")
        if not Path(settings.checkpoint).is_file():
            raise ConfigError(f"router.checkpoint {settings.checkpoint} does not exist")
        if check_only:
            return None
        return LearnedRouter.load(settings.checkpoint, None, PromptEmbedder(model, tokenizer))
    path = Path(settings.table) if settings.table else REFERENCE_TABLE
    if not path.is_file():
        raise ConfigError(f"router.table {path} does not exist; give a YAML or JSON keyword table")
    doc = read_keyword_table(path)
    if isinstance(doc, dict) and isinstance(doc.get("experts"), dict):
        doc = {**doc, "experts": {e: p for e, p in doc["experts"].items() if e in available}}
        if doc.get("default") not in available and available:
            doc["default"] = available[0]
        if not doc["experts"]:
            raise ConfigError(f"router.table {path} names none of the experts {', '.join(available)}")
    return KeywordRouter.from_dict(doc, list(available), f"keyword table {path}")


# ------------------------------------------------------------------------------------ the command


def run(cfg) -> None:
    """The three phases for a parsed config (a jsonargparse namespace, see :func:`build_parser`)."""
    from fedmoe.experts.clocks import make_clock
    from fedmoe.experts.coordinator import ExpertCoordinator
    from fedmoe.experts.workers import ModelPool, run_federation

    parts = {k: cfg[k].as_dict() if hasattr(cfg[k], "as_dict") else dict(cfg[k])
             for k in ("model", "data", "coordinator", "clock")}
    msettings = ModelSettings(**{**parts["model"], "lora": LoRASettings(**parts["model"]["lora"])})
    dsettings = DataSettings(**parts["data"])
    csettings = CoordinatorSettings(**parts["coordinator"])
    ksettings = ClockSettings(**parts["clock"])
    expert_names = list(dict.fromkeys(cfg.experts))
    if not expert_names:
        raise ConfigError("experts is empty; name at least one expert (python, sql, docs)")
    duration = cfg.duration
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        raise ConfigError(f"--duration must be a finite number of seconds > 0, got {duration!r}")
    if cfg.eval_every < 1:
        raise ConfigError(f"eval_every must be an integer >= 1, got {cfg.eval_every}")

    workers = fleet(cfg.worker, cfg.worker_json, expert_names)
    rsettings = RouterSettings(**(cfg.router.as_dict() if hasattr(cfg.router, "as_dict") else dict(cfg.router)))
    build_inference_router(rsettings, expert_names, None, None, check_only=True)  # before anything is loaded or written
    trained = list(dict.fromkeys(w.specialty for w in workers))
    clock = make_clock(ksettings.name, ksettings.step_cost, ksettings.torch_threads)
    root = Path(cfg.run_dir)
    folder = RunFolder(root, fingerprint(msettings, csettings, expert_names, dsettings))
    seed = int(cfg.seed) + folder.session

    print("== Phase 1: expert registration and worker spin-up ==", flush=True)
    t0 = time.perf_counter()
    model, tokenizer, described = load_model(msettings, expert_names, int(cfg.seed))
    prepared = prepare_data(dsettings, workers, tokenizer, int(cfg.seed), seed)
    root.mkdir(parents=True, exist_ok=True)
    coord_kwargs = {k: v for k, v in asdict(csettings).items()}
    if csettings.round_size < 0:
        raise ConfigError(f"coordinator.round_size must be >= 1, or 0 for one update per worker; got {csettings.round_size}")
    if csettings.round_size == 0:
        per_expert = Counter(w.specialty for w in workers)
        coord_kwargs.update(round_size=max(per_expert.values()), round_sizes=dict(per_expert))
    coordinator = ExpertCoordinator(str(root / "experts"), seed=int(cfg.seed), **coord_kwargs)
    try:
        for name in trained:
            coordinator.register(name, model.expert_state(name), model.adapted_layers(name))
        print(f"  {described} (loaded in {time.perf_counter() - t0:.1f}s)")
        mode = {"fedasync": f"mix {csettings.mix}, staleness {csettings.staleness}",
                "fedbuff": f"buffer {csettings.buffer_size}, staleness {csettings.staleness}, server lr {csettings.server_lr}",
                "sync": f"rule {csettings.rule}, " + (f"{csettings.round_size} updates a round" if csettings.round_size
                                                     else "a round = one update per worker of the expert")}[csettings.mode]
        print(f"  coordinator: {csettings.mode} ({mode}), rank budget {csettings.rank_budget}, store {root / 'experts'}")
        resumed = folder.session > 0
        for name in expert_names:
            if name not in trained:
                print(f"  expert {name}: no worker, not trained")
                continue
            n_train = sum(prepared.sizes[w.id][0] for w in workers if w.specialty == name)
            v = coordinator.version(name)
            state = f"version {v}" + (f" (resumed, session {folder.session + 1})" if resumed else "")
            print(f"  expert {name}: {state}, {n_train} training / {prepared.heldout_sizes[name]} held-out examples")
        for w in workers:
            n, tokens = prepared.sizes[w.id]
            job = cfg.steps_per_update / w.speed * (ksettings.step_cost if ksettings.name == "simulated" else 1.0)
            cost = f"a job {job:.2f}s" if ksettings.name == "simulated" else "a rate: slower workers wait longer"
            print(f"  worker {w.id}: expert {w.specialty}, speed {w.speed:.3g} ({cost}), latency {w.latency:g}s, "
                  f"failure rate {w.failure_rate:g}, device {w.device}, data {n} examples ({tokens} response tokens)")

        print(f"== Phase 2: federated training ({duration:g}s on the {clock.name} clock, "
              f"{cfg.steps_per_update} step(s) a job, lr {cfg.lr:g}) ==", flush=True)
        folder.begin(clock.name, float(duration))
        _save_config(cfg, root)
        pool = ModelPool.per_device(model, workers)
        recorder = Recorder(root, coordinator, pool, model, prepared.heldout, cfg.eval_every, folder.session - 1,
                            folder.offset_of_last())
        try:
            recorder.checkpoint_eval(0.0, "start:")
            history = run_federation(coordinator, pool, workers, prepared.train, clock, float(duration),
                                     steps_per_update=cfg.steps_per_update, lr=cfg.lr, seed=seed, flush=cfg.flush,
                                     on_event=recorder)
            recorder.checkpoint_eval(clock.now(), "end:")
            recorder.finish()
        except BaseException:
            recorder.close()
            folder.end(clock.now(), coordinator.counts())  # a rerun's clock continues from here
            raise
        counts = coordinator.counts()
        folder.end(clock.now(), counts)
        mine = history.counts()
        print(f"  this session: {counts['pushed']} pushed = {counts['applied']} applied + {counts['refused']} refused + "
              f"{counts['pending']} pending (persisted, waiting for a round); {mine['failed']} failed jobs (nothing pushed)")
        for name in trained:
            m = coordinator.metrics(name)
            print(f"  expert {name}: version {m['version']}, applied {sum(m['applied'].values())}, refused "
                  f"{sum(m['refused'].values())}, pending {m['pending']}, held-out loss {recorder.last_loss[name]:.4f}, "
                  f"staleness {dict(sorted(Counter({int(k): v for k, v in m['staleness'].items()}).items()))}, "
                  f"{m['bytes_in']} bytes in, {m['bytes_out']} out")
        for worker, c in history.per_worker().items():
            print(f"  worker {worker}: receipts " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        print(f"  metrics: {', '.join(str(root / f'metrics_{n}.csv') for n in trained)}; TensorBoard: {root / 'tensorboard'}")
        table = cross_domain_losses(model, coordinator, prepared.heldout, trained)
        write_loss_table(root / "heldout_losses.csv", table)
        print("  held-out loss, domains (rows) x models (columns); * marks each domain's best:")
        for line in format_loss_table(table):
            print(f"    {line}")

        from fedmoe.experts.agent import InferenceAgent, run_sample_tasks

        available = [e for e in expert_names if e in coordinator.experts()]  # trained now or in an earlier session
        router = build_inference_router(rsettings, available, model, tokenizer)
        print(f"== Phase 3: inference on sample prompts ({rsettings.kind} router, {rsettings.combine}) ==", flush=True)
        prompts = [(f"prompt {i + 1}", p) for i, p in enumerate(cfg.prompts)] if cfg.prompts else list(SAMPLE_PROMPTS)
        agent = InferenceAgent(model, tokenizer, router, coordinator, combine=rsettings.combine,
                               max_new_tokens=cfg.max_new_tokens)
        run_sample_tasks(agent, prompts)
    finally:
        coordinator.close()


def _save_config(cfg, root: Path) -> None:
    from fedmoe.federation.checkpoint import atomic_write_text

    cfg = cfg.clone()
    for key in ("config", "__path__"):
        if key in cfg:
            del cfg[key]
    atomic_write_text(root / "config.yaml", build_parser().dump(cfg, skip_check=True, skip_none=False))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmoe.cli experts ...``: 0 on success, 2 with one ``error:`` line for bad input,
    130 on Ctrl-C (every applied update is already persisted: rerun the command to resume)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        cfg = parser.parse_args(_gather_workers(args))
        run(cfg)
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every applied update is persisted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as e:  # --help, --print_config
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
