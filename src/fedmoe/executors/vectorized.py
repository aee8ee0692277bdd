"""A round's homogeneous clients trained as one batched model with ``torch.func``.

Every client's trainable parameters are stacked along a new leading dimension and one step of all
clients is one call of ``vmap(grad_and_value(loss))`` over ``functional_call`` of the shared network,
each client with its own batch. Each client's batches come from its own loader
(:meth:`FederatedDataModule.client_train_loader`), exactly the batches the sequential executor would
draw for it, and its optimizer state is its own: SGD (momentum, dampening, Nesterov, weight decay)
and Adam/AdamW update the stacked state in place following ``torch.optim``'s update rules, so
results match the sequential executor to float tolerance. On the CPU an update of clients at the
same step count is one pass of torch's fused kernel (``torch._fused_adam_``, ``_fused_adamw_``,
``_fused_sgd_``: what ``fused=True`` selects in ``torch.optim``) over each stacked tensor, with no
temporaries; elsewhere, and for clients at different step counts, foreach tensor ops.

On the CPU (``compute: loop``) nothing is gained by batching a compute-bound model, so clients train
one after another over their own batches, each on leaves that view its row of the stack (by default
a stack of one client, reused: ``chunk_size``); what the executor saves over the sequential one is per-client and per-step overhead: no Fabric set-up or
optimizer built per client, and the fused update instead of ``torch.optim``'s default per-tensor
loop on the CPU (for Adam seven passes and two temporaries per tensor, whose fresh pages cost page
faults).

On a GPU the clients' rows are copied to the device once (their data set's storage, shared by all
clients' views) and each batch is gathered and augmented there: the random draws still come from the
client's CPU generator in the sequential executor's order, so the batches are the same to float
rounding, and a round no longer waits for the CPU to augment every client's images.

Unequal clients. Clients are ordered by their number of local steps, longest first, so the clients
still training at global step ``t`` are a prefix of the stack and a step updates a slice (a view:
no copies); a client that has run out of batches is outside the slice, so its parameters and
optimizer state stay as they were, as if it had finished earlier. A batch shorter than the others
(the last of an epoch) is padded, and the padded rows get weight 0 in the client's mean loss.

What cannot be batched is refused with one line naming the reason (:class:`ConfigError`): BatchNorm
or other running statistics, dropout (one random stream cannot reproduce each client's own),
modules whose ``training_step`` or ``loss`` is not the :class:`Classifier`'s, plans whose weights
differ in keys or shapes (heterogeneous architectures), optimizers other than SGD/Adam/AdamW,
learning-rate schedules, gradient accumulation, precisions other than 32-bit, and per-client
regularizers other than one FedProx proximal term. Fed-MoE's clients batch like any others: each
starts from its own synced model (the plans' weights are stacked per client).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader

from fedmoe.algorithms.base import ClientResult, StateDict
from fedmoe.data.federated import ArrayDataset
from fedmoe.errors import ConfigError
from fedmoe.executors.base import ClientFailure, ClientOutcome, ClientTask, Executor
from fedmoe.federation.runner import LocalRunner, _batch_limit, _unpack_optimizers

log = logging.getLogger(__name__)

_PREFIX = "federation.executor vectorized"
_FULL_PRECISION = ("32-true", "32", 32)


class Vectorized(Executor):
    """Trains a round's clients together as one batched model (``torch.func.vmap``).

    Args:
        chunk_size: at most this many clients per batched model (memory grows with it); None: the
            whole round at once with ``vmap``, one client at a time with ``loop`` (which trains one
            client after another anyway: stacking more of them would only hold their weights and
            optimizer state in memory at once).
        compute: how a step's gradients are computed: ``vmap`` (all clients' step in one batched
            call and one optimizer update) or ``loop`` (one client after another, all its steps, with
            plain autograd on views of its rows of the stack; on a CPU, where a compute-bound model
            gains nothing from batching, vmap's grouped convolutions can be slower than one client
            at a time); None: ``vmap`` on a GPU, ``loop`` on the CPU. The results are the same
            either way (to float rounding).
    """

    def __init__(self, chunk_size: int | None = None, compute: Literal["vmap", "loop"] | None = None) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"federation.executor.chunk_size={chunk_size!r} must be an integer >= 1, or null")
        if compute not in (None, "vmap", "loop"):
            raise ConfigError(f"federation.executor.compute={compute!r} must be vmap, loop or null")
        self.chunk_size = chunk_size
        self.compute = compute
        self._pool = _Pool()
        self._device_rows: dict = {}

    # -- checks -----------------------------------------------------------------------------------

    def bind(self, module, datamodule, settings) -> None:
        super().bind(module, datamodule, settings)
        self.runner = LocalRunner(settings)
        self.device = self.runner.device
        self._device_rows = {}
        _check_settings(settings)
        _check_module(module)
        self.optim = _OptimizerSpec.from_module(module)

    @property
    def compute_mode(self) -> str:
        """``compute``, or its default on the training device: ``loop`` on the CPU, ``vmap`` elsewhere."""
        return self.compute or ("loop" if self.device.type == "cpu" else "vmap")

    # -- running ----------------------------------------------------------------------------------

    def run(self, tasks: list[ClientTask]) -> list[ClientOutcome | ClientFailure]:
        if not tasks:
            return []
        regularizer = _common_regularizer(tasks)
        _check_plans(tasks, self.module.net)
        size = self.chunk_size or (1 if self.compute_mode == "loop" else len(tasks))
        out: list[ClientOutcome | ClientFailure] = []
        for start in range(0, len(tasks), size):
            out.extend(self._run_chunk(tasks[start : start + size], regularizer))
        return out

    def _run_chunk(self, tasks: list[ClientTask], regularizer) -> list[ClientOutcome | ClientFailure]:
        outcomes: dict[int, ClientOutcome | ClientFailure] = {}
        clients: list[_Client] = []
        for pos, task in enumerate(tasks):
            try:
                clients.append(_Client(pos, task, self._batches(task)))
            except ConfigError:
                raise
            except Exception as e:  # a client whose data cannot be read is dropped, never the round
                log.warning("client %d failed: %s: %s", task.client_id, type(e).__name__, e)
                outcomes[pos] = ClientFailure(task.client_id, f"{type(e).__name__}: {e}")
        if clients:
            try:
                for client, outcome in zip(clients, self._train(clients, regularizer)):
                    outcomes[client.pos] = outcome
            except ConfigError:
                raise
            except Exception as e:
                log.warning("batched training of %d clients failed: %s: %s", len(clients), type(e).__name__, e)
                for client in clients:
                    outcomes[client.pos] = ClientFailure(client.task.client_id, f"{type(e).__name__}: {e}")
        return [outcomes[pos] for pos in range(len(tasks))]

    def _batches(self, task: ClientTask) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The client's batches in training order, drawn as the sequential executor draws them
        (including the batch a ``limit_train_batches`` cut fetches and drops)."""
        s = self.settings
        loader = self.datamodule.client_train_loader(task.client_id, task.round, task.seed)
        if self.device.type != "cpu":
            loader = rows_on(loader, self.device, self._device_rows)
        limit = _batch_limit(s.limit_train_batches, loader)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _ in range(s.max_epochs):
            for i, batch in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                        and all(isinstance(t, torch.Tensor) for t in batch)):
                    raise ConfigError(f"{_PREFIX} needs (inputs, labels) tensor batches; client "
                                      f"{task.client_id}'s loader gives {type(batch).__name__}")
                out.append((batch[0], batch[1]))
                if 0 < s.max_steps <= len(out):
                    return out
        return out

    def _train(self, clients: list[_Client], regularizer) -> list[ClientOutcome]:
        net = self.module.net
        dev = self.device
        net.to(dev)
        net.train()
        clients = sorted(clients, key=lambda c: -len(c.batches))  # stable: longest first
        n = len(clients)
        steps = [len(c.batches) for c in clients]
        trainable = [k for k, p in net.named_parameters() if p.requires_grad]
        current = {k: v.detach() for k, v in net.state_dict().items()}
        plans = [c.task.plan.weights for c in clients]
        pool = self._pool
        train = {k: _stack([p.get(k, current[k]) for p in plans], dev, pool.get(("w", k), n)) for k in trainable}
        fixed_batched, shared = {}, {}
        for k, v in current.items():
            if k in train:
                continue
            values = [p.get(k, v) for p in plans]
            if all(x is values[0] for x in values):
                shared[k] = values[0].to(dev)
            else:
                fixed_batched[k] = _stack(values, dev, pool.get(("w", k), n))
        opt = self.optim.state_for([c.task.optimizer_state for c in clients], train, trainable, pool)

        if regularizer is not None:  # the anchor on the training device once, not at every step
            regularizer = type(regularizer)({k: v.to(dev) for k, v in regularizer.anchor.items()}, regularizer.mu)
        module = self.module
        smoothing = float(getattr(module, "label_smoothing", 0.0))
        regression = getattr(module, "num_classes", None) == 1

        def client_loss(params, fixed, common, x, y, w):
            """The client's loss on one batch: the mean over its rows (``w`` None), or the sum of the rows'
            losses weighted by ``w`` (a padded batch of the stack)."""
            out = functional_call(net, ({**params, **fixed, **common}), (x,))
            if regression:
                per = (out.squeeze(-1) - y.to(out.dtype)).pow(2)
            else:
                per = F.cross_entropy(out, y, label_smoothing=smoothing, reduction="none")
            loss = per.mean() if w is None else (per * w).sum()
            if regularizer is not None:
                loss = loss + regularizer.formula(_ParamView(params))
            return loss, loss.detach()

        try:
            if self.compute_mode == "vmap":
                losses = self._train_vmap(clients, client_loss, train, fixed_batched, shared, opt, trainable)
            else:
                losses = self._train_loop(clients, client_loss, train, fixed_batched, shared, opt, trainable)
        except RuntimeError as e:
            if "randomness" in str(e):
                raise ConfigError(f"{_PREFIX}: the network draws random numbers in training (dropout?), "
                                  "which cannot be reproduced per client; use federation.executor sequential") from None
            raise
        return self._outcomes(clients, train, fixed_batched, shared, current, opt, losses, steps)

    def _train_vmap(self, clients, client_loss, train, fixed_batched, shared, opt, trainable) -> list[float]:
        """All clients' step ``t`` as one batched call: the clients still training are a prefix of the
        stack, their batches are stacked (padded to one width) and one optimizer update covers them."""
        dev = self.device
        n = len(clients)
        steps = [len(c.batches) for c in clients]
        batched_fn = vmap(grad_and_value(client_loss, has_aux=True), in_dims=(0, 0, None, 0, 0, 0))
        width = max((len(b[1]) for c in clients for b in c.batches), default=0)
        loss_sum = torch.zeros(n, dtype=torch.float64, device=dev)
        for t in range(max(steps, default=0)):
            k = sum(1 for s in steps if s > t)
            rows = slice(0, k)
            x, y, w = _stack_batches([c.batches[t] for c in clients[:k]], width, dev)
            params = {key: v[rows] for key, v in train.items()}
            fixed = {key: v[rows] for key, v in fixed_batched.items()}
            grads, (_, loss) = batched_fn(params, fixed, shared, x, y, w)
            loss_sum[rows] += loss.detach().to(torch.float64)
            grads = [grads[key] for key in trainable]
            _clip(grads, self.settings)
            opt.step(trainable, [params[key] for key in trainable], grads, rows)
        return loss_sum.cpu().tolist()

    def _train_loop(self, clients, client_loss, train, fixed_batched, shared, opt, trainable) -> list[float]:
        """One client after another over its own batches as the loader gave them (no stacking, no
        padding): plain autograd on leaves that view the client's row of the stack (no functorch
        levels, no copy of its weights), then the optimizer's update of that row in place (on the
        CPU one fused pass over each tensor). The summed batch losses per client."""
        dev = self.device
        losses = []
        for i, c in enumerate(clients):
            rows = slice(i, i + 1)
            leaves = {key: train[key][i].detach().requires_grad_() for key in trainable}
            inputs = [leaves[key] for key in trainable]
            params = [train[key][rows] for key in trainable]
            fixed = {key: v[i] for key, v in fixed_batched.items()}
            total = 0.0
            for x, y in c.batches:
                loss, _ = client_loss(leaves, fixed, shared, x.to(dev), y.to(dev), None)
                grads = [g.unsqueeze(0) for g in torch.autograd.grad(loss, inputs)]
                total += float(loss.detach())
                _clip(grads, self.settings)
                opt.step(trainable, params, grads, rows)
            losses.append(total)
        return losses

    def _outcomes(self, clients, train, fixed_batched, shared, current, opt, losses, steps) -> list[ClientOutcome]:
        dev = self.device
        pin = dev.type == "cuda"
        out = []
        for i, c in enumerate(clients):
            plan = c.task.plan
            upload, keep = plan.upload_keys, plan.keep_keys
            wanted = [k for k in current if upload is None or k in upload or k in keep]
            state: StateDict = {}
            for k in wanted:
                if k in train:
                    state[k] = _to_cpu(train[k][i], pin)
                elif k in fixed_batched:
                    state[k] = _to_cpu(fixed_batched[k][i], pin)
                else:
                    state[k] = _to_cpu(shared[k], pin)
            weights = {k: v for k, v in state.items() if upload is None or k in upload}
            kept = {k: state[k] for k in keep}
            optimizer_state = opt.client_state(i, pin) if c.task.keep_optimizer else None
            metrics = {"loss": losses[i] / steps[i] if steps[i] else math.nan, "steps": steps[i]}
            result = ClientResult(client_id=c.task.client_id, num_samples=c.num_samples(self.datamodule),
                                  weights=weights, metrics=metrics, kept=kept)
            out.append(ClientOutcome(result=result, optimizer_state=optimizer_state))
        if pin:
            torch.cuda.synchronize(dev)
        order = {id(c): j for j, c in enumerate(clients)}
        return [out[order[id(c)]] for c in sorted(clients, key=lambda c: c.pos)]


@dataclass
class _Client:
    pos: int
    task: ClientTask
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    def num_samples(self, datamodule) -> int:
        return len(datamodule.splits.client_train[self.task.client_id])


class _ParamView:
    """What a regularizer sees of the network being trained: its trainable parameters by name."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


def _stack(values: list[torch.Tensor], device: torch.device, out: _Slot) -> torch.Tensor:
    """Per-client copies of tensors, stacked on ``device`` into ``out`` (one transfer when every client
    has the same tensor)."""
    if all(v is values[0] for v in values):
        one = values[0].detach().to(device)
        return out.like(one).copy_(one.unsqueeze(0).expand(len(values), *one.shape))
    stacked = torch.stack([v.detach() for v in values]).to(device)
    return out.like(stacked[0]).copy_(stacked)


class _Slot:
    """One reusable stacked buffer: rounds of the same clients-per-chunk reuse its memory (fresh
    allocations of this size cost page faults on the CPU)."""

    def __init__(self, pool: "_Pool", key: tuple, n: int) -> None:
        self.pool, self.key, self.n = pool, key, n

    def like(self, one: torch.Tensor) -> torch.Tensor:
        shape = (self.n, *one.shape)
        t = self.pool.tensors.get(self.key)
        if t is None or t.shape != shape or t.dtype != one.dtype or t.device != one.device:
            t = self.pool.tensors[self.key] = torch.empty(shape, dtype=one.dtype, device=one.device)
        return t

    def zeros_like(self, stacked: torch.Tensor) -> torch.Tensor:
        return self.like(stacked[0]).zero_()


class _Pool:
    """Stacked buffers kept between rounds, by name."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, n: int) -> _Slot:
        return _Slot(self, key, n)


def rows_on(loader: DataLoader, device: torch.device, copies: dict) -> DataLoader:
    """``loader`` drawing its rows from a copy on ``device`` (:meth:`ArrayDataset.to`) with the same
    sampler and generator, so its batches come in the same order with the same augmentation draws,
    now gathered and augmented on the device; loaders of other datasets, or with worker processes,
    are returned as they are."""
    dataset = loader.dataset
    if not isinstance(dataset, ArrayDataset) or loader.num_workers:
        return loader
    moved = dataset.to(device, copies)
    if loader.batch_size is None:
        return DataLoader(moved, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                          generator=loader.generator)
    return DataLoader(moved, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
                      collate_fn=loader.collate_fn, generator=loader.generator)


def _stack_batches(batches, width: int, device: torch.device):
    """Inputs ``k x width x ...``, labels and per-row loss weights (1/n for a batch's n real rows, 0 for padding)."""
    xs, ys, ws = [], [], []
    for x, y in batches:
        n = len(y)
        w = torch.full((width,), 1.0 / n, dtype=torch.float32)
        if n < width:
            x = torch.cat([x, x[:1].expand(width - n, *x.shape[1:])])
            y = torch.cat([y, y[:1].expand(width - n, *y.shape[1:])])
            w[n:] = 0.0
        xs.append(x)
        ys.append(y)
        ws.append(w)
    return (torch.stack(xs).to(device, non_blocking=True), torch.stack(ys).to(device, non_blocking=True),
            torch.stack(ws).to(device, non_blocking=True))


def _to_cpu(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A CPU copy; from a GPU into page-locked memory without waiting (the caller synchronises once),
    or a plain copy where page-locked memory cannot be had."""
    if pin:
        try:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:
            pin = False
        else:
            return out.copy_(t.detach(), non_blocking=True)
    return t.detach().to("cpu", copy=True)


def _clip(grads: list[torch.Tensor], settings) -> None:
    """Per-client gradient clipping as Fabric's ``clip_gradients`` (norm: ``clip_grad_norm_``; value: clamp)."""
    if not settings.gradient_clip_val:
        return
    v = float(settings.gradient_clip_val)
    if settings.gradient_clip_algorithm == "value":
        torch._foreach_clamp_min_(grads, -v)
        torch._foreach_clamp_max_(grads, v)
        return
    norms = torch.stack([g.flatten(1).norm(2, dim=1) for g in grads], dim=1)  # k x params
    total = norms.norm(2, dim=1)
    coef = (v / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


# -- optimizers ----------------------------------------------------------------------------------


@dataclass
class _OptimizerSpec:
    """The module's optimizer: its kind, its hyperparameters per parameter name, its param groups."""

    kind: str
    hyper: dict[str, dict[str, Any]]
    index: dict[str, int]
    """State-dict index of each parameter (torch's ``optimizer.state_dict()`` numbering)."""
    param_groups: list[dict[str, Any]]

    @classmethod
    def from_module(cls, module) -> "_OptimizerSpec":
        if hasattr(module, "planned_steps"):
            module.planned_steps = 1
        optimizer, scheduler, _ = _unpack_optimizers(module.configure_optimizers())
        if scheduler is not None:
            raise ConfigError(f"{_PREFIX} does not run learning-rate schedules (model.lr_schedule); "
                              "use a constant learning rate or federation.executor sequential")
        kinds = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
        kind = kinds.get(type(optimizer))
        if kind is None:
            raise ConfigError(f"{_PREFIX} supports the optimizers SGD, Adam and AdamW, not "
                              f"{type(optimizer).__name__}; use federation.executor sequential")
        names = {id(p): k for k, p in module.named_parameters()}
        hyper, index, i = {}, {}, 0
        for group in optimizer.param_groups:
            if group.get("maximize") or group.get("amsgrad"):
                raise ConfigError(f"{_PREFIX} does not support {type(optimizer).__name__}'s maximize or amsgrad options")
            for p in group["params"]:
                name = names[id(p)]
                if not name.startswith("net."):
                    raise ConfigError(f"{_PREFIX}: the optimizer trains {name}, which is outside the client network")
                hyper[name[4:]] = {k: v for k, v in group.items() if k != "params"}
                index[name[4:]] = i
                i += 1
        return cls(kind, hyper, index, optimizer.state_dict()["param_groups"])

    def state_for(self, saved: list[dict | None], train: dict[str, torch.Tensor], trainable: list[str],
                  pool: _Pool | None = None) -> "_StackedOptimizer":
        for k in trainable:
            if k not in self.hyper:
                raise ConfigError(f"{_PREFIX}: trainable parameter {k} is not in the optimizer")
        return _StackedOptimizer(self, saved, train, trainable, pool or _Pool())


class _StackedOptimizer:
    """Per-client optimizer state, stacked like the parameters, and the foreach update of a prefix."""

    def __init__(self, spec: _OptimizerSpec, saved: list[dict | None], train: dict[str, torch.Tensor],
                 trainable: list[str], pool: _Pool) -> None:
        self.spec = spec
        self.trainable = trainable
        n = len(saved)
        self.steps = [0] * n
        self.bufs: dict[str, dict[str, torch.Tensor]] = {}
        self.has_buf = [False] * n
        self._groups: dict[tuple[str, ...], list[tuple[dict[str, Any], list[int]]]] = {}
        names = ("momentum_buffer",) if spec.kind == "sgd" else ("exp_avg", "exp_avg_sq")
        if spec.kind == "sgd" and all(spec.hyper[k]["momentum"] == 0 for k in trainable):
            names = ()
        for name in names:
            self.bufs[name] = {k: pool.get((name, k), n).zeros_like(train[k]) for k in trainable}
        for i, state in enumerate(saved):
            if not state or not state.get("state"):
                continue
            entries = state["state"]
            for k in trainable:
                entry = entries.get(self.spec.index[k])
                if not entry:
                    continue
                for name in names:
                    if entry.get(name) is not None:
                        self.bufs[name][k][i].copy_(entry[name])
                        self.has_buf[i] = True
                if "step" in entry:
                    self.steps[i] = int(float(entry["step"]))

    def step(self, keys: list[str], params: list[torch.Tensor], grads: list[torch.Tensor], rows: slice) -> None:
        """Update the clients ``rows`` of the stack: ``params`` and ``grads`` are those rows."""
        groups = self._groups.get(tuple(keys))
        if groups is None:  # the parameters by hyperparameters (param groups), once per list of keys
            by: dict[tuple, list[int]] = {}
            for j, key in enumerate(keys):
                h = self.spec.hyper[key]
                by.setdefault(tuple(sorted((a, repr(b)) for a, b in h.items())), []).append(j)
            groups = self._groups[tuple(keys)] = [(self.spec.hyper[keys[idx[0]]], idx) for idx in by.values()]
        for i in range(*rows.indices(len(self.steps))):
            self.steps[i] += 1
        for h, idx in groups:
            ps = [params[j] for j in idx]
            gs = [grads[j] for j in idx]
            sub = [keys[j] for j in idx]
            if self.spec.kind == "sgd":
                self._sgd(h, sub, ps, gs, rows)
            else:
                self._adam(h, sub, ps, gs, rows)
        if self.spec.kind == "sgd":
            for i in range(*rows.indices(len(self.steps))):
                self.has_buf[i] = True

    def _sgd(self, h, keys, ps, gs, rows: slice) -> None:
        lr, wd, momentum = float(h["lr"]), float(h["weight_decay"]), float(h["momentum"])
        dampening = float(h["dampening"])
        bufs = [self.bufs["momentum_buffer"][key][rows] for key in keys] if momentum != 0 else []
        have = self.has_buf[rows]
        if (momentum == 0 or all(have) or not any(have)) and _fusable(ps, bufs):
            torch._fused_sgd_(ps, _contiguous(gs), bufs, weight_decay=wd, momentum=momentum, lr=lr,
                              dampening=dampening, nesterov=bool(h["nesterov"]), maximize=False,
                              is_first_step=momentum != 0 and not any(have))
            return
        if wd != 0:
            gs = torch._foreach_add(gs, ps, alpha=wd)
        if momentum != 0:
            if all(have):
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, gs, alpha=1 - dampening)
            elif not any(have):
                torch._foreach_copy_(bufs, gs)
            else:
                mask = torch.tensor(have, device=ps[0].device)
                for b, g in zip(bufs, gs):
                    m = mask.view(-1, *([1] * (g.dim() - 1)))
                    b.copy_(torch.where(m, b * momentum + g * (1 - dampening), g))
            gs = torch._foreach_add(gs, bufs, alpha=momentum) if h["nesterov"] else bufs
        torch._foreach_add_(ps, gs, alpha=-lr)

    def _adam(self, h, keys, ps, gs, rows: slice) -> None:
        lr, wd, eps = float(h["lr"]), float(h["weight_decay"]), float(h["eps"])
        beta1, beta2 = (float(b) for b in h["betas"])
        decoupled = self.spec.kind == "adamw" or bool(h.get("decoupled_weight_decay", False))
        m = [self.bufs["exp_avg"][key][rows] for key in keys]
        v = [self.bufs["exp_avg_sq"][key][rows] for key in keys]
        steps = self.steps[rows]
        if len(set(steps)) == 1 and _fusable(ps, m, v):
            fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
            step = [torch.tensor(float(steps[0]))] * len(ps)
            fused(ps, _contiguous(gs), m, v, [], step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd,
                  eps=eps, amsgrad=False, maximize=False)
            return
        if wd != 0:
            if decoupled:
                torch._foreach_mul_(ps, 1 - lr * wd)
            else:
                gs = torch._foreach_add(gs, ps, alpha=wd)
        torch._foreach_lerp_(m, gs, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, gs, gs, value=1 - beta2)
        if len(set(steps)) == 1:
            step = steps[0]
            step_size = lr / (1 - beta1**step)
            bc2_sqrt = (1 - beta2**step) ** 0.5
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, m, denom, value=-step_size)
            return
        step = torch.tensor(steps, dtype=torch.float64, device=ps[0].device)
        step_size = (lr / (1 - beta1**step)).float()
        bc2_sqrt = (1 - beta2**step).sqrt().float()
        for p, mi, vi in zip(ps, m, v):
            shape = (-1, *([1] * (p.dim() - 1)))
            denom = vi.sqrt().div_(bc2_sqrt.view(shape)).add_(eps)
            p.sub_(mi / denom * step_size.view(shape))

    def client_state(self, i: int, pin: bool) -> dict:
        """Client ``i``'s state in ``torch.optim``'s ``state_dict`` format."""
        state: dict[int, dict[str, Any]] = {}
        for k in self.trainable:
            entry: dict[str, Any] = {}
            if self.spec.kind == "sgd":
                if "momentum_buffer" in self.bufs and self.has_buf[i]:
                    entry["momentum_buffer"] = _to_cpu(self.bufs["momentum_buffer"][k][i], pin)
            elif self.steps[i]:
                entry["step"] = torch.tensor(float(self.steps[i]))
                entry["exp_avg"] = _to_cpu(self.bufs["exp_avg"][k][i], pin)
                entry["exp_avg_sq"] = _to_cpu(self.bufs["exp_avg_sq"][k][i], pin)
            if entry:
                state[self.spec.index[k]] = entry
        return {"state": state, "param_groups": [dict(g) for g in self.spec.param_groups]}


def _fusable(*lists: list[torch.Tensor]) -> bool:
    """Whether torch's fused CPU kernels can update these tensors in place: all on the CPU, floating
    point and contiguous (the kernels walk the memory flat). On other devices the foreach updates run."""
    return all(t.device.type == "cpu" and t.is_floating_point() and t.is_contiguous() for ts in lists for t in ts)


def _contiguous(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


# -- refusals ------------------------------------------------------------------------------------


def _check_settings(settings) -> None:
    if settings.precision not in _FULL_PRECISION:
        raise ConfigError(f"{_PREFIX} trains in 32-bit only; trainer.precision={settings.precision!r} "
                          "needs federation.executor sequential")
    if int(settings.accumulate_grad_batches) != 1:
        raise ConfigError(f"{_PREFIX} does not accumulate gradients (trainer.accumulate_grad_batches="
                          f"{settings.accumulate_grad_batches}); use 1 or federation.executor sequential")


def _check_module(module) -> None:
    from fedmoe.models.classifier import Classifier

    if not isinstance(module, Classifier):
        raise ConfigError(f"{_PREFIX} batches fedmoe's Classifier, not {type(module).__name__}; use federation.executor sequential")
    for name in ("training_step", "loss"):
        if getattr(type(module), name) is not getattr(Classifier, name):
            raise ConfigError(f"{_PREFIX} batches the Classifier's own loss; {type(module).__name__} overrides "
                              f"{name}; use federation.executor sequential")
    net = module.net
    for name, sub in net.named_modules():
        where = name or "the network"
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            raise ConfigError(f"{_PREFIX} cannot batch {where} ({type(sub).__name__}): running statistics "
                              "are updated per batch; use federation.executor sequential")
        if isinstance(sub, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)) and sub.p > 0:
            raise ConfigError(f"{_PREFIX} cannot batch {where} ({type(sub).__name__} p={sub.p}): each client's "
                              "dropout draws its own random numbers; use federation.executor sequential")


def _check_plans(tasks: list[ClientTask], net: nn.Module) -> None:
    """Every plan has the same keys, shapes and dtypes (one architecture) and the same upload/keep keys."""
    first = tasks[0].plan
    ref = {k: (tuple(v.shape), v.dtype) for k, v in first.weights.items()}
    current = net.state_dict()
    for k, (shape, dtype) in ref.items():
        if k not in current:
            raise ConfigError(f"{_PREFIX}: client {tasks[0].client_id}'s weights have key {k}, which the network lacks")
        if tuple(current[k].shape) != shape:
            raise ConfigError(f"{_PREFIX} needs one architecture: client {tasks[0].client_id}'s {k} has shape "
                              f"{list(shape)}, the network's {list(current[k].shape)}; use federation.executor sequential")
    for task in tasks[1:]:
        plan = task.plan
        mine = {k: (tuple(v.shape), v.dtype) for k, v in plan.weights.items()}
        if mine != ref:
            diff = sorted(set(mine) ^ set(ref)) or [k for k in ref if mine[k] != ref[k]]
            raise ConfigError(f"{_PREFIX} needs clients of one architecture: clients {tasks[0].client_id} and "
                              f"{task.client_id} differ at {diff[0]}; use federation.executor sequential")
        if plan.upload_keys != first.upload_keys or plan.keep_keys != first.keep_keys:
            raise ConfigError(f"{_PREFIX} needs the same upload and kept keys for every client (clients "
                              f"{tasks[0].client_id} and {task.client_id} differ); use federation.executor sequential")


def _common_regularizer(tasks: list[ClientTask]):
    """The one regularizer every client shares (FedProx's proximal term with one anchor), or None."""
    from fedmoe.algorithms.fedprox import ProximalTerm

    regs = [t.plan.regularizer for t in tasks]
    if all(r is None for r in regs):
        return None
    first = regs[0]
    if all(isinstance(r, ProximalTerm) for r in regs) and all(
            r.mu == first.mu and r.anchor is first.anchor for r in regs):
        return first
    kind = type(next(r for r in regs if r is not None)).__name__
    raise ConfigError(f"{_PREFIX} batches one FedProx proximal term shared by all clients, not per-client "
                      f"{kind} regularizers; use federation.executor sequential")


__all__ = ["Vectorized"]
