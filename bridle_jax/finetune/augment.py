"""Fine-tuning augmentations that run inside the jitted step, on device (SPEC 4, A12), per example from one key:
  `mixup`          waveform mixup at rate 0.5 with lambda ~ Beta(10, 10) and soft labels (AudioMAE/BRIDLE `dataset.py`)
  `spec_augment`   torchaudio FrequencyMasking(F) + TimeMasking(T) on the log-mel (F48/T192 in the AudioSet scripts)
  `patch_mask_2d`  AudioMAE's `random_masking_2d`: keep int(T(1-p_t)) random time rows x int(F(1-p_f)) random
                   frequency columns of the patch grid (0.2/0.2; A12: the released HEAD code forgets to apply it)
The host-side ones of the input pipeline (RandAugment, random erasing, the class-balancing sampler) live in
`bridle_jax.data` (randaugment, weighted_sampler), behind the pipeline's `augment=` train stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------------------------- on device


def _expand(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def beta_symmetric(key, alpha: int, shape: tuple) -> jax.Array:
    """Beta(alpha, alpha) samples for an integer alpha: the alpha-th smallest of 2 alpha - 1 uniforms (exact).

    Why not `jax.random.beta`: its Gamma rejection sampler is a data-dependent while loop, and when the batch is
    sharded the partitioner splits that loop across devices with collectives in its condition; on the CPU backend
    such a step deadlocked now and then (devices waiting in different collectives). This form is loop-free.
    """
    if isinstance(alpha, bool) or not float(alpha).is_integer() or alpha < 1:
        raise ValueError(f"mixup alpha must be a positive integer (Beta(a, a) as an order statistic), got {alpha!r}")
    a = int(alpha)
    u = jax.random.uniform(key, tuple(shape) + (2 * a - 1,))
    return jnp.sort(u, axis=-1)[..., a - 1]


def mixup(key, inputs, lengths, targets, *, rate: float, alpha: int = 10):
    """Mixes each example, with probability `rate`, with a random partner from the batch.

    inputs `[B, S, ...]` (audio: zero-padded waveforms), lengths `[B]` int or None, targets `[B, C]` (one-hot or
    multi-hot). As AudioMAE's `_wav2fbank(wav1, wav2)`: both clips lose their mean over their real samples, the
    partner is cut (or zero-padded) to the first clip's length, `lam * x1 + (1 - lam) * x2` with lam ~ Beta(alpha,
    alpha), soft targets `lam * y1 + (1 - lam) * y2`; the length stays the first clip's. Un-mixed examples come back
    unchanged. Returns (inputs, targets, lam [B]).
    """
    b = inputs.shape[0]
    k_partner, k_apply, k_lam = jax.random.split(key, 3)
    partner = jax.random.permutation(k_partner, b)
    apply = jax.random.uniform(k_apply, (b,)) < rate
    lam = jnp.where(apply, beta_symmetric(k_lam, alpha, (b,)), 1.0).astype(jnp.float32)
    x = inputs.astype(jnp.float32)
    if lengths is not None:  # waveforms: mean over the real samples, zeros beyond them
        steps = jnp.arange(x.shape[1])
        real = _expand(steps[None, :] < lengths[:, None], x.ndim)
        count = _expand(jnp.maximum(lengths, 1).astype(jnp.float32), x.ndim)
        mean = jnp.sum(jnp.where(real, x, 0.0), axis=tuple(range(1, x.ndim)), keepdims=True) / count
        x = jnp.where(real, x - mean, 0.0)
        other = jnp.where(real, x[partner], 0.0)  # the partner cut / padded to this clip's length
    else:
        other = x[partner]
    mixed = _expand(lam, x.ndim) * x + _expand(1.0 - lam, x.ndim) * other
    mixed = jnp.where(_expand(apply, x.ndim), mixed, inputs.astype(jnp.float32))
    t = targets.astype(jnp.float32)
    mixed_targets = lam[:, None] * t + (1.0 - lam[:, None]) * t[partner]
    return mixed.astype(inputs.dtype), mixed_targets, lam


def _mask_along(key, batch: int, size: int, mask_param: int) -> jax.Array:
    """torchaudio's `mask_along_axis` per example: width floor(u * param), start floor(v * (size - u * param));
    returns `[B, size]` True where masked."""
    k_width, k_start = jax.random.split(key)
    value = jax.random.uniform(k_width, (batch,)) * mask_param
    min_value = jax.random.uniform(k_start, (batch,)) * (size - value)
    start = jnp.floor(min_value)
    end = start + jnp.floor(value)
    pos = jnp.arange(size, dtype=jnp.float32)[None, :]
    return (pos >= start[:, None]) & (pos < end[:, None])


def spec_augment(key, feats, *, freq_mask: int, time_mask: int, fill: float = 0.0):
    """FrequencyMasking(freq_mask) then TimeMasking(time_mask) on `[B, T, F]` log-mels, independently per example.

    `fill` is the value of a masked bin. AudioMAE masks the raw log-mel with 0 *before* normalising, so on the
    normalised features that is `(0 - mean) / (2 * std)` (what the padded frames hold too).
    """
    b, t, f = feats.shape
    k_f, k_t = jax.random.split(key)
    masked = jnp.zeros((b, t, f), bool)
    if freq_mask >= 1:
        masked = masked | _mask_along(k_f, b, f, freq_mask)[:, None, :]
    if time_mask >= 1:
        masked = masked | _mask_along(k_t, b, t, time_mask)[:, :, None]
    return jnp.where(masked, jnp.asarray(fill, feats.dtype), feats)


def patch_mask_2d(key, batch: int, grid: tuple[int, int], *, mask_t_prob: float, mask_f_prob: float) -> jax.Array:
    """`[B, n_keep]` int32 indices (row-major, index = t * F + f) of the kept patches: int(T (1 - p_t)) random time
    rows times int(F (1 - p_f)) random frequency columns per example (AudioMAE `random_masking_2d`)."""
    rows, cols = grid
    keep_t, keep_f = int(rows * (1 - mask_t_prob)), int(cols * (1 - mask_f_prob))
    if keep_t < 1 or keep_f < 1:
        raise ValueError(
            f"patch_mask_2d: mask_t_prob={mask_t_prob} / mask_f_prob={mask_f_prob} keep no row or column of the "
            f"{rows}x{cols} patch grid"
        )
    k_t, k_f = jax.random.split(key)
    t_idx = jnp.sort(jnp.argsort(jax.random.uniform(k_t, (batch, rows)), axis=1)[:, :keep_t], axis=1)
    f_idx = jnp.sort(jnp.argsort(jax.random.uniform(k_f, (batch, cols)), axis=1)[:, :keep_f], axis=1)
    return (t_idx[:, :, None] * cols + f_idx[:, None, :]).reshape(batch, keep_t * keep_f).astype(jnp.int32)
