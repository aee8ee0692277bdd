"""Tables and plots from run folders: ``python -m fedmoe.report RUN_DIR [RUN_DIR ...] [--plot FILE]``.

Each run folder holds ``metrics.csv`` (one row per round), ``summary.json`` and ``config.yaml``
(written by ``fit``). The table gives, per run, the final server test accuracy, the test accuracy
at the best validation round (lowest validation loss, or the data set's monitored metric such as
GLUE's Matthews correlation), the best test accuracy seen, client accuracy and time.
``--lora`` prints the adapter table instead: rule, rank, bytes per round, score at the best
validation round (a rank sweep's communication/accuracy trade-off).
``--experts`` reads folders of ``python -m fedmoe.cli experts`` (``metrics_<expert>.csv``): per run
and expert the coordinator mode, updates applied and refused, staleness, held-out loss at the start
and at the end; ``--plot`` then draws each expert's held-out loss against (simulated) time, a line
per run (sync against FedAsync against FedBuff on the same fleet).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from fedmoe.errors import FedMoEError


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """A run's per-round metrics; a folder without ``metrics.csv`` is an error naming it."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FedMoEError(f"{run_dir} is not a run folder (no metrics.csv)")
    return pd.read_csv(path)


def _summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def monitor_of(run_dir: str | Path) -> tuple[str, str]:
    """The metric that picked the run's best validation round, and ``min`` or ``max``."""
    name, mode = _summary(run_dir).get("monitor") or ("loss", "min")
    return name, mode


def best_row(m: pd.DataFrame, monitor: tuple[str, str]) -> pd.Series | None:
    """The evaluated round with the best validation value of ``monitor`` (the first one on ties)."""
    column = f"server/val_{monitor[0]}"
    if column not in m:
        return None
    evaluated = m.dropna(subset=[column])
    if not len(evaluated):
        return None
    index = evaluated[column].idxmax() if monitor[1] == "max" else evaluated[column].idxmin()
    return evaluated.loc[index]


def summarise(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run: rounds, final / best-validation / max server test accuracy, client accuracy."""
    rows = []
    for run_dir in run_dirs:
        m = load_run(run_dir)
        algorithm = _summary(run_dir).get("algorithm", "?")
        evaluated = m.dropna(subset=["server/test_acc"]) if "server/test_acc" in m else m.iloc[0:0]
        best = best_row(m, monitor_of(run_dir)) if len(evaluated) else None
        rows.append({
            "run": str(run_dir),
            "algorithm": algorithm,
            "rounds": int(m["round"].max()),
            "test acc (last)": evaluated["server/test_acc"].iloc[-1] if len(evaluated) else float("nan"),
            "test acc (best val)": best["server/test_acc"] if best is not None else float("nan"),
            "best val round": int(best["round"]) if best is not None else None,
            "test acc (max)": evaluated["server/test_acc"].max() if len(evaluated) else float("nan"),
            "client acc (last)": m["clients/acc_mean"].iloc[-1] if "clients/acc_mean" in m else float("nan"),
            "minutes": m["time/round_s"].sum() / 60 + m.get("time/eval_s", pd.Series([0.0])).sum() / 60,
        })
    return pd.DataFrame(rows)


def _config(run_dir: str | Path) -> dict:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text()) or {}
    return cfg.get("fit", cfg) if isinstance(cfg, dict) else {}


def lora_table(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per adapter run: rule, rank, mean bytes up / down per round (all clients), the
    monitored test metric at the best validation round, and the client mean of that metric."""
    rows = []
    for run_dir in run_dirs:
        m = load_run(run_dir)
        cfg = _config(run_dir)
        kwargs = (cfg.get("model") or {}).get("network_kwargs") or {}
        adapter = kwargs.get("adapter")
        rank = kwargs.get("r", adapter.get("r") if isinstance(adapter, dict) else None)
        kind = adapter.get("type") if isinstance(adapter, dict) else adapter
        algorithm = ((cfg.get("federation") or {}).get("algorithm") or {})
        rule = algorithm.get("class_path", _summary(run_dir).get("algorithm", "?")).rsplit(".", 1)[-1]
        monitor = monitor_of(run_dir)
        metric = "acc" if monitor[0] == "loss" else monitor[0]
        best = best_row(m, monitor)
        rows.append({
            "run": str(run_dir),
            "rule": rule,
            "adapter": kind or "?",
            "r": rank,
            "MB up / round": m["comm/bytes_up"].mean() / 1e6 if "comm/bytes_up" in m else float("nan"),
            "MB down / round": m["comm/bytes_down"].mean() / 1e6 if "comm/bytes_down" in m else float("nan"),
            f"test {metric} (best val)": best[f"server/test_{metric}"] if best is not None else float("nan"),
            "best val round": int(best["round"]) if best is not None else None,
            f"client {metric} (last)": m[f"clients/{metric}_mean"].iloc[-1] if f"clients/{metric}_mean" in m else float("nan"),
            "rounds": int(m["round"].max()),
        })
    return pd.DataFrame(rows)


def plot(run_dirs: list[str | Path], out: str | Path, metric: str = "server/test_acc") -> None:
    """Curves of ``metric`` over rounds, one per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir in run_dirs:
        m = load_run(run_dir).dropna(subset=[metric])
        ax.plot(m["round"], m[metric], marker="o", markersize=3, label=Path(run_dir).name)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def load_expert_runs(run_dir: str | Path) -> dict[str, pd.DataFrame]:
    """An experts run folder's per-expert CSVs (``metrics_<expert>.csv``) by expert name."""
    files = sorted(Path(run_dir).glob("metrics_*.csv"))
    if not files:
        raise FedMoEError(f"{run_dir} is not an experts run folder (no metrics_<expert>.csv)")
    return {f.stem[len("metrics_"):]: pd.read_csv(f) for f in files}


def _experts_label(run_dir: str | Path) -> str:
    import yaml

    path = Path(run_dir) / "config.yaml"
    cfg = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    mode = (cfg.get("coordinator") or {}).get("mode")
    return f"{mode} ({Path(run_dir).name})" if mode and mode != Path(run_dir).name else (mode or Path(run_dir).name)


def experts_table(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run and expert: mode, jobs (pushes and failures), the expert's last version, jobs
    refused and failed, staleness of the updates that made a version (mean, max), held-out loss at
    the start and at the end, its change, the last time."""
    rows = []
    for run_dir in run_dirs:
        label = _experts_label(run_dir)
        for expert, m in load_expert_runs(run_dir).items():
            evals = m.dropna(subset=["heldout_loss"])
            applied = m[m["status"] == "applied"]
            start = float(evals["heldout_loss"].iloc[0]) if len(evals) else float("nan")
            end = float(evals["heldout_loss"].iloc[-1]) if len(evals) else float("nan")
            jobs = m[m["status"] != "eval"]
            rows.append({
                "run": label,
                "expert": expert,
                "jobs": int(len(jobs)),
                "versions": int(m["version"].max()) if m["version"].notna().any() else 0,
                "refused": int((m["status"] == "refused").sum()),
                "failed": int((m["status"] == "failed").sum()),
                "staleness mean": float(applied["staleness"].mean()) if len(applied) else float("nan"),
                "staleness max": int(applied["staleness"].max()) if len(applied) else 0,
                "held-out start": start,
                "held-out end": end,
                "change": end - start,
                "time": float(m["time"].max()),
            })
    return pd.DataFrame(rows)


def plot_experts(run_dirs: list[str | Path], out: str | Path) -> None:
    """Each expert's held-out loss against time, one panel per expert, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(_experts_label(r), load_expert_runs(r)) for r in run_dirs]
    experts = list(dict.fromkeys(e for _, per in runs for e in per))
    fig, axes = plt.subplots(1, len(experts), figsize=(4.2 * len(experts), 3.6), squeeze=False)
    for ax, expert in zip(axes[0], experts):
        for label, per in runs:
            if expert in per:
                m = per[expert].dropna(subset=["heldout_loss"])
                ax.plot(m["time"], m["heldout_loss"], marker="o", markersize=3, label=label)
        ax.set_title(expert)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmoe.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (trainer.default_root_dir of each run)")
    parser.add_argument("--plot", help="write a PNG of server test accuracy over rounds")
    parser.add_argument("--metric", default="server/test_acc", help="metric plotted (default server/test_acc)")
    parser.add_argument("--lora", action="store_true", help="the adapter table: rule, rank, bytes, score")
    parser.add_argument("--experts", action="store_true",
                        help="folders of `fedmoe.cli experts`: per expert, updates and held-out loss; --plot: loss over time")
    args = parser.parse_args(argv)
    try:
        if args.experts:
            table = experts_table(args.runs)
            if args.plot:
                plot_experts(args.runs, args.plot)
        else:
            table = lora_table(args.runs) if args.lora else summarise(args.runs)
            if args.plot:
                plot(args.runs, args.plot, args.metric)
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(table))
    return 0


def markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table; floats with 4 decimals."""
    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
