"""Metric functions against hand-computed values, and their degenerate cases."""

import math

import numpy as np
import pytest

from fedmoe import metrics as M


def test_accuracy_is_the_share_of_equal_predictions():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_binary_mcc_from_the_confusion_matrix():
    # TP = 2, FN = 1, TN = 2, FP = 1: (2*2 - 1*1) / sqrt(3 * 3 * 3 * 3) = 1/3
    assert M.matthews_corrcoef([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]) == pytest.approx(1 / 3)


def test_mcc_is_one_for_perfect_and_minus_one_for_inverted_predictions():
    y = np.array([0, 1, 1, 0, 1])
    assert M.matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert M.matthews_corrcoef(y, 1 - y) == pytest.approx(-1.0)


def test_multiclass_mcc_follows_gorodkin():
    # C = [[2,0,0],[0,1,0],[0,1,0]]: t = (2,1,1), p = (2,2,0), c = 3, s = 4 -> 6 / sqrt(8 * 10)
    assert M.matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 0]) == pytest.approx(6 / math.sqrt(80))


def test_mcc_of_constant_predictions_or_labels_is_zero():
    assert M.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0


def test_f1_of_the_positive_class():
    # TP = 2, FP = 1, FN = 1: 2*2 / (2*2 + 1 + 1) = 2/3
    assert M.f1_score([1, 1, 1, 0, 0], [1, 0, 1, 1, 0]) == pytest.approx(2 / 3)
    assert M.f1_score([1, 1, 1, 0, 0], [1, 0, 1, 1, 0], positive=0) == pytest.approx(0.5)  # TP 1, FP 1, FN 1


def test_f1_without_any_positive_is_zero():
    assert M.f1_score([0, 0, 0], [0, 0, 0]) == 0.0


def test_pearson_by_hand():
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): 3 / sqrt(2 * 42/9) = 9 / sqrt(84)
    assert M.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))


def test_pearson_of_a_constant_side_is_zero():
    assert M.pearson([2.0, 2.0, 2.0], [1, 2, 3]) == 0.0


def test_spearman_is_pearson_of_ranks():
    # ranks (1,2,3,4) vs (1,3,2,4): 1 - 6 * 2 / (4 * 15) = 0.8
    assert M.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)


def test_spearman_gives_ties_their_average_rank():
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert M.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert M.spearman([5, 5, 5], [1, 2, 3]) == 0.0


def test_mean_squared_error_by_hand():
    assert M.mean_squared_error([1.0, 2.0], [2.0, 4.0]) == pytest.approx(2.5)


def test_empty_inputs_give_nan_and_unequal_lengths_raise():
    for fn in (M.accuracy, M.matthews_corrcoef, M.f1_score, M.pearson, M.spearman, M.mean_squared_error):
        assert math.isnan(fn([], []))
    with pytest.raises(ValueError, match="3 values but predictions 2"):
        M.accuracy([0, 1, 1], [0, 1])
