"""Evaluation of LoRA experts (DESIGN.md §4): MBPP pass@1 in a sandbox, held-out loss and
perplexity per domain and model, router accuracy on labelled prompts.

MBPP pass@1 (Austin et al., 2021): each problem's prompt is its text plus its three test asserts,
in the format the experts are trained on (:func:`fedmoe.data.instructions.read_mbpp`: the text,
a blank line, "Your code should pass these tests:" and the asserts), rendered with the tokenizer's
chat template when it has one; one greedy completion per problem; the code is extracted from the
completion (:func:`extract_code`) and run with the task's ``test_setup_code`` and asserts in
:mod:`fedmoe.experts.sandbox`; pass@1 = passed / problems (one sample: the unbiased pass@k
estimator reduces to this). The standard test split is tasks 11-510 (:data:`TEST_TASKS`).

Generation goes through any callable ``generate(prompts) -> completions`` (:class:`CausalGenerator`
for a model with an expert active or the base; a router or an agent plugs in the same way).

Held-out loss (:func:`loss_table`): mean next-token cross-entropy over response tokens per domain
and model; a routed model (:class:`RoutedModel`) scores each held-out row with the adapter the
inference agent serves its prompt's route with (one expert, or the exact merge of several), so
its column is comparable with the experts'.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.errors import ConfigError, DataError
from fedmoe.experts.sandbox import Isolation, SandboxLimits, SandboxPool, SandboxResult

#: The standard MBPP test split (task ids 11-510; 1-10 are few-shot prompts, 511-600 validation,
#: 601-974 training).
TEST_TASKS = range(11, 511)
TESTS_HEADER = "Your code should pass these tests:"
BASE = "base"

Generate = Callable[[Sequence[str]], Sequence[str]]
Batches = Iterable[tuple[dict, Any]]


# ------------------------------------------------------------------------------------ MBPP data


@dataclass(frozen=True)
class MBPPTask:
    """One MBPP problem: its text, reference code, test asserts and setup code."""

    task_id: int
    text: str
    code: str
    test_list: tuple[str, ...]
    test_setup_code: str = ""

    def instruction(self):
        """The problem as an :class:`~fedmoe.data.instructions.Instruction`, built as
        :func:`fedmoe.data.instructions.read_mbpp` builds it (the experts' training format)."""
        from fedmoe.data.instructions import Instruction

        tests = f"{TESTS_HEADER}\n" + "\n".join(self.test_list)
        return Instruction(self.text, tests, self.code, "mbpp", f"mbpp:{self.task_id}", domain="python")

    def prompt(self) -> str:
        """The user's message: the text, a blank line, the tests header and the asserts (what
        :func:`fedmoe.data.instructions.user_message` gives for :meth:`instruction`, without
        importing the training stack)."""
        return f"{self.text}\n\n{TESTS_HEADER}\n" + "\n".join(self.test_list)


def parse_task_ids(spec: str) -> list[int]:
    """Task ids from ``"11-510"``, ``"11"`` or ``"11-20,31,40-45"`` (inclusive ranges, in order)."""
    out: list[int] = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"tasks {spec!r} is not a list of task ids or ranges such as 11-510 or 11-20,31")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"tasks {spec!r}: the range {lo}-{hi} is empty; write it low-high (e.g. 11-510)")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


def _records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` of a JSONL file (one object a line) or a JSON list (the sanitized subset)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"MBPP file {path} cannot be read: {e}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not a JSON list of MBPP problems ({e.msg})") from None
        return [(f"record {i}", r) for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not JSON ({e.msg}); MBPP has one problem object per line") from None
    return out


def read_mbpp_tasks(path: str | Path, task_ids: Iterable[int] | None = None) -> list[MBPPTask]:
    """MBPP problems from ``mbpp.jsonl`` (fields text, code, task_id, test_list, test_setup_code) or
    the sanitized subset's JSON list (prompt, code, task_id, test_list, test_imports), in the order
    of ``task_ids`` (default: every problem in file order). A requested id the file lacks is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MBPP file {path} does not exist; give --data the path of mbpp.jsonl")
    tasks: dict[int, MBPPTask] = {}
    for where, rec in _records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {where} is a {type(rec).__name__}, expected an MBPP problem object")
        text_key = "text" if "text" in rec else "prompt"
        missing = [k for k in (text_key, "code", "task_id", "test_list") if k not in rec]
        if missing:
            raise DataError(f"{path}: {where} has no field {missing[0]!r}; fields found: {', '.join(sorted(rec))}")
        tests = rec["test_list"]
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests) or not isinstance(rec["task_id"], int):
            raise DataError(f"{path}: {where} needs an integer task_id and a list of assert strings in test_list")
        setup = rec.get("test_setup_code") or "\n".join(rec.get("test_imports") or [])
        code = str(rec["code"]).replace("\r\n", "\n")
        tasks[rec["task_id"]] = MBPPTask(rec["task_id"], str(rec[text_key]), code, tuple(tests), str(setup))
    if not tasks:
        raise DataError(f"{path} holds no MBPP problems")
    if task_ids is None:
        return list(tasks.values())
    wanted = list(task_ids)
    absent = [t for t in wanted if t not in tasks]
    if absent:
        raise DataError(
            f"{path} has no task {absent[0]} ({len(absent)} of {len(wanted)} requested ids missing; "
            f"it holds ids {min(tasks)}-{max(tasks)}, {len(tasks)} problems)"
        )
    return [tasks[t] for t in wanted]


# ------------------------------------------------------------------------------------ programs

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(def |class |import |from \w[\w.]* import |@|[A-Za-z_]\w* *=)", re.M)


def extract_code(completion: str) -> str:
    """The program in a completion: the fenced blocks (```python ... ```, an unclosed last fence
    running to the end, code before a lone closing fence) that are Python or untagged, joined,
    preferring those that define something (``def`` / ``class``); without a fence, the text from its first line that starts code (``def``,
    ``class``, ``import``, ``from .. import``, a decorator, an assignment), else the whole text."""
    first = completion.find("```")
    lead = _CODE_START.search(completion[:first]) if first > 0 else None
    if lead is not None and re.search(r"^(def|class) ", completion[:first], re.M):
        completion = "```\n" + completion[lead.start():]  # code, then a closing fence without an opening one
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if blocks:
        python = [b for lang, b in blocks if lang in ("", "python", "py", "python3")] or [b for _, b in blocks]
        defining = [b for b in python if re.search(r"^\s*(def|class) ", b, re.M)]
        return "\n".join(b.strip("\n") for b in (defining or python)) + "\n"
    m = _CODE_START.search(completion)
    return (completion[m.start():] if m else completion).strip("\n") + "\n"


def build_program(task: MBPPTask, code: str) -> str:
    """The program the sandbox runs: the solution, the task's setup code (after the solution: tasks
    367 and 927 use the solution's classes in it), then the asserts."""
    parts = [code.rstrip("\n"), task.test_setup_code.replace("\r\n", "\n").strip("\n"), "\n".join(task.test_list)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------------ pass@1


@dataclass
class ProblemRecord:
    """One problem's outcome (a JSONL line): ``status`` and ``kind`` as in
    :class:`~fedmoe.experts.sandbox.SandboxResult`, ``seconds`` its execution, ``generation_seconds``
    its share of generation, ``stderr`` the tail of the program's error output."""

    task_id: int
    passed: bool
    status: str
    kind: str
    seconds: float
    generation_seconds: float
    completion: str
    stderr: str = ""

    @classmethod
    def of(cls, task: MBPPTask, completion: str, result: SandboxResult, generation_seconds: float) -> "ProblemRecord":
        return cls(task.task_id, result.passed, result.status, result.kind, round(result.seconds, 4),
                   round(generation_seconds, 4), completion, result.stderr[-400:])


@dataclass
class MBPPReport:
    """pass@1 over the problems, the records and the time spent."""

    records: list[ProblemRecord]
    seconds: float
    generation_seconds: float = 0.0
    isolation: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.records)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.records)

    @property
    def pass_at_1(self) -> float:
        return self.passed / self.total if self.total else 0.0

    def kinds(self) -> Counter:
        """Failures by kind (AssertionError, NameError, timeout, ...)."""
        return Counter(r.kind for r in self.records if not r.passed)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.kinds().most_common(6))
        return (f"pass@1 {self.pass_at_1:.4f} ({self.passed}/{self.total}) in {self.seconds / 60:.2f} min "
                f"(generation {self.generation_seconds / 60:.2f} min)" + (f"; failures: {kinds}" if kinds else ""))

    def write_jsonl(self, path: str | Path) -> Path:
        """One JSON object per problem, in task order."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(asdict(r)) + "\n")
        return path


def evaluate_mbpp(
    tasks: Sequence[MBPPTask],
    generate: Generate,
    limits: SandboxLimits | None = None,
    workers: int = 2,
    batch_size: int = 1,
    isolation: Isolation | None = None,
    on_record: Callable[[ProblemRecord], None] | None = None,
) -> MBPPReport:
    """pass@1 of ``generate`` on ``tasks``: prompts (:meth:`MBPPTask.prompt`) go to ``generate`` in
    batches of ``batch_size``; each completion's program runs in the sandbox while the next batch is
    generated. ``on_record`` sees each record as it completes (in task order)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not tasks:
        raise DataError("no MBPP tasks to evaluate")
    start = time.perf_counter()
    gen_seconds = 0.0
    pending: list[tuple[MBPPTask, str, float, Any]] = []
    records: list[ProblemRecord] = []
    with SandboxPool(limits, workers, isolation) as pool:
        for i in range(0, len(tasks), batch_size):
            chunk = tasks[i : i + batch_size]
            t0 = time.perf_counter()
            completions = list(generate([t.prompt() for t in chunk]))
            spent = time.perf_counter() - t0
            gen_seconds += spent
            if len(completions) != len(chunk):
                raise DataError(f"generate returned {len(completions)} completions for {len(chunk)} prompts")
            for task, completion in zip(chunk, completions):
                program = build_program(task, extract_code(str(completion)))
                pending.append((task, str(completion), spent / len(chunk), pool.submit(program)))
            while pending and pending[0][3].done():
                records.append(_record(pending.pop(0), on_record))
        while pending:
            records.append(_record(pending.pop(0), on_record))
        description = pool.isolation.description
    return MBPPReport(records, time.perf_counter() - start, gen_seconds, description)


def _record(item: tuple[MBPPTask, str, float, Any], on_record) -> ProblemRecord:
    task, completion, gen, future = item
    record = ProblemRecord.of(task, completion, future.result(), gen)
    if on_record is not None:
        on_record(record)
    return record


def reference_generator(tasks: Sequence[MBPPTask]) -> Generate:
    """A ``generate`` that answers each task's prompt with its reference code (a harness check:
    every reference solution should pass)."""
    return fixed_generator(tasks, {t.task_id: t.code for t in tasks})


def fixed_generator(tasks: Sequence[MBPPTask], completions: Mapping[int, str]) -> Generate:
    """A ``generate`` that answers each task's prompt with ``completions[task_id]`` (rescoring
    saved completions without generating again)."""
    missing = [t.task_id for t in tasks if t.task_id not in completions]
    if missing:
        raise DataError(f"no completion for task {missing[0]} ({len(missing)} of {len(tasks)} tasks have none)")
    by_prompt = {t.prompt(): completions[t.task_id] for t in tasks}
    return lambda prompts: [by_prompt[p] for p in prompts]


def read_completions(path: str | Path) -> dict[int, str]:
    """``task_id -> completion`` from a records file written by :meth:`MBPPReport.write_jsonl`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"completions file {path} does not exist; give a .jsonl written with --out")
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[int(rec["task_id"])] = str(rec["completion"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path}: line {n} is not a record with task_id and completion") from None
    if not out:
        raise DataError(f"{path} holds no completions")
    return out


# ------------------------------------------------------------------------------------ generation


class CausalGenerator:
    """``generate(prompts) -> completions``: greedy decoding with a causal LM.

    Args:
        model: an :class:`~fedmoe.models.causal.ExpertModel` (``expert`` active, or the base alone
            with ``expert=None``) or a plain transformers causal LM (``expert`` must be None).
        tokenizer: its tokenizer; prompts are rendered with its chat template (user turn plus the
            generation prompt) when it has one and ``template`` allows, else the plain
            ``### Instruction`` format of :func:`fedmoe.data.instructions.plain_prompt`.
        expert: the expert to activate (None: the base).
        max_new_tokens: tokens generated at most per prompt (generation stops at EOS).
        template: ``auto``, ``chat`` or ``plain``.

    Prompts of one call are left-padded into one batch; the model's active expert is restored after.
    """

    def __init__(self, model: Any, tokenizer: Any, expert: str | None = None, max_new_tokens: int = 256,
                 template: str = "auto") -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if template not in ("auto", "chat", "plain"):
            raise ConfigError(f"template={template!r} is unknown; use 'auto', 'chat' or 'plain'")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ConfigError("template='chat' but the tokenizer has no chat_template; use 'auto' or 'plain'")
        self.chat = has_chat if template == "auto" else template == "chat"
        self.experts = tuple(getattr(model, "experts", ()))
        if expert is not None and expert not in self.experts:
            known = ", ".join(self.experts) or "none (a plain model)"
            raise DataError(f"expert {expert!r} is unknown; experts: {known}")
        self.model, self.tokenizer, self.expert, self.max_new_tokens = model, tokenizer, expert, max_new_tokens

    def render(self, prompt: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        from fedmoe.data.instructions import Instruction, plain_prompt

        return plain_prompt(Instruction(prompt, "", "", "prompt", "prompt:0"))

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        import contextlib

        import torch

        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([self.render(p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=not self.chat)
        finally:
            tok.padding_side = side
        lm = getattr(self.model, "peft", self.model)
        device = next(lm.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = [e for e in dict.fromkeys([tok.eos_token_id, *_as_list(lm.generation_config.eos_token_id)]) if e is not None]
        previous = getattr(self.model, "active", None)
        if self.experts:
            self.model.activate(self.expert)
        base_only = self.expert is None and hasattr(lm, "disable_adapter")
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad(), (lm.disable_adapter() if base_only else contextlib.nullcontext()):
                out = lm.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=eos, temperature=None, top_p=None, top_k=None)
        finally:
            lm.train(was_training)
            if self.experts:
                self.model.activate(previous)
        width = enc["input_ids"].shape[1]
        return [tok.decode(row[width:], skip_special_tokens=True) for row in out]


def _as_list(x: Any) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


# ------------------------------------------------------------------------------------ loss table


def loss_table(
    model: Any,
    heldout: Mapping[str, Batches],
    experts: Sequence[str | None] | None = None,
    extra: Mapping[str, Callable[[Batches], float]] | None = None,
) -> Any:
    """Held-out loss (mean next-token cross-entropy over response tokens) as a pandas DataFrame,
    one row per domain of ``heldout`` and one column per model: ``base`` (None), each expert
    (default: the base then every expert of ``model``, an :class:`~fedmoe.models.causal.ExpertModel`),
    then each ``extra`` model (a callable scoring a domain's batches, e.g. a routed model).

    Each domain's batches are iterated once per model, so give re-iterable batches (a DataLoader
    or a list). Perplexity is ``exp`` of it (:func:`perplexity_table`)."""
    import pandas as pd

    if not heldout:
        raise DataError("no held-out domains to score")
    names = [None, *model.experts] if experts is None else list(experts)
    columns: dict[str, Callable[[Batches], float]] = {}
    for name in names:
        label = BASE if name is None else name
        if label in columns:
            raise DataError(f"model {label!r} appears twice in the loss table")
        columns[label] = (lambda batches, e=name: model.heldout_loss(e, batches))
    for label, score in (extra or {}).items():
        if label in columns:
            raise DataError(f"extra model {label!r} clashes with an expert or the base; rename it")
        columns[label] = score
    data = {label: [float(score(heldout[d])) for d in heldout] for label, score in columns.items()}
    table = pd.DataFrame(data, index=pd.Index(list(heldout), name="domain"))
    table.columns.name = "model"
    return table


def perplexity_table(losses: Any) -> Any:
    """exp of a loss table."""
    return losses.map(math.exp)


def markdown_table(losses: Any, digits: int = 3) -> str:
    """A loss table in Markdown, each cell ``loss (perplexity)``, the best model of each row in bold
    (every model whose loss shows as the best's at ``digits`` digits: equal losses reached through
    different adapters differ in the last float bits)."""
    header = ["domain", *map(str, losses.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(losses.columns)) + "|"]
    for domain, row in losses.iterrows():
        best = f"{row.min():.{digits}f}"
        cells = []
        for v in row:
            text = f"{v:.{digits}f} ({math.exp(v):.2f})"
            cells.append(f"**{text}**" if f"{v:.{digits}f}" == best else text)
        lines.append("| " + " | ".join([str(domain), *cells]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ routers


@dataclass
class RouterAccuracy:
    """Top-1 routing accuracy on labelled prompts: overall, per true domain, and the confusion
    matrix (rows: true domain, columns: the router's first choice, ``base`` for none)."""

    accuracy: float
    correct: int
    total: int
    per_domain: dict[str, float]
    confusion: Any
    predictions: list[str]

    def summary(self) -> str:
        per = ", ".join(f"{d} {a:.3f}" for d, a in self.per_domain.items())
        return f"router accuracy {self.accuracy:.4f} ({self.correct}/{self.total}); {per}"


def router_accuracy(router: Any, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 64) -> RouterAccuracy:
    """Accuracy of ``router`` (any object with ``route(prompts)`` returning, per prompt, an ordered
    list of ``(expert, weight)``, best first) against the domain ``labels``; a prompt routed to
    nothing (an empty list or expert None) counts as ``base``."""
    import pandas as pd

    if len(prompts) != len(labels):
        raise DataError(f"router accuracy needs one label per prompt: {len(prompts)} prompts, {len(labels)} labels")
    if not prompts:
        raise DataError("router accuracy needs at least one labelled prompt")
    if not callable(getattr(router, "route", None)):
        raise DataError(f"{type(router).__name__} has no route(prompts) method; it is not a router")
    predictions: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        routes = list(router.route(chunk))
        if len(routes) != len(chunk):
            raise DataError(f"{type(router).__name__}.route returned {len(routes)} routes for {len(chunk)} prompts")
        for r in routes:
            first = list(r)[:1]
            if first and not (isinstance(first[0], (tuple, list)) and len(first[0]) == 2):
                raise DataError(
                    f"{type(router).__name__}.route must give, per prompt, a list of (expert, weight); got {first[0]!r}"
                )
            predictions.append(BASE if not first or first[0][0] is None else str(first[0][0]))
    labels = [str(x) for x in labels]
    correct = sum(p == y for p, y in zip(predictions, labels))
    per_domain = {
        d: sum(p == y for p, y in zip(predictions, labels) if y == d) / labels.count(d) for d in dict.fromkeys(labels)
    }
    confusion = pd.crosstab(pd.Series(labels, name="true"), pd.Series(predictions, name="routed"))
    return RouterAccuracy(correct / len(labels), correct, len(labels), per_domain, confusion, predictions)


# ------------------------------------------------------------------------------------ routed model


class PromptBatches:
    """Re-iterable held-out batches ``(inputs, labels)`` with the user prompt of every row, in batch
    order: what :class:`RoutedModel` routes on, and plain batches for the base and the experts."""

    def __init__(self, batches: Any, prompts: Sequence[str]) -> None:
        self.batches, self.prompts = batches, list(prompts)

    def __iter__(self):
        return iter(self.batches)


class RoutedModel:
    """A router and the experts as one model of the loss table (a ``loss_table`` ``extra`` column).

    Each held-out row is scored with the PEFT adapter that serves its prompt's route in the inference
    agent's ``merge`` mode (:class:`~fedmoe.experts.agent.InferenceAgent`, no coordinator: the model's
    own experts): a one-expert route by the expert's serving adapter, B' A' = s B A + U V (exactly
    its delta), a multi-expert route by the exact weighted merge sum_e w_e B'_e A'_e. The rows of a
    batch may go to different adapters: one forward per batch with PEFT's ``adapter_names``.

    Call it with :class:`PromptBatches`; the loss is the token-weighted mean next-token
    cross-entropy over response tokens, as :meth:`~fedmoe.models.causal.ExpertModel.heldout_loss`.
    ``routes`` keeps every call's routes, in call order.
    """

    def __init__(self, model: Any, tokenizer: Any, router: Any) -> None:
        from fedmoe.experts.agent import InferenceAgent

        self.model = model
        self.agent = InferenceAgent(model, tokenizer, router, None, combine="merge")
        self.routes: list[list[Any]] = []

    def adapters(self, routes: Sequence[Any]) -> list[str]:
        """The PEFT adapter serving each route (installed now: serving adapters, merges)."""
        return self.agent.adapters(routes)

    def __call__(self, batches: PromptBatches) -> float:
        import torch
        import torch.nn.functional as F

        from fedmoe.data.instructions import IGNORE_INDEX

        prompts = getattr(batches, "prompts", None)
        if prompts is None:
            raise DataError("a routed model scores PromptBatches (batches with each row's prompt)")
        routes = self.agent.router.route(prompts)
        names = self.adapters(routes)
        self.routes.append(routes)
        lm = self.model.peft
        device = next(lm.parameters()).device
        was_training = lm.training
        lm.eval()
        total, count, row = 0.0, 0, 0
        try:
            with torch.no_grad():
                for inputs, labels in batches:
                    n = int(labels.shape[0])
                    if row + n > len(names):
                        raise DataError(f"held-out batches hold more rows than their {len(names)} prompts")
                    inputs = {k: v.to(device) for k, v in inputs.items()}
                    logits = lm(**inputs, adapter_names=names[row : row + n], use_cache=False).logits[:, :-1].float()
                    target = labels[:, 1:].to(device)
                    total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="sum"))
                    count += int((target != IGNORE_INDEX).sum())
                    row += n
        finally:
            lm.train(was_training)
        if row != len(names):
            raise DataError(f"held-out batches hold {row} rows for {len(names)} prompts")
        if count == 0:
            raise DataError("the held-out batches have no response tokens to score")
        return total / count


def route_label(route: Any) -> str:
    """``python`` or ``python+sql``: the experts of a route."""
    return "+".join(e for e, _ in route)
