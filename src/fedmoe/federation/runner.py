"""Local training, prediction and evaluation of LightningModules, driven with Lightning Fabric.

A federated round trains many small clients. Building a Trainer per client costs more than a
client's training on small data, so the engine drives the LightningModule's ``training_step`` and
``configure_optimizers`` with one Fabric per process: devices, precision and gradient clipping come
from the ``trainer:`` section of the config, and a round costs about what a bare PyTorch loop
costs (benchmarks/round_overhead.py).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import nn

log = logging.getLogger(__name__)

Regularizer = Callable[[nn.Module], torch.Tensor]


@dataclass
class FitOutput:
    """What one local fit returns."""

    loss: float
    steps: int
    optimizer_state: dict | None


@dataclass
class RunnerSettings:
    """The ``trainer:`` settings that local training honours."""

    accelerator: str = "cpu"
    devices: Any = 1
    precision: Any = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    limit_train_batches: int | float | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"

    @classmethod
    def from_trainer_config(cls, cfg: dict[str, Any]) -> "RunnerSettings":
        """Read the honoured keys of a Lightning ``Trainer`` config; ``None`` means the default."""
        kw = {}
        for name in cls.__dataclass_fields__:
            value = cfg.get(name)
            if value is not None:
                kw[name] = value
        if kw.get("accelerator") == "auto":
            kw["accelerator"] = "cuda" if torch.cuda.is_available() else "cpu"
        if kw.get("devices") == "auto":
            kw["devices"] = 1
        if kw.get("max_epochs", 1) < 0:
            kw["max_epochs"] = 1
        if cfg.get("strategy") not in (None, "auto") or (cfg.get("num_nodes") or 1) != 1:
            log.warning(
                "trainer.strategy=%r / num_nodes=%r are not used: clients train on one device each",
                cfg.get("strategy"), cfg.get("num_nodes"),
            )
        return cls(**kw)


class LocalRunner:
    """Fits, predicts and evaluates modules on one device with one reusable Fabric."""

    def __init__(self, settings: RunnerSettings | None = None) -> None:
        self.settings = settings or RunnerSettings()
        s = self.settings
        self.fabric = Fabric(accelerator=s.accelerator, devices=s.devices, precision=s.precision)

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
        that a caller can keep it (persistent client optimizers, the server gate).
        """
        s = self.settings
        epochs = s.max_epochs if epochs is None else epochs
        limit = _batch_limit(s.limit_train_batches, loader)
        if hasattr(module, "planned_steps"):
            module.planned_steps = _planned_steps(loader, limit, epochs, s)
        optimizer, scheduler, interval = _unpack_optimizers(module.configure_optimizers())
        if optimizer_state is not None:
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        model, opt = self.fabric.setup(module, optimizer)
        model.train()
        accumulate = max(1, int(s.accumulate_grad_batches))
        total, count, steps = 0.0, 0, 0
        done = False
        for _ in range(epochs):
            for i, batch in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                batch = self.fabric.to_device(batch)
                with self.fabric.autocast():
                    loss = model.training_step(batch, i)
                    if regularizer is not None:
                        loss = loss + regularizer(module)
                self.fabric.backward(loss / accumulate)
                total += float(loss.detach())
                count += 1
                if (i + 1) % accumulate == 0:
                    self._step(model, opt)
                    steps += 1
                    if scheduler is not None and interval == "step":
                        scheduler.step()
                    if 0 < s.max_steps <= steps:
                        done = True
                        break
            if count % accumulate:
                self._step(model, opt)
                steps += 1
            if scheduler is not None and interval == "epoch":
                scheduler.step()
            if done:
                break
        state = copy.deepcopy(optimizer.state_dict()) if return_optimizer_state else None
        return FitOutput(loss=total / max(count, 1) if count else math.nan, steps=steps, optimizer_state=state)

    def _step(self, model, opt) -> None:
        s = self.settings
        if s.gradient_clip_val:
            if s.gradient_clip_algorithm == "value":
                self.fabric.clip_gradients(model, opt, clip_val=s.gradient_clip_val, error_if_nonfinite=False)
            else:
                self.fabric.clip_gradients(model, opt, max_norm=s.gradient_clip_val, error_if_nonfinite=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

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
