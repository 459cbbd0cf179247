"""Classification metrics of the downstream evaluations (SPEC 4), in NumPy float64 so the numbers are reproducible
and comparable with the PyTorch reference code (which calls scikit-learn and timm); scikit-learn is only a test
dependency.

* `average_precision` / `mean_average_precision` -- AudioSet mAP: scikit-learn's `average_precision_score` per
  class (step-wise precision-recall integral, no interpolation, one threshold per *distinct* score, so tied scores
  enter together), then the mean over classes. A class without a positive example has no defined AP:
  scikit-learn 1.9 warns and returns 0.0 for it (and counts that 0 in its macro mean); here it gets NaN and is left
  out of the mean, and the number left out is reported. On the AudioSet eval set every class has positives, so both
  conventions agree there; on small subsets ours does not drag the mean down with undefined classes.
* `topk_accuracy` -- top-k accuracy with a deterministic tie rule (see its docstring).
* `kfold_splits`, `esc50_folds`, `summarize_folds` -- ESC-50's 5-fold cross-validation: train on 4 folds, test on
  the fifth, each fold tested once. The authors' scripts run one job per fold and do not average (SPEC 4); the
  summary here is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from bridle_jax.validation import is_int

__all__ = [
    "ESC50_FOLDS",
    "FoldSplit",
    "average_precision",
    "esc50_folds",
    "kfold_splits",
    "mean_average_precision",
    "summarize_folds",
    "topk_accuracy",
]

ESC50_FOLDS = (1, 2, 3, 4, 5)


# ----------------------------------------------------------------------------------------------- validation


def _scores_2d(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, C], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name}: expected finite values, got {x[tuple(bad)].item()} at row {bad[0]}, column {bad[1]}")
    return x


def _binary(name: str, y, shape: tuple) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (as the scores), got {y.shape}")
    if y.dtype == bool:
        return y.astype(np.float64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name}: expected 0/1 values, got dtype {y.dtype}")
    ok = (y == 0) | (y == 1)
    if not np.all(ok):
        bad = np.argwhere(~ok)[0]
        raise ValueError(f"{name}: expected 0/1 values, got {y[tuple(bad)].item()!r} at row {bad[0]}, column {bad[1]}")
    return y.astype(np.float64)


# ----------------------------------------------------------------------------------------------- mAP


def average_precision(scores, targets) -> np.ndarray:
    """Per-class average precision [C] of `scores` [N, C] against 0/1 `targets` [N, C], equal to
    `sklearn.metrics.average_precision_score(targets, scores, average=None)` for every class with a positive.

    AP = Σ_t (R_t − R_{t−1}) P_t over the distinct score thresholds t, highest first; examples with tied scores
    cross the threshold together (their group shares the precision at the group's end), so the result does not
    depend on the order of ties. Classes without a positive example get NaN (scikit-learn: 0.0 and a warning).
    """
    s = _scores_2d("scores", scores)
    y = _binary("targets", targets, s.shape)
    if s.shape[0] == 0:
        raise ValueError("scores: expected at least one example (row), got 0")
    # one class at a time on contiguous columns: a 1-D sort is cache-friendly (faster than sorting [N, C] at once)
    return np.array([_binary_ap(sc, yc) for sc, yc in zip(s.T.copy(), y.T.copy())], np.float64).reshape(s.shape[1])


def _binary_ap(s: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tps = np.cumsum(y)
    if tps[-1] == 0:
        return np.nan
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # the last position of each group of tied scores
    tp_at = tps[ends]
    gained = np.diff(tp_at, prepend=0.0)  # positives admitted at each threshold
    return float(np.sum(gained * (tp_at / (ends + 1.0))) / tps[-1])


def mean_average_precision(scores, targets) -> dict:
    """{"mAP": mean AP over the classes with a positive, "num_classes_used", "num_classes_without_positives",
    "per_class": the list of APs (None for the classes left out)}."""
    ap = average_precision(scores, targets)
    used = ~np.isnan(ap)
    if not np.any(used):
        raise ValueError(f"targets: no class (of {ap.size}) has a positive example; mAP is undefined")
    return {
        "mAP": float(np.mean(ap[used])),
        "num_classes_used": int(np.sum(used)),
        "num_classes_without_positives": int(np.sum(~used)),
        "per_class": [float(a) if u else None for a, u in zip(ap, used)],
    }


# ----------------------------------------------------------------------------------------------- top-k


def topk_accuracy(logits, labels, ks: Sequence[int] = (1, 5)) -> dict:
    """{"top1": ..., "top5": ...}: fractions in [0, 1] of the examples whose label is among the k highest logits.

    Ties are resolved as a *stable* descending sort would (`np.argsort(-logits, kind="stable")`): among equal logits
    the lower class index ranks first, so a label tied with others at the k-th place counts as correct only when it
    still falls inside the first k in that order (torch.topk leaves the order of ties unspecified). As in timm's
    `accuracy`, k larger than the number of classes C is clipped to C (every example is then correct).
    """
    x = _scores_2d("logits", logits)
    n, c = x.shape
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) (one per row of logits), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= c)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"labels: expected class indices in [0, {c}), got {labels[i]} at row {i}")
    if n == 0:
        raise ValueError("logits: expected at least one example (row), got 0")
    ks = tuple(ks)
    for k in ks:
        if not is_int(k) or k < 1:
            raise ValueError(f"ks: expected positive ints, got {k!r}")
    true_logit = x[np.arange(n), labels][:, None]
    ahead = (x > true_logit) | ((x == true_logit) & (np.arange(c)[None, :] < labels[:, None]))
    rank = np.sum(ahead, axis=1)  # the label's 0-based position in the stable descending order
    return {f"top{k}": float(np.mean(rank < min(int(k), c))) for k in ks}


# ----------------------------------------------------------------------------------------------- folds


class FoldSplit(NamedTuple):
    fold: int  # the fold tested
    train: np.ndarray  # int64 indices of the examples of every other fold, ascending
    test: np.ndarray  # int64 indices of the examples of `fold`, ascending


def kfold_splits(folds_of_each_example, folds: Sequence[int] | None = None) -> list[FoldSplit]:
    """One split per fold, in ascending fold order: test on that fold's examples, train on all the others.

    `folds_of_each_example` [N] ints (ESC-50's CSV column "fold"). `folds`: the folds expected (ESC-50:
    `ESC50_FOLDS`); an example in another fold, or an expected fold without examples, is an error. Without it, the
    folds are the distinct values present (at least two).
    """
    f = np.asarray(folds_of_each_example)
    if f.ndim != 1 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"folds_of_each_example: expected a 1-D int array [N], got {f.dtype} {f.shape}")
    present = np.unique(f)
    if folds is None:
        expected = present
    else:
        expected = np.unique(np.asarray(tuple(folds), dtype=np.int64))
        unknown = np.setdiff1d(present, expected)
        if unknown.size:
            i = int(np.argmax(np.isin(f, unknown)))
            raise ValueError(
                f"folds_of_each_example: example {i} is in fold {f[i]}, expected one of {expected.tolist()}"
            )
        empty = np.setdiff1d(expected, present)
        if empty.size:
            raise ValueError(f"folds_of_each_example: folds {empty.tolist()} have no examples")
    if expected.size < 2:
        raise ValueError(f"folds_of_each_example: cross-validation needs at least 2 folds, got {expected.tolist()}")
    index = np.arange(f.size, dtype=np.int64)
    return [FoldSplit(int(k), index[f != k], index[f == k]) for k in expected]


def esc50_folds(folds: Sequence[int] = ESC50_FOLDS) -> list[tuple[tuple[int, ...], int]]:
    """ESC-50's protocol as (train folds, test fold) pairs, e.g. ((2, 3, 4, 5), 1), ... -- one run per pair, as
    `submit_ft_esc.sh` does; feed them to `audio_sources.ESC50Source(root, folds=...)`."""
    folds = tuple(int(k) for k in folds)
    if len(set(folds)) != len(folds) or len(folds) < 2:
        raise ValueError(f"folds: expected at least 2 distinct fold numbers, got {folds}")
    return [(tuple(k for k in folds if k != test), test) for test in folds]


def summarize_folds(values, ddof: int = 1) -> dict:
    """{"mean", "std", "ddof", "num_folds", "values"} of one metric over the folds.

    The std is the *sample* standard deviation by default (ddof=1: the folds are a sample of possible splits);
    ddof=0 gives the population one (`np.std`'s default). With one value the sample std is undefined (None).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"values: expected one finite number per fold, got {np.asarray(values).tolist()}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof: expected 0 (population) or 1 (sample), got {ddof!r}")
    std = None if v.size <= ddof else float(np.std(v, ddof=ddof))
    return {"mean": float(np.mean(v)), "std": std, "ddof": ddof, "num_folds": int(v.size), "values": v.tolist()}
