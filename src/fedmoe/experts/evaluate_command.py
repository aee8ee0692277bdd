"""The ``evaluate`` command: MBPP pass@1 of a causal LM (the base, or an expert of an experts run),
and a sanity check of the sandboxed harness on MBPP's reference solutions.

``python -m fedmoe.experts.evaluate_command mbpp --model runs/models/smollm2-135m --tasks 11-110 --out base.jsonl``

``python -m fedmoe.experts.evaluate_command mbpp --expert-run runs/experts --expert python --tasks 11-110``
(the run folder's base model, LoRA settings and the expert's latest version, as the ``experts``
command stored them; ``--model`` overrides the base folder)

``python -m fedmoe.experts.evaluate_command references --tasks 11-510`` (every reference solution
through the sandbox: all should pass)

``python -m fedmoe.experts.evaluate_command score --completions base.jsonl`` (the completions of an
earlier run, scored again without generating)

Each prints pass@1, the failure kinds and the minutes spent; ``--out FILE.jsonl`` keeps one record
per problem. Bad input (a missing model folder, a task range the data lacks, an unknown expert) is
one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmoe.errors import CheckpointError, ConfigError, DataError, FedMoEError

DEFAULT_DATA = "../shared/data/code/mbpp.jsonl"


def load_run_experts(run_dir: str | Path, base: str | None = None, tokenizer: str | None = None,
                     dtype: str | None = None) -> tuple[Any, Any, str, dict[str, int]]:
    """``(ExpertModel, tokenizer, description, versions)`` of an experts run folder: the model as
    the ``experts`` command built it (its ``run.json`` settings, :func:`fedmoe.experts.command.load_model`)
    with every stored expert's latest version loaded from the coordinator's store (opened on a
    temporary copy: the run folder is only read, even while a session writes to it). ``base`` / ``tokenizer`` / ``dtype`` override the run's."""
    from fedmoe.experts.command import CoordinatorSettings, LoRASettings, ModelSettings, load_model
    from fedmoe.experts.coordinator import ExpertCoordinator

    root = Path(run_dir)
    record = root / "run.json"
    if not record.is_file():
        raise CheckpointError(f"{root} is not an experts run folder (no run.json); give the run_dir of an experts run")
    try:
        fp = json.loads(record.read_text(encoding="utf-8"))["fingerprint"]
        model = dict(fp["model"])
        msettings = ModelSettings(**{**model, "lora": LoRASettings(**model["lora"])})
        csettings = CoordinatorSettings(**fp["coordinator"])
        names = list(fp["experts"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{record} is not a run record of the experts command") from None
    if base is not None:
        msettings.base, msettings.config = base, None
    if tokenizer is not None:
        msettings.tokenizer = tokenizer
    if dtype is not None:
        msettings.dtype = dtype
    seed = _run_seed(root)
    store = root / "experts"
    if not store.is_dir():
        raise CheckpointError(f"run folder {root} has no expert store ({store}); train experts there first")
    with tempfile.TemporaryDirectory(prefix="fedmoe-evaluate-") as tmp:
        # a copy: opening a store cuts a torn last record, which may be a record a running session is writing
        copy = shutil.copytree(store, Path(tmp) / "experts")
        coordinator = ExpertCoordinator(
            str(copy), mode=csettings.mode, rule=csettings.rule, staleness=csettings.staleness,
            mix=csettings.mix, buffer_size=csettings.buffer_size, server_lr=csettings.server_lr,
            round_size=csettings.round_size, rank_budget=csettings.rank_budget, rank_slack=csettings.rank_slack,
            history=csettings.history, snapshot_every=2**62, fsync=False, seed=seed,
        )
        try:
            stored = coordinator.experts()
            if not stored:
                raise CheckpointError(f"run folder {root} holds no trained expert (its store {store} is empty)")
            lm, tok, described = load_model(msettings, names, seed)
            versions = {}
            for name in stored:
                snap = coordinator.snapshot(name)
                lm.load_expert(name, snap.adapter, snap.correction)
                versions[name] = snap.version
        finally:
            coordinator.close()
    return lm, tok, described, versions


def _run_seed(root: Path) -> int:
    """The ``seed`` of the run's last session (its ``config.yaml``; 0 when absent): the coordinator's
    settings include it."""
    import yaml

    path = root / "config.yaml"
    if not path.is_file():
        return 0
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise CheckpointError(f"{path} is not YAML; restore it from the experts command's run") from None
    return int(doc.get("seed", 0)) if isinstance(doc, dict) else 0


# ------------------------------------------------------------------------------------ parsing


def build_parser() -> argparse.ArgumentParser:
    """The command's parser: subcommands ``mbpp`` and ``references``."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise ConfigError(f"{message} (see --help)")

    parser = Parser(prog="python -m fedmoe.cli evaluate",
                    description="MBPP pass@1 in a sandbox, for a causal LM, an expert, or MBPP's reference solutions.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=DEFAULT_DATA, help="mbpp.jsonl (or the sanitized subset's JSON list)")
        p.add_argument("--tasks", default="11-510", help="task ids: 11-510 (the test split), 11-110, 11-20,31, ...")
        p.add_argument("--workers", type=int, default=2, help="programs run at a time")
        p.add_argument("--timeout", type=float, default=20.0, help="wall-clock seconds per program")
        p.add_argument("--cpu-seconds", type=int, default=10, help="CPU seconds per program")
        p.add_argument("--memory-mb", type=int, default=512, help="address space per program (MiB)")
        p.add_argument("--out", default=None, help="write one JSON record per problem to this .jsonl file")
        p.add_argument("--quiet", action="store_true", help="no line per problem")

    m = sub.add_parser("mbpp", help="pass@1 of greedy completions")
    m.add_argument("--model", default=None, help="the base model's folder (save_pretrained)")
    m.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the base's dtype (default float32, or the run's)")
    m.add_argument("--expert-run", default=None, help="an experts run folder (run_dir of the experts command)")
    m.add_argument("--expert", default=None, help="the expert to activate (default: the base alone)")
    m.add_argument("--max-new-tokens", type=int, default=256)
    m.add_argument("--batch-size", type=int, default=1, help="prompts generated together (left-padded)")
    m.add_argument("--template", default="auto", choices=["auto", "chat", "plain"])
    m.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    common(m)
    r = sub.add_parser("references", help="run MBPP's reference solutions through the sandbox (harness check)")
    common(r)
    s = sub.add_parser("score", help="rescore saved completions (a .jsonl written with --out) without generating")
    s.add_argument("--completions", required=True, help="records of an earlier mbpp run (task_id, completion)")
    common(s)
    s.set_defaults(tasks=None)
    return parser


def _limits(args):
    from fedmoe.experts.sandbox import SandboxLimits

    return SandboxLimits(timeout_s=args.timeout, cpu_s=args.cpu_seconds, memory_mb=args.memory_mb)


def _load_generator(args):
    """The ``generate`` callable and a description of what it runs."""
    import torch

    from fedmoe.experts.evaluation import CausalGenerator

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.expert is not None and args.expert_run is None:
        raise ConfigError("--expert needs --expert-run (the experts run folder that stores it)")
    if args.expert_run is not None:
        model, tok, described, versions = load_run_experts(args.expert_run, args.model, args.tokenizer, args.dtype)
        if args.expert is not None and args.expert not in versions:
            raise DataError(f"expert {args.expert!r} is not stored in {args.expert_run}; "
                            f"stored: {', '.join(versions) or 'none'}")
        what = "the base" if args.expert is None else f"expert {args.expert} (version {versions[args.expert]})"
        described = f"{what} of {args.expert_run}: {described}"
    else:
        if args.model is None:
            raise ConfigError("give --model (a model folder) or --expert-run (an experts run folder)")
        from fedmoe.models.causal import load_causal

        model, tok = load_causal(args.model, args.tokenizer, args.dtype or "float32")
        described = f"the base {args.model}"
    gen = CausalGenerator(model, tok, args.expert, args.max_new_tokens, args.template)
    return gen, f"{described}; greedy, {args.max_new_tokens} new tokens, {'chat template' if gen.chat else 'plain prompt'}"


def run(args) -> Any:
    """One subcommand for parsed ``args``; returns the :class:`~fedmoe.experts.evaluation.MBPPReport`."""
    from fedmoe.experts.evaluation import (
        evaluate_mbpp,
        fixed_generator,
        parse_task_ids,
        read_completions,
        read_mbpp_tasks,
        reference_generator,
    )

    saved = read_completions(args.completions) if args.command == "score" else None
    if args.tasks is None:
        args.tasks = ",".join(map(str, saved))
    tasks = read_mbpp_tasks(args.data, parse_task_ids(args.tasks))
    limits = _limits(args)
    if args.command == "references":
        generate, described = reference_generator(tasks), "MBPP reference solutions"
        batch = 64
    elif args.command == "score":
        generate, described = fixed_generator(tasks, saved), f"completions of {args.completions}"
        batch = 64
    else:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        generate, described = _load_generator(args)
        batch = args.batch_size
    print(f"{described}; {len(tasks)} problems ({args.tasks}) from {args.data}", flush=True)

    def show(rec) -> None:
        if not args.quiet:
            tail = "" if rec.passed else f" {rec.kind}"
            print(f"  task {rec.task_id}: {rec.status}{tail} ({rec.generation_seconds:.1f}s + {rec.seconds:.2f}s)",
                  flush=True)

    report = evaluate_mbpp(tasks, generate, limits, args.workers, batch, on_record=show)
    print(f"sandbox: {report.isolation}")
    print(report.summary(), flush=True)
    if args.out:
        print(f"records: {report.write_jsonl(args.out)}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmoe.cli evaluate {mbpp,references} ...``: 0 on success, 2 with one ``error:``
    line for bad input, 130 on Ctrl-C."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
        run(args)
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
