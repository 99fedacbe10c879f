"""Quantile categorisation of minority scores into L ordinal classes (Section 3.3, Section C, B.3).

Class 0 = most common (lowest scores), class L-1 = rarest. ``thresholds`` are the L upper
quantiles q_1..q_L of the scores (q_L = max); a score s gets class j when q_j < s <= q_{j+1}
(the official binning: bucketize against thresholds[:-1], right=False). New data is labelled with
the stored thresholds; scores above q_L fall in class L-1.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from core.errors import DataError


def quantile_thresholds(scores: np.ndarray, num_classes: int) -> np.ndarray:
    """L ascending thresholds (float64) splitting ``scores`` (N,) into equal-count bins."""
    scores = np.asarray(scores, dtype=np.float64)
    if num_classes < 2:
        raise ValueError(f"the number of classes L must be >= 2, got {num_classes}")
    if len(scores) < num_classes:
        raise DataError(f"{num_classes} classes need at least {num_classes} scored images, got {len(scores)}")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or infinite values")
    return np.quantile(scores, np.arange(1, num_classes + 1) / num_classes)


def categorize(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Labels int64 (N,) in [0, L) for scores (N,) given L ascending thresholds."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    return np.searchsorted(thresholds[:-1], np.asarray(scores, dtype=np.float64), side="left").astype(np.int64)


def per_class_thresholds(scores: np.ndarray, class_ids: np.ndarray, num_classes: int) -> dict[int, np.ndarray]:
    """Appendix B.3: thresholds computed within each data class c, L shared by all classes."""
    class_ids = np.asarray(class_ids)
    out = {}
    for c in np.unique(class_ids):
        try:
            out[int(c)] = quantile_thresholds(np.asarray(scores)[class_ids == c], num_classes)
        except DataError as e:
            raise DataError(f"data class {int(c)}: {e}") from None
    return out


def categorize_per_class(scores: np.ndarray, class_ids: np.ndarray, thresholds: dict[int, np.ndarray]) -> np.ndarray:
    labels = np.empty(len(scores), dtype=np.int64)
    class_ids = np.asarray(class_ids)
    for c, th in thresholds.items():
        m = class_ids == int(c)
        labels[m] = categorize(np.asarray(scores)[m], th)
    missing = set(np.unique(class_ids).tolist()) - {int(c) for c in thresholds}
    if missing:
        raise DataError(f"no thresholds for data class {sorted(missing)[0]}")
    return labels


def fit_labels(scores: np.ndarray, num_classes: int, class_ids: Optional[np.ndarray] = None):
    """Thresholds (array, or {class: array} when per class) and the labels they give."""
    if class_ids is None:
        th = quantile_thresholds(scores, num_classes)
        return th, categorize(scores, th)
    th = per_class_thresholds(scores, class_ids, num_classes)
    return th, categorize_per_class(scores, class_ids, th)
