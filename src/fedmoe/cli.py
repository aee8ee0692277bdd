"""Command line: ``python -m fedmoe.cli fit --config experiments/quickstart.yaml``.

A LightningCLI whose sections are ``model:`` (the client LightningModule), ``data:`` (a federated
data module), ``trainer:`` (local training: epochs, devices, precision, gradient clipping; and
``default_root_dir``, the run's folder) and ``federation:`` (rounds, sampling, the algorithm).
``fit`` runs the federated loop; ``validate`` and ``test`` evaluate a saved checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedmoe.errors import FedMoEError

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
    "federation.client_eval", "federation.checkpoint_every",
)


def condense_error(message: str) -> str:
    """The informative part of a jsonargparse error, as one line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    head, rest = lines[0], lines[1:]
    for i, ln in enumerate(rest):
        if ln.startswith("- Problem with given class_path"):
            detail = " ".join(rest[i : i + 2]).lstrip("- ")
            return f"{head} {detail}"
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value type", "- Expected a <class 'NoneType'>")
    detail = [ln for ln in rest if not ln.startswith(skip)][:2]
    return " ".join([head, *detail])


def _build_cli_class():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from fedmoe.data.federated import FederatedDataModule
    from fedmoe.federation.checkpoint import atomic_write_text, flatten, select_keys
    from fedmoe.federation.loop import Federation, FederatedLoop
    from fedmoe.federation.runner import RunnerSettings
    from fedmoe.models.classifier import Classifier

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
            super().__init__(
                Classifier,
                FederatedDataModule,
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
            return {
                "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"},
                "test": {"model", "dataloaders", "datamodule"},
            }

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(Federation, "federation")

        def _parse_ckpt_path(self) -> None:
            """Our checkpoints carry the run state, not model hyperparameters: nothing to merge."""

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

        def _math_config(self) -> dict[str, Any]:
            cfg = self.config[self.subcommand].as_dict()
            return select_keys(flatten(cfg), FINGERPRINT_INCLUDE, FINGERPRINT_EXCLUDE)

        def _loop(self, model, datamodule) -> FederatedLoop:
            cfg = self.config[self.subcommand]
            return FederatedLoop(
                self.config_init[self.subcommand]["federation"],
                model,
                datamodule,
                settings=self.trainer,
                run_dir=self._run_dir(),
                seed=int(cfg.get("seed_everything") or 0),
                config=self._math_config(),
            )

        def _resolve_ckpt(self, ckpt_path: str | None, required: bool) -> Path | None:
            last = self._run_dir() / "checkpoints" / "last.ckpt"
            if ckpt_path in (None, ""):
                if required:
                    raise FedMoEError(f"{self.subcommand} needs --ckpt_path (a checkpoint file, or 'last' for {last})")
                return None
            if ckpt_path == "last":
                if last.is_file():
                    return last
                if required:
                    raise FedMoEError(f"no checkpoint to evaluate: {last} does not exist")
                log.warning("ckpt_path=last but %s does not exist: starting a new run", last)
                return None
            path = Path(ckpt_path)
            if not path.is_file():
                raise FedMoEError(f"checkpoint {path} does not exist")
            return path

        # -- subcommands --------------------------------------------------------------------------

        def fit(self, model, datamodule, ckpt_path: str | None = None) -> None:
            path = self._resolve_ckpt(ckpt_path, required=False)
            run_dir = self._run_dir()
            if path is None and (run_dir / "checkpoints" / "last.ckpt").exists():
                raise FedMoEError(
                    f"{run_dir} already holds a run; continue it with --ckpt_path last, or start a new one "
                    "with another --trainer.default_root_dir (or delete the folder)"
                )
            loop = self._loop(model, datamodule)
            loop.setup()
            if loop.datamodule.splits.num_classes != model.num_classes:
                raise FedMoEError(
                    f"model.num_classes={model.num_classes} but the data set has "
                    f"{loop.datamodule.splits.num_classes} classes; set --model.num_classes "
                    f"{loop.datamodule.splits.num_classes}"
                )
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write_text(run_dir / "config.yaml", text)
            summary = loop.fit(path)
            print(_summary_line(summary))

        def validate(self, model, datamodule, ckpt_path: str | None = None) -> None:
            self._evaluate("val", model, datamodule, ckpt_path)

        def test(self, model, datamodule, ckpt_path: str | None = None) -> None:
            self._evaluate("test", model, datamodule, ckpt_path)

        def _evaluate(self, split: str, model, datamodule, ckpt_path: str | None) -> None:
            path = self._resolve_ckpt(ckpt_path, required=True)
            loop = self._loop(model, datamodule)
            loop.setup()
            loop.load(path)
            metrics = loop.evaluate(split)
            print(f"{split} of {path} (round {loop.round}): loss {metrics['loss']:.4f}  acc {metrics['acc']:.4f}  "
                  f"({metrics['n']} samples)")

    return FedMoECLI


def _summary_line(s: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"{s['algorithm']}: {s['rounds']} rounds in {s['seconds']:.1f}s | server test acc {f(s['server_test_acc'])}"
        f" | at best val (round {s['best_val_round']}) {f(s['best_val_test_acc'])}"
        f" | clients mean acc {f(s['clients_acc_mean'])} | {s['run_dir']}"
    )


def main(args: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _build_cli_class()(args=args)
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argument errors, --help, --print_config
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
