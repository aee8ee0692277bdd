"""Client plans and results as Flower records (``RecordDict`` of ``ArrayRecord``/``ConfigRecord``/
``MetricRecord``), and back, without loss.

Tensors travel as NumPy arrays in their own dtype (bfloat16 as its raw 16-bit pattern), so a round
trip is bit-exact. A plan's regulariser (FedProx's proximal term, HetLoRA's tail penalty) travels
as a restricted pickle: its tensors are references to the plan's weights (the proximal anchor is
not sent twice) or arrays of their own, and the client unpickles only fedmoe classes and plain
containers, never arbitrary code.
"""

from __future__ import annotations

import builtins
import copyreg
import io
import pickle
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmoe.algorithms.base import ClientPlan, ClientResult, StateDict

WEIGHTS = "weights"
KEPT = "kept"
REGULARIZER_TENSORS = "regularizer-tensors"
TASK = "task"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
_BF16 = "bfloat16"


def state_to_record(state: StateDict) -> ArrayRecord:
    """A state dict as an ArrayRecord, key by key, exact (bfloat16 as its raw bits)."""
    record = ArrayRecord()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            buf = io.BytesIO()
            np.save(buf, t.view(torch.int16).numpy(), allow_pickle=False)
            record[key] = Array(dtype=_BF16, shape=tuple(t.shape), stype="numpy.ndarray", data=buf.getvalue())
        else:
            record[key] = Array(t.numpy())
    return record


def record_to_state(record: ArrayRecord) -> StateDict:
    """The state dict of an ArrayRecord written by :func:`state_to_record` (writable tensors)."""
    out: StateDict = {}
    for key, array in record.items():
        data = np.load(io.BytesIO(array.data), allow_pickle=False)
        tensor = torch.from_numpy(np.array(data, copy=True))
        out[key] = tensor.view(torch.bfloat16) if array.dtype == _BF16 else tensor
    return out


# -- regularisers ------------------------------------------------------------------------------------

_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "object", "tuple", "list", "dict", "range"}
_SAFE_COPYREG = {"_reconstructor", "__newobj__", "__newobj_ex__"}


class _RefPickler(pickle.Pickler):
    """Pickles tensors as references: to the plan's weights when they are the same object, else to
    arrays of their own."""

    def __init__(self, file, weights: StateDict) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._by_id = {id(t): k for k, t in weights.items()}
        self.extra: dict[str, torch.Tensor] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            key = self._by_id.get(id(obj))
            if key is not None:
                return ("weights", key)
            name = str(len(self.extra))
            self.extra[name] = obj
            return ("extra", name)
        return None


class _RefUnpickler(pickle.Unpickler):
    """Resolves tensor references and admits only fedmoe classes and plain containers."""

    def __init__(self, file, weights: StateDict, extra: StateDict) -> None:
        super().__init__(file)
        self._tables = {"weights": weights, "extra": extra}

    def persistent_load(self, pid: Any) -> Any:
        table, key = pid
        return self._tables[table][key]

    def find_class(self, module: str, name: str) -> Any:
        if module == "fedmoe" or module.startswith("fedmoe."):
            return super().find_class(module, name)
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "copyreg" and name in _SAFE_COPYREG:
            return getattr(copyreg, name)
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a client plan may not carry {module}.{name}")


def dump_object(obj: Any, weights: StateDict) -> tuple[bytes, StateDict]:
    """``obj`` as restricted-pickle bytes plus the tensors it holds that are not in ``weights``."""
    buf = io.BytesIO()
    pickler = _RefPickler(buf, weights)
    pickler.dump(obj)
    return buf.getvalue(), pickler.extra


def load_object(data: bytes, weights: StateDict, extra: StateDict) -> Any:
    """The object of :func:`dump_object`, its tensor references resolved against ``weights``/``extra``."""
    return _RefUnpickler(io.BytesIO(data), weights, extra).load()


# -- plans and results ------------------------------------------------------------------------------


def plan_to_content(
    plan: ClientPlan, client_id: int, server_round: int, seed: int, keep_optimizer: bool = False
) -> RecordDict:
    """What a sampled client receives: its weights, the regulariser, the keys to upload and keep,
    the options, and (client id, round, seed), from which it draws its random numbers."""
    task = ConfigRecord({"client-id": int(client_id), "round": int(server_round), "seed": int(seed),
                         "keep-optimizer": bool(keep_optimizer)})
    content = RecordDict({WEIGHTS: state_to_record(plan.weights), TASK: task})
    if plan.upload_keys is not None:
        task["upload-keys"] = sorted(plan.upload_keys)
    if plan.keep_keys:
        task["keep-keys"] = sorted(plan.keep_keys)
    if plan.regularizer is not None or plan.options:
        data, extra = dump_object({"regularizer": plan.regularizer, "options": plan.options}, plan.weights)
        task["plan-objects"] = data
        if extra:
            content[REGULARIZER_TENSORS] = state_to_record(extra)
    return content


def content_to_plan(content: RecordDict) -> tuple[ClientPlan, dict[str, Any]]:
    """The plan of :func:`plan_to_content` and its task fields (``client-id``, ``round``, ``seed``,
    ``keep-optimizer``)."""
    task = dict(content[TASK])
    weights = record_to_state(content[WEIGHTS])
    objects: dict[str, Any] = {"regularizer": None, "options": {}}
    if "plan-objects" in task:
        extra = record_to_state(content[REGULARIZER_TENSORS]) if REGULARIZER_TENSORS in content else {}
        objects = load_object(task["plan-objects"], weights, extra)
    upload = task.get("upload-keys")
    plan = ClientPlan(
        weights=weights,
        regularizer=objects["regularizer"],
        options=dict(objects["options"]),
        upload_keys=frozenset(upload) if upload is not None else None,
        keep_keys=frozenset(task.get("keep-keys", [])),
    )
    return plan, task


def result_to_content(result: ClientResult) -> RecordDict:
    """A client's reply: its upload, what it keeps (the server's bookkeeping of personal state, as
    the engine's), and its sample count and training metrics."""
    metrics = MetricRecord({NUM_EXAMPLES: int(result.num_samples), "client-id": int(result.client_id),
                            "base-version": int(result.base_version)})
    for key, value in result.metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"train/{key}"] = float(value)
    content = RecordDict({WEIGHTS: state_to_record(result.weights), METRICS: metrics})
    if result.kept:
        content[KEPT] = state_to_record(result.kept)
    return content


def content_to_result(content: RecordDict) -> ClientResult:
    """The :class:`ClientResult` of :func:`result_to_content`."""
    metrics = content[METRICS]
    train = {k[len("train/"):]: float(v) for k, v in metrics.items() if k.startswith("train/")}
    return ClientResult(
        client_id=int(metrics["client-id"]),
        num_samples=int(metrics[NUM_EXAMPLES]),
        weights=record_to_state(content[WEIGHTS]),
        metrics=train,
        base_version=int(metrics.get("base-version", 0)),
        kept=record_to_state(content[KEPT]) if KEPT in content else {},
    )
