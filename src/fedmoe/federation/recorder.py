"""Per-round records: TensorBoard scalars and images, ``metrics.csv`` (one row per round),
``clients.csv`` (one row per client and round) and, for algorithms that log matrices (Fed-MoE's W_r
and W_c), ``matrices.csv`` (one row per entry)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import torch

from fedmoe.federation.checkpoint import atomic_write_text


class RoundRecorder:
    """Writes a run's TensorBoard events and ``metrics.csv`` into ``run_dir``.

    Nothing is created before the first :meth:`log` (a run that fails before its first round
    leaves no event file behind).

    Args:
        run_dir: the run's folder (one TensorBoard run).
        start_round: rounds already done; on resume, TensorBoard events after it are purged.
        history: rows of earlier rounds (from a checkpoint), kept in ``metrics.csv``.
        tensorboard: write TensorBoard events (``trainer.logger``); ``metrics.csv`` is always written,
            and ``matrices.csv`` (columns round, matrix, row, column, client, value) once a round
            logs a matrix; on resume its rows after ``start_round`` are dropped, as TensorBoard's.
        every: write TensorBoard events every this many rounds (``trainer.log_every_n_steps``) and at
            ``last_round``.
        last_round: the run's last round.
        client_columns: the columns of ``clients.csv`` (rows given to :meth:`log` are appended each
            round, so the file grows with the run rather than being rewritten); on resume its rows
            after ``start_round`` are dropped once, as TensorBoard's. None: no ``clients.csv``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        start_round: int = 0,
        history: list[dict[str, Any]] | None = None,
        tensorboard: bool = True,
        every: int = 1,
        last_round: int | None = None,
        client_columns: list[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.start_round = start_round
        self.tensorboard = tensorboard
        self.every = max(1, int(every))
        self.last_round = last_round
        self.writer = None
        self.history: list[dict[str, Any]] = list(history or [])
        self.matrices = self._earlier_matrices()
        self.client_columns = client_columns
        self._clients_checked = False

    def _earlier_matrices(self):
        """Rows of ``matrices.csv`` up to ``start_round`` (a resumed run's), or None."""
        path = self.run_dir / "matrices.csv"
        if not (self.start_round and path.is_file()):
            return None
        import pandas as pd

        rows = pd.read_csv(path)
        return rows[rows["round"] <= self.start_round].reset_index(drop=True)

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            purge = self.start_round + 1 if self.start_round else None
            self.writer = SummaryWriter(str(self.run_dir), purge_step=purge)
        return self.writer

    def log(self, round_idx: int, scalars: dict[str, Any], images: dict[str, torch.Tensor] | None = None,
            columns: list[int] | None = None, clients: list[dict[str, Any]] | None = None) -> None:
        """One round's scalars, matrices and client rows; ``columns``: the client id of each matrix column."""
        if self.tensorboard and (round_idx % self.every == 0 or round_idx == self.last_round):
            writer = self._writer()
            for key, value in scalars.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(key, value, round_idx)
            for key, matrix in (images or {}).items():
                writer.add_figure(key, _heatmap(matrix, key), round_idx, close=True)
            writer.flush()
        self.history.append({"round": round_idx, **scalars})
        self.write_csv()
        if images:
            self.write_matrices(round_idx, images, columns)
        if clients and self.client_columns:
            self.append_clients(clients)

    def append_clients(self, rows: list[dict[str, Any]]) -> None:
        """Append one round's client rows to ``clients.csv`` (header first in a new file)."""
        path = self.run_dir / "clients.csv"
        if not self._clients_checked:
            self._keep_earlier_clients(path)
            self._clients_checked = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.client_columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)

    def _keep_earlier_clients(self, path: Path) -> None:
        """On resume, ``clients.csv`` keeps the complete rows of rounds up to ``start_round`` (an
        interrupted run may have appended later rounds, or part of a row); a new run starts it anew."""
        if not path.is_file():
            return
        kept = []
        if self.start_round:
            with open(path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header == self.client_columns:
                    kept = [header] + [row for row in reader if len(row) == len(header)
                                       and row[0].isdigit() and int(row[0]) <= self.start_round]
        if not kept:
            path.unlink()
            return
        buf = io.StringIO()
        csv.writer(buf).writerows(kept)
        atomic_write_text(path, buf.getvalue())

    def write_matrices(self, round_idx: int, images: dict[str, torch.Tensor], columns: list[int] | None) -> None:
        import pandas as pd

        frames = [] if self.matrices is None else [self.matrices]
        for key, matrix in images.items():
            m = matrix.detach().double().cpu().numpy()
            rows, cols = m.shape
            ids = columns if columns is not None and len(columns) == cols else [None] * cols
            frames.append(pd.DataFrame({
                "round": round_idx, "matrix": key, "row": [i for i in range(rows) for _ in range(cols)],
                "column": list(range(cols)) * rows, "client": ids * rows, "value": m.reshape(-1),
            }))
        self.matrices = pd.concat(frames, ignore_index=True)
        buf = io.StringIO()
        self.matrices.to_csv(buf, index=False)
        atomic_write_text(self.run_dir / "matrices.csv", buf.getvalue())

    def write_csv(self) -> None:
        import pandas as pd

        buf = io.StringIO()
        pd.DataFrame(self.history).to_csv(buf, index=False)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float], round_idx: int) -> None:
        """The run's settings (flat scalars) and results in TensorBoard's HPARAMS tab, one row per run:
        runs of a sweep side by side, sortable by any metric. The metrics are logged as scalars at
        ``round_idx`` under their own tags, as that tab requires."""
        metrics = {k: float(v) for k, v in metrics.items() if _number(v) and math.isfinite(v)}
        if not (self.tensorboard and metrics):
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        writer = self._writer()
        for summary in hparams_summary({k: _hparam_value(v) for k, v in hparams.items()}, metrics):
            writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, round_idx)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with scalar values (lists as text); ``class_path`` entries keep
    only the class name. Paths of files and folders are left out: they name a machine, not a setting."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif key == "class_path" and isinstance(value, str):
            out[name] = value.rsplit(".", 1)[-1]
        elif key.endswith(("_dir", "_path", "cache")) or key in ("config", "tokenizer", "pretrained"):
            continue
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def _cell(v: Any) -> Any:
    """A CSV cell: NaN and None as empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _hparam_value(v: Any) -> int | float | str | bool:
    """What TensorBoard's hparams accept: numbers, text and booleans (None as 'null')."""
    if isinstance(v, (bool, int, float, str)):
        return v
    return "null" if v is None else str(v)


def _heatmap(matrix: torch.Tensor, title: str):
    """An annotated heatmap of a small matrix (rows: experts, columns: clients)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.detach().float().cpu().numpy()
    rows, cols = m.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * cols, 0.8 + 0.5 * rows))
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(1e-12, float(m.max())), aspect="auto")
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 * m.max() else "black")
    ax.set_xlabel("client (sampled, in id order)")
    ax.set_ylabel("expert")
    ax.set_title(title.split("/")[-1], fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
