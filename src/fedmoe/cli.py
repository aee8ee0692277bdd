"""Command line: ``python -m fedmoe.cli fit --config experiments/quickstart.yaml``.

A LightningCLI whose sections are ``model:`` (the client LightningModule), ``data:`` (a federated
data module), ``trainer:`` (local training: epochs, devices, precision, gradient clipping; and
``default_root_dir``, the run's folder) and ``federation:`` (rounds, sampling, the algorithm).
``fit`` runs the federated loop; ``validate`` and ``test`` evaluate a saved checkpoint.

Every failure the user can cause prints one ``error: ...`` line and exits with code 2; Ctrl-C prints
one ``interrupted: ...`` line with the resume command and exits with code 130.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import pkgutil
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

from fedmoe.errors import CheckpointError, ConfigError, FedMoEError

log = logging.getLogger("fedmoe")

#: Config keys that change the math of a run (checked when resuming); the rest do not.
FINGERPRINT_INCLUDE = (
    "model", "data", "federation", "seed_everything",
    "trainer.max_epochs", "trainer.max_steps", "trainer.limit_train_batches", "trainer.precision",
    "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm",
)
FINGERPRINT_EXCLUDE = (
    "data.data_dir", "data.init_args.data_dir", "data.eval_batch_size", "data.init_args.eval_batch_size",
    "federation.rounds", "federation.executor", "federation.progress", "federation.eval_every",
    "federation.client_eval", "federation.checkpoint_every", "federation.eval_last", "federation.checkpoint_last",
    "federation.write_logs", "federation.client_store",
)
#: Of those, what only changes training, so that ``validate``/``test`` accept a checkpoint whose values
#: differ: the local optimiser, batch sizes, the seed and local training, the loop's sampling.
#: Algorithm options that only change training are listed by the algorithm (``training_options``).
EVAL_EXCLUDE = (
    "model.optimizer", "model.label_smoothing", "seed_everything", "trainer",
    "data.batch_size", "data.init_args.batch_size", "data.server_batch_size", "data.init_args.server_batch_size",
    "federation.clients_per_round", "federation.sampling", "federation.min_clients",
    "federation.persistent_optimizer", "federation.store_dtype",
)
RESUME_CHOICES = "'last' (the run folder's checkpoints/last.ckpt) or the path of a checkpoint file"
INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where the last checkpoint is and how to resume."""


def condense_error(message: str) -> str:
    """The informative part of a jsonargparse error, as one line."""
    from fedmoe.federation.runner import NOT_IN_FEDERATED_RUNS, no_effect_message

    for key in re.findall(r"trainer\.(\w+)", message):
        if key in NOT_IN_FEDERATED_RUNS:
            return no_effect_message(key)
        if key == "logger":
            return ("trainer.logger takes true or false: the run writes TensorBoard events and metrics.csv itself "
                    "(false: no TensorBoard events)")
    raw = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    if not raw:
        return "invalid arguments"
    lines = [ln.strip() for ln in raw]
    head, rest = lines[0], lines[1:]
    for i, ln in enumerate(raw):
        if ln.lstrip().startswith("- Problem with given class_path"):
            indent = len(ln) - len(ln.lstrip())
            block = [lines[i].lstrip("- ")]
            for nested in raw[i + 1 :]:  # the lines indented under it: the nested key and what it expected
                if len(nested) - len(nested.lstrip()) <= indent:
                    break
                block.append(nested.strip())
            return " ".join([head, *block])
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value type", "- Expected a <class 'NoneType'>")
    detail = [ln for ln in rest if not ln.startswith(skip)][:2]
    return " ".join([head, *detail])


def builtin_classes(package: str, base: type) -> list[type]:
    """Public, concrete subclasses of ``base`` defined in the modules of ``package`` (imported here);
    modules that cannot be imported (a missing optional dependency) are skipped."""
    pkg = importlib.import_module(package)
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an optional extra that is not installed
            continue
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, base) and obj is not base and obj.__module__ == module.__name__
                    and not name.startswith("_") and not inspect.isabstract(obj)):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def builtins_epilog() -> str:
    """What ``fit --help`` lists under the options: the built-in algorithms, networks and data modules."""
    from fedmoe.algorithms.base import Algorithm
    from fedmoe.data.federated import FederatedDataModule
    from fedmoe.models import networks

    algorithms = builtin_classes("fedmoe.algorithms", Algorithm)
    data = [c for c in builtin_classes("fedmoe.data", FederatedDataModule) if c.__module__ != "fedmoe.data.federated"]
    builtin_classes("fedmoe.models", object)  # registers every network
    return (
        "Built-in algorithms (--federation.algorithm NAME; --federation.algorithm.help NAME lists its options): "
        + ", ".join(f"{c.__name__} ({c.__module__})" for c in algorithms)
        + ". Networks (--model.network): " + ", ".join(sorted(networks.NETWORKS))
        + ", or a dotted class path. Data modules (--data NAME): "
        + ", ".join(f"{c.__name__} ({c.__module__})" for c in data)
        + ". Other Lightning Trainer arguments have no effect in federated runs and are refused."
        + " Federated LoRA experts on a causal LM: python -m fedmoe.cli experts --help;"
        + " their MBPP pass@1 in a sandbox: python -m fedmoe.cli evaluate --help."
    )


def _wants_help(args: list[str]) -> bool:
    return any(a in ("-h", "--help") or a.split("=")[0].endswith(".help") for a in args)


def build_cli_class(args: list[str], configs: list[Any]):
    """The ``LightningCLI`` subclass of the project for these arguments and the config files they name
    (:func:`check_config_files`): ``fit``, ``validate``, ``test`` and the federated sections
    (``federation:``, the local ``trainer:``). :func:`fedmoe.federation.job.build_job` builds a job
    from it without running anything."""
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    import fedmoe.algorithms.fedavg  # noqa: F401  (short names: --federation.algorithm FedAvg)
    import fedmoe.algorithms.fedmoe  # noqa: F401
    import fedmoe.algorithms.fedprox  # noqa: F401
    from fedmoe.data.federated import FederatedDataModule
    from fedmoe.federation import checkpoint as ckpt_io
    from fedmoe.federation.loop import Federation, FederatedLoop
    from fedmoe.federation.runner import RunnerSettings
    from fedmoe.models.classifier import Classifier

    epilog = builtins_epilog() if _wants_help(args) else None
    if _short_algorithm_names(args, configs):
        from fedmoe.algorithms.base import Algorithm

        builtin_classes("fedmoe.algorithms", Algorithm)

    class LocalTrainer(pl.Trainer):
        """Local training of each client (Lightning Fabric driving the module's ``training_step``).

        Args:
            accelerator: ``cpu``, ``gpu`` (``cuda``), ``mps`` or ``auto``.
            devices: one device per client: 1, or ``[k]`` for device k; with a multi-device ``strategy``, the
                devices of each client's training: a number of CPU processes, or GPU ids such as ``[0, 1]``.
            strategy: ``auto``: each client on one device; ``ddp``, ``fsdp`` or ``deepspeed`` (Lightning's
                strategies): each client's local training on all of ``devices``, its batches split across them.
            precision: Lightning's precision names (``32-true``, ``bf16-mixed``, ``16-mixed``, ...).
            max_epochs: local epochs per round.
            max_steps: at most this many optimiser steps per local fit (-1: no limit).
            limit_train_batches: batches per local epoch (an integer, or a fraction of the client's batches).
            accumulate_grad_batches: batches per optimiser step.
            gradient_clip_val: clip gradients at this norm (or value); null: no clipping.
            gradient_clip_algorithm: ``norm`` or ``value``.
            deterministic: ``torch.use_deterministic_algorithms`` (``warn``: warn only).
            benchmark: ``torch.backends.cudnn.benchmark``.
            detect_anomaly: ``torch.autograd.set_detect_anomaly``.
            fast_dev_run: a smoke run: one round whose local fits stop after this many batches (true: 1);
                nothing is saved.
            logger: false: no TensorBoard events (metrics.csv and summary.json are still written).
            enable_progress_bar: the progress bar over rounds.
            log_every_n_steps: TensorBoard scalars every this many rounds (metrics.csv has every round).
            default_root_dir: the run folder (config.yaml, metrics.csv, summary.json, events, checkpoints/).
        """

        def __init__(
            self,
            *,
            accelerator: str = "cpu",
            devices: int | str | list[int] = 1,
            strategy: str = "auto",
            precision: int | str | None = None,
            max_epochs: int = 1,
            max_steps: int = -1,
            limit_train_batches: int | float | None = None,
            accumulate_grad_batches: int = 1,
            gradient_clip_val: float | None = None,
            gradient_clip_algorithm: Literal["norm", "value"] | None = None,
            deterministic: bool | Literal["warn"] | None = None,
            benchmark: bool | None = None,
            detect_anomaly: bool = False,
            fast_dev_run: bool | int = False,
            logger: bool | None = None,
            enable_progress_bar: bool | None = None,
            log_every_n_steps: int | None = None,
            default_root_dir: str | None = None,
        ) -> None:
            raise NotImplementedError("the CLI builds RunnerSettings from these arguments")

        def fit(self, model: Any = None, datamodule: Any = None, ckpt_path: str | None = None) -> None:
            """Run the federated rounds (a new run, or continue one).

            Args:
                ckpt_path: continue from a checkpoint: 'last' (the run folder's checkpoints/last.ckpt) or
                    the path of a checkpoint file.
            """

        def validate(self, model: Any = None, datamodule: Any = None, ckpt_path: str | None = None) -> None:
            """Evaluate a saved server model on the validation set.

            Args:
                ckpt_path: 'last' (the run folder's checkpoints/last.ckpt) or the path of a checkpoint file.
            """

        def test(self, model: Any = None, datamodule: Any = None, ckpt_path: str | None = None) -> None:
            """Evaluate a saved server model on the test set.

            Args:
                ckpt_path: 'last' (the run folder's checkpoints/last.ckpt) or the path of a checkpoint file.
            """

    class OneLineErrorParser(LightningArgumentParser):
        """Parse errors as one line on stderr and exit code 2 (no usage dump)."""

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
                return ArgumentParser.error(self, message, ex)
            sys.stderr.write(f"error: {condense_error(message)} (see --help)\n")
            sys.exit(2)

    class FedMoECLI(LightningCLI):
        """LightningCLI with a ``federation:`` section; ``fit`` runs rounds instead of epochs."""

        def __init__(self, args=None, run: bool = True) -> None:
            self._seed_drawn = False
            super().__init__(
                Classifier,
                FederatedDataModule,
                trainer_class=LocalTrainer,
                subclass_mode_data=True,
                save_config_callback=None,
                auto_configure_optimizers=False,
                seed_everything_default=0,
                parser_class=OneLineErrorParser,
                trainer_defaults={"accelerator": "cpu", "devices": 1, "max_epochs": 1},
                args=args,
                run=run,
            )

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": {"model", "datamodule"}, "validate": {"model", "datamodule"}, "test": {"model", "datamodule"}}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(Federation, "federation")
            if epilog:
                parser.epilog = epilog

        def _parse_ckpt_path(self) -> None:
            """Our checkpoints carry the run state, not model hyperparameters: nothing to merge."""

        def _set_seed(self) -> None:
            seed = self._get(self.config, "seed_everything")
            if seed is False:
                raise ConfigError(
                    "seed_everything=false: a federated run needs a seed (client sampling, resume); use true to "
                    "draw one (it is recorded in config.yaml) or an integer"
                )
            if seed is True:  # Lightning 2.6 would take PL_GLOBAL_SEED or 0: draw one, as documented
                seed = int.from_bytes(os.urandom(4), "little")
                if self.subcommand:
                    self.config[self.subcommand]["seed_everything"] = seed
                else:
                    self.config["seed_everything"] = seed
                self._seed_drawn = True
            super()._set_seed()

        def before_instantiate_classes(self) -> None:
            _check_network(self._section("model").get("network"))

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as e:
                raise _user_error(e) from None

        def instantiate_trainer(self, **kwargs: Any) -> RunnerSettings:
            return RunnerSettings.from_trainer_config(self._section("trainer"))

        def _run_subcommand(self, subcommand: str) -> None:
            kwargs = self._prepare_subcommand_kwargs(subcommand)
            getattr(self, subcommand)(kwargs["model"], kwargs["datamodule"], kwargs.get("ckpt_path"))

        # -- helpers ------------------------------------------------------------------------------

        def _section(self, name: str) -> dict[str, Any]:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            value = cfg.get(name)
            return value.as_dict() if hasattr(value, "as_dict") else dict(value or {})

        def _run_dir(self) -> Path:
            return Path(self._section("trainer").get("default_root_dir") or "runs/default")

        def _flat_config(self) -> dict[str, Any]:
            return ckpt_io.flatten(self.config[self.subcommand].as_dict())

        def _math_config(self) -> dict[str, Any]:
            return ckpt_io.select_keys(self._flat_config(), FINGERPRINT_INCLUDE, FINGERPRINT_EXCLUDE)

        def _loop(self, model, datamodule, run_dir: Path | None = None) -> FederatedLoop:
            cfg = self.config[self.subcommand]
            return FederatedLoop(
                self.config_init[self.subcommand]["federation"],
                model,
                datamodule,
                settings=self.trainer,
                run_dir=run_dir or self._run_dir(),
                seed=int(cfg.get("seed_everything")),
                config=self._math_config(),
                config_defaults=config_defaults(self._math_config(), {"model": Classifier, "federation": Federation}),
            )

        def _config_yaml(self) -> str:
            """The resolved config as a file that ``fit --config`` and ``test --config`` accept."""
            cfg = self.config[self.subcommand].clone()
            for key in ("ckpt_path", "config", "__path__"):
                if key in cfg:
                    del cfg[key]
            return self._parser(self.subcommand).dump(cfg, skip_none=False, skip_check=True)

        def _resolve_ckpt(self, ckpt_path: str | None, required: bool) -> Path | None:
            last = self._run_dir() / "checkpoints" / "last.ckpt"
            if ckpt_path in (None, ""):
                if required:
                    raise CheckpointError(f"{self.subcommand} needs --ckpt_path: {RESUME_CHOICES} (here {last})")
                return None
            if ckpt_path == "last":
                if last.is_file():
                    return last
                if required:
                    raise CheckpointError(
                        f"--ckpt_path last: {last} does not exist (no run in trainer.default_root_dir="
                        f"{self._run_dir()}); run fit first, or give the checkpoint file"
                    )
                log.warning("--ckpt_path last: %s does not exist yet; starting a new run", last)
                return None
            path = Path(ckpt_path)
            if ckpt_path in ("best", "hpc", "registry") and not path.exists():
                raise CheckpointError(f"--ckpt_path {ckpt_path} is not available here: use {RESUME_CHOICES}")
            if not path.is_file():
                raise CheckpointError(f"--ckpt_path {ckpt_path}: no such checkpoint file; use {RESUME_CHOICES}")
            return path

        def _resume_command(self) -> str:
            argv, skip = [], False
            for a in self._argv:
                if skip:
                    skip = False
                    continue
                if a == "--ckpt_path":
                    skip = True
                    continue
                if a.startswith("--ckpt_path="):
                    continue
                argv.append(a)
            return shlex.join(["python", "-m", "fedmoe.cli", *argv, "--ckpt_path", "last"])

        # -- subcommands --------------------------------------------------------------------------

        def fit(self, model, datamodule, ckpt_path: str | None = None) -> None:
            settings: RunnerSettings = self.trainer
            if settings.fast_dev_run:
                return self._smoke_run(model, datamodule, ckpt_path)
            run_dir = self._run_dir()
            check_run_dir(run_dir)
            path = self._resolve_ckpt(ckpt_path, required=False)
            if path is None and (run_dir / "checkpoints" / "last.ckpt").exists():
                raise CheckpointError(
                    f"{run_dir} already holds a run; continue it with --ckpt_path last, or start a new one "
                    "with another --trainer.default_root_dir (or delete the folder)"
                )
            check_optimizer(model)
            loop = self._loop(model, datamodule)
            loop.setup()
            check_labels(loop.datamodule.splits, model)
            try:
                summary = loop.fit(path, config_yaml=self._config_yaml())
            except KeyboardInterrupt:
                raise Interrupted(self._interrupted(loop, path)) from None
            except CheckpointError as e:
                if self._seed_drawn and "seed_everything" in str(e):
                    raise CheckpointError(f"{e}; seed_everything true drew a new seed: resume with --config "
                                          f"{run_dir / 'config.yaml'}, which records the run's seed") from None
                raise
            if summary.get("new_rounds") == 0:
                print(f"{run_dir} already has {summary['rounds']} of federation.rounds={loop.fed.rounds} rounds: "
                      "nothing to do, nothing changed (raise --federation.rounds to extend it)")
                return
            print(_summary_line(summary))

        def _interrupted(self, loop: FederatedLoop, resumed_from: Path | None) -> str:
            where = f"in round {loop.round + 1} of {loop.fed.rounds}"
            if loop.saved_round is not None or resumed_from is not None:
                ckpt = loop.ckpt_path if loop.saved_round is not None else resumed_from
                saved = loop.saved_round if loop.saved_round is not None else loop.loaded_round
                at = f" (round {saved})" if saved is not None else ""
                return f"{where}; the last checkpoint is {ckpt}{at}; resume with: {self._resume_command()}"
            return f"{where}, before the first checkpoint: nothing was saved in {loop.run_dir}"

        def _smoke_run(self, model, datamodule, ckpt_path: str | None) -> None:
            import tempfile

            if ckpt_path:
                raise ConfigError("trainer.fast_dev_run makes a fresh one-round smoke run: leave out --ckpt_path")
            check_optimizer(model)
            with tempfile.TemporaryDirectory(prefix="fedmoe-fast-dev-run-") as tmp:
                loop = self._loop(model, datamodule, run_dir=Path(tmp))
                loop.fed.rounds = 1
                loop.setup()
                check_labels(loop.datamodule.splits, model)
                try:
                    summary = loop.fit()
                except KeyboardInterrupt:
                    raise Interrupted("during the fast_dev_run smoke run; nothing was saved") from None
            summary["run_dir"] = f"fast_dev_run={self.trainer.fast_dev_run}, nothing saved"
            print(_summary_line(summary))

        def validate(self, model, datamodule, ckpt_path: str | None = None) -> None:
            self._evaluate("val", model, datamodule, ckpt_path)

        def test(self, model, datamodule, ckpt_path: str | None = None) -> None:
            self._evaluate("test", model, datamodule, ckpt_path)

        def _evaluate(self, split: str, model, datamodule, ckpt_path: str | None) -> None:
            path = self._resolve_ckpt(ckpt_path, required=True)
            loop = self._loop(model, datamodule)
            loop.setup()
            check_labels(loop.datamodule.splits, model)
            algo = type(loop.algo)
            loop.load(path, compare=lambda flat: _eval_keys(flat, algo))
            metrics = loop.evaluate(split)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n" and isinstance(v, float))
            print(f"{split} of {path} (round {loop.round}): {shown}  ({metrics.get('n')} samples)")

    return FedMoECLI


def check_optimizer(model) -> None:
    """Build the local optimiser once, so that a bad learning rate fails now, not in round 1."""
    from fedmoe.federation.runner import _unpack_optimizers

    try:
        optimizer = _unpack_optimizers(model.configure_optimizers())[0]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.optimizer: {e}") from None
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"model.optimizer.init_args.lr={lr} is out of range: must be a finite number >= 0")


def check_labels(splits, model) -> None:
    """Refuse a data set whose classes or class labels do not fit ``model.num_classes`` (one
    ``error:`` line naming the split and row), before round 1."""
    if splits.num_classes != model.num_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but the data set has {splits.num_classes} classes; "
            f"set --model.num_classes {splits.num_classes}"
        )
    named = {"server_train": splits.server_train, "probe": splits.probe, "val": splits.val, "test": splits.test}
    named.update({f"client_train[{i}]": d for i, d in enumerate(splits.client_train)})
    for name, dataset in named.items():
        targets = getattr(dataset, "targets", None)
        if (targets is None or not hasattr(targets, "is_floating_point") or targets.is_floating_point()
                or targets.dim() != 1 or len(targets) == 0):
            continue  # not class labels (e.g. regression scores)
        bad = ((targets < 0) | (targets >= model.num_classes)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ConfigError(
                f"data: label {int(targets[i])} of {name} row {i} is outside 0..{model.num_classes - 1} "
                "(model.num_classes); fix the data or model.num_classes"
            )


def config_defaults(flat: dict[str, Any], sections: dict[str, type]) -> dict[str, Any]:
    """The default of each key of a flat config, where its owner is known: the parameter's default in
    the signature of the class it configures (``<prefix>.init_args.<name>`` of a ``<prefix>.class_path``,
    or ``<section>.<name>`` of a fixed section class). A checkpoint written before an option existed
    then resumes when the option keeps its default (the behaviour the run was trained with)."""
    import importlib
    import inspect
    import json

    out: dict[str, Any] = {}
    for key in flat:
        owner, name = None, None
        prefix, _, rest = key.rpartition(".init_args.")
        if prefix and "." not in rest and isinstance(flat.get(f"{prefix}.class_path"), str):
            module_name, _, cls_name = flat[f"{prefix}.class_path"].rpartition(".")
            try:
                owner = getattr(importlib.import_module(module_name), cls_name)
            except (ImportError, AttributeError, ValueError):
                continue
            name = rest
        else:
            section, _, rest = key.partition(".")
            if section in sections and rest and "." not in rest:
                owner, name = sections[section], rest
        if owner is None:
            continue
        try:
            param = inspect.signature(owner).parameters.get(name)
        except (TypeError, ValueError):
            continue
        if param is None or param.default is inspect.Parameter.empty:
            continue
        try:
            out[key] = json.loads(json.dumps(param.default))
        except (TypeError, ValueError):
            continue
    return out


def _eval_keys(flat: dict[str, Any], algorithm: type) -> dict[str, Any]:
    """The config values that change the server model or the evaluation data."""
    training = getattr(algorithm, "training_options", ())
    skip = [*EVAL_EXCLUDE, *(f"federation.algorithm.{p}{name}" for name in training for p in ("init_args.", ""))]

    def under(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in skip)

    return {k: v for k, v in flat.items()
            if not under(k) and (not k.startswith("federation.") or k.startswith("federation.algorithm"))}


def _check_network(name: Any) -> None:
    """``model.network`` names a registered architecture or an importable class."""
    if not isinstance(name, str):
        return
    from fedmoe.models import networks

    if name not in networks.NETWORKS and "." not in name:
        builtin_classes("fedmoe.models", object)  # modules that register more networks
    if name in networks.NETWORKS:
        return
    if "." in name:
        try:
            networks._import_class(name)
        except ValueError as e:
            raise ConfigError(f"model.network={name!r}: {e}") from None
        return
    raise ConfigError(
        f"model.network={name!r} is not a known network; known names: {', '.join(sorted(networks.NETWORKS))} "
        "(or a dotted path pkg.module.Class)"
    )


def _user_error(e: BaseException) -> BaseException:
    """The user's mistake behind an error raised while building the config's objects: a FedMoEError
    anywhere in the chain, else the innermost ValueError/TypeError as one line; otherwise ``e``."""
    chain, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for err in chain:
        if isinstance(err, FedMoEError):
            return err
    inner = chain[-1]
    if isinstance(inner, (ValueError, TypeError)):
        first = next((ln.strip() for ln in str(inner).splitlines() if ln.strip()), type(inner).__name__)
        return ConfigError(f"invalid config: {first}")
    return e


def check_run_dir(run_dir: Path) -> None:
    """The run folder can be created and written: no file in the way, not read-only."""
    for path in (run_dir, run_dir / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"trainer.default_root_dir: {path} is a file, not a folder; move it or choose another "
                "--trainer.default_root_dir"
            )
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"trainer.default_root_dir={run_dir}: {existing} is a file, not a folder; choose another "
            "--trainer.default_root_dir"
        )
    for folder in (existing, run_dir / "checkpoints"):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"trainer.default_root_dir={run_dir}: cannot write in {folder} (read-only or no permission); "
                "choose another --trainer.default_root_dir"
            )


def check_config_files(args: list[str]) -> list[Any]:
    """Each ``--config`` file exists and is valid YAML (an error names the file and the line); returns
    their contents."""
    import yaml

    paths = []
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif a.startswith("--config="):
            paths.append(a.split("=", 1)[1])
    docs = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            docs.append(yaml.safe_load(path.read_text()))
        except yaml.YAMLError as e:
            parts = []
            for label, mark in (("", getattr(e, "problem_mark", None)), (getattr(e, "context", None), getattr(e, "context_mark", None))):
                if mark is not None:
                    parts.append(f"{label + ' at ' if label else ''}line {mark.line + 1}, column {mark.column + 1}")
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {path}: YAML syntax error at {'; '.join(parts) or 'an unknown line'}: {problem}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
    return docs


def _short_algorithm_names(args: list[str], configs: list[Any]) -> bool:
    """Whether an algorithm is named by its class name alone (``FedIT``), which needs the built-in
    algorithm modules imported to resolve."""
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--federation.algorithm"]
    names += [a.split("=", 1)[1] for a in args if a.startswith("--federation.algorithm=")]
    for doc in configs:
        algo = (doc or {}).get("federation", {}) if isinstance(doc, dict) else {}
        algo = algo.get("algorithm") if isinstance(algo, dict) else None
        names.append(algo.get("class_path", "") if isinstance(algo, dict) else algo or "")
    return any(isinstance(n, str) and n and "." not in n and not n.lstrip().startswith("{") for n in names)


def _summary_line(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    rounds = f"{s['rounds']} round" + ("" if s["rounds"] == 1 else "s")
    return (
        f"{s['algorithm']}: {rounds} in {s['seconds']:.1f}s | server test acc {f(s['server_test_acc'])}"
        f" | at best val (round {s['best_val_round']}) {f(s['best_val_test_acc'])}"
        f" | clients mean acc {f(s['clients_acc_mean'])} | {s['run_dir']}"
    )


def main(args: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2, Ctrl-C one line and 130."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["experts"]:  # federated LoRA experts on a causal LM: its own parser
        from fedmoe.experts.command import main as experts_main

        return experts_main(argv[1:])
    if argv[:1] == ["evaluate"]:  # MBPP pass@1 in a sandbox, the reference solutions, saved completions
        from fedmoe.experts.evaluate_command import main as evaluate_main

        return evaluate_main(argv[1:])
    try:
        configs = check_config_files(argv)
        cli_class = build_cli_class(argv, configs)
        cli_class._argv = argv
        cli_class(args=args)
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted {e}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted before the run started: nothing was written", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as e:  # argument errors, --help, --print_config
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
