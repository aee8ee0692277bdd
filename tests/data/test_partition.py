import numpy as np
import pytest

from fedmoe.data.partition import contiguous_groups, dirichlet, holdout, iid, stratified_holdout
from fedmoe.errors import DataError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(parts)
    assert len(flat) == n
    assert np.array_equal(np.sort(flat), np.arange(n))


def test_iid_covers_every_index_once_with_sizes_within_one():
    parts = iid(103, 10, rng())
    assert_exact_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_iid_is_shuffled_and_deterministic_by_seed():
    a, b, c = iid(100, 4, rng(1)), iid(100, 4, rng(1)), iid(100, 4, rng(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], np.arange(25))


def test_iid_rejects_more_clients_than_samples():
    with pytest.raises(DataError, match="3 samples over 5 clients"):
        iid(3, 5, rng())


def test_dirichlet_covers_every_index_once_and_respects_min_size():
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet(labels, 8, 1.0, rng(3), min_size=20)
    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 20
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_dirichlet_is_deterministic_by_seed():
    labels = np.tile(np.arange(5), 60)
    a = dirichlet(labels, 5, 0.5, rng(7), min_size=5)
    b = dirichlet(labels, 5, 0.5, rng(7), min_size=5)
    c = dirichlet(labels, 5, 0.5, rng(8), min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_balances_them():
    labels = np.repeat(np.arange(4), 400)

    def top_class_share(alpha: float) -> float:
        parts = dirichlet(labels, 4, alpha, rng(0), min_size=1)
        return float(np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in parts]))

    assert top_class_share(0.05) > 0.8
    assert top_class_share(1000.0) < 0.3


def test_dirichlet_redraws_until_every_client_has_min_size():
    labels = np.repeat(np.arange(5), 30)
    failing_first_draw = []
    for seed in range(30):
        try:
            dirichlet(labels, 6, 0.3, rng(seed), min_size=8, max_tries=1)
        except DataError:
            failing_first_draw.append(seed)
    assert failing_first_draw, "expected some seed whose first draw leaves a client too small"
    seed = failing_first_draw[0]
    parts = dirichlet(labels, 6, 0.3, rng(seed), min_size=8, max_tries=100)
    assert min(len(p) for p in parts) >= 8


def test_dirichlet_error_after_max_tries_says_what_to_change():
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(DataError, match=r"100 samples over 9 clients.*all 100 draws.*raise dirichlet_alpha"):
        dirichlet(labels, 9, 0.01, rng(), min_size=11)


def test_dirichlet_rejects_too_few_samples_at_once():
    with pytest.raises(DataError, match=r"4 clients x 10 samples .* = 40 samples, but only 39"):
        dirichlet(np.zeros(39, dtype=int), 4, 1.0, rng(), min_size=10)


def test_contiguous_groups_assigns_consecutive_ranges():
    assert contiguous_groups(10, 3, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_contiguous_groups_rejects_too_few_groups():
    with pytest.raises(DataError, match=r"3 clients x 4 groups = 12 groups, found 10"):
        contiguous_groups(10, 4, 3)


@pytest.mark.parametrize(
    ("n", "fraction", "expected"), [(100, 0.1, 10), (15, 0.1, 2), (2, 0.1, 1), (5, 0.2, 1), (1, 0.1, 0)]
)
def test_holdout_sizes_are_rounded_with_at_least_one(n, fraction, expected):
    train, test = holdout(n, fraction, rng())
    assert len(test) == expected
    assert_exact_cover([train, test], n)


def test_holdout_is_random_and_deterministic_by_seed():
    a, b, c = holdout(50, 0.2, rng(4)), holdout(50, 0.2, rng(4)), holdout(50, 0.2, rng(5))
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], np.arange(40, 50))


def test_holdout_rejects_fraction_of_one():
    with pytest.raises(DataError, match="fraction"):
        holdout(10, 1.0, rng())


def test_stratified_holdout_has_exact_total_and_proportional_classes():
    labels = np.repeat(np.arange(3), [50, 31, 19])
    train, test = stratified_holdout(labels, 0.25, rng(6))
    assert len(test) == 25
    assert_exact_cover([train, test], 100)
    counts = np.bincount(labels[test], minlength=3)
    assert np.all(np.abs(counts - 0.25 * np.array([50, 31, 19])) < 1)
