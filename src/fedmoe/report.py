"""Tables and plots from run folders: ``python -m fedmoe.report RUN_DIR [RUN_DIR ...] [--plot FILE]``.

Each run folder holds ``metrics.csv`` (one row per round) and ``summary.json`` (written by ``fit``).
The table gives, per run, the final server test accuracy, the test accuracy at the round with the
lowest validation loss (the paper's metric), the best test accuracy seen, client accuracy and time.
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


def summarise(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run: rounds, final / best-validation / max server test accuracy, client accuracy."""
    rows = []
    for run_dir in run_dirs:
        m = load_run(run_dir)
        summary_path = Path(run_dir) / "summary.json"
        algorithm = json.loads(summary_path.read_text())["algorithm"] if summary_path.is_file() else "?"
        evaluated = m.dropna(subset=["server/test_acc"]) if "server/test_acc" in m else m.iloc[0:0]
        best = evaluated.loc[evaluated["server/val_loss"].idxmin()] if len(evaluated) else None
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmoe.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (trainer.default_root_dir of each run)")
    parser.add_argument("--plot", help="write a PNG of server test accuracy over rounds")
    args = parser.parse_args(argv)
    try:
        table = summarise(args.runs)
        if args.plot:
            plot(args.runs, args.plot)
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
