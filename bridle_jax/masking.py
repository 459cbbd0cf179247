"""MAE-style random masking and VideoMAE tube masking, with static shapes.

Masks are permutations, not boolean selections: every sample keeps exactly the same number of patches
(`num_kept(N, ratio)` for random masks, `t * tube_num_kept(h * w, ratio)` for tube masks), so the visible-token array
has a static shape under jit. `keep_idx` feeds the encoder's gather, `restore_idx` the
decoder's unshuffle, `masked` the loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
    keep_idx: jax.Array  # [B, n_keep] int32: visible patch indices, in shuffled (not sorted) order
    restore_idx: jax.Array  # [B, N] int32: inverse permutation; restore_idx[b, keep_idx[b, j]] == j
    masked: jax.Array  # [B, N] bool: True = masked = prediction target


def _check(num_patches: int, ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")


def num_kept(num_patches: int, ratio: float) -> int:
    """Visible patches per sample of a random mask: int(N * (1 - ratio)), as MAE's `random_masking` counts them
    (196 patches at 0.8 keep 39, 512 keep 102), at least 1."""
    _check(num_patches, ratio)
    return max(1, int(num_patches * (1.0 - ratio)))


def tube_num_kept(num_spatial: int, ratio: float) -> int:
    """Visible patches per frame slot of a tube mask: hw - int(ratio * hw). VideoMAE's generator counts the *masked*
    tokens, int(ratio * hw), so 0.9 on 14x14 masks 176 and keeps 20 (160 per 8-slot clip); int(hw * (1 - ratio))
    would give int(19.599...) = 19 in float arithmetic. At least 1 (ratio < 1); it masks nothing when
    ratio * hw < 1."""
    _check(num_spatial, ratio)
    return num_spatial - int(ratio * num_spatial)


def random_mask(key: jax.Array, batch_size: int, num_patches: int, ratio: float) -> Mask:
    """Per-sample argsort of uniform noise: the first n_keep of the shuffle are visible, the rest masked."""
    n_keep = num_kept(num_patches, ratio)
    noise = jax.random.uniform(key, (batch_size, num_patches))
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    return Mask(keep_idx=shuffle[:, :n_keep], restore_idx=restore, masked=restore >= n_keep)


def tube_mask(key: jax.Array, batch_size: int, grid: tuple[int, int, int], ratio: float) -> Mask:
    """VideoMAE tube masking: one random spatial mask per sample, repeated in every temporal slot of the (t, h, w)
    grid, so a masked patch cannot be copied from its neighbour in time. Keeps `t * tube_num_kept(h * w, ratio)`
    patches (0.9 on 8x14x14: 20 per slot, 160 in all), listed slot by slot."""
    if len(grid) != 3:
        raise ValueError(f"tube masking needs a (time, height, width) patch grid, got {grid}")
    t, h, w = grid
    hw = h * w
    n_keep = tube_num_kept(hw, ratio)
    noise = jax.random.uniform(key, (batch_size, hw))
    spatial = jnp.argsort(noise, axis=1).astype(jnp.int32)  # [B, hw]: kept positions first
    offsets = (jnp.arange(t, dtype=jnp.int32) * hw)[None, :, None]  # [1, t, 1]
    kept = (spatial[:, None, :n_keep] + offsets).reshape(batch_size, t * n_keep)
    dropped = (spatial[:, None, n_keep:] + offsets).reshape(batch_size, t * (hw - n_keep))
    shuffle = jnp.concatenate([kept, dropped], axis=1)
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    return Mask(keep_idx=kept, restore_idx=restore, masked=restore >= t * n_keep)


MASKS = {
    "random": "per-sample random patches (audio, image)",
    "tube": "the same spatial mask in every frame slot (video)",
}


def make_mask(kind: str, key: jax.Array, batch_size: int, grid: tuple[int, ...], ratio: float) -> Mask:
    """The mask of `config.masking.kind` for a batch on a patch grid."""
    if kind == "random":
        return random_mask(key, batch_size, math.prod(grid), ratio)
    if kind == "tube":
        return tube_mask(key, batch_size, tuple(grid), ratio)
    raise ValueError(f"config.masking.kind: expected one of {sorted(MASKS)}, got {kind!r}")
