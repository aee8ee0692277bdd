"""FederatedLoop: sample clients -> executor trains them -> algorithm aggregates -> evaluate ->
log -> checkpoint. One loop for every algorithm."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from fedmoe.algorithms.base import Algorithm, ClientResult, StateDict
from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.algorithms.fusion import all_finite, num_bytes
from fedmoe.data.federated import FederatedDataModule
from fedmoe.errors import CheckpointError, ConfigError, DataError, RoundError
from fedmoe.executors import build_executor
from fedmoe.executors.base import ClientFailure, ClientTask, Executor
from fedmoe.federation import checkpoint as ckpt_io
from fedmoe.federation.context import EngineContext
from fedmoe.federation.recorder import RoundRecorder, flat_config
from fedmoe.federation.runner import RunnerSettings, check_executor_strategy
from fedmoe.federation.sampling import ClientSampler
from fedmoe.federation.store import ClientStore
from fedmoe.validation import check_choice, check_int

log = logging.getLogger(__name__)


class Federation:
    """The ``federation:`` section: the rounds loop and its algorithm.

    Args:
        algorithm: the federated algorithm (``class_path`` + ``init_args``); default FedAvg.
        rounds: number of rounds; a finished run can be extended with ``--ckpt_path last``.
        clients_per_round: m, clients sampled per round.
        sampling: ``uniform`` or ``per_group`` (one client per residue class of the id mod m).
        min_clients: clients that must survive a round (others may fail or return non-finite weights).
        executor: who trains the clients: ``sequential`` (default, in this process), ``vectorized``
            (a round's clients as one batched model), ``parallel``, or an :class:`Executor`.
        persistent_optimizer: keep each client's optimizer state between its rounds.
        store_dtype: store client weights as ``float16`` / ``bfloat16`` (default: lossless).
        client_store: where personalised client weights and optimizer states live between rounds:
            ``memory`` (default: a checkpoint file holds the whole run) or ``disk`` (one safetensors
            file per client in the run's ``clients/`` folder, read when the client is sampled:
            memory grows with clients per round, not total clients, and checkpoints reference the
            files instead of copying every client; see :mod:`fedmoe.federation.store`).
        eval_every: evaluate the server model every this many rounds (null: only at the last round).
        eval_last: also evaluate the server model at the last round (false: only every ``eval_every``).
        client_eval: evaluate each sampled client's synced model on its held-out split.
        checkpoint_every: save ``checkpoints/last.ckpt`` every this many rounds (null: only at the last).
        checkpoint_last: also save a checkpoint after the last round (false: only every ``checkpoint_every``).
        write_logs: write ``metrics.csv``, ``summary.json``, ``config.yaml`` and TensorBoard events into
            the run folder (false: the rounds' records stay in ``FederatedLoop.history`` only).
        progress: show a progress bar over rounds.
    """

    def __init__(
        self,
        algorithm: Algorithm | None = None,
        rounds: int = 10,
        clients_per_round: int = 5,
        sampling: Literal["uniform", "per_group"] = "uniform",
        min_clients: int = 1,
        executor: Executor | Literal["sequential", "vectorized", "parallel"] | None = None,
        persistent_optimizer: bool = False,
        store_dtype: Literal["float16", "bfloat16"] | None = None,
        client_store: Literal["memory", "disk"] = "memory",
        eval_every: int | None = 1,
        eval_last: bool = True,
        client_eval: bool = True,
        checkpoint_every: int | None = 1,
        checkpoint_last: bool = True,
        write_logs: bool = True,
        progress: bool = True,
    ) -> None:
        check_int("federation.rounds", rounds, 1)
        check_int("federation.clients_per_round", clients_per_round, 1)
        check_int("federation.min_clients", min_clients, 1, clients_per_round,
                  hint="the clients that must survive a round, at most clients_per_round")
        if eval_every is not None:
            check_int("federation.eval_every", eval_every, 1, hint="rounds between evaluations; null: never on a schedule")
        if checkpoint_every is not None:
            check_int("federation.checkpoint_every", checkpoint_every, 1,
                      hint="rounds between checkpoints; null: never on a schedule")
        check_choice("federation.sampling", sampling, ("uniform", "per_group"))
        check_choice("federation.store_dtype", store_dtype, (None, "float16", "bfloat16"))
        check_choice("federation.client_store", client_store, ("memory", "disk"))
        self.algorithm = algorithm if algorithm is not None else FedAvg()
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self.min_clients = min_clients
        self.executor = build_executor(executor if executor is not None else "sequential")
        self.persistent_optimizer = persistent_optimizer
        self.store_dtype = store_dtype
        self.client_store = client_store
        self.eval_every = eval_every
        self.eval_last = eval_last
        self.client_eval = client_eval
        self.checkpoint_every = checkpoint_every
        self.checkpoint_last = checkpoint_last
        self.write_logs = write_logs
        self.progress = progress

    def evaluates(self, r: int) -> bool:
        """Whether the server model is evaluated after round ``r``."""
        return _on_schedule(r, self.eval_every) or (self.eval_last and r == self.rounds)

    def checkpoints(self, r: int) -> bool:
        """Whether a checkpoint is saved after round ``r``."""
        return _on_schedule(r, self.checkpoint_every) or (self.checkpoint_last and r == self.rounds)


class FederatedLoop:
    """Runs a federation for a client module and a federated data module.

    Args:
        federation: the loop settings and algorithm.
        module: the client LightningModule; its ``net`` is what travels.
        datamodule: the federated data.
        settings: local training settings (from ``trainer:``).
        run_dir: folder of the run (events, metrics.csv, checkpoints).
        seed: the run's seed (client sampling).
        config: flattened config values that define the math, for the checkpoint fingerprint.
        config_defaults: the default of each such key where known: a key that a checkpoint lacks
            (an option added since it was written) counts as holding its default.
    """

    def __init__(
        self,
        federation: Federation,
        module,
        datamodule: FederatedDataModule,
        settings: RunnerSettings | None = None,
        run_dir: str | Path = "runs/default",
        seed: int = 0,
        config: dict[str, Any] | None = None,
        config_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.fed = federation
        self.algo = federation.algorithm
        self.module = module
        self.datamodule = datamodule
        self.settings = settings or RunnerSettings()
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.config = dict(config or {})
        self.config_defaults = dict(config_defaults or {})
        self.template: StateDict = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
        self.store = ClientStore(federation.store_dtype,
                                 root=self.run_dir / "clients" if federation.client_store == "disk" else None)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.state: dict[str, Any] | None = None
        self.round = 0
        self.elapsed = 0.0
        """Seconds spent in rounds over all sessions of the run (up to the last checkpoint, then this one)."""
        self.sessions: list[dict[str, Any]] = []
        """One record per ``fit`` call that ran rounds: start time, rounds, seconds, resumed-from."""
        self._columns: list[int] = []  # the last round's aggregated clients: the columns of its matrices
        self._client_rows: list[dict[str, Any]] = []  # the last round's rows of clients.csv
        self.saved_round: int | None = None
        self.loaded_round: int | None = None
        self._writer = ckpt_io.BackgroundWriter()
        self._writing: int | None = None
        """The round whose checkpoint the background writer holds, until it is waited for."""
        self._ready = False

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def setup(self) -> None:
        if self._ready:
            return
        self.datamodule.setup("fit")
        n = len(self.datamodule.splits.client_train)
        if self.fed.clients_per_round > n:
            raise DataError(
                f"federation.clients_per_round={self.fed.clients_per_round} exceeds the {n} clients of the data"
            )
        if not 1 <= self.fed.min_clients <= self.fed.clients_per_round:
            raise RoundError(
                f"federation.min_clients={self.fed.min_clients} must be between 1 and clients_per_round="
                f"{self.fed.clients_per_round}"
            )
        self.sampler = ClientSampler(n, self.fed.clients_per_round, self.fed.sampling, self.seed)
        self.ctx = EngineContext(self.module, self.datamodule, self.settings, self.template)
        frozen = self.algo.frozen_keys(self.ctx)
        for name, param in self.module.net.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        check_executor_strategy(self.settings, self.fed.executor)
        self.fed.executor.bind(self.module, self.datamodule, self.settings)
        self.fed.executor.check(self.algo)
        self._ready = True

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "server_state": self.state,
            "store": self.store.state_dict(),
            "history": self.history,
            "best": self.best,
            "rng": ckpt_io.capture_rng(),
            "config": self.config,
            "fingerprint": ckpt_io.fingerprint(self.config),
            "elapsed": self.elapsed,
            "sessions": self.sessions,
        }

    def load(self, path: str | Path, check_config: bool = True, compare=None) -> None:
        """Restore a checkpoint; refuse one whose math-defining config differs.

        ``compare`` (flat config -> the values that must match) narrows the check, e.g. to what
        changes the model and the evaluation data when only evaluating.
        """
        ckpt = ckpt_io.load_checkpoint(path)
        pick = compare or (lambda flat: flat)
        known = {k: v for k, v in self.config_defaults.items() if k not in ckpt["config"]}
        saved, current = pick({**known, **ckpt["config"]}), pick(self.config)
        if check_config and saved != current:
            keys = ckpt_io.diff_keys(saved, current)
            shown = ", ".join(f"{k} ({ckpt['config'].get(k, '<unset>')!r} -> {self.config.get(k, '<unset>')!r})" for k in keys[:6])
            more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
            raise CheckpointError(
                f"checkpoint {path} was made with another configuration: {shown}{more}; "
                "use the same config, or start a new run in another trainer.default_root_dir"
            )
        self.round = ckpt["round"]
        self.state = ckpt["server_state"]
        self.store.load_state_dict(ckpt["store"], folder=Path(path).parent.parent / "clients")
        self.history = ckpt["history"]
        self.best = ckpt["best"]
        self._rng = ckpt["rng"]
        self.loaded_round = self.round
        self.sessions = list(ckpt.get("sessions", []))
        self.elapsed = ckpt.get("elapsed", sum(row.get("time/round_s", 0.0) + row.get("time/eval_s", 0.0)
                                                for row in self.history))

    def save(self) -> None:
        """Save the checkpoint here and now (after the background one, if any); with a disk client
        store it references the store's files, and the files it no longer references are deleted
        once it is written."""
        self.settle_checkpoint()
        ckpt_io.save_checkpoint(self.ckpt_path, self.state_dict())
        self.store.commit()

    def checkpoint(self) -> None:
        """Save this round's checkpoint, then ``summary.json``, as ``fit`` does after a round.

        The write goes to a background thread (:class:`~fedmoe.federation.checkpoint.BackgroundWriter`:
        a deep copy of the state, written atomically with fsync while the next round trains) when
        the snapshot costs no more memory than one round's uploads just released, the client store
        is in memory and local fits do not fork processes; otherwise it is written here. Either way
        the previous checkpoint stays until the new one is complete, and :meth:`settle_checkpoint`
        (called by the next checkpoint and at the end of ``fit``) raises a failed write's error.
        """
        self.settle_checkpoint()
        summary = self._summary_json() if self.fed.write_logs else None
        payload = self.state_dict()
        background = self.store.root is None and not self.settings.distributed
        if background and ckpt_io.tensor_bytes(payload) <= self.fed.clients_per_round * num_bytes(self.template):
            self._writer.submit(self.ckpt_path, payload, then=lambda: self._write_summary(summary))
            self._writing = self.round
            return
        ckpt_io.save_checkpoint(self.ckpt_path, payload)
        self.store.commit()
        self.saved_round = self.round
        self._write_summary(summary)

    def settle_checkpoint(self, raise_error: bool = True) -> None:
        """Wait for the background checkpoint, if one is being written; once written it is the
        run's saved round. A failed write raises its error, or with ``raise_error=False`` (a run
        already failing) is logged."""
        if not self._writer.pending:
            return
        written = self._writing
        try:
            self._writer.wait()
        except Exception as e:
            self._writing = None
            if raise_error:
                raise
            log.error("the checkpoint of round %s was not written: %s", written, e)
            return
        self._writing = None
        self.saved_round = written

    @property
    def checkpoint_cpu_seconds(self) -> float:
        """CPU time spent writing checkpoints in the background so far."""
        return self._writer.cpu_seconds

    # -- running --------------------------------------------------------------------------------

    def fit(self, ckpt_path: str | Path | None = None, config_yaml: str | None = None) -> dict[str, Any]:
        """Run rounds up to ``federation.rounds``, resuming from ``ckpt_path`` if given.

        Leftovers of interrupted atomic writes are removed when the rounds start. Nothing else is
        written before the first round of this call completes, so a run that fails or is
        interrupted earlier leaves its folder as it was; then ``config_yaml`` (the resolved config)
        is saved as ``config.yaml``, headed by comments listing the run's sessions.
        ``summary.json`` is written after every checkpoint (:meth:`checkpoint`: often in the
        background while the next round trains; the last one is complete, or its error raised,
        before ``fit`` returns). A checkpoint with more rounds than ``federation.rounds`` is
        refused; one with exactly as many changes nothing (the summary has ``new_rounds: 0``).
        ``seconds`` in the summary is the time spent in rounds over all sessions.
        """
        self.setup()
        self.store.check_writable()
        self._rng = None
        if ckpt_path is not None:
            self.load(ckpt_path)
            if self.round > self.fed.rounds:
                raise ConfigError(
                    f"federation.rounds={self.fed.rounds} but {ckpt_path} has already done {self.round} rounds: "
                    f"nothing was run or changed; to extend the run set --federation.rounds above {self.round}"
                )
            if self.round == self.fed.rounds:
                return {**self.summary(self.elapsed), "sessions": self.sessions, "new_rounds": 0}
            self.store.verify()
            ckpt_io.restore_rng(self._rng)
            log.info("resumed from %s at round %d", ckpt_path, self.round)
        else:
            self.state = self.algo.init_server(self.template, self.ctx)
        session = {
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "resumed_from": None if ckpt_path is None else str(ckpt_path),
            "first_round": self.round + 1,
            "last_round": self.round,
            "target_rounds": self.fed.rounds,
            "seconds": 0.0,
        }
        self.sessions.append(session)
        ckpt_io.remove_stale_temp_files(self.run_dir, self.ckpt_path.parent, *filter(None, [self.store.root]))
        recorder = (RoundRecorder(self.run_dir, self.round, self.history, tensorboard=self.settings.logger,
                                  every=self.settings.log_every_n_steps, last_round=self.fed.rounds,
                                  client_columns=self.client_columns())
                    if self.fed.write_logs else None)
        bar = tqdm(
            total=self.fed.rounds, initial=min(self.round, self.fed.rounds), desc="rounds", unit="round",
            disable=not (self.fed.progress and self.settings.enable_progress_bar), dynamic_ncols=True,
        )
        tick = time.perf_counter()
        finished = False
        try:
            while self.round < self.fed.rounds:
                row, images = self.run_round(self.round + 1)
                self.round += 1
                if self.round == session["first_round"] and self.fed.write_logs:
                    if config_yaml is not None:
                        ckpt_io.atomic_write_text(self.run_dir / "config.yaml", self._sessions_header() + config_yaml)
                if recorder is not None:
                    recorder.log(self.round, row, images, self._columns, self._client_rows)
                    self.history = recorder.history
                else:
                    self.history = [*self.history, {"round": self.round, **row}]
                now = time.perf_counter()
                self.elapsed += now - tick
                session["seconds"] += now - tick
                session["last_round"] = self.round
                tick = now
                if self.fed.checkpoints(self.round):
                    self.checkpoint()
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{row[k]:.4f}" for k in ("server/test_acc", "clients/acc_mean") if _finite(row.get(k))})
            finished = True
        finally:
            bar.close()
            if recorder is not None:
                if config_yaml is not None and self.round >= session["first_round"]:
                    try:  # a summary for browsing runs: never the reason a run fails, nor what hides why
                        recorder.write_hparams(_hparams_of(config_yaml), self._hparam_metrics(), self.round)
                    except Exception as e:
                        log.warning("TensorBoard HPARAMS record not written: %s: %s", type(e).__name__, e)
                recorder.close()
            self.fed.executor.close()  # worker processes stop with the rounds (a later fit starts them again)
            self.settle_checkpoint(raise_error=finished)
        return {**self.summary(self.elapsed), "sessions": self.sessions,
                "new_rounds": self.round - session["first_round"] + 1}

    def _hparam_metrics(self) -> dict[str, float]:
        """The results shown beside the run's settings in TensorBoard's HPARAMS tab."""
        last = self.history[-1] if self.history else {}
        out = {f"hparams/best_val_test_{k[5:]}": v for k, v in self.best.items() if k.startswith("test_")}
        out["hparams/best_val_round"] = self.best.get("round")
        out["hparams/test_acc_last"] = last.get("server/test_acc")
        out["hparams/clients_acc_mean_last"] = last.get("clients/acc_mean")
        for way in ("up", "down"):
            out[f"hparams/MB_{way}_per_round"] = _mean([r.get(f"comm/bytes_{way}") for r in self.history]) / 1e6
        out["hparams/minutes"] = self.elapsed / 60
        return out

    def _summary_json(self) -> str:
        """summary.json's text now; written after the checkpoint, so that the two always agree."""
        summary = {**self.summary(self.elapsed), "sessions": self.sessions, "complete": self.round == self.fed.rounds}
        return json.dumps(summary, indent=2, default=str)

    def _write_summary(self, text: str | None) -> None:
        if text is not None:
            ckpt_io.atomic_write_text(self.run_dir / "summary.json", text)

    def _sessions_header(self) -> str:
        """Comment lines for config.yaml: how to rerun or evaluate it, and the run's sessions."""
        lines = [
            "# The resolved config of this run. Rerun it in a new folder:",
            "#   python -m fedmoe.cli fit --config <this file> --trainer.default_root_dir <new folder>",
            "# evaluate it: python -m fedmoe.cli test --config <this file> --ckpt_path last",
            "# sessions:",
        ]
        for i, ses in enumerate(self.sessions, 1):
            how = "new run" if ses["resumed_from"] is None else f"resumed from {ses['resumed_from']}"
            done = f"from round {ses['first_round']}" if i == len(self.sessions) else f"rounds {ses['first_round']}..{ses['last_round']} saved"
            lines.append(f"#   {i}. {ses['started']} {how}, federation.rounds {ses['target_rounds']}: {done}")
        return "\n".join(lines) + "\n"

    def run_round(self, r: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One round; returns its logged scalars and images."""
        t0 = time.perf_counter()
        ids = self.sampler.sample(r)
        tasks, down = [], {}
        for cid in ids:
            own = self.store.get_weights(cid) if self.algo.personalised else None
            plan = self.algo.configure_client(self.state, cid, own if own is not None else self.template)
            down[cid] = (num_bytes(plan.weights) if plan.wire_bytes is None else plan.wire_bytes) if plan.transmit else 0
            opt = self.store.get_optimizer(cid) if self.fed.persistent_optimizer else None
            tasks.append(ClientTask(cid, plan, opt, keep_optimizer=self.fed.persistent_optimizer, round=r, seed=self.seed))
        outcomes = self.fed.executor.run(tasks)
        del tasks, own, plan, opt  # the round's inputs: with a disk client store, their only copies in memory
        results: list[ClientResult] = []
        optimizer_states: dict[int, dict | None] = {}
        dropped: list[str] = []
        status: dict[int, str] = {}
        for out in outcomes:
            if isinstance(out, ClientFailure):
                dropped.append(f"{out.client_id} ({out.error})")
                status[out.client_id] = "failed"
            elif not all_finite(out.result.weights):
                log.warning("round %d: client %d returned non-finite weights; dropped", r, out.result.client_id)
                dropped.append(f"{out.result.client_id} (non-finite weights)")
                status[out.result.client_id] = "non-finite"
            else:
                results.append(out.result)
                optimizer_states[out.result.client_id] = out.optimizer_state
                status[out.result.client_id] = "ok"
        if dropped:
            log.warning("round %d: dropped clients %s", r, "; ".join(dropped))
        if len(results) < self.fed.min_clients:
            raise RoundError(
                f"round {r}: only {len(results)} of {len(ids)} clients survived (federation.min_clients="
                f"{self.fed.min_clients}); dropped: {'; '.join(dropped)}"
            )
        self._columns = [res.client_id for res in results]  # the clients of a logged matrix's columns
        up = {res.client_id: self.algo.upload_bytes(res) for res in results}
        self.state = self.algo.aggregate(self.state, results, self.ctx)
        synced = self.algo.sync(self.state, results, self.ctx)
        if self.algo.sync_transmits:
            for cid, w in synced.items():
                down[cid] += num_bytes(w)
        if self.algo.personalised:
            for cid, w in synced.items():
                self.store.put_weights(cid, w, version=r)
        if self.fed.persistent_optimizer:
            for cid, st in optimizer_states.items():
                self.store.put_optimizer(cid, st, version=r)
        round_time = time.perf_counter() - t0

        row: dict[str, Any] = {
            "clients": " ".join(map(str, ids)),
            "clients/ok": len(results),
            "clients/dropped": len(dropped),
            "clients/train_loss": _mean([res.metrics.get("loss", math.nan) for res in results]),
            "comm/bytes_up": sum(up.values()),
            "comm/bytes_down": sum(down.values()),
            "time/round_s": round_time,
        }
        t1 = time.perf_counter()
        if self.fed.evaluates(r):
            row.update(self.evaluate_server(r))
        heldout: dict[int, dict[str, float]] = {}
        if self.fed.client_eval:
            clients_row, heldout = self.evaluate_clients(synced)
            row.update(clients_row)
        by_id = {res.client_id: res for res in results}
        self._client_rows = [self._client_row(r, cid, status[cid], by_id.get(cid), down[cid], up.get(cid, 0),
                                              heldout.get(cid, {})) for cid in ids]
        extra = self.algo.round_metrics(self.state)
        images = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        row.update({k: float(v) for k, v in extra.items() if k not in images})
        row["time/eval_s"] = time.perf_counter() - t1
        return row, images

    def evaluate_server(self, r: int) -> dict[str, float]:
        """Server model on validation and test; tracks the test metrics at the best validation round
        (by the data set's ``monitor``: validation loss, or e.g. Matthews correlation for CoLA)."""
        server = self.algo.server_module(self.state, self.ctx)
        cached = getattr(self.algo, "server_val_metrics", None)  # measured by the algorithm on this model
        val = (cached(self.state) if cached is not None else None) or self.ctx.evaluate(server, self.ctx.val)
        test = self.ctx.evaluate(server, self.ctx.test)
        name, mode = self.datamodule.monitor
        score = val.get(name, math.nan)
        if _finite(score) and (not self.best or _better(score, self.best.get("val_" + name, self.best.get("val_loss")), mode)):
            self.best = {
                "round": r, "val_" + name: score, "val_loss": val["loss"],
                "test_acc": test.get("acc", math.nan), "test_loss": test["loss"],
                **{"test_" + k: v for k, v in test.items() if k not in ("n", "loss", "acc")},
            }
        row = {}
        for split, metrics in (("val", val), ("test", test)):
            row.update({f"server/{split}_{k}": v for k, v in metrics.items() if k != "n"})
        row["server/best_test_acc"] = self.best.get("test_acc", math.nan)
        if name not in ("loss", "acc"):
            row[f"server/best_test_{name}"] = self.best.get("test_" + name, math.nan)
        best_module = getattr(self.algo, "best_module", None)
        best = best_module(self.state, self.ctx) if best_module is not None else None
        if best is not None:  # the best iteration of any round so far (Fed-MoE's released code reports it)
            row["server/best_iteration_test_acc"] = self.ctx.evaluate(best, self.ctx.test).get("acc", math.nan)
        return row

    def evaluate_clients(self, synced: dict[int, StateDict]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Each participating client's synced model on its own held-out split: accuracy and the data
        set's monitored metric as mean, min and max over clients, and each client's metrics by id."""
        by_client, loaded, net = {}, None, None
        for cid, weights in synced.items():
            dataset = self.datamodule.splits.client_test[cid]
            if len(dataset) == 0:
                continue
            if loaded is not weights:
                net, loaded = self.ctx.load_network(weights), weights
            by_client[cid] = self.ctx.evaluate(net, dataset)
        per_client = list(by_client.values())
        row: dict[str, float] = {}
        for key in dict.fromkeys(["acc", self.datamodule.monitor[0]]):
            values = [m[key] for m in per_client if _finite(m.get(key))]
            if key != "loss" and values:
                row.update({f"clients/{key}_mean": _mean(values), f"clients/{key}_min": min(values),
                            f"clients/{key}_max": max(values)})
        return row, by_client

    def client_columns(self) -> list[str]:
        """The columns of ``clients.csv``: one row per client and round."""
        metrics = list(dict.fromkeys(["loss", "acc", self.datamodule.monitor[0]]))
        return ["round", "client", "status", "samples", "steps", "train_loss", "bytes_down", "bytes_up",
                *[f"heldout_{m}" for m in metrics]]

    def _client_row(self, r: int, cid: int, status: str, result: ClientResult | None, down: int, up: int,
                    heldout: dict[str, float]) -> dict[str, Any]:
        """A client's round: whether it made it into the aggregate, its local training, its exact bytes
        each way (a dropped client's download counts; it uploaded nothing that was used), and its
        synced model on its own held-out split (with ``client_eval``)."""
        metrics = result.metrics if result is not None else {}
        row = {
            "round": r, "client": cid, "status": status,
            "samples": result.num_samples if result is not None else None,
            "steps": metrics.get("steps"), "train_loss": metrics.get("loss"),
            "bytes_down": down, "bytes_up": up,
        }
        row.update({f"heldout_{k}": v for k, v in heldout.items() if k != "n"})
        return row

    def evaluate(self, split: Literal["val", "test"]) -> dict[str, float]:
        """The server model of the loaded state on the validation or test set."""
        self.setup()
        server = self.algo.server_module(self.state, self.ctx)
        return self.ctx.evaluate(server, self.ctx.val if split == "val" else self.ctx.test)

    def summary(self, seconds: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "algorithm": type(self.algo).__name__,
            "rounds": self.round,
            "seconds": round(seconds, 2),
            "server_test_acc": last.get("server/test_acc"),
            "best_val_round": self.best.get("round"),
            "best_val_test_acc": self.best.get("test_acc"),
            "clients_acc_mean": last.get("clients/acc_mean"),
            "monitor": list(self.datamodule.monitor),
            "best_val_test": {k[5:]: v for k, v in self.best.items() if k.startswith("test_")},
            "run_dir": str(self.run_dir),
        }


def _hparams_of(config_yaml: str) -> dict[str, Any]:
    """The settings of a run's resolved config, flat (:func:`flat_config`); seed_everything and
    the trainer's options included, the config's own bookkeeping left out."""
    import yaml

    config = yaml.safe_load(config_yaml) or {}
    return flat_config(config) if isinstance(config, dict) else {}


def _on_schedule(r: int, every: int | None) -> bool:
    return every is not None and r % every == 0


def _better(score: float, best: float | None, mode: str) -> bool:
    if best is None or not _finite(best):
        return True
    return score > best if mode == "max" else score < best


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if _finite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
