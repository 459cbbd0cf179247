"""AST/AudioMAE's class-balancing sampler for multi-label audio (AudioSet-2M, docs/method.md): examples are drawn
with replacement, with probability proportional to the summed rarity of their labels, so rare classes are seen
about as often as common ones. `audio_pipeline.train_dataset(..., augment=config.augment)` uses it when
`augment.weighted_sampler` is set (`augment.epoch_len` examples per sampler epoch).
"""

from __future__ import annotations

import sys

import grain
import numpy as np


def weighted_sampler_weights(multi_hot, *, scale: float = 1000.0, eps: float = 0.01) -> np.ndarray:
    """Per-example weights [N] of AST/AudioMAE's balanced sampler (AudioMAE `dataset/audioset/gen_weight.py`):
    label_weight[c] = scale / (count of examples with label c + eps); an example's weight = the sum of its labels'
    weights. Rare classes are drawn more often; the weights are unnormalised (a sampler normalises them). An
    example without a label gets weight 0 (never drawn), as there.
    """
    y = np.asarray(multi_hot)
    if y.ndim != 2:
        raise ValueError(f"multi_hot: expected a 2-D 0/1 array [N, C], got shape {y.shape}")
    if y.dtype == bool:
        y = y.astype(np.float64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"multi_hot: expected 0/1 values, got dtype {y.dtype}")
    ok = (y == 0) | (y == 1)
    if not np.all(ok):
        bad = np.argwhere(~ok)[0]
        raise ValueError(
            f"multi_hot: expected 0/1 values, got {y[tuple(bad)].item()!r} at row {bad[0]}, column {bad[1]}"
        )
    y = y.astype(np.float64)
    label_weight = scale / (np.sum(y, axis=0) + eps)
    return y @ label_weight


def sampler_weights(source, chunk: int = 65536) -> np.ndarray:
    """`weighted_sampler_weights` of a multi-label source's labels (`source.label(i)`: read from its CSV, nothing
    decoded), computed in chunks: AudioSet-2M's labels as one dense [N, 527] matrix would take 4 GB."""
    n = len(source)
    counts = None
    for start in range(0, n, chunk):
        y = np.stack([source.label(i) for i in range(start, min(n, start + chunk))]).astype(np.float64)
        counts = y.sum(0) if counts is None else counts + y.sum(0)
    label_weight = 1000.0 / (counts + 0.01)  # the scale and eps of weighted_sampler_weights (AudioMAE gen_weight)
    return np.concatenate(
        [
            np.stack([source.label(i) for i in range(start, min(n, start + chunk))]).astype(np.float64) @ label_weight
            for start in range(0, n, chunk)
        ]
    )


class WeightedSample(grain.MapDataset):
    """An infinite stream of `parent` records drawn with replacement with probability ∝ `weights`, `epoch_len` per
    "epoch", redrawn each epoch from (seed, epoch) -- torch's WeightedRandomSampler as AST/AudioMAE use it. Random
    access by position (a pure function of seed and position), so the stream resumes and shards like the others."""

    def __init__(self, parent: grain.MapDataset, weights: np.ndarray, epoch_len: int, seed: int):
        super().__init__(parent)
        w = np.asarray(weights, np.float64)
        if w.shape != (len(parent),) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"WeightedSample: expected {len(parent)} finite weights >= 0, not all 0, got {w.shape}")
        self._p = w / w.sum()
        self._epoch_len, self._seed = int(epoch_len), int(seed)
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"WeightedSample(epoch_len={self._epoch_len})"

    def indices(self, epoch: int) -> np.ndarray:
        """The source indices of `epoch` (the latest epoch's are kept: positions are read in order)."""
        cached = self._cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng([self._seed, int(epoch)])
        indices = rng.choice(len(self._p), size=self._epoch_len, replace=True, p=self._p)
        self._cache = (epoch, indices)  # one tuple assignment: readers in other threads see old or new, whole
        return indices

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index), self._epoch_len)
        return self._parent[int(self.indices(epoch)[pos])]
