"""MAE-style random masking with static shapes (SPEC 1.3, A9).

Masks are permutations, not boolean selections: every sample keeps exactly `num_kept(N, ratio)` patches, so the
visible-token array has a static shape under jit. `keep_idx` feeds the encoder's gather, `restore_idx` the
decoder's unshuffle, `masked` the loss.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
    keep_idx: jax.Array  # [B, n_keep] int32: visible patch indices, in shuffled (not sorted) order
    restore_idx: jax.Array  # [B, N] int32: inverse permutation; restore_idx[b, keep_idx[b, j]] == j
    masked: jax.Array  # [B, N] bool: True = masked = prediction target


def num_kept(num_patches: int, ratio: float) -> int:
    """Visible patches per sample: int(N * (1 - ratio)) as in MAE (196 patches at 0.8 keep 39), at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    return max(1, int(num_patches * (1.0 - ratio)))


def random_mask(key: jax.Array, batch_size: int, num_patches: int, ratio: float) -> Mask:
    """Per-sample argsort of uniform noise: the first n_keep of the shuffle are visible, the rest masked."""
    n_keep = num_kept(num_patches, ratio)
    noise = jax.random.uniform(key, (batch_size, num_patches))
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    return Mask(keep_idx=shuffle[:, :n_keep], restore_idx=restore, masked=restore >= n_keep)
