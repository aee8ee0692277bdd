"""Local training, prediction and evaluation of LightningModules, driven with Lightning Fabric.

A federated round trains many small clients. Building a Trainer per client costs more than a
client's training on small data, so the engine drives the LightningModule's ``training_step`` and
``configure_optimizers`` with one Fabric per process: devices, precision and gradient clipping come
from the ``trainer:`` section of the config, and a round costs about what a bare PyTorch loop
costs (benchmarks/round_overhead.py).

A client whose model needs several devices trains through the Lightning strategy named in
``trainer.strategy`` (``ddp``, ``fsdp``, ``deepspeed``) on ``trainer.devices``: each local fit starts
one process per device (:mod:`fedmoe.federation.multidevice`); the rest of the round stays here.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import nn

from fedmoe.errors import ConfigError
from fedmoe.validation import check_choice, check_float, check_int

log = logging.getLogger(__name__)

Regularizer = Callable[[nn.Module], torch.Tensor]


@dataclass
class FitOutput:
    """What one local fit returns."""

    loss: float
    steps: int
    optimizer_state: dict | None


#: ``trainer:`` keys of Lightning's Trainer that have no effect in a federated run, with what to use
#: instead. A config that sets one of them (to other than Lightning's default) is refused.
NOT_IN_FEDERATED_RUNS: dict[str, str] = {
    "num_nodes": "a client trains on the devices of one machine (trainer.strategy with trainer.devices); "
                 "clients in parallel are federation.executor's job",
    "callbacks": "local training drives the module's training_step with Fabric, without Trainer callbacks; "
                 "put per-step logic in training_step",
    "min_epochs": "use trainer.max_epochs (local epochs per round)",
    "min_steps": "use trainer.max_steps",
    "max_time": "bound local training with trainer.max_steps or max_epochs, and the run with federation.rounds",
    "limit_val_batches": "the server sets are evaluated whole; evaluate less often with federation.eval_every",
    "limit_test_batches": "the server sets are evaluated whole; evaluate less often with federation.eval_every",
    "limit_predict_batches": "the server sets are evaluated whole; evaluate less often with federation.eval_every",
    "overfit_batches": "use trainer.limit_train_batches",
    "val_check_interval": "the server model is evaluated after rounds: use federation.eval_every",
    "check_val_every_n_epoch": "the server model is evaluated after rounds: use federation.eval_every",
    "num_sanity_val_steps": "there is no sanity check; trainer.fast_dev_run makes a one-round smoke run",
    "enable_checkpointing": "checkpoints/last.ckpt is the run's record; save less often with federation.checkpoint_every",
    "enable_model_summary": "no model summary is printed",
    "inference_mode": "evaluation always runs without gradients",
    "use_distributed_sampler": "with trainer.strategy ddp, local training splits each batch of the client's "
                               "loader across trainer.devices itself",
    "profiler": "wrap the run in torch.profiler, or see benchmarks/round_overhead.py",
    "barebones": "use trainer.logger false and trainer.enable_progress_bar false",
    "plugins": "use trainer.accelerator and trainer.precision",
    "sync_batchnorm": "BatchNorm statistics are each device's own under trainer.strategy (SyncBatchNorm is not applied)",
    "reload_dataloaders_every_n_epochs": "client loaders are built afresh for every local fit",
    "enable_autolog_hparams": "the resolved config is saved as config.yaml in the run folder",
    "model_registry": "checkpoints live in the run folder (trainer.default_root_dir)",
    "weights_only": "fedmoe checkpoints are read in full",
}

#: Lightning's defaults of the keys above (a full Trainer config that leaves them alone is accepted).
_LIGHTNING_DEFAULTS: dict[str, Any] = {
    "num_nodes": 1, "overfit_batches": 0.0, "check_val_every_n_epoch": 1,
    "inference_mode": True, "use_distributed_sampler": True, "barebones": False, "sync_batchnorm": False,
    "reload_dataloaders_every_n_epochs": 0, "enable_autolog_hparams": True,
}
#: Values of refused keys that describe what a federated run does anyway.
_SAME_AS_FEDERATED: dict[str, tuple[Any, ...]] = {"enable_checkpointing": (True,), "enable_model_summary": (False,)}

_PRECISIONS = ("16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true",
               "16", "bf16", "32", "64", "transformer-engine", "transformer-engine-float16")


def no_effect_message(key: str) -> str:
    """One line saying that ``trainer.<key>`` has no effect in federated runs, and what to use instead."""
    return f"trainer.{key} has no effect in federated runs: {NOT_IN_FEDERATED_RUNS[key]}"


def _is_lightning_default(key: str, value: Any) -> bool:
    return value == _LIGHTNING_DEFAULTS.get(key) or value is None or value in _SAME_AS_FEDERATED.get(key, ())


def available_accelerators() -> list[str]:
    """Accelerators local training can use on this machine."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append(f"cuda ({torch.cuda.device_count()} devices)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


@dataclass
class RunnerSettings:
    """The ``trainer:`` settings: what local training honours, and the run-level switches that
    Lightning users expect from a Trainer (``fast_dev_run``, ``logger``, ``enable_progress_bar``,
    ``log_every_n_steps``), read by the federated loop."""

    accelerator: str = "cpu"
    devices: Any = 1
    """1 (or ``[k]``: device k); with a ``strategy``, the processes of one client's training: a count
    (CPU processes, or the first GPUs) or a list of GPU ids."""
    strategy: str = "auto"
    """``auto``: each client on one device; ``ddp``, ``fsdp``, ``deepspeed`` (Lightning's strategies):
    each local fit on ``devices`` devices, the client's batches split across them."""
    precision: Any = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    limit_train_batches: int | float | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    deterministic: bool | str | None = None
    benchmark: bool | None = None
    detect_anomaly: bool = False
    fast_dev_run: int = 0
    """> 0: a smoke run of one round whose local fits stop after this many batches; nothing is saved."""
    logger: bool = True
    """False: no TensorBoard events (metrics.csv and summary.json are still written)."""
    enable_progress_bar: bool = True
    log_every_n_steps: int = 1
    """Write TensorBoard scalars every this many rounds (and at the last); metrics.csv has every round."""

    @classmethod
    def from_trainer_config(cls, cfg: dict[str, Any]) -> "RunnerSettings":
        """Settings from a ``trainer:`` config; ``None`` means the default.

        A key of Lightning's Trainer that has no effect here, set to other than its default, is a
        :class:`ConfigError` saying what to use instead; so is a value out of its range, an
        accelerator this machine lacks, or more than one device.
        """
        honoured = set(cls.__dataclass_fields__) | {"default_root_dir"}
        refused = [k for k, v in cfg.items() if k not in honoured and not _is_lightning_default(k, v)]
        if refused:
            unknown = [k for k in refused if k not in NOT_IN_FEDERATED_RUNS]
            if unknown:
                raise ConfigError(f"trainer.{unknown[0]} is not a trainer setting; see fit --help for the trainer: keys")
            also = f" (also {', '.join('trainer.' + k for k in refused[1:])})" if len(refused) > 1 else ""
            raise ConfigError(no_effect_message(refused[0]) + also)
        kw: dict[str, Any] = {k: cfg[k] for k in cls.__dataclass_fields__ if cfg.get(k) is not None}
        kw["accelerator"] = _accelerator(kw.get("accelerator", "cpu"))
        kw["strategy"] = _strategy(kw.get("strategy", "auto"), kw["accelerator"])
        if kw["strategy"] == "auto":
            kw["devices"] = _devices(kw.get("devices", 1), kw["accelerator"])
        else:
            kw["devices"] = _strategy_devices(kw.get("devices", 1), kw["accelerator"], kw["strategy"])
        if "precision" in kw:
            kw["precision"] = _precision(kw["precision"])
        check_int("trainer.max_epochs", kw.get("max_epochs", 1), 1,
                  hint="local epochs per round; bound local training by steps with trainer.max_steps")
        steps = kw.get("max_steps", -1)
        check_int("trainer.max_steps", steps, -1)
        if steps == 0:
            raise ConfigError("trainer.max_steps=0 would train nothing: use -1 (no limit) or a number >= 1")
        limit = kw.get("limit_train_batches")
        if isinstance(limit, float):
            check_float("trainer.limit_train_batches", limit, 0.0, 1.0, low_open=True,
                        hint="a fraction of each client's batches, or an integer count")
        elif limit is not None:
            check_int("trainer.limit_train_batches", limit, 1)
        check_int("trainer.accumulate_grad_batches", kw.get("accumulate_grad_batches", 1), 1)
        if kw.get("gradient_clip_val") is not None:
            check_float("trainer.gradient_clip_val", kw["gradient_clip_val"], 0.0)
        check_choice("trainer.gradient_clip_algorithm", kw.get("gradient_clip_algorithm", "norm"), ("norm", "value"))
        check_choice("trainer.deterministic", kw.get("deterministic"), (None, True, False, "warn"))
        fast = kw.get("fast_dev_run", 0)
        if isinstance(fast, bool):
            fast = kw["fast_dev_run"] = int(fast)
        check_int("trainer.fast_dev_run", fast, 0, hint="true, false, or the batches per local fit of a smoke run")
        if fast:
            kw.update(max_epochs=1, limit_train_batches=fast)
        if cfg.get("logger") not in (None, True, False):
            raise ConfigError(
                f"trainer.logger={cfg['logger']!r} is not supported: the run writes TensorBoard events and "
                "metrics.csv itself; use true (default) or false (no TensorBoard events)"
            )
        check_int("trainer.log_every_n_steps", kw.get("log_every_n_steps", 1), 1, hint="rounds between TensorBoard writes")
        return cls(**kw)

    @property
    def world_size(self) -> int:
        """Processes of one local fit: 1 unless a ``strategy`` spreads it over several devices."""
        if self.strategy == "auto":
            return 1
        return self.devices if isinstance(self.devices, int) else len(self.devices)

    @property
    def distributed(self) -> bool:
        """Whether each local fit runs in ``world_size`` > 1 processes."""
        return self.world_size > 1

    def apply_torch_flags(self) -> None:
        """Process-wide torch switches of ``deterministic``, ``benchmark`` and ``detect_anomaly``, as
        Lightning's Trainer sets them."""
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=self.deterministic == "warn")
        elif self.deterministic is False:
            torch.use_deterministic_algorithms(False)
        if self.benchmark is not None:
            torch.backends.cudnn.benchmark = self.benchmark
        elif self.deterministic:
            torch.backends.cudnn.benchmark = False
        if self.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)


def _accelerator(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"trainer.accelerator={value!r} is not supported: use cpu, gpu (cuda), mps or auto")
    name = value.lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={value} but this machine has no CUDA GPU; available: "
                f"{', '.join(available_accelerators())} (use --trainer.accelerator cpu or auto)"
            )
        return "cuda"
    if name == "mps":
        if "mps" not in available_accelerators():
            raise ConfigError(f"trainer.accelerator=mps is not available here; available: {', '.join(available_accelerators())}")
        return "mps"
    if name == "cpu":
        return "cpu"
    raise ConfigError(
        f"trainer.accelerator={value!r} is not supported by local training; use cpu, gpu (cuda), mps or auto "
        f"(available here: {', '.join(available_accelerators())})"
    )


_MULTI_DEVICE = (
    "local training runs each client on one device unless trainer.strategy names a multi-device strategy: "
    "set trainer.strategy ddp (or fsdp, deepspeed) to train each client on these devices, or use "
    "trainer.devices 1, or [k] to pick device k (clients side by side on several devices are "
    "federation.executor's job)"
)
#: Lightning strategies that train one client on several devices, with what they need.
MULTI_DEVICE_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "fsdp", "fsdp_cpu_offload", "deepspeed",
                           "deepspeed_stage_1", "deepspeed_stage_1_offload", "deepspeed_stage_2",
                           "deepspeed_stage_2_offload")
_OTHER_STRATEGIES = {
    "ddp_spawn": "local training starts the client's processes itself: use trainer.strategy ddp",
    "ddp_fork": "local training starts the client's processes itself: use trainer.strategy ddp",
    "ddp_notebook": "local training starts the client's processes itself: use trainer.strategy ddp",
    "dp": "DataParallel is not supported (Lightning deprecates it): use trainer.strategy ddp",
    "deepspeed_stage_3": "ZeRO stage 3 partitions the weights that a client must upload: use fsdp, or deepspeed_stage_2",
    "deepspeed_stage_3_offload": "ZeRO stage 3 partitions the weights that a client must upload: use fsdp, or "
                                 "deepspeed_stage_2_offload",
    "deepspeed_stage_3_offload_nvme": "ZeRO stage 3 partitions the weights that a client must upload: use fsdp",
}


def _strategy(value: Any, accelerator: str) -> str:
    """``auto``, or a Lightning strategy that trains one client on several devices and can run here."""
    if value is None:
        return "auto"
    if not isinstance(value, str):
        raise ConfigError(f"trainer.strategy={value!r} is not supported: use auto, ddp, fsdp or deepspeed")
    name = value.lower()
    if name in ("auto", "single_device"):
        return "auto"
    if name in _OTHER_STRATEGIES:
        raise ConfigError(f"trainer.strategy={value} is not supported by local training: {_OTHER_STRATEGIES[name]}")
    if name not in MULTI_DEVICE_STRATEGIES:
        from lightning.fabric.strategies import STRATEGY_REGISTRY

        known = "is not supported by local training" if name in STRATEGY_REGISTRY else "is not a Lightning strategy"
        raise ConfigError(f"trainer.strategy={value!r} {known}: use auto (one device per client), ddp, fsdp or deepspeed")
    if accelerator == "mps":
        raise ConfigError(f"trainer.strategy={value}: Lightning's multi-device strategies do not run on MPS; "
                          "use trainer.strategy auto, or trainer.accelerator cpu")
    if name.startswith("fsdp") and accelerator != "cuda":
        raise ConfigError(f"trainer.strategy={value} needs GPUs (Lightning's FSDP runs on CUDA only) but "
                          f"trainer.accelerator is {accelerator}: use trainer.strategy ddp, or trainer.accelerator gpu")
    if name.startswith("deepspeed"):
        from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE

        if not _DEEPSPEED_AVAILABLE:
            raise ConfigError(f"trainer.strategy={value} needs the deepspeed package, which is not installed here: "
                              "pip install deepspeed, or use trainer.strategy ddp or fsdp")
    return name


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _strategy_devices(value: Any, accelerator: str, strategy: str) -> int | list[int]:
    """The devices of one client's training under a multi-device ``strategy``: on the CPU a number
    of processes (at most the cores), on GPUs a list of existing, distinct device ids."""
    key = f"trainer.devices={value!r}"
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":  # Lightning's meaning: one CPU process, or every GPU
            value = 1 if accelerator == "cpu" else -1
        elif text == "-1":
            value = -1
        elif text.isdigit():
            value = int(text)
        elif all(part.strip().isdigit() for part in text.rstrip(",").split(",")):
            value = [int(part) for part in text.rstrip(",").split(",")]
    if accelerator == "cpu":
        cores = cpu_cores()
        if value == -1:
            return cores
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: on the CPU, trainer.devices is the number of processes of one client's "
                              f"training under trainer.strategy {strategy} (an integer >= 1)")
        if value > cores:
            raise ConfigError(f"{key}: {value} CPU processes but this machine has {cores} cores; "
                              f"use trainer.devices {cores} or fewer")
        return value
    count = torch.cuda.device_count() if accelerator == "cuda" else 1
    if value == -1:
        value = list(range(count))
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        if value > count:
            raise ConfigError(f"{key}: {value} {accelerator} devices but this machine has {count}; "
                              f"use trainer.devices {count} or fewer, or a list of device ids")
        value = list(range(value))
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise ConfigError(f"{key}: use a number of devices or a list of {accelerator} device ids, e.g. [0, 1]")
    missing = [i for i in value if not 0 <= i < count]
    if missing:
        raise ConfigError(f"{key}: no {accelerator} device {missing[0]} (this machine has {count}: ids 0..{count - 1})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key} names a device twice: one process per device")
    return list(value)


def check_executor_strategy(settings: RunnerSettings, executor: Any) -> None:
    """Refuse a multi-device ``trainer.strategy`` with an executor that does not train clients
    through :meth:`LocalRunner.fit` (executors that do say so with ``multi_device_clients = True``)."""
    if not settings.distributed or getattr(executor, "multi_device_clients", False):
        return
    from fedmoe.executors import EXECUTORS

    path = f"{type(executor).__module__}:{type(executor).__name__}"
    name = next((k for k, v in EXECUTORS.items() if v == path), type(executor).__name__)
    raise ConfigError(
        f"trainer.strategy={settings.strategy} trains each client on {settings.world_size} devices, which "
        f"federation.executor {name} cannot do; use federation.executor sequential, or trainer.strategy auto "
        "with trainer.devices 1"
    )


def _devices(value: Any, accelerator: str) -> Any:
    """1, or a one-element list/"k," naming the device; anything meaning several devices is refused."""
    if value in ("auto", 1, "1"):
        return 1
    index = None
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], int):
        index = value[0]
    elif isinstance(value, str) and value.strip().endswith(",") and value.strip()[:-1].strip().isdigit():
        index = int(value.strip()[:-1])
    if index is None:
        raise ConfigError(f"trainer.devices={value!r}: {_MULTI_DEVICE}")
    if accelerator == "cpu":
        if index != 0:
            raise ConfigError(f"trainer.devices={value!r}: the CPU is one device; use trainer.devices 1")
        return 1
    count = torch.cuda.device_count() if accelerator == "cuda" else 1
    if not 0 <= index < count:
        raise ConfigError(f"trainer.devices={value!r}: no {accelerator} device {index} (this machine has {count})")
    return [index]


def _precision(value: Any) -> Any:
    if str(value) not in _PRECISIONS:
        raise ConfigError(f"trainer.precision={value!r} is not a precision: use one of {', '.join(_PRECISIONS[:6])}")
    return value


class LocalRunner:
    """Fits, predicts and evaluates modules on one device with one reusable Fabric.

    Args:
        settings: the ``trainer:`` settings.
        distribute_fits: under a multi-device ``trainer.strategy``, run each fit on all of
            ``trainer.devices`` (clients' local training); otherwise, and for prediction and
            evaluation, the first of them (server-side training stays in this process).
    """

    def __init__(self, settings: RunnerSettings | None = None, distribute_fits: bool = False) -> None:
        self.settings = settings or RunnerSettings()
        self.distribute_fits = distribute_fits
        s = self.settings
        s.apply_torch_flags()
        devices = s.devices
        if s.strategy != "auto":  # prediction and evaluation on the first device of the fits
            devices = 1 if s.accelerator == "cpu" else [s.devices[0] if isinstance(s.devices, list) else 0]
        self.fabric = Fabric(accelerator=s.accelerator, devices=devices, precision=s.precision)

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def fit(
        self,
        module: nn.Module,
        loader: Iterable,
        epochs: int | None = None,
        regularizer: Regularizer | None = None,
        optimizer_state: dict | None = None,
        return_optimizer_state: bool = True,
    ) -> FitOutput:
        """Train ``module`` with its own ``training_step`` and ``configure_optimizers``.

        Optimizer state is fresh unless ``optimizer_state`` is given (it is copied, never
        modified); with ``return_optimizer_state`` a copy of the state after training is returned so
        that a caller can keep it (persistent client optimizers, the server gate). With
        ``distribute_fits`` under a multi-device strategy the fit runs in processes started for it,
        and ``module`` receives the trained weights (:func:`fedmoe.federation.multidevice.fit_on_devices`).
        """
        s = self.settings
        epochs = s.max_epochs if epochs is None else epochs
        if self.distribute_fits and s.distributed:
            from fedmoe.federation.multidevice import fit_on_devices

            return fit_on_devices(module, loader, s, epochs, regularizer, optimizer_state, return_optimizer_state)
        trained = train_module(self.fabric, module, loader, s, epochs, regularizer, optimizer_state)
        state = copy.deepcopy(trained.optimizer.state_dict()) if return_optimizer_state else None
        return FitOutput(loss=trained.mean_loss, steps=trained.steps, optimizer_state=state)

    @torch.no_grad()
    def predict(self, module: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets over a loader, in eval mode, on the CPU, in loader order."""
        was_training = module.training
        module.to(self.device)
        module.eval()
        logits, targets = [], []
        with self.fabric.autocast():
            for x, y in loader:
                x = self.fabric.to_device(x)
                logits.append(module(x).float().cpu())
                targets.append(y)
        module.train(was_training)
        if not logits:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(logits), torch.cat(targets)

    def evaluate(
        self,
        module: nn.Module,
        loader: Iterable,
        metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
    ) -> dict[str, float]:
        """``metrics(outputs, targets)`` of a model over a loader (default: cross-entropy and
        accuracy), with the number of samples ``n``; NaN metrics when the loader is empty."""
        logits, y = self.predict(module, loader)
        if len(y) == 0:
            return {"loss": math.nan, "acc": math.nan, "n": 0}
        if metrics is None:
            out = {"loss": F.cross_entropy(logits, y).item(), "acc": (logits.argmax(1) == y).float().mean().item()}
        else:
            out = dict(metrics(logits, y))
        out["n"] = len(y)
        return out


@dataclass
class Trained:
    """What :func:`train_module` leaves: the summed batch losses, batches, optimizer steps, and the
    Fabric-wrapped model and optimizer."""

    total: float
    count: int
    steps: int
    model: Any
    optimizer: torch.optim.Optimizer

    @property
    def mean_loss(self) -> float:
        return self.total / self.count if self.count else math.nan


Split = Callable[[Any], tuple[Any, "float | None"]]


def train_module(
    fabric: Fabric,
    module: nn.Module,
    loader: Iterable,
    settings: RunnerSettings,
    epochs: int,
    regularizer: Regularizer | None = None,
    optimizer_state: dict | None = None,
    split: Split | None = None,
) -> Trained:
    """The local training loop: ``epochs`` passes over ``loader`` through the module's
    ``training_step``, with the optimizer of ``configure_optimizers`` stepped every
    ``accumulate_grad_batches`` batches (and after an epoch's last batches).

    ``split`` (a process of a multi-device fit) maps a batch of the loader to this process's part
    and the weight of its loss, so that the processes' averaged gradients are those of the whole
    batch; the gradients of batches that do not step are then accumulated without synchronising.
    """
    s = settings
    limit = _batch_limit(s.limit_train_batches, loader)
    if hasattr(module, "planned_steps"):
        module.planned_steps = _planned_steps(loader, limit, epochs, s)
    optimizer, scheduler, interval = _unpack_optimizers(module.configure_optimizers())
    if optimizer_state is not None:
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    model, opt = fabric.setup(module, optimizer)
    model.train()
    accumulate = max(1, int(s.accumulate_grad_batches))
    batches = _num_batches(loader, limit)
    total, count, steps, pending = 0.0, 0, 0, 0
    done = False
    for _ in range(epochs):
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            weight = None
            if split is not None:
                batch, weight = split(batch)
            batch = fabric.to_device(batch)
            steps_now = (i + 1) % accumulate == 0
            sync = split is None or steps_now or batches is None or i + 1 == batches
            with nullcontext() if sync else fabric.no_backward_sync(model):
                with fabric.autocast():
                    loss = model.training_step(batch, i)
                    if weight is not None:
                        loss = loss * weight
                    if regularizer is not None:
                        loss = loss + regularizer(module)
                fabric.backward(loss / accumulate)
            total += float(loss.detach())
            count += 1
            pending += 1
            if steps_now:
                _step(fabric, model, opt, s)
                steps += 1
                pending = 0
                if scheduler is not None and interval == "step":
                    scheduler.step()
                if 0 < s.max_steps <= steps:
                    done = True
                    break
        if pending:
            _step(fabric, model, opt, s)
            steps += 1
            pending = 0
        if scheduler is not None and interval == "epoch":
            scheduler.step()
        if done:
            break
    return Trained(total, count, steps, model, optimizer)


def _step(fabric: Fabric, model, opt, s: RunnerSettings) -> None:
    if s.gradient_clip_val:
        if s.gradient_clip_algorithm == "value":
            fabric.clip_gradients(model, opt, clip_val=s.gradient_clip_val, error_if_nonfinite=False)
        else:
            fabric.clip_gradients(model, opt, max_norm=s.gradient_clip_val, error_if_nonfinite=False)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _num_batches(loader: Iterable, limit: int | None) -> int | None:
    """Batches of one epoch, None if the loader has no length."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    return batches if limit is None else min(batches, limit)


def _unpack_optimizers(conf: Any) -> tuple[torch.optim.Optimizer, Any, str]:
    """The optimizer, scheduler and its interval from a ``configure_optimizers`` return value."""
    if isinstance(conf, torch.optim.Optimizer):
        return conf, None, "epoch"
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        interval = "epoch"
        if isinstance(sched, dict):
            interval = sched.get("interval", "epoch")
            sched = sched["scheduler"]
        return conf["optimizer"], sched, interval
    if isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        opts, scheds = conf
        if len(opts) != 1:
            raise ValueError("local training supports one optimizer per module")
        return opts[0], (scheds[0] if scheds else None), "epoch"
    if isinstance(conf, (list, tuple)) and len(conf) == 1:
        return conf[0], None, "epoch"
    raise ValueError(f"unsupported configure_optimizers() return value: {type(conf).__name__}")


def _planned_steps(loader: Iterable, limit: int | None, epochs: int, s: RunnerSettings) -> int | None:
    """Optimizer steps a local fit will take (for learning-rate schedules), None if unknown."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    if limit is not None:
        batches = min(batches, limit)
    steps = epochs * math.ceil(batches / max(1, int(s.accumulate_grad_batches)))
    return min(steps, s.max_steps) if s.max_steps and s.max_steps > 0 else steps


def _batch_limit(limit: int | float | None, loader: Iterable) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, float):
        if limit >= 1.0:
            return None
        return max(1, int(limit * len(loader)))
    return int(limit)
