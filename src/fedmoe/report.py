"""Tables and plots from run folders: ``python -m fedmoe.report RUN_DIR [RUN_DIR ...] [--plot FILE | --paper]``.

Each run folder holds ``metrics.csv`` (one row per round), ``summary.json`` and ``config.yaml``
(written by ``fit``). The table gives, per run, the final server test accuracy, the test accuracy
at the best validation round (lowest validation loss, or the data set's monitored metric such as
GLUE's Matthews correlation), the best test accuracy seen, client accuracy and time.
``--lora`` prints the adapter table instead: rule, rank, bytes per round, score at the best
validation round (a rank sweep's communication/accuracy trade-off). ``--at 8,16,24`` adds the test
metric at those rounds and ``--mean-from 17`` its mean over rounds 17 to the last, to both tables:
whether a curve has settled, read off a late window rather than one round.
``--paper`` prints and saves the Fed-MoE paper's table (src/fedmoe/paper.py) with the runs beside
it, matched to its cells by data set, number of clients and algorithm: see docs/paper.md.
``--clients`` prints one row per client of each run from its ``clients.csv``: rounds taken part in
and dropped, samples, MB downloaded and uploaded over the run, the last training loss and held-out
accuracy of its synced model (who the federation served, and at what cost).
``--experts`` reads folders of ``python -m fedmoe.cli experts`` (``metrics_<expert>.csv``): per run
and expert the coordinator mode, updates applied and refused, staleness, held-out loss at the start
and at the end; ``--plot`` then draws each expert's held-out loss against (simulated) time, a line
per run (sync against FedAsync against FedBuff on the same fleet).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedmoe import paper
from fedmoe.errors import FedMoEError


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """A run's per-round metrics; a folder without ``metrics.csv``, or one whose file is empty,
    unreadable or has no ``round`` column, is an error naming it."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FedMoEError(f"{run_dir} is not a run folder (no metrics.csv)")
    try:
        m = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedMoEError(f"{path} cannot be read as a CSV table ({first}); it should be the metrics.csv that fit writes") from None
    if "round" not in m or not m["round"].notna().any():
        raise FedMoEError(f"{path} has no rounds (no 'round' column or no rows); it should be the metrics.csv that fit writes")
    return m


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


def parse_rounds(text: str, option: str = "--at") -> list[int]:
    """``"8,16,24"`` -> ``[8, 16, 24]``; anything but positive whole numbers is an error naming ``option``."""
    try:
        rounds = [int(part) for part in text.split(",")]
    except ValueError:
        rounds = []
    if not rounds or min(rounds) < 1:
        example = "8,16,24" if option == "--at" else "17"
        raise FedMoEError(f"{option} takes round numbers of 1 or more, such as {example}; got {text!r}")
    return rounds


def round_columns(m: pd.DataFrame, column: str, label: str, at: list[int] = (),
                  mean_from: int | None = None) -> dict[str, float]:
    """``column`` at each round of ``at`` (NaN where that round was not evaluated) and, with
    ``mean_from``, its mean over the evaluated rounds from ``mean_from`` to the run's last."""
    values = m.dropna(subset=[column]).set_index("round")[column] if column in m else pd.Series(dtype=float)
    cells = {f"{label}, round {r}": float(values.get(r, float("nan"))) for r in at}
    if mean_from is not None:
        last = int(m["round"].max())
        window = values[values.index >= mean_from]
        cells[f"{label}, mean of rounds {mean_from}-{last}"] = float(window.mean()) if len(window) else float("nan")
    return cells


def summarise(run_dirs: list[str | Path], at: list[int] = (), mean_from: int | None = None) -> pd.DataFrame:
    """One row per run: rounds, final / best-validation / max server test accuracy, client accuracy;
    with ``at`` / ``mean_from`` also the test accuracy at those rounds and its mean from a round on."""
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
            **round_columns(m, "server/test_acc", "test acc", at, mean_from),
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


CLIENT_COLUMNS = ("round", "client", "status", "bytes_down", "bytes_up")


def load_clients(run_dir: str | Path) -> pd.DataFrame | None:
    """A run's ``clients.csv`` (one row per client and round), or None where the run has none; a
    file that is not such a table is an error naming it."""
    path = Path(run_dir) / "clients.csv"
    if not path.is_file():
        return None
    try:
        c = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        c = None
    if c is None or not set(CLIENT_COLUMNS) <= set(c.columns):
        raise FedMoEError(f"{path} is not a table with columns {', '.join(CLIENT_COLUMNS)}; "
                          "it should be the clients.csv that fit writes")
    return c


def clients_table(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per client of each run: rounds it was sampled in and dropped from, samples, MB down
    and up over the run, its last training loss and the last held-out accuracy of its synced model."""
    rows = []
    for run_dir in run_dirs:
        c = load_clients(run_dir)
        if c is None:
            raise FedMoEError(f"{run_dir} has no clients.csv (runs write it since clients.csv was added; "
                              "rerun or resume the run to get one)")
        for client, g in c.sort_values("round").groupby("client", sort=True):
            ok = g[g["status"] == "ok"]
            heldout = g["heldout_acc"].dropna() if "heldout_acc" in g else pd.Series(dtype=float)
            rows.append({
                "run": str(run_dir),
                "client": int(client),
                "rounds": int(len(g)),
                "dropped": int(len(g) - len(ok)),
                "samples": int(ok["samples"].iloc[-1]) if "samples" in ok and len(ok) else None,
                "MB down": g["bytes_down"].sum() / 1e6,
                "MB up": g["bytes_up"].sum() / 1e6,
                "train loss (last)": float(ok["train_loss"].iloc[-1]) if "train_loss" in ok and len(ok) else float("nan"),
                "held-out acc (last)": float(heldout.iloc[-1]) if len(heldout) else float("nan"),
            })
    return pd.DataFrame(rows)


PER_CLIENT_BYTES = ("MB up / client", "MB up / client (max)", "MB down / client", "MB down / client (max)")


def per_client_bytes(run_dir: str | Path) -> dict[str, float]:
    """Mean MB a client downloads and uploads in a round it takes part in (``clients.csv``), and the
    largest of any client in any round; empty for a run folder without ``clients.csv``."""
    c = load_clients(run_dir)
    if c is None or not len(c):
        return {}
    return {
        "MB up / client": c["bytes_up"].mean() / 1e6, "MB up / client (max)": c["bytes_up"].max() / 1e6,
        "MB down / client": c["bytes_down"].mean() / 1e6, "MB down / client (max)": c["bytes_down"].max() / 1e6,
    }


def lora_table(run_dirs: list[str | Path], at: list[int] = (), mean_from: int | None = None) -> pd.DataFrame:
    """One row per adapter run: rule, rank, mean bytes up / down per round (all clients, and per
    client from ``clients.csv`` where the runs have one), the monitored test metric at the best
    validation round (and, with ``at`` / ``mean_from``, at those rounds and its mean from a round
    on), and the client mean of that metric."""
    rows = []
    per_client = {str(d): per_client_bytes(d) for d in run_dirs}
    any_per_client = any(per_client.values())
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
            **({k: per_client[str(run_dir)].get(k, float("nan")) for k in PER_CLIENT_BYTES} if any_per_client else {}),
            f"test {metric} (best val)": best[f"server/test_{metric}"] if best is not None else float("nan"),
            "best val round": int(best["round"]) if best is not None else None,
            **round_columns(m, f"server/test_{metric}", f"test {metric}", at, mean_from),
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


#: Columns of the ``--paper`` table (Markdown and CSV).
PAPER_COLUMNS = ["data set", "clients", "algorithm", "paper acc", "ours", "difference", "rounds",
                 "planned rounds", "run", "command"]
#: What the table's accuracy columns mean, printed under it.
PAPER_LEGEND = ("ours: the server's test accuracy (%) at the run's best validation round (the paper's metric); "
                "difference: ours - paper, in points; rounds: rounds run, of the config's federation.rounds")
#: The ``--paper`` files when ``--out`` is not given.
PAPER_OUT = "runs/paper_table"


@dataclass
class PaperRun:
    """What the paper table takes from one run folder (config.yaml, metrics.csv, summary.json)."""

    run_dir: str
    data_class: str
    dataset: str | None
    clients: int | None
    algorithm: str
    rounds: int
    planned_rounds: int | None
    accuracy: float | None
    curve: pd.DataFrame

    def command(self) -> str:
        """The command that reruns this run from its resolved config, into a new folder."""
        return shlex.join(["python", "-m", "fedmoe.cli", "fit", "--config", str(Path(self.run_dir) / "config.yaml"),
                           "--trainer.default_root_dir", f"{str(self.run_dir).rstrip('/')}_rerun"])


def _run_config(run_dir: str | Path) -> dict:
    """A run's ``config.yaml`` as a dict; missing, unreadable or not a mapping is an error naming it."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FedMoEError(f"{run_dir} has no config.yaml: --paper matches a run to a paper cell by the config "
                          "that fit writes into the run folder")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedMoEError(f"{path} cannot be read as YAML ({first}); it should be the config.yaml that fit writes") from None
    if not isinstance(cfg, dict):
        raise FedMoEError(f"{path} is not a YAML mapping; it should be the config.yaml that fit writes")
    return cfg.get("fit", cfg) if isinstance(cfg.get("fit"), dict) else cfg


def paper_run(run_dir: str | Path) -> PaperRun:
    """Read one run folder for the paper table: its data set (data module class, else ``data_dir``),
    number of clients, algorithm class name, rounds and its test accuracy (%) at the best validation
    round."""
    m = load_run(run_dir)
    cfg = _run_config(run_dir)
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    init = data.get("init_args") if isinstance(data.get("init_args"), dict) else data
    data_class = str(data.get("class_path") or "")
    algorithm = (cfg.get("federation") or {}).get("algorithm") if isinstance(cfg.get("federation"), dict) else None
    name = algorithm.get("class_path") if isinstance(algorithm, dict) else algorithm
    name = str(name or _summary(run_dir).get("algorithm") or "?").rsplit(".", 1)[-1]
    clients = init.get("num_clients")
    planned = (cfg.get("federation") or {}).get("rounds") if isinstance(cfg.get("federation"), dict) else None
    best = best_row(m, monitor_of(run_dir)) if "server/test_acc" in m else None
    accuracy = best["server/test_acc"] if best is not None else None
    curve = m.dropna(subset=["server/test_acc"])[["round", "server/test_acc"]] if "server/test_acc" in m else m.iloc[0:0]
    return PaperRun(
        run_dir=str(run_dir),
        data_class=data_class,
        dataset=paper.dataset_of(data_class, init.get("data_dir")),
        clients=int(clients) if isinstance(clients, int) else None,
        algorithm=name,
        rounds=int(m["round"].max()),
        planned_rounds=int(planned) if isinstance(planned, int) else None,
        accuracy=100 * float(accuracy) if accuracy is not None and pd.notna(accuracy) else None,
        curve=curve,
    )


def _unmatched(run: PaperRun) -> str:
    dataset = paper.DATASETS.get(run.dataset or "", run.data_class or "no data module")
    clients = f"{run.clients} clients" if run.clients is not None else "no data.num_clients"
    return (f"{run.run_dir} matches no paper cell ({dataset}, {clients}, {run.algorithm}); the paper's cells are "
            f"{paper.cells_line()}, each with {', '.join(paper.ALGORITHMS)}")


def paper_table(run_dirs: list[str | Path]) -> tuple[pd.DataFrame, list[str], dict[str, list[PaperRun]]]:
    """The paper's table with the runs beside it: one row per paper cell and matching run (a cell
    without a run keeps one row, with the command that runs it), in the paper's order. Returns the
    table, notes (runs that match no cell, runs without a test accuracy) and the matched runs per
    data set key (for the curves)."""
    runs = [paper_run(r) for r in run_dirs]
    notes, matched = [], {}
    for run in runs:
        cell = paper.find_cell(run.dataset, run.clients, run.algorithm)
        if cell is None:
            notes.append(_unmatched(run))
            continue
        matched.setdefault(cell, []).append(run)
        if run.accuracy is None:
            notes.append(f"{run.run_dir} has no server test accuracy at a validated round in metrics.csv: "
                         "its 'ours' is empty")
    if not matched:
        notes.append(f"no run matches a paper cell ({paper.cells_line()}): the table gives the paper's numbers only")
    rows = []
    for cell in paper.CELLS:
        for run in matched.get(cell) or [None]:
            ours = run.accuracy if run is not None else None
            diff = ours - cell.accuracy if ours is not None and cell.accuracy is not None else None
            rows.append([
                cell.name, cell.clients, cell.algorithm, cell.accuracy, ours, diff,
                run.rounds if run else None, run.planned_rounds if run else None,
                run.run_dir if run else "not run", run.command() if run else cell.command(),
            ])
    by_dataset: dict[str, list[PaperRun]] = {}
    for cell, cell_runs in matched.items():
        by_dataset.setdefault(cell.dataset, []).extend(cell_runs)
    table = pd.DataFrame(rows, columns=PAPER_COLUMNS)
    for column in ("clients", "rounds", "planned rounds"):
        table[column] = table[column].astype("Int64")
    return table, notes, by_dataset


def paper_markdown(table: pd.DataFrame, notes: list[str], plots: list[Path] = ()) -> str:
    """The paper table as a Markdown document: the table (accuracies with 2 decimals, differences
    signed, empty where there is no number), the source and legend, the notes and the plots."""
    def cell(column: str, v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
            return ""
        if column == "difference":
            return f"{v:+.2f}"
        if column == "command":
            return f"`{v}`"
        if column in ("rounds", "planned rounds", "clients"):
            return str(int(v))
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    lines += ["", f"paper acc: {paper.SOURCE}.", f"{PAPER_LEGEND}."]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines)


def plot_paper(by_dataset: dict[str, list[PaperRun]], out_dir: str | Path) -> list[Path]:
    """One PNG per data set (``paper_<data set>.png``): test accuracy (%) per round, a line per run,
    and a dashed line at the paper's Fed-MoE accuracy for each number of clients that was run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, runs in by_dataset.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            ax.plot(run.curve["round"], 100 * run.curve["server/test_acc"], marker="o", markersize=2,
                    label=f"{run.algorithm}, {run.clients} clients ({Path(run.run_dir).name})")
        for clients in sorted({run.clients for run in runs}):
            cell = paper.find_cell(dataset, clients, "FedMoE")
            if cell is not None and cell.accuracy is not None:
                ax.axhline(cell.accuracy, linestyle="--", linewidth=1, color="gray")
                ax.annotate(f"paper Fed-MoE, {clients} clients: {cell.accuracy:.2f}", (0.01, cell.accuracy),
                            xycoords=("axes fraction", "data"), fontsize=7, va="bottom", color="dimgray")
        ax.set_title(paper.DATASETS[dataset])
        ax.set_xlabel("round")
        ax.set_ylabel("server test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"paper_{dataset}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_paper(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[str, list[Path]]:
    """Build the paper table from ``run_dirs`` and save ``paper.md``, ``paper.csv`` and the curves
    into ``out_dir``; returns the Markdown document and the files written."""
    table, notes, by_dataset = paper_table(run_dirs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FedMoEError(f"--out {out} is a file, not a folder; give a folder for paper.md, paper.csv and the plots")
    try:
        out.mkdir(parents=True, exist_ok=True)
        plots = plot_paper(by_dataset, out)
        document = paper_markdown(table, notes, plots)
        (out / "paper.md").write_text(document + "\n")
        table.to_csv(out / "paper.csv", index=False, float_format="%.2f")
    except OSError as e:
        raise FedMoEError(f"--out {out}: cannot write there ({e.strerror or e}); give another folder") from None
    return document, [out / "paper.md", out / "paper.csv", *plots]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmoe.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (trainer.default_root_dir of each run)")
    parser.add_argument("--plot", help="write a PNG of server test accuracy over rounds")
    parser.add_argument("--metric", default="server/test_acc", help="metric plotted (default server/test_acc)")
    parser.add_argument("--lora", action="store_true", help="the adapter table: rule, rank, bytes, score")
    parser.add_argument("--clients", action="store_true",
                        help="one row per client of each run (clients.csv): rounds, bytes, last loss and accuracy")
    parser.add_argument("--experts", action="store_true",
                        help="folders of `fedmoe.cli experts`: per expert, updates and held-out loss; --plot: loss over time")
    parser.add_argument("--paper", action="store_true",
                        help="the Fed-MoE paper's table with these runs beside it; saves paper.md, paper.csv and "
                             "paper_<data set>.png curves into --out")
    parser.add_argument("--out", help=f"folder for the --paper files (default {PAPER_OUT})")
    parser.add_argument("--at", help="also the test metric at these rounds, e.g. 8,16,24")
    parser.add_argument("--mean-from", help="also the test metric's mean from this round to the last")
    args = parser.parse_args(argv)
    tables = [flag for flag, on in (("--lora", args.lora), ("--clients", args.clients), ("--experts", args.experts)) if on]
    if len(tables) > 1:
        print(f"error: {' and '.join(tables)} are different tables; ask for one at a time", file=sys.stderr)
        return 2
    if (args.at or args.mean_from) and (args.paper or args.experts or args.clients):
        print("error: --at and --mean-from go with the run table or --lora, not with --paper, --experts or --clients",
              file=sys.stderr)
        return 2
    if args.clients and args.plot:
        print("error: --clients prints a table only; drop --plot (or plot the runs without --clients)", file=sys.stderr)
        return 2
    try:
        at = parse_rounds(args.at) if args.at else []
        mean_from = parse_rounds(args.mean_from, "--mean-from") if args.mean_from else None
        if mean_from is not None and len(mean_from) > 1:
            raise FedMoEError(f"--mean-from takes one round number, such as 17; got {args.mean_from!r}")
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mean_from = mean_from[0] if mean_from else None
    clash = [flag for flag, on in (("--lora", args.lora), ("--clients", args.clients), ("--experts", args.experts),
                                   ("--plot", args.plot)) if on]
    if args.paper and clash:
        print(f"error: --paper cannot be combined with {', '.join(clash)}: it writes its own table and per data set "
              "curves into --out", file=sys.stderr)
        return 2
    if args.out and not args.paper:
        print("error: --out names the folder of the --paper files; add --paper (or use --plot FILE for a plot)",
              file=sys.stderr)
        return 2
    if args.paper:
        try:
            document, written = write_paper(args.runs, args.out or PAPER_OUT)
        except FedMoEError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(document)
        print(f"\nwrote {', '.join(str(p) for p in written)}")
        return 0
    try:
        if args.clients:
            table = clients_table(args.runs)
        elif args.experts:
            table = experts_table(args.runs)
            if args.plot:
                plot_experts(args.runs, args.plot)
        else:
            table = lora_table(args.runs, at, mean_from) if args.lora else summarise(args.runs, at, mean_from)
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
