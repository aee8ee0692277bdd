"""Evaluation metrics over label and prediction arrays (GLUE's task metrics among them).

Pure numpy functions. Degenerate inputs give a defined number instead of NaN or a warning, so a
round's log never holds NaN from a model that predicts one class: Matthews correlation, F1 and the
correlations are 0 when their denominator is 0 (a constant prediction or constant labels), which
is the value of an uninformative predictor. Empty inputs give NaN (there is nothing to score).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata


def _pair(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels).reshape(-1), np.asarray(preds).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels have {y.size} values but predictions {p.size}")
    return y, p


def accuracy(labels, preds) -> float:
    """Share of predictions equal to the label."""
    y, p = _pair(labels, preds)
    return float(np.mean(y == p)) if y.size else math.nan


def matthews_corrcoef(labels, preds) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; binary MCC for 2 classes).

    With the confusion matrix C, t_k = row sums (true counts), p_k = column sums (predicted counts),
    c = trace(C) and s = n:  MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)).
    Returns 0 when a factor of the denominator is 0 (all predictions, or all labels, one class).
    """
    y, p = _pair(labels, preds)
    if y.size == 0:
        return math.nan
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    cm = np.bincount(codes[: y.size] * k + codes[y.size :], minlength=k * k).reshape(k, k).astype(np.float64)
    t, q = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    cov_yp = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_yy = s * s - t @ t
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / math.sqrt(cov_pp * cov_yy))


def f1_score(labels, preds, positive=1) -> float:
    """Binary F1 of class ``positive``: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    y, p = _pair(labels, preds)
    if y.size == 0:
        return math.nan
    tp = np.sum((y == positive) & (p == positive))
    fp = np.sum((y != positive) & (p == positive))
    fn = np.sum((y == positive) & (p != positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; 0 when either side is constant (where the coefficient is undefined)."""
    a, b = _pair(x, y)
    if a.size == 0:
        return math.nan
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    if denom == 0 or not math.isfinite(denom):
        return 0.0
    return float(np.clip((a @ b) / denom, -1.0, 1.0))


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties given their average rank; 0 when constant."""
    a, b = _pair(x, y)
    if a.size == 0:
        return math.nan
    return pearson(rankdata(a), rankdata(b))


def mean_squared_error(labels, preds) -> float:
    """Mean of (prediction - label)^2."""
    y, p = _pair(labels, preds)
    return float(np.mean((p.astype(np.float64) - y) ** 2)) if y.size else math.nan
