"""The Fed-MoE paper's accuracy table: the cells ``python -m fedmoe.report --paper`` compares runs with.

Source: Jiang, Chen, Liu, Jiang and Fan, "Fed-MoE: Heterogeneous Federated Learning with Scalable
Server Mixture-of-Experts", IJCAI 2025 (https://fanchenyou.github.io/docs/ijcai25.pdf); the numbers
are the "Results" table of the released repository's README (github.com/FancyAI-SCNU/FedMoE_IJCAI_2025,
its one commit 26a979d), the same as DESIGN.md section 2, "paper accuracy". They are server test
accuracies in percent on the full data sets. The released material gives no FedAvg or FedProx
numbers: those cells exist (the same split, to be run beside Fed-MoE) with no paper accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Where the numbers come from, as the report prints it.
SOURCE = ("Fed-MoE: the Results table of the released README (github.com/FancyAI-SCNU/FedMoE_IJCAI_2025, "
          "IJCAI 2025); FedAvg and FedProx: not in the released material (empty)")

#: Data sets in table order: the key (the data module's file name under ``fedmoe.data``) and its name.
DATASETS: dict[str, str] = {"femnist": "FEMNIST", "cifar10": "CIFAR-10", "sent140": "Sent140", "yelp": "Yelp"}

#: Algorithms in table order (class names) and their preset files under ``experiments/<data set>/``.
ALGORITHMS: dict[str, str] = {"FedMoE": "fedmoe.yaml", "FedAvg": "fedavg.yaml", "FedProx": "fedprox.yaml"}

#: Fed-MoE's published accuracy (%) per (data set key, number of clients).
FEDMOE_ACCURACY: dict[tuple[str, int], float] = {
    ("femnist", 50): 86.03,
    ("femnist", 100): 82.58,
    ("cifar10", 50): 65.52,
    ("cifar10", 100): 60.73,
    ("sent140", 100): 78.10,
    ("yelp", 100): 53.46,
}

#: The overlay that sets each vision cell's split (combined with a preset); the text presets are
#: their data set's 100-client cell as they stand.
OVERLAYS: dict[tuple[str, int], str] = {
    ("femnist", 50): "experiments/femnist/paper_50.yaml",
    ("femnist", 100): "experiments/femnist/paper_100.yaml",
    ("cifar10", 50): "experiments/cifar10/paper_50.yaml",
    ("cifar10", 100): "experiments/cifar10/paper_100.yaml",
}

#: Other spellings of a data set in a folder name (``data_dir``), normalised to letters and digits.
_ALIASES = {"femnist": "femnist", "cifar10": "cifar10", "sent140": "sent140", "sentiment140": "sent140",
            "yelp": "yelp"}


@dataclass(frozen=True)
class Cell:
    """One row of the paper's table: a data set, its number of clients, an algorithm and the
    published accuracy in percent (None where the paper's released material gives none)."""

    dataset: str
    clients: int
    algorithm: str
    accuracy: float | None

    @property
    def name(self) -> str:
        """The data set as the table prints it."""
        return DATASETS[self.dataset]

    def command(self) -> str:
        """The command that runs this cell at paper scale on the full data."""
        preset = f"experiments/{self.dataset}/{ALGORITHMS[self.algorithm]}"
        overlay = OVERLAYS.get((self.dataset, self.clients))
        configs = f"--config {preset}" + (f" --config {overlay}" if overlay else "")
        root = f"runs/paper/{self.dataset}_{self.clients}/{self.algorithm.lower()}"
        return f"python -m fedmoe.cli fit {configs} --data.data_dir <folder> --trainer.default_root_dir {root}"


CELLS: tuple[Cell, ...] = tuple(
    Cell(dataset, clients, algorithm, accuracy if algorithm == "FedMoE" else None)
    for (dataset, clients), accuracy in FEDMOE_ACCURACY.items()
    for algorithm in ALGORITHMS
)


def dataset_of(data_class_path: str | None, data_dir: str | None = None) -> str | None:
    """The paper data set a run used: from its data module's module (``fedmoe.data.femnist.*`` is
    FEMNIST, ``fedmoe.data.sent140.*`` Sent140, ...), else, for a data module of another package, from
    a folder name in ``data_dir`` (the deepest that names one); None when neither names a paper data set."""
    if data_class_path:
        parts = data_class_path.split(".")
        if parts[:2] == ["fedmoe", "data"]:
            return parts[2] if len(parts) > 3 and parts[2] in DATASETS else None
    for part in reversed(re.split(r"[\\/]", data_dir or "")):
        key = re.sub(r"[^a-z0-9]", "", part.lower())
        for alias, dataset in _ALIASES.items():
            if key.startswith(alias):
                return dataset
    return None


def find_cell(dataset: str | None, clients: int | None, algorithm: str | None) -> Cell | None:
    """The paper cell with this data set key, number of clients and algorithm class name, if any."""
    for cell in CELLS:
        if (cell.dataset, cell.clients, cell.algorithm) == (dataset, clients, algorithm):
            return cell
    return None


def cells_line() -> str:
    """The paper's cells in one line, for messages: ``FEMNIST 50/100, CIFAR-10 50/100, ...``."""
    clients: dict[str, list[int]] = {}
    for dataset, n in FEDMOE_ACCURACY:
        clients.setdefault(DATASETS[dataset], []).append(n)
    return ", ".join(f"{name} {'/'.join(map(str, ns))}" for name, ns in clients.items())
