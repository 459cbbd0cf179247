"""What a fine-tune run reports: targets from labels, the eval scores, `finetune.json` (history, best and last
eval, A12), the cross-validation summary and the human-readable report."""

from __future__ import annotations

import json
import math

import jax
import numpy as np

from bridle_jax import paths
from bridle_jax.evaluators import scoring

RESULT_FILE = "finetune.json"


def targets_from_labels(labels, num_classes: int, multi_label: bool, where: str) -> np.ndarray:
    """Pipeline labels (int [B], or multi-hot [B, C]) -> float32 targets [B, num_classes]; a label set that does not
    match `config.num_classes` is an error naming both."""
    labels = np.asarray(labels)
    if multi_label:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise ValueError(
                f"{where}: expected multi-hot labels [N, config.num_classes={num_classes}] (config.multi_label=True), "
                f"got shape {labels.shape}"
            )
        return labels.astype(np.float32)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: expected integer class labels [N] (config.multi_label=False), got {labels.dtype} {labels.shape}"
        )
    bad = (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{where}: label {int(labels[np.argmax(bad)])} is outside 0..{num_classes - 1}: config.num_classes="
            f"{num_classes} does not match the data"
        )
    return np.eye(num_classes, dtype=np.float32)[labels]


def score(logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> dict:
    """{"mAP"} (multi-label) or {"top1", "top5"}: the eval metrics of one evaluation."""
    if multi_label:
        return {"mAP": scoring.mean_average_precision(logits, labels)["mAP"]}
    return scoring.topk_accuracy(logits, labels, (1, 5))


def primary_metric(c) -> str:
    return "mAP" if c.multi_label else "top1"


def summarize(history: list[dict], metric: str) -> dict:
    """{"best": the eval with the highest `metric` (the authors' number), "last": the final eval} (A12)."""
    if not history:
        return {"best": None, "last": None}
    best = max(history, key=lambda h: (h[metric], -h["step"]))  # the earliest of equal bests
    return {"best": dict(best), "last": dict(history[-1])}


def write_json(workdir: str, payload: dict) -> None:
    if jax.process_index() == 0:
        root = paths.workdir_path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(root / RESULT_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_result(workdir: str) -> dict | None:
    path = paths.workdir_path(workdir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def cv_summary(c, folds: dict, metric: str, done: bool) -> dict:
    summary = {}
    for which in ("best", "last"):
        values = [f[which][metric] for f in folds.values() if f.get(which)]
        if values:
            summary[which] = scoring.summarize_folds(values)
    return {
        "mode": c.mode,
        "init_from": paths.resolve_workdir(c.init_from),
        "dataset": c.data.name,
        "metric": metric,
        "cv_folds": list(c.cv_folds),
        "folds": {
            k: {key: v[key] for key in ("best", "last", "init_iteration", "test_folds") if key in v}
            for k, v in folds.items()
        },
        "summary": summary,
        "done": done,
    }


def format_result(result: dict) -> str:
    """A short human-readable report of a `run` result."""
    metric = result["metric"]
    if "summary" in result:
        lines = [f"{result['mode']} on {result['dataset']}, {len(result['folds'])}-fold cross-validation ({metric}):"]
        for which in ("best", "last"):
            s = result["summary"].get(which)
            if s:
                std = "n/a" if s["std"] is None else f"{s['std']:.4f}"
                folds = ", ".join(f"{v:.4f}" for v in s["values"])
                lines.append(f"  {which:<4} eval: {s['mean']:.4f} +- {std}  (folds: {folds})")
        return "\n".join(lines)
    best, last = result.get("best") or {}, result.get("last") or {}
    return (
        f"{result['mode']} on {result['dataset']} ({result['eval_split']}, {result['num_eval_examples']} examples), "
        f"from iteration {result['init_iteration']}:\n"
        f"  best eval: {metric} {best.get(metric, math.nan):.4f} at step {best.get('step')}\n"
        f"  last eval: {metric} {last.get(metric, math.nan):.4f} at step {last.get('step')}"
    )
