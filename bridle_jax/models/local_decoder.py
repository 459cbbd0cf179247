"""The audio label predictor D (SPEC 1.4 Audio, A11): AudioMAE's local-window decoder (`decoder_mode 1`).

Same contract as `decoder.LabelPredictor` (encoded visible tokens + `restore_idx` -> `[B, N, M, K]` float32 logits),
but the cls token is dropped and the patch grid goes through `depth` Swin-style blocks that attend only inside
`window`-sized windows; odd blocks roll the grid by `shift` first (with Swin's mask so the rolled-in rows never see
the rows they wrapped past), which is what lets information cross window borders along time.

The block is the one AudioMAE (and BRIDLE) actually run: timm's `swin_transformer_v2_cr` block as patched into timm by
AudioMAE's `timm_patch/swin_transformer.py`, built by `models_mae.py`:

* post-norm residual: `x = x + LN(attn(x)); x = x + LN(mlp(x))`, MLP `mlp_dim` with exact GELU;
* LayerNorm eps 1e-6 by default; the authors' released `encoder_decoder.py` passes no norm_layer to its
  `SwinTransformerBlock`s, so their norm1/norm2 use torch's 1e-5 (`block_ln_eps`, config.model.decoder_block_ln_eps;
  the parity tests pin it, README "Parity");
* scaled cosine attention `cos(q, k) / max(tau, 0.01)` with a per-head `tau` initialised to 1, a bias on q, k and v
  (one fused `qkv` Linear), and a continuous relative-position bias from an MLP `2 -> cpb_hidden -> heads` (ReLU) on
  `sign(d) * ln(1 + |d|)` of the raw pairwise offsets `d = coord_i - coord_j` inside a window, added unsquashed;
* shifted windows: roll by `-shift`, partition, attend with Swin's region mask (-100 between regions), reverse;
  a window larger than the grid along an axis shrinks to the grid and that axis is not shifted (`_calc_window_shift`).

`variant="swinv2"` switches the attention to Microsoft's official SwinV2 instead: `cos(q, k) * exp(min(logit_scale,
log 100))` with `logit_scale` initialised to log 10, bias on q and v only, offsets normalised to [-8, 8] then
`sign * log2(1 + |d|) / log2 8`, a bias-free second CPB layer, and `16 * sigmoid(bias)`.

Deviations from the authors: the CPB MLP's dropout 0.1 (both layers, train mode) is not applied -- this module is
deterministic; the fixed sin-cos table is the correct (time = rows) 2-D grid of SPEC A10, not AudioMAE's transposed
one. Every Linear is xavier-uniform with zero bias, as AudioMAE's `_init_weights` applies to the whole model.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax.models.decoder import unshuffle
from bridle_jax.models.patch_embed import Dtype
from bridle_jax.models.vit import dense_init, position_table, token_init
from bridle_jax.sharding import logical

VARIANTS = ("audiomae", "swinv2")
MASK_VALUE = -100.0  # Swin's additive mask between tokens of different pre-roll regions
MIN_TAU = 0.01  # temperature floor, i.e. the cosine logits are scaled by at most 100


def effective_window_shift(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and shift a block really uses on `grid`, validated.

    As the authors' `_calc_window_shift`: along an axis where the grid is no larger than the window, the window
    shrinks to the grid and the shift is dropped. Windows must then tile the grid and a shift must be in
    [0, window).
    """
    grid, window, shift = tuple(int(g) for g in grid), tuple(int(v) for v in window), tuple(int(s) for s in shift)
    if len(grid) != 2 or len(window) != 2 or len(shift) != 2:
        raise ValueError(f"local decoder: patch_grid {grid}, window {window} and shift {shift} must all be (h, w)")
    if min(grid) < 1 or min(window) < 1:
        raise ValueError(f"local decoder: patch_grid {grid} and window {window} must be positive")
    eff_window = tuple(min(g, v) for g, v in zip(grid, window))
    eff_shift = tuple(0 if g <= v else s for g, v, s in zip(grid, window, shift))
    if grid[0] % eff_window[0] or grid[1] % eff_window[1]:
        raise ValueError(
            f"local decoder: patch_grid {grid} is not tiled by windows of {eff_window} patches "
            f"(need h % {eff_window[0]} == 0 and w % {eff_window[1]} == 0)"
        )
    if any(s < 0 or s >= v for s, v in zip(eff_shift, eff_window)):
        raise ValueError(f"local decoder: shift {shift} must lie in [0, window) per axis, window {eff_window}")
    return eff_window, eff_shift


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """`[B, h, w, C]` -> `[B, nW, wh*ww, C]`, windows row-major over the grid and tokens row-major in a window."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: jax.Array, window: tuple[int, int], grid: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: `[B, nW, wh*ww, C]` -> `[B, h, w, C]`."""
    b, _, _, c = windows.shape
    (h, w), (wh, ww) = grid, window
    x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_regions(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """Region id `[h, w]` of every position of the *rolled* grid, as Swin's `img_mask`.

    Along a shifted axis the rolled grid has three slices, `[0, n-window)`, `[n-window, n-shift)` and `[n-shift, n)`;
    the last one holds the tokens that wrapped around. An unshifted axis is one region (the authors' slice
    `[-0:]` covers it whole). Ids are `3 * time_region + freq_region`.
    """
    ids = []
    for n, v, s in zip(grid, window, shift):
        idx = np.arange(n)
        ids.append(np.zeros(n, np.int32) if s == 0 else (idx >= n - v).astype(np.int32) + (idx >= n - s))
    return 3 * ids[0][:, None] + ids[1][None, :]


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray | None:
    """Additive mask `[nW, L, L]` (0 within a region, -100 across regions) for a shifted block; None if unshifted."""
    if not any(shift):
        return None
    regions = shift_regions(grid, window, shift)
    (h, w), (wh, ww) = grid, window
    win = regions.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    return np.where(win[:, :, None] != win[:, None, :], MASK_VALUE, 0.0).astype(np.float32)


def relative_coords(window: tuple[int, int], variant: str) -> np.ndarray:
    """The CPB MLP's input `[L*L, 2]`: log-spaced offsets `coord_i - coord_j` for query i, key j of one window."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1).astype(np.float64)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).reshape(-1, 2)
    if variant == "audiomae":
        return (np.sign(rel) * np.log1p(np.abs(rel))).astype(np.float32)
    rel = rel / np.maximum(np.array([wh - 1, ww - 1], np.float64), 1.0) * 8.0  # [-8, 8] per axis
    return (np.sign(rel) * np.log2(np.abs(rel) + 1.0) / np.log2(8.0)).astype(np.float32)


class WindowAttention(nn.Module):
    """Scaled-cosine multi-head attention inside each window, plus the continuous relative-position bias.

    Input and output `[B, nW, L, C]`. Logits, bias, mask and softmax are float32 whatever the compute dtype; the
    probabilities are sown as `intermediates/attn_probs` `[B, nW, H, L, L]` for inspection.
    """

    width: int
    num_heads: int
    window: tuple[int, int]
    cpb_hidden: int = 384
    variant: str = "audiomae"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        if self.width % self.num_heads:
            raise ValueError(f"WindowAttention: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.variant not in VARIANTS:
            raise ValueError(f"WindowAttention: variant {self.variant!r} is not one of {VARIANTS}")
        b, nw, length, _ = x.shape
        heads, head_dim = self.num_heads, self.width // self.num_heads
        audiomae = self.variant == "audiomae"
        qkv = nn.Dense(
            3 * self.width,
            use_bias=audiomae,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init, ("embed", "qkv")),
            name="qkv",
        )(x)
        if not audiomae:  # SwinV2: learnable q and v biases, none on k
            q_bias = self.param("q_bias", nn.initializers.zeros, (self.width,), jnp.float32)
            v_bias = self.param("v_bias", nn.initializers.zeros, (self.width,), jnp.float32)
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        # torch layout [.., L, 3, H, hd] (weights map 1:1) -> [3, B, nW, H, L, hd]
        qkv = jnp.transpose(qkv.reshape(b, nw, length, 3, heads, head_dim), (3, 0, 1, 4, 2, 5))
        q, k, v = qkv[0], qkv[1], qkv[2]

        dots = jnp.einsum("bnhtd,bnhsd->bnhts", q, k, preferred_element_type=jnp.float32)
        # each norm floored at 1e-12 inside the sqrt: same values as torch for any non-zero vector, and a finite
        # gradient
        # (not NaN) for an all-zero q or k
        q_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1), 1e-24))
        k_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1), 1e-24))
        if audiomae:  # timm v2_cr: q.k / clamp(|q| |k|, 1e-6) / clamp(tau, 0.01)
            cos = dots / jnp.maximum(q_norm[..., :, None] * k_norm[..., None, :], 1e-6)
            tau = self.param("tau", nn.initializers.ones, (heads,), jnp.float32)
            scale = 1.0 / jnp.maximum(tau, MIN_TAU)
        else:  # official SwinV2: F.normalize (eps 1e-12) on q and k, exp(clamp(logit_scale, max=log 100))
            cos = dots / (q_norm[..., :, None] * k_norm[..., None, :])
            logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), (heads,), jnp.float32)
            scale = jnp.exp(jnp.minimum(logit_scale, math.log(1.0 / MIN_TAU)))
        logits = cos * scale[:, None, None]

        # continuous position bias: one MLP call on the L*L offsets, shared by all windows (float32, params only)
        rel = jnp.asarray(relative_coords(self.window, self.variant))
        bias = nn.Dense(self.cpb_hidden, param_dtype=jnp.float32, kernel_init=dense_init, name="cpb_fc1")(rel)
        bias = nn.Dense(heads, use_bias=audiomae, param_dtype=jnp.float32, kernel_init=dense_init, name="cpb_fc2")(
            nn.relu(bias)
        )
        bias = bias.T.reshape(heads, length, length)
        if not audiomae:
            bias = 16.0 * jax.nn.sigmoid(bias)
        logits = logits + bias
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]

        probs = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attn_probs", probs)
        out = jnp.einsum("bnhts,bnhsd->bnhtd", probs.astype(v.dtype), v)
        out = jnp.transpose(out, (0, 1, 3, 2, 4)).reshape(b, nw, length, self.width)
        proj_init = logical(dense_init, ("heads", "embed"))
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=proj_init, name="proj")(out)


class SwinBlock(nn.Module):
    """Post-norm Swin block on a `[B, h, w, C]` grid: `x + LN(shifted-window attn(x))`, then `x + LN(mlp(x))`."""

    width: int
    num_heads: int
    mlp_dim: int
    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int] = (0, 0)
    cpb_hidden: int = 384
    variant: str = "audiomae"
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        window, shift = effective_window_shift(self.grid, self.window, self.shift)
        if tuple(x.shape[1:3]) != tuple(self.grid):
            raise ValueError(f"SwinBlock: input grid {tuple(x.shape[1:3])} != patch_grid {tuple(self.grid)}")
        ln = {"epsilon": self.ln_eps, "dtype": self.dtype, "param_dtype": jnp.float32}
        dense = {"dtype": self.dtype, "param_dtype": jnp.float32}

        y = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2)) if any(shift) else x
        y = WindowAttention(self.width, self.num_heads, window, self.cpb_hidden, self.variant, self.dtype, name="attn")(
            window_partition(y, window), shifted_window_mask(self.grid, window, shift)
        )
        y = window_reverse(y, window, self.grid)
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + nn.LayerNorm(**ln, name="norm1")(y)

        y = nn.Dense(self.mlp_dim, **dense, kernel_init=logical(dense_init, ("embed", "mlp")), name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.width, **dense, kernel_init=logical(dense_init, ("mlp", "embed")), name="fc2")(y)
        return x + nn.LayerNorm(**ln, name="norm2")(y)


class LocalLabelPredictor(nn.Module):
    """D for audio: embed -> unshuffle with mask tokens -> + fixed sin-cos -> drop cls -> `depth` Swin blocks (even
    unshifted, odd shifted by `shift`) -> LayerNorm -> Linear(width -> num_levels * codebook_size) -> `[B, N, M, K]`.

    Drop-in for `decoder.LabelPredictor` (same call and output). The head runs in float32 as there.
    """

    width: int = 512
    depth: int = 16
    num_heads: int = 16
    mlp_dim: int = 2048
    num_levels: int = 4
    codebook_size: int = 256
    window: tuple[int, int] = (4, 4)
    shift: tuple[int, int] = (2, 0)
    dtype: Dtype = jnp.float32
    remat: bool = False
    cpb_hidden: int = 384
    cls_token: bool = True  # whether `encoded` starts with E's cls token (dropped here, as the authors do)
    variant: str = "audiomae"  # "audiomae" (timm v2_cr, what the authors run) or "swinv2" (official SwinV2 attention)
    ln_eps: float = 1e-6
    # the blocks' norm1/norm2 eps (None = ln_eps); the authors' released block builds them with torch's default 1e-5
    # (config.model.decoder_block_ln_eps)
    block_ln_eps: float | None = None
    pos_layout: str = "grid"  # see vit.position_table

    @nn.compact
    def __call__(self, encoded: jax.Array, restore_idx: jax.Array, patch_grid: tuple[int, int]) -> jax.Array:
        """encoded: `[B, (1+)n_keep, W_enc]` (cls first if `cls_token`); restore_idx: `[B, N]`; patch_grid: (h, w)."""
        if self.variant not in VARIANTS:
            raise ValueError(f"LocalLabelPredictor: variant {self.variant!r} is not one of {VARIANTS}")
        h, w = (int(v) for v in patch_grid)
        b, n = restore_idx.shape
        if h * w != n:
            raise ValueError(
                f"LocalLabelPredictor: patch_grid {patch_grid} has {h * w} patches but restore_idx has {n}"
            )
        if encoded.ndim != 3 or encoded.shape[0] != b:
            raise ValueError(f"LocalLabelPredictor: encoded must be [B={b}, tokens, width], got {encoded.shape}")
        for i in range(min(self.depth, 2)):  # bad grids fail here, naming the grid, before any tracing work
            effective_window_shift((h, w), self.window, self.shift if i % 2 else (0, 0))

        visible = encoded[:, 1:] if self.cls_token else encoded  # the cls would only go through `embed` to be dropped
        embed_init = logical(dense_init, ("features", "embed"))
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=embed_init, name="embed")(
            visible.astype(self.dtype)
        )
        mask_token = self.param("mask_token", token_init, (1, 1, self.width), jnp.float32)
        x = unshuffle(x, mask_token, restore_idx)
        x = x + jnp.asarray(position_table((h, w), self.width, self.pos_layout), self.dtype)
        x = x.reshape(b, h, w, self.width)

        block = nn.remat(SwinBlock) if self.remat else SwinBlock
        for i in range(self.depth):
            x = block(
                self.width,
                self.num_heads,
                self.mlp_dim,
                (h, w),
                tuple(self.window),
                tuple(self.shift) if i % 2 else (0, 0),
                self.cpb_hidden,
                self.variant,
                self.ln_eps if self.block_ln_eps is None else self.block_ln_eps,
                self.dtype,
                name=f"block_{i}",
            )(x)
            x = nn.with_logical_constraint(x, ("batch", None, None, "embed"))  # residual [B, h, w, C], see vit
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
        logits = nn.Dense(
            self.num_levels * self.codebook_size,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init, ("embed", "vocab")),
            name="head",
        )(x.reshape(b, n, self.width))
        return logits.reshape(b, n, self.num_levels, self.codebook_size)
