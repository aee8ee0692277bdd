"""Seeded partitioners: which sample (or group of samples) goes to which client or held-out set.

Every function is pure given its ``np.random.Generator`` and returns index arrays sorted ascending,
so a split depends only on the seed and the data, never on the order of work done elsewhere.
"""

from __future__ import annotations

import numpy as np

from fedmoe.errors import DataError


def _sorted(idx: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(idx, dtype=np.int64))


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` and cut it into ``num_clients`` parts whose sizes differ by at most 1."""
    if num_clients < 1:
        raise DataError(f"IID split needs at least 1 client, got num_clients={num_clients}")
    if num_samples < num_clients:
        raise DataError(
            f"IID split of {num_samples} samples over {num_clients} clients would leave clients empty; "
            "lower num_clients"
        )
    return [_sorted(part) for part in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, client shares ~ Dirichlet(alpha).

    The indices of a class (shuffled) are cut at the cumulative shares. The whole partition is
    redrawn, up to ``max_tries`` times, until every client holds at least ``min_size`` samples.
    Returns positions into ``labels``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise DataError(f"Dirichlet split needs at least 1 client, got num_clients={num_clients}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise DataError(f"Dirichlet split needs a finite dirichlet_alpha > 0, got {alpha}")
    if n < num_clients * min_size:
        raise DataError(
            f"Dirichlet split needs {num_clients} clients x {min_size} samples (min_client_size) = "
            f"{num_clients * min_size} samples, but only {n} are left for clients; "
            "lower num_clients or min_client_size"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, float(alpha))
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            idx = rng.permutation(members)
            shares = rng.dirichlet(concentration)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        clients = [_sorted(np.concatenate(p)) for p in parts]
        if min(len(c) for c in clients) >= min_size:
            return clients
    raise DataError(
        f"Dirichlet split (alpha={alpha}) of {n} samples over {num_clients} clients left some client with "
        f"fewer than {min_size} samples (min_client_size) in all {max_tries} draws; "
        "raise dirichlet_alpha or lower num_clients or min_client_size"
    )


def contiguous_groups(num_groups: int, groups_per_client: int, num_clients: int) -> list[list[int]]:
    """Natural split: client i gets groups ``[groups_per_client * i, groups_per_client * (i + 1))``."""
    need = groups_per_client * num_clients
    if groups_per_client < 1 or num_clients < 1:
        raise DataError(
            f"natural split needs groups_per_client >= 1 and num_clients >= 1, "
            f"got {groups_per_client} and {num_clients}"
        )
    if num_groups < need:
        raise DataError(
            f"natural split needs {num_clients} clients x {groups_per_client} groups = {need} groups, "
            f"found {num_groups}"
        )
    return [list(range(groups_per_client * i, groups_per_client * (i + 1))) for i in range(num_clients)]


def _holdout_count(n: int, fraction: float) -> int:
    """round(fraction * n), half up, kept in [1, n - 1] when n >= 2 and fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"a held-out fraction must be in [0, 1), got {fraction}")
    k = int(np.floor(fraction * n + 0.5))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return min(k, n)


def holdout(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random held-out part of ``range(n)`` with round(fraction * n) items (at least 1 when n >= 2)."""
    k = _holdout_count(n, fraction)
    perm = rng.permutation(n)
    return _sorted(perm[k:]), _sorted(perm[:k])


def stratified_holdout(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`holdout`, with each class held out in proportion to its size.

    The total is exactly round(fraction * n); per-class counts are the floors of their quotas plus
    one for the classes with the largest remainders (ties broken at random).
    """
    labels = np.asarray(labels)
    k = _holdout_count(len(labels), fraction)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    quota = np.array([fraction * len(m) for m in members])
    counts = np.floor(quota).astype(np.int64)
    remainder = quota - counts
    order = np.lexsort((rng.random(len(classes)), -remainder))
    counts[order[: k - counts.sum()]] += 1
    held = [rng.permutation(m)[:c] for m, c in zip(members, counts)]
    test = _sorted(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return _sorted(train), test


def fixed_sizes(num_samples: int, sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Client i gets ``sizes[i]`` samples of a shuffle of ``range(num_samples)``, consecutively.

    Parts are disjoint; the ``num_samples - sum(sizes)`` samples left over go to no client.
    """
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise DataError("fixed-size split needs client_sizes with one size per client, got an empty list")
    if min(sizes) < 1:
        raise DataError(f"fixed-size split needs every client size >= 1, got client_sizes={sizes}")
    if sum(sizes) > num_samples:
        raise DataError(
            f"client_sizes={sizes} sum to {sum(sizes)} samples but only {num_samples} are left for clients; "
            "lower client_sizes"
        )
    perm = rng.permutation(num_samples)
    cuts = np.cumsum(sizes)[:-1]
    return [_sorted(part) for part in np.split(perm[: sum(sizes)], cuts)]
