"""Fed-MoE (IJCAI 2025): client models fused into a server mixture of experts by relevance.

One round (DESIGN.md §2, the paper's Algorithm 1):

* Stage A — sampled clients train locally (the engine's executor).
* Stage B — P[c, j] = confidence of client c on probe sample j. For t = 1..T: Q = gate
  probabilities on the probe set; R = Q^T P^T (K x m); W_r = softmax_row(R / tau);
  E_e <- (1 - lam) E_e + lam sum_c W_r[e, c] M_c; E_0 <- (1 - lam) E_0 + lam sum_c p_c M_c;
  then the gate (G, G_n, alpha) trains on D_s with the server loss, and the state with the best
  validation loss is kept.
* Stage C — S = Q^T P^T with the updated gate; W_c = softmax_col([(1 - alpha) 1; alpha S]);
  M_i <- lam M_i + (1 - lam) (W_c[0, i] E_0 + sum_e W_c[e, i] E_e).

Every behaviour of the released code that can change a number is an option (``... | code``);
docs/fedmoe.md tabulates them against Algorithm 1 and each released folder, and
``experiments/<data set>/fedmoe.yaml`` reproduces that folder.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import nn

from fedmoe.algorithms.base import Algorithm, ClientPlan, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.fusion import mix, weighted_average
from fedmoe.models.moe import ServerMoE, expert_utilisation, gating_entropy
from fedmoe.models.moe_module import ExpertModule, ServerMoEModule
from fedmoe.errors import ConfigError
from fedmoe.validation import check_choice, check_float, check_int


def confidences(logits: torch.Tensor, targets: torch.Tensor, mode: str = "probability") -> torch.Tensor:
    """P[j] = softmax(logits_j)[y_j] (``probability``) or logits_j[y_j] (``logit``, the CIFAR code)."""
    values = torch.softmax(logits.float(), dim=1) if mode == "probability" else logits.float()
    return values.gather(1, targets.view(-1, 1)).squeeze(1)


def relevance(q: torch.Tensor, p: torch.Tensor, norm: str = "sum") -> torch.Tensor:
    """R = Q^T P^T (K x m) from gate probabilities Q (n x K) and confidences P (m x n).

    ``sum`` is the paper's raw sum over probe samples; ``mean`` divides row e by sum_j Q[j, e].
    """
    r = q.t().double() @ p.t().double()
    if norm == "mean":
        r = r / q.double().sum(0).clamp_min(1e-12).unsqueeze(1)
    elif norm != "sum":
        raise ValueError(f"relevance_norm must be 'sum' or 'mean', got {norm!r}")
    return r.float()


def routing_weights(r: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """W_r = softmax over clients of R / tau (each routed expert's distribution over clients)."""
    return torch.softmax(r / temperature, dim=1)


def sync_weights(s: torch.Tensor, alpha: float, has_main: bool, mode: str = "paper") -> torch.Tensor:
    """W_c, ((K+1) x m with row 0 the main expert, or K x m without one): column softmax of
    [(1 - alpha) 1; alpha S]. ``code`` first takes a softmax over experts of S."""
    if mode == "code":
        s = torch.softmax(s, dim=0)
    elif mode != "paper":
        raise ValueError(f"stage_c must be 'paper' or 'code', got {mode!r}")
    if not has_main:
        return torch.softmax(s, dim=0)
    top = torch.full((1, s.shape[1]), 1.0 - alpha, dtype=s.dtype)
    return torch.softmax(torch.cat([top, alpha * s]), dim=0)


class FedMoE(Algorithm):
    """Fed-MoE with the paper's defaults; code behaviours as named options.

    Args:
        num_routed: K routed experts.
        num_main: main experts (0: none, as the Sent140 code).
        top_k: experts chosen per sample.
        lam: lambda, the moving-average weight (the paper's ``--a``).
        iterations: T server iterations per round.
        gate_value: ``probability`` | ``renormalised`` (g / sum of the top k) | ``code`` (softmax over
            the top-k probabilities); for k = 1 the last two are exactly 1 (no gate gradient).
        alpha_init: initial alpha; alpha_clamp: clamp alpha to [0, 1].
        noisy_gate: add the learned gate noise G_n while training.
        gate_network: architecture of G and G_n (default: the client architecture, K-way head).
        gate_network_kwargs: keyword arguments of ``gate_network`` (e.g. a smaller backbone for a
            text gate than the experts', as the Yelp folder's GPT-2 small gate beside GPT-2 medium).
        w_ent, w_aux, label_smoothing, load, entropy_mode: the server loss (DESIGN.md §2).
        confidence: ``probability`` | ``logit`` (CIFAR code).
        relevance_gate: ``soft`` (gate probabilities) | ``onehot`` (top-1 one-hot) | ``gates`` (the
            forward's gate values g, eval mode: the code's Q, one-hot for k = 1 with ``code`` gates).
        relevance_norm: ``sum`` (paper, code) | ``mean``.
        relevance_temperature: tau dividing R before the softmax.
        expert_update: ``moving`` | ``replace`` (FEMNIST code: lambda = 1).
        main_update: ``moving`` | ``mean`` (FEMNIST and CIFAR code: the plain, unweighted mean of
            the clients) | ``weighted_mean`` (sample-weighted mean, FedAvg's).
        main_epochs, main_lr: after its update, train each main expert alone on D_s for this many
            epochs with a fresh Adam at ``main_lr`` and plain cross-entropy (the CIFAR code: 20
            epochs at the client learning rate); 0 (default) skips it.
        server_epochs: epochs of gate training per server step.
        server_schedule: ``every_iteration`` | ``pretrain_only`` (FEMNIST and Yelp code: one epoch before round 1).
        train_experts_on_server: the CIFAR code trains the experts on D_s too, the routed experts at
            ``expert_lr`` and the main expert(s) at ``main_server_lr``.
        train_noise: whether the server step trains the noise net G_n (the CIFAR code leaves it out
            of its optimizer).
        gate_lr, alpha_lr, server_weight_decay, server_eps: the server optimizer's groups. As in the
            code, alpha and the main experts get no weight decay and Adam's default eps.
        server_optimizer, server_momentum: ``adam`` (the vision folders) or ``sgd`` with this momentum
            (the text folders: Sent140 momentum 0.9, Yelp none) over the same groups.
        server_lr_schedule, server_lr_period, server_lr_gamma: the server learning rates over the
            run's server steps (fits): ``constant``; ``cosine`` (CosineAnnealingLR with T_max =
            period, the CIFAR code: 100 rounds x T = 5); ``step`` (times gamma every period fits).
        stage_c: ``paper`` | ``code`` (softmax over experts first; W_c nearly uniform).
        client_update: ``moving`` | ``replace`` (FEMNIST and Sent140 code: lambda = 0 in Stage C).
        common_init: start experts and main from the clients' common initialisation.
        keep_best_iteration: continue from the iteration with the lowest validation loss; false (the
            code) continues from the last iteration and records the lowest-validation-loss state of
            the whole run in ``state["best"]`` (evaluate it with :meth:`best_module`).
        random_routing, random_routing_min, random_routing_steps: epsilon-greedy exploration of the
            text folders (:class:`ExploringMoE`): epsilon starts at ``random_routing`` (0: off, the
            text folders: 0.5) and falls linearly to ``random_routing_min`` over
            ``random_routing_steps`` server training batches.
    """

    personalised = True
    sync_transmits = True
    #: Options that change training only, not the server model's structure or forward pass (so that
    #: evaluating a checkpoint does not require them to match).
    training_options = (
        "lam", "iterations", "alpha_init", "w_ent", "w_aux", "label_smoothing", "load", "entropy_mode",
        "confidence", "relevance_gate", "relevance_norm", "relevance_temperature", "expert_update",
        "main_update", "main_epochs", "main_lr", "server_epochs", "server_schedule", "train_experts_on_server",
        "expert_lr", "main_server_lr", "train_noise", "gate_lr", "alpha_lr", "server_weight_decay", "server_eps",
        "server_lr_schedule", "server_lr_period", "server_lr_gamma", "stage_c", "client_update", "common_init",
        "keep_best_iteration", "random_routing", "random_routing_min", "random_routing_steps", "server_optimizer",
        "server_momentum",
    )

    def __init__(
        self,
        num_routed: int = 5,
        num_main: int = 1,
        top_k: int = 1,
        lam: float = 0.1,
        iterations: int = 1,
        gate_value: Literal["probability", "renormalised", "code"] = "probability",
        alpha_init: float = 0.5,
        alpha_clamp: bool = False,
        noisy_gate: bool = True,
        gate_network: str | None = None,
        gate_network_kwargs: dict | None = None,
        w_ent: float = 0.1,
        w_aux: float = 1.0,
        label_smoothing: float = 0.0,
        load: Literal["count", "smooth", "code"] = "count",
        entropy_mode: Literal["paper", "conditional", "code"] = "paper",
        confidence: Literal["probability", "logit"] = "probability",
        relevance_gate: Literal["soft", "onehot", "gates"] = "soft",
        relevance_norm: Literal["sum", "mean"] = "sum",
        relevance_temperature: float = 1.0,
        expert_update: Literal["moving", "replace"] = "moving",
        main_update: Literal["moving", "mean", "weighted_mean"] = "moving",
        main_epochs: int = 0,
        main_lr: float = 1e-4,
        server_epochs: int = 1,
        server_schedule: Literal["every_iteration", "pretrain_only"] = "every_iteration",
        train_experts_on_server: bool = False,
        expert_lr: float = 1e-4,
        main_server_lr: float = 5e-5,
        train_noise: bool = True,
        gate_lr: float = 1e-4,
        alpha_lr: float = 1e-3,
        server_weight_decay: float = 5e-4,
        server_eps: float = 1e-6,
        server_optimizer: Literal["adam", "sgd"] = "adam",
        server_momentum: float = 0.0,
        server_lr_schedule: Literal["constant", "cosine", "step"] = "constant",
        server_lr_period: int = 1,
        server_lr_gamma: float = 0.1,
        stage_c: Literal["paper", "code"] = "paper",
        client_update: Literal["moving", "replace"] = "moving",
        common_init: bool = True,
        keep_best_iteration: bool = True,
        random_routing: float = 0.0,
        random_routing_min: float = 0.01,
        random_routing_steps: int = 10000,
    ) -> None:
        _check_options(locals())
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        self._module: ServerMoEModule | None = None
        self._scratch: nn.Module | None = None

    # -- building ---------------------------------------------------------------------------------

    def _build(self, ctx: ServerContext) -> ServerMoEModule:
        from fedmoe.models.networks import build_network

        def gate_net() -> nn.Module:
            if self.gate_network is None:
                return ctx.build_network(self.num_routed)
            return build_network(self.gate_network, self.num_routed, **(self.gate_network_kwargs or {}))

        exploring = {}
        if self.random_routing > 0:
            exploring = {"start": self.random_routing, "end": self.random_routing_min, "steps": self.random_routing_steps}
        moe = (ExploringMoE if exploring else ServerMoE)(
            **exploring,
            experts=[ctx.build_network() for _ in range(self.num_routed)],
            mains=[ctx.build_network() for _ in range(self.num_main)],
            gate=gate_net(),
            noise=gate_net() if self.noisy_gate else None,
            top_k=self.top_k,
            gate_value=self.gate_value,
            alpha_init=self.alpha_init,
            alpha_clamp=self.alpha_clamp,
            noisy=self.noisy_gate,
        )
        return ServerMoEModule(
            moe,
            label_smoothing=self.label_smoothing,
            w_aux=self.w_aux,
            w_ent=self.w_ent,
            load=self.load,
            entropy_mode=self.entropy_mode,
            gate_lr=self.gate_lr,
            alpha_lr=self.alpha_lr,
            weight_decay=self.server_weight_decay,
            eps=self.server_eps,
            optimizer=self.server_optimizer,
            momentum=self.server_momentum,
            train_experts=self.train_experts_on_server,
            expert_lr=self.expert_lr,
            main_lr=self.main_server_lr,
            experts_alpha_lr=self.alpha_lr,
            train_noise=self.train_noise,
            no_decay=("alpha", "mains"),
            eps_groups=("gate", "experts"),
        )

    def _module_for(self, state: ServerState, ctx: ServerContext) -> ServerMoEModule:
        """The cached server module with ``state`` loaded (built without touching the global RNG,
        so a resumed run draws the same random numbers as an uninterrupted one)."""
        if self._module is None:
            with torch.random.fork_rng(devices=[]):
                self._module = self._build(ctx)
        self._module.moe.load_state_dict(state["moe"])
        self._module.moe.steps_done = int(state.get("routing_steps", 0))
        return self._module

    def _scratch_net(self, ctx: ServerContext) -> nn.Module:
        if self._scratch is None:
            with torch.random.fork_rng(devices=[]):
                self._scratch = ctx.build_network()
        return self._scratch

    # -- protocol ---------------------------------------------------------------------------------

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        module = self._build(ctx)
        if self.common_init:
            for expert in [*module.moe.experts, *module.moe.mains]:
                expert.load_state_dict(template)
        self._module = module
        state: ServerState = {"moe": _clone(module.moe.state_dict()), "optimizer": None, "stats": {}, "server_fits": 0}
        if self.server_schedule == "pretrain_only":
            state["optimizer"] = self._server_step(module, state, 1, None, ctx)
            state["server_fits"] = 1
            state["moe"] = _clone(module.moe.state_dict())
            state["routing_steps"] = getattr(module.moe, "steps_done", 0)
        return state

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        """The client starts from its own synced model, which it already holds."""
        return ClientPlan(weights=client_weights, transmit=False)

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        module = self._module_for(state, ctx)
        moe = module.moe
        clients = [r.weights for r in results]
        sizes = torch.tensor([float(r.num_samples) for r in results])
        p = self.client_confidences(clients, ctx)
        lam_e = 1.0 if self.expert_update == "replace" else self.lam
        optimizer_state = state.get("optimizer")
        fits = int(state.get("server_fits", 0))
        rounds = int(state.get("rounds", 0)) + 1
        record = state.get("best")
        best: tuple[float, dict, Any, dict, dict] | None = None
        stats: dict[str, Any] = {}
        val: dict[str, float] = {}
        for t in range(self.iterations):
            q = self.gate_relevance(moe, ctx)
            w_r = routing_weights(relevance(q, p, self.relevance_norm), self.relevance_temperature)
            for e, expert in enumerate(moe.experts):
                expert.load_state_dict(mix(expert.state_dict(), clients, (lam_e * w_r[e]).tolist(), 1.0 - lam_e))
            for main in moe.mains:
                main.load_state_dict(self._main_update(main.state_dict(), clients, sizes))
                if self.main_epochs > 0:
                    self._train_alone(main, ctx)
            if self.server_schedule == "every_iteration":
                optimizer_state = self._server_step(module, {"server_fits": fits}, self.server_epochs, optimizer_state, ctx)
                fits += 1
            val = ctx.evaluate(module, ctx.val)
            stats = {"W_r": w_r, "val_loss": val["loss"], "iteration": t + 1}
            if not self.keep_best_iteration:
                if record is None or val["loss"] < record["val_loss"]:
                    record = {"val_loss": val["loss"], "round": rounds, "iteration": t + 1,
                              "moe": _clone(moe.state_dict())}
            elif best is None or val["loss"] < best[0]:
                best = (val["loss"], _clone(moe.state_dict()), copy.deepcopy(optimizer_state), stats, val)
        if best is not None:
            _, moe_state, optimizer_state, stats, val = best
            moe.load_state_dict(moe_state)
        else:
            moe_state = _clone(moe.state_dict())
        s = relevance(self.gate_relevance(moe, ctx), p, self.relevance_norm)
        w_c = sync_weights(s, float(moe.alpha_value().detach()), moe.num_main > 0, self.stage_c)
        stats = {**stats, "W_c": w_c, **self.gate_statistics(moe, ctx)}
        out = {**state, "moe": moe_state, "optimizer": optimizer_state, "stats": stats, "val": dict(val),
               "server_fits": fits, "rounds": rounds, "routing_steps": getattr(moe, "steps_done", 0)}
        if record is not None:
            out["best"] = record
        return out

    def server_val_metrics(self, state: ServerState) -> dict[str, float] | None:
        """The validation metrics of ``state``'s server model, measured in :meth:`aggregate` (None
        before the first round), so that the engine need not evaluate the same model again."""
        val = state.get("val")
        return dict(val) if val else None

    def best_module(self, state: ServerState, ctx: ServerContext) -> nn.Module | None:
        """With ``keep_best_iteration: false``: the server module holding the lowest-validation-loss
        state of any iteration so far (the code's ``best_val.pth``); None otherwise."""
        record = state.get("best")
        if record is None:
            return None
        return self._module_for({"moe": record["moe"]}, ctx)

    def _main_update(self, main: StateDict, clients: list[StateDict], sizes: torch.Tensor) -> StateDict:
        """E_0's Stage B update: moving average towards the sample-weighted client mean, or a
        replacement by the plain (code) or sample-weighted mean."""
        if self.main_update == "mean":
            return weighted_average(clients, [1.0] * len(clients), base=main)
        if self.main_update == "weighted_mean":
            return weighted_average(clients, sizes.tolist(), base=main)
        share = (self.lam * sizes / sizes.sum()).tolist()
        return mix(main, clients, share, 1.0 - self.lam)

    def _server_step(
        self, module: ServerMoEModule, state: ServerState, epochs: int, optimizer_state: dict | None, ctx: ServerContext
    ) -> dict | None:
        """Train the server module on D_s at the learning rates the schedule gives this fit."""
        module.lr_scale = self.lr_factor(int(state.get("server_fits", 0)))
        rates = module.learning_rates()
        if optimizer_state is not None:
            optimizer_state = {
                **optimizer_state,
                "param_groups": [{**g, "lr": rates.get(g.get("name"), g["lr"])} for g in optimizer_state["param_groups"]],
            }
        return ctx.fit(module, ctx.server_train, epochs, optimizer_state)

    def lr_factor(self, fit: int) -> float:
        """The server learning-rate factor of the ``fit``-th server step (0-based): 1 (constant),
        (1 + cos(pi fit / period)) / 2 (cosine, periodic as torch's closed form), gamma^(fit // period) (step)."""
        if self.server_lr_schedule == "cosine":
            return (1.0 + math.cos(math.pi * fit / self.server_lr_period)) / 2.0
        if self.server_lr_schedule == "step":
            return self.server_lr_gamma ** (fit // self.server_lr_period)
        return 1.0

    def sync(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> dict[int, StateDict]:
        """Stage C: client i mixes its model with the experts by column i of W_c (computed in
        :meth:`aggregate` with the updated gate)."""
        moe = self._module_for(state, ctx).moe
        w_c = state["stats"]["W_c"]
        experts = [e.state_dict() for e in moe.experts]
        if moe.num_main > 0:
            mains = [m.state_dict() for m in moe.mains]
            main = mains[0] if len(mains) == 1 else weighted_average(mains, [1.0] * len(mains), base=mains[0])
            experts = [main, *experts]
        keep = 0.0 if self.client_update == "replace" else self.lam
        out = {}
        for i, r in enumerate(results):
            out[r.client_id] = mix(r.weights, experts, ((1.0 - keep) * w_c[:, i]).tolist(), keep)
        return out

    def _train_alone(self, net: nn.Module, ctx: ServerContext) -> None:
        """Train one expert on D_s with plain cross-entropy (the code's ``train_fix_expert``), then
        restore its mode and frozen flags."""
        was_training = net.training
        flags = [p.requires_grad for p in net.parameters()]
        for p in net.parameters():
            p.requires_grad_(True)
        ctx.fit(ExpertModule(net, self.main_lr, 0.0), ctx.server_train, self.main_epochs)
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
        net.train(was_training)

    def server_module(self, state: ServerState, ctx: ServerContext) -> nn.Module:
        return self._module_for(state, ctx)

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        stats = state.get("stats") or {}
        out: dict[str, Any] = {}
        if "alpha" in stats:
            out["fedmoe/alpha"] = stats["alpha"]
            out["fedmoe/gate_entropy"] = stats["gate_entropy"]
            out["fedmoe/label_entropy"] = stats["label_entropy"]
            for e, u in enumerate(stats["utilisation"].tolist()):
                out[f"fedmoe/utilisation/expert_{e + 1}"] = u
        for key in ("W_r", "W_c"):
            if key in stats:
                out[f"fedmoe/{key}"] = stats[key]
        return out

    # -- the matrices -----------------------------------------------------------------------------

    def client_confidences(self, clients: list[StateDict], ctx: ServerContext) -> torch.Tensor:
        """P (m x n): each uploaded client model's confidence on each probe sample (eval mode)."""
        net = self._scratch_net(ctx)
        rows = []
        for weights in clients:
            net.load_state_dict(weights)
            logits, targets = ctx.predict(net, ctx.probe)
            rows.append(confidences(logits, targets, self.confidence))
        return torch.stack(rows)

    def gate_relevance(self, moe: ServerMoE, ctx: ServerContext) -> torch.Tensor:
        """Q (n x K) on the probe set (eval, no noise): gate probabilities (``soft``), their top-1
        one-hot (``onehot``), or the forward's gate values g (``gates``, the code's Q)."""
        logits, _ = ctx.predict(moe.gate, ctx.probe)
        if self.relevance_gate == "gates":
            return moe.route(logits.float())[0]
        q = torch.softmax(logits.float(), dim=1)
        if self.relevance_gate == "onehot":
            q = torch.nn.functional.one_hot(q.argmax(1), q.shape[1]).float()
        return q

    def gate_statistics(self, moe: ServerMoE, ctx: ServerContext) -> dict[str, Any]:
        """Routing on the validation set: utilisation per expert, gate entropy, label entropy H_lab."""
        logits, targets = ctx.predict(moe.gate, ctx.val)
        probs = torch.softmax(logits.float(), dim=1)
        gates, _ = moe.route(logits.float())
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
        return {
            "alpha": float(moe.alpha_value().detach()),
            "utilisation": expert_utilisation(gates),
            "gate_entropy": float(entropy),
            "label_entropy": float(gating_entropy(gates, targets, ctx.num_classes, self.entropy_mode)),
        }


class ExploringMoE(ServerMoE):
    """:class:`ServerMoE` with the text folders' epsilon-greedy routing (Sent140 ``moe_bert.py:313-319``,
    Yelp ``moe.py:315-321``): in a training forward, with probability epsilon, every sample of the
    batch goes to k distinct experts drawn at random, carrying the gate values of its own top k.
    epsilon = max(end, start - s (start - end) / steps) at the s-th training forward (the code lowers
    it by (start - end) / steps before each server training batch, Sent140 ``train.py:35-36``, Yelp
    ``train.py:29-30``)."""

    def __init__(self, *args: Any, start: float, end: float, steps: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start, self.end, self.steps = start, end, steps
        self.steps_done = 0
        self._exploring = False

    def epsilon(self) -> float:
        """The exploration probability after ``steps_done`` training forwards."""
        return max(self.end, self.start - self.steps_done * (self.start - self.end) / self.steps)

    def forward(self, x: Any):
        if self.training:
            self.steps_done += 1
        self._exploring = self.training
        try:
            return super().forward(x)
        finally:
            self._exploring = False

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates, top = super().route(logits)
        epsilon = self.epsilon()
        if not self._exploring or epsilon <= 0 or float(torch.rand(())) >= epsilon:
            return gates, top
        chosen = torch.rand(logits.shape, device=logits.device).argsort(dim=1)[:, : top.shape[1]]
        return torch.zeros_like(gates).scatter(1, chosen, gates.gather(1, top)), chosen


_KEY = "federation.algorithm."
_CHOICES = {
    "gate_value": ("probability", "renormalised", "code"),
    "load": ("count", "smooth", "code"),
    "entropy_mode": ("paper", "conditional", "code"),
    "confidence": ("probability", "logit"),
    "relevance_gate": ("soft", "onehot", "gates"),
    "relevance_norm": ("sum", "mean"),
    "expert_update": ("moving", "replace"),
    "main_update": ("moving", "mean", "weighted_mean"),
    "server_lr_schedule": ("constant", "cosine", "step"),
    "server_schedule": ("every_iteration", "pretrain_only"),
    "stage_c": ("paper", "code"),
    "client_update": ("moving", "replace"),
    "server_optimizer": ("adam", "sgd"),
}


def _check_options(o: dict[str, Any]) -> None:
    """Every option with a domain, checked before anything runs (a ConfigError naming the option)."""
    check_int(_KEY + "num_routed", o["num_routed"], 1)
    check_int(_KEY + "num_main", o["num_main"], 0)
    check_int(_KEY + "top_k", o["top_k"], 1, o["num_routed"], hint="experts per sample, at most num_routed")
    check_int(_KEY + "iterations", o["iterations"], 1)
    check_int(_KEY + "server_epochs", o["server_epochs"], 0)
    check_int(_KEY + "main_epochs", o["main_epochs"], 0)
    check_int(_KEY + "server_lr_period", o["server_lr_period"], 1, hint="server steps per cosine half-period or per decay step")
    check_float(_KEY + "server_lr_gamma", o["server_lr_gamma"], 0.0, 1.0, low_open=True)
    check_float(_KEY + "lam", o["lam"], 0.0, 1.0)
    check_float(_KEY + "alpha_init", o["alpha_init"], 0.0, 1.0)
    check_float(_KEY + "relevance_temperature", o["relevance_temperature"], 0.0, low_open=True)
    check_float(_KEY + "label_smoothing", o["label_smoothing"], 0.0, 1.0, high_open=True)
    for name in ("w_ent", "w_aux", "gate_lr", "alpha_lr", "main_lr", "expert_lr", "main_server_lr", "server_weight_decay"):
        check_float(_KEY + name, o[name], 0.0)
    check_float(_KEY + "server_eps", o["server_eps"], 0.0, low_open=True)
    check_float(_KEY + "server_momentum", o["server_momentum"], 0.0, 1.0, high_open=True)
    if o["gate_network_kwargs"] is not None and not isinstance(o["gate_network_kwargs"], dict):
        raise ConfigError(f"{_KEY}gate_network_kwargs must be a mapping of keyword arguments, got {o['gate_network_kwargs']!r}")
    check_float(_KEY + "random_routing", o["random_routing"], 0.0, 1.0)
    check_float(_KEY + "random_routing_min", o["random_routing_min"], 0.0, 1.0)
    check_int(_KEY + "random_routing_steps", o["random_routing_steps"], 1)
    for name, choices in _CHOICES.items():
        check_choice(_KEY + name, o[name], choices)
    if o["gate_network"] is not None:
        _check_gate_network(o["gate_network"])


def _check_gate_network(name: str) -> None:
    """``gate_network`` names a registered architecture (modules registering more are imported first)
    or a dotted class path."""
    import importlib
    import pkgutil

    from fedmoe.models import networks

    if "." in name or name in networks.NETWORKS:
        return
    import fedmoe.models

    for info in pkgutil.iter_modules(fedmoe.models.__path__, "fedmoe.models."):
        try:
            importlib.import_module(info.name)
        except Exception:  # an optional extra that is not installed
            continue
    if name not in networks.NETWORKS:
        raise ConfigError(
            f"{_KEY}gate_network={name!r} is not a known network; known names: {', '.join(sorted(networks.NETWORKS))} "
            "(or a dotted path pkg.module.Class)"
        )


def _clone(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}
