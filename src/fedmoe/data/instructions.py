"""Instruction data for the LoRA experts (DESIGN.md section 4): Code Alpaca and MBPP, a keyword
domain classifier, per-domain splits over workers, and response-only tokenisation.

Domains. :func:`classify` walks :data:`DOMAIN_RULES` in order and returns the domain of the first
rule whose every pattern matches its field (``instruction``, ``input`` or ``output``); an example
no rule matches is ``other``. The order is the documentation:

1. ``sql``: the instruction names SQL (SQL, MySQL, PostgreSQL, SQLite, T-SQL, PL/SQL), or the
   output begins with a SQL statement (SELECT, INSERT INTO, UPDATE .. SET, DELETE FROM,
   CREATE/ALTER/DROP TABLE, ...);
2. ``docs``: the instruction asks for documentation (docstrings, documentation, comments);
3. ``docs``: the instruction is a question or asks for an explanation (explain, describe, what,
   why, how, ...) and the output is prose (starts with a capital, at least 8 words, none of
   ``{ } ; = < >``);
4. ``other``: the instruction names another language or web technology (Java, JavaScript, C++,
   C#, HTML, CSS, Ruby, PHP, "in C", "in Go", ...);
5. ``python``: the instruction names Python or a Python library (pandas, NumPy, Django, ...);
6. ``python``: the output looks like Python (``def f(``, ``class C:``, ``import x``,
   ``from x import``, ``print(``, ``elif``, ``self.``, ``range(``, ``len(``);
7. ``docs``: the output is longer prose (at least 12 words, same characters as rule 3).

On the Code Alpaca 2k sample (2,017 examples) this gives 778 python, 187 sql, 127 docs and 925
other. MBPP problems are Python by construction (:func:`read_mbpp` labels them ``python``).

Tokenisation (:func:`tokenize_instructions`): with the tokenizer's chat template the prompt is the
user turn plus the generation prompt and the response is the rest of the rendered conversation
(the assistant's text and its end-of-turn token); without one, the plain format
``### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n`` then the output and EOS.
Prompt and response are tokenised separately and concatenated, so the boundary is exact; labels are
-100 on every prompt token (and on padding): the loss is on response tokens only.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmoe.data.partition import dirichlet, holdout, iid
from fedmoe.errors import DataError

#: The expert domains; everything else is ``other``.
DOMAINS = ("python", "sql", "docs")
OTHER = "other"
IGNORE_INDEX = -100

CODE_ALPACA_FIELDS = ("instruction", "input", "output")
MBPP_FIELDS = ("text", "code", "task_id", "test_list")


@dataclass(frozen=True)
class Instruction:
    """One instruction example. ``domain`` is set when the source fixes it (MBPP: python), else
    :func:`classify` decides; ``uid`` is ``<source>:<index or task_id>``."""

    instruction: str
    input: str
    output: str
    source: str
    uid: str
    domain: str | None = None


@dataclass(frozen=True)
class DomainRule:
    """Examples whose every field matches its pattern (``re.search``) belong to ``domain``."""

    domain: str
    name: str
    patterns: Mapping[str, str]
    flags: int = 0

    def matches(self, example: Instruction) -> bool:
        return all(re.search(p, getattr(example, f), self.flags) for f, p in self.patterns.items())


_PROSE = r"\A(?=(?:\S+\s+){%d})[A-Z][^{};=<>]*\Z"
_QUESTION = (
    r"\A\s*(explain|describe|what|why|how|discuss|summari[sz]e|define|compare|name|list|give|suggest"
    r"|is|are|can|does|do)\b"
)

#: The classifier's rules, in the order they are tried (module docstring).
DOMAIN_RULES: tuple[DomainRule, ...] = (
    DomainRule("sql", "names-sql", {"instruction": r"\b(sql|mysql|postgre(s|sql)|sqlite|t-sql|pl/sql)\b"}, re.I),
    DomainRule(
        "sql", "sql-statement",
        {"output": r"\A\s*(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM"
                   r"|CREATE\s+(TABLE|DATABASE|INDEX|VIEW)|ALTER\s+TABLE|DROP\s+TABLE)\b"},
    ),
    DomainRule(
        "docs", "asks-for-docs",
        {"instruction": r"\b(docstrings?|documentation|document (the|this|a)|add comments|comment the)\b"}, re.I,
    ),
    DomainRule("docs", "question-prose-answer", {"instruction": _QUESTION, "output": r"(?-i:" + _PROSE % 7 + ")"}, re.I),
    DomainRule(
        OTHER, "names-other-language",
        {"instruction": r"\b(java|javascript|typescript|c\+\+|c#|ruby|php|swift|golang|rust|bash|shell|perl"
                        r"|kotlin|scala|matlab|haskell|html|css|xml|json|react|angular|vue|node\.?js|jquery"
                        r"|assembly|objective-c|dart|lua|latex|visual basic|vba|powershell)\b"
                        r"|\b(in|using) (c|go|r)\b"},
        re.I,
    ),
    DomainRule(
        "python", "names-python",
        {"instruction": r"\b(python|pandas|numpy|django|flask|scikit-learn|tensorflow|keras|pytorch)\b"}, re.I,
    ),
    DomainRule(
        "python", "python-syntax",
        {"output": r"^\s*(def \w+\(|class \w+(\(.*\))?:|import \w|from [\w.]+ import )"
                   r"|\bprint\(|\belif\b|\bself\.|\brange\(|\blen\("},
        re.M,
    ),
    DomainRule("docs", "prose-answer", {"output": _PROSE % 11}),
)


def classify(example: Instruction, rules: Sequence[DomainRule] = DOMAIN_RULES) -> str:
    """The example's domain: its fixed ``domain`` if set, else the first matching rule's, else ``other``."""
    if example.domain is not None:
        return example.domain
    rule = matching_rule(example, rules)
    return OTHER if rule is None else rule.domain


def matching_rule(example: Instruction, rules: Sequence[DomainRule] = DOMAIN_RULES) -> DomainRule | None:
    """The first rule the example matches (None: no rule)."""
    return next((r for r in rules if r.matches(example)), None)


def by_domain(
    examples: Sequence[Instruction], rules: Sequence[DomainRule] = DOMAIN_RULES
) -> dict[str, list[Instruction]]:
    """Examples grouped by :func:`classify`, keyed in :data:`DOMAINS` order then ``other``, in input order."""
    groups: dict[str, list[Instruction]] = {d: [] for d in (*DOMAINS, OTHER)}
    for ex in examples:
        groups.setdefault(classify(ex, rules), []).append(ex)
    return groups


# --------------------------------------------------------------------------------------- readers


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _check_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    return path


def _field(record: Any, key: str, path: Path, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where} is a {type(record).__name__}, expected an object with {key!r}")
    if key not in record:
        raise DataError(f"{path}: {where} has no field {key!r}; fields found: {', '.join(sorted(record)) or 'none'}")
    value = record[key]
    if not isinstance(value, kinds):
        raise DataError(f"{path}: {where} field {key!r} is a {type(value).__name__}, expected {kinds[0].__name__}")
    return value


def read_code_alpaca(path: str | Path) -> list[Instruction]:
    """Code Alpaca: a JSON list (plain or ``.gz``) of {instruction, input, output}."""
    path = _check_file(path, "Code Alpaca")
    try:
        with _open_text(path) as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as e:
        raise DataError(f"{path} is not a Code Alpaca JSON list: {str(e).splitlines()[0]}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} objects")
    return [
        Instruction(*(_field(r, k, path, f"record {i}") for k in CODE_ALPACA_FIELDS), "code_alpaca", f"code_alpaca:{i}")
        for i, r in enumerate(records)
    ]


def read_mbpp(path: str | Path, task_ids: Sequence[int] | range | None = None) -> list[Instruction]:
    """MBPP (``mbpp.jsonl``, one problem per line): the instruction is the problem text, the input
    its test asserts ("Your code should pass these tests:", the usual MBPP prompt), the output the
    reference code (CRLF line ends made LF); domain ``python``. ``task_ids`` keeps only those tasks (e.g. ``range(601, 975)``,
    the standard training split)."""
    path = _check_file(path, "MBPP")
    keep = None if task_ids is None else set(int(t) for t in task_ids)
    out: list[Instruction] = []
    try:
        with _open_text(path) as f:
            lines = f.read().splitlines()
    except (UnicodeDecodeError, EOFError, OSError) as e:
        raise DataError(f"{path} is not an MBPP JSONL file: {str(e).splitlines()[0]}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not JSON ({e.msg}); MBPP has one problem object per line") from None
        where = f"line {n}"
        text, code = _field(rec, "text", path, where), _field(rec, "code", path, where)
        task = _field(rec, "task_id", path, where, (int,))
        tests = _field(rec, "test_list", path, where, (list,))
        if keep is not None and task not in keep:
            continue
        prompt = "Your code should pass these tests:\n" + "\n".join(map(str, tests))
        code = code.replace("\r\n", "\n")
        out.append(Instruction(text, prompt, code, "mbpp", f"mbpp:{task}", domain="python"))
    if not out:
        raise DataError(f"{path} holds no MBPP problems" + ("" if keep is None else " with the requested task_ids"))
    return out


# --------------------------------------------------------------------------------------- splits


@dataclass
class DomainSplit:
    """One domain's data: a training part per worker and a held-out part."""

    domain: str
    workers: list[list[Instruction]]
    heldout: list[Instruction]


PartitionName = Literal["iid", "dirichlet"]


def subtopic(example: Instruction, rules: Sequence[DomainRule] = DOMAIN_RULES) -> str:
    """A sub-topic label for Dirichlet splits: the source and the name of the rule that matched."""
    rule = matching_rule(example, rules) if example.domain is None else None
    return f"{example.source}/{rule.name if rule else 'fixed'}"


def split_domains(
    groups: Mapping[str, Sequence[Instruction]],
    workers: Mapping[str, int] | int,
    heldout_fraction: float = 0.1,
    partition: PartitionName = "iid",
    dirichlet_alpha: float = 0.5,
    min_size: int = 1,
    seed: int = 0,
) -> dict[str, DomainSplit]:
    """Split each domain named in ``workers`` (an int: every domain of :data:`DOMAINS`) into a
    held-out part (round(fraction * n)) and one training part per worker: seeded IID shards, or a
    Dirichlet(alpha) skew over :func:`subtopic` labels (at least ``min_size`` examples each).

    Each domain draws from its own generator (``seed`` and the domain's position), so adding a domain
    leaves the others' splits unchanged. A domain with no examples, or fewer than its workers, is a
    :class:`DataError`.
    """
    counts = {d: workers for d in DOMAINS} if isinstance(workers, int) else dict(workers)
    if partition not in ("iid", "dirichlet"):
        raise DataError(f"partition={partition!r} is unknown; use 'iid' or 'dirichlet'")
    out: dict[str, DomainSplit] = {}
    for k, (domain, n_workers) in enumerate(counts.items()):
        examples = list(groups.get(domain, ()))
        if not examples:
            found = ", ".join(f"{d} ({len(v)})" for d, v in groups.items() if v) or "none"
            raise DataError(f"domain {domain!r} has no examples; domains with data: {found}")
        if n_workers < 1:
            raise DataError(f"domain {domain!r} needs at least 1 worker, got {n_workers}")
        rng = np.random.default_rng([seed, k])
        train, held = holdout(len(examples), heldout_fraction, rng)
        if len(train) < n_workers * max(1, min_size if partition == "dirichlet" else 1):
            raise DataError(
                f"domain {domain!r} has {len(train)} training examples after the held-out split, "
                f"too few for {n_workers} workers; lower its workers or heldout_fraction"
            )
        if partition == "iid":
            parts = iid(len(train), n_workers, rng)
        else:
            labels = np.array([subtopic(examples[i]) for i in train])
            parts = dirichlet(labels, n_workers, dirichlet_alpha, rng, min_size=min_size)
        out[domain] = DomainSplit(
            domain, [[examples[train[i]] for i in p] for p in parts], [examples[i] for i in held]
        )
    return out


# --------------------------------------------------------------------------------- tokenisation

TemplateName = Literal["auto", "chat", "plain"]


def user_message(example: Instruction) -> str:
    """The user's turn: the instruction, then the input (if any) after a blank line."""
    return example.instruction if not example.input.strip() else f"{example.instruction}\n\n{example.input}"


def plain_prompt(example: Instruction) -> str:
    """The plain (template-free) prompt: ``### Instruction`` / ``### Input`` / ``### Response``."""
    text = f"### Instruction:\n{example.instruction}\n\n"
    if example.input.strip():
        text += f"### Input:\n{example.input}\n\n"
    return text + "### Response:\n"


def _uses_chat(tokenizer: Any, template: TemplateName) -> bool:
    if template not in ("auto", "chat", "plain"):
        raise DataError(f"template={template!r} is unknown; use 'auto', 'chat' or 'plain'")
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise DataError("template='chat' but the tokenizer has no chat_template; use 'auto' or 'plain'")
    return has if template == "auto" else template == "chat"


def encode_example(
    tokenizer: Any, example: Instruction, max_length: int = 512, template: TemplateName = "auto",
    long: Literal["cut", "drop"] = "cut",
) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` of one example, labels -100 on the prompt. Longer than ``max_length``:
    ``cut`` drops response tokens from the end (the end-of-turn token with them, so a model trained
    on many cut responses learns not to stop), ``drop`` leaves the example out (None). None also
    when the prompt leaves no room for a response token."""
    if _uses_chat(tokenizer, template):
        user = [{"role": "user", "content": user_message(example)}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": example.output}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template does not render the prompt as a prefix of the conversation; "
                "use template='plain'"
            )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(plain_prompt(example), add_special_tokens=True)["input_ids"]
        if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id is not None:
            prompt_ids = prompt_ids[:-1]  # tokenizers that append EOS to every text
        response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1 or not response_ids or (long == "drop" and len(response_ids) > room):
        return None
    response_ids = response_ids[:room]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)


def response_batches(batches: Iterable[tuple[dict, Any]], empty: str) -> Iterator[tuple[dict, Any, int]]:
    """``(inputs, labels, response tokens)`` of ``batches`` without end (re-iterated when exhausted),
    skipping batches with no response token; a whole pass without one is a :class:`DataError`
    saying ``empty``."""
    while True:
        stepped = False
        for inputs, labels in batches:
            n = int((labels != IGNORE_INDEX).sum())
            if n:
                stepped = True
                yield inputs, labels, n
        if not stepped:
            raise DataError(empty)


class InstructionDataset(Dataset):
    """Tokenised instruction examples, served as right-padded batches.

    ``__getitems__`` returns ``(dict(input_ids, attention_mask), labels)`` for a whole batch, padded
    to the batch's longest sequence (pad id in ``input_ids``, 0 in the mask, -100 in ``labels``);
    use it with :func:`fedmoe.data.federated.batch_collate`. ``dropped`` counts the examples whose
    prompt left no room for a response within ``max_length``.
    """

    def __init__(self, sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, dropped: int = 0) -> None:
        self.sequences = [(torch.tensor(i, dtype=torch.long), torch.tensor(y, dtype=torch.long)) for i, y in sequences]
        self.pad_id = int(pad_id)
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = self.__getitems__([i])
        return {k: v[0] for k, v in x.items()}, y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = [self.sequences[int(i)] for i in indices]
        width = max((len(ids) for ids, _ in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, : len(x)], mask[r, : len(x)], labels[r, : len(y)] = x, 1, y
        return {"input_ids": ids, "attention_mask": mask}, labels

    @property
    def num_response_tokens(self) -> int:
        """Tokens the loss is computed on (labels other than -100)."""
        return int(sum((y != IGNORE_INDEX).sum() for _, y in self.sequences))


def tokenize_instructions(
    examples: Sequence[Instruction], tokenizer: Any, max_length: int = 512, template: TemplateName = "auto",
    long: Literal["cut", "drop"] = "cut",
) -> InstructionDataset:
    """An :class:`InstructionDataset` of the examples (:func:`encode_example` each, ``long`` saying
    what becomes of one longer than ``max_length``); padding uses the tokenizer's pad id (else EOS).
    No example left is a :class:`DataError`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    if long not in ("cut", "drop"):
        raise DataError(f"long={long!r} is unknown; use cut or drop")
    encoded = [encode_example(tokenizer, ex, max_length, template, long) for ex in examples]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise DataError(
            f"none of {len(examples)} instruction examples fits max_length={max_length} with a response token; "
            "raise max_length"
        )
    return InstructionDataset(kept, pad, dropped=len(encoded) - len(kept))
