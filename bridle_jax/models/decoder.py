"""The label predictor D (SPEC 1.4, image version): global-attention blocks and one M*K-logit head.

It sees the encoded visible tokens put back at their original positions, with a learned mask token everywhere else
(MAE's `ids_restore` unshuffle), and predicts, for every patch, one K-way distribution per codebook level. The loss
keeps only the masked patches.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridle_jax.models.patch_embed import Dtype
from bridle_jax.models.vit import Transformer, dense_init, position_table, token_init
from bridle_jax.sharding import logical


def unshuffle(visible: jax.Array, mask_token: jax.Array, restore_idx: jax.Array) -> jax.Array:
    """`[B, n_keep, W]` visible tokens (in `keep_idx` order) -> `[B, N, W]` in patch order, mask_token elsewhere.

    This is MAE's unshuffle: append N - n_keep mask tokens, then gather with `restore_idx` (the inverse of the noise
    permutation whose first n_keep entries are `keep_idx`).
    """
    b, n_keep, w = visible.shape
    n = restore_idx.shape[1]
    if n_keep > n:
        raise ValueError(f"unshuffle: {n_keep} visible tokens but only {n} positions in restore_idx")
    fill = jnp.broadcast_to(mask_token.astype(visible.dtype).reshape(1, 1, w), (b, n - n_keep, w))
    shuffled = jnp.concatenate([visible, fill], axis=1)
    return jnp.take_along_axis(shuffled, restore_idx[:, :, None].astype(jnp.int32), axis=1)


class LabelPredictor(nn.Module):
    """D: decoder_embed -> unshuffle with mask tokens -> + fixed pos (cls slot zero) -> blocks -> LayerNorm
    -> Linear(width -> num_levels * codebook_size) -> drop cls -> logits `[B, N, M, K]` float32.

    The image predictor (16 global blocks, cls kept through the blocks) and, with `cls_token=False` and a 3-D grid,
    the VideoMAE predictor (SPEC 1.4: 4 blocks of 384, 1-D sinusoid positions). Deviation for video: VideoMAE applies
    the head to the masked tokens only; here it runs on every token and the loss keeps the masked ones (same loss
    and gradients; the head is ~5% of D's FLOPs at mask 0.9), so all modalities share one code path.
    The head is computed in float32: it is a few percent of D's FLOPs and feeds a K-way cross-entropy directly.
    """

    width: int = 512
    depth: int = 16
    num_heads: int = 16
    mlp_dim: int = 2048
    num_levels: int = 4
    codebook_size: int = 256
    dtype: Dtype = jnp.float32
    remat: bool = False
    cls_token: bool = True  # whether `encoded` starts with E's cls token
    pos_layout: str = "grid"  # see vit.position_table
    embed_bias: bool = True  # False: VideoMAE's bias-free `encoder_to_decoder` (config.model.input_proj_bias)
    attention: str = "auto"  # the attention kernel (config.model.attention)

    @nn.compact
    def __call__(self, encoded: jax.Array, restore_idx: jax.Array, patch_grid: tuple[int, ...]) -> jax.Array:
        """encoded: `[B, c+n_keep, W_enc]` (E's output, cls first when `cls_token`); restore_idx: `[B, N]`;
        patch_grid: the static grid."""
        b, n = restore_idx.shape
        if math.prod(patch_grid) != n:
            raise ValueError(
                f"LabelPredictor: patch_grid {patch_grid} has {math.prod(patch_grid)} patches but restore_idx has {n}"
            )
        if encoded.shape[0] != b:
            raise ValueError(f"LabelPredictor: batch of encoded ({encoded.shape[0]}) != batch of restore_idx ({b})")
        embed_init = logical(dense_init, ("features", "embed"))
        x = nn.Dense(
            self.width,
            use_bias=self.embed_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=embed_init,
            name="embed",
        )(encoded.astype(self.dtype))
        mask_token = self.param("mask_token", token_init, (1, 1, self.width), jnp.float32)
        c = 1 if self.cls_token else 0
        patches = unshuffle(x[:, c:], mask_token, restore_idx)
        patches = patches + jnp.asarray(position_table(patch_grid, self.width, self.pos_layout), self.dtype)
        x = jnp.concatenate([x[:, :c], patches], axis=1)
        x = Transformer(
            self.depth,
            self.width,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.remat,
            attention=self.attention,
            name="transformer",
        )(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
        logits = nn.Dense(
            self.num_levels * self.codebook_size,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init, ("embed", "vocab")),
            name="head",
        )(x[:, c:])
        return logits.reshape(b, n, self.num_levels, self.codebook_size)
