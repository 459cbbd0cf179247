"""The tokenizer T, the iteration-1 cold-start tokenizer and the tokenizer estimator TE (SPEC 1.5, 1.6, A8).

All three return float32 (the quantiser's math is float32 whatever the model dtype). The codebooks live in
`bridle_jax.quantizer`, not here: these modules produce the latents z and consume the quantised z_q.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridle_jax.models.patch_embed import Dtype, make_stem
from bridle_jax.models.vit import Transformer, ViTEncoder, dense_init, sincos_2d


class Tokenizer(nn.Module):
    """T: a ViT with the encoder's structure on the full input, cls dropped, then Linear -> Tanh -> Linear(code_dim).

    The head (BEATs' `quantize_layer`) runs in float32: its output is normalised and compared with codes.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    code_dim: int = 256
    stem: str = "image"
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, H, W, C]` unmasked input -> z `[B, N, code_dim]` float32."""
        _, inter = ViTEncoder(self.width, self.depth, self.num_heads, self.mlp_dim, self.patch_size, self.stem,
                              self.dtype, self.remat, name="vit")(x)
        dense = dict(dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=dense_init)
        z = nn.Dense(self.width, **dense, name="head_in")(inter["patches"].astype(jnp.float32))
        return nn.Dense(self.code_dim, **dense, name="head_out")(jnp.tanh(z))


class ColdStartTokenizer(nn.Module):
    """Iteration-1 tokenizer (SPEC A8): random patch embedding + fixed pos + random Linear(width -> code_dim, no bias).

    No transformer: its params are drawn once and stay frozen, so the first targets are a fixed random projection
    of the patches, made discrete by k-means-initialised codebooks. Always float32 (it is cheap and defines targets).
    """

    width: int
    patch_size: int
    code_dim: int = 256
    stem: str = "image"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, H, W, C]` -> z `[B, N, code_dim]` float32."""
        patches, grid = make_stem(self.stem, self.width, self.patch_size, jnp.float32)(x.astype(jnp.float32))
        patches = patches + jnp.asarray(sincos_2d(grid, self.width))
        return nn.Dense(self.code_dim, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                        kernel_init=dense_init, name="proj")(patches)


class Estimator(nn.Module):
    """TE: Linear(code_dim -> width) + fixed sin-cos pos (no cls) -> blocks -> LayerNorm -> Linear(width -> out_dim).

    It rebuilds the teacher encoder's last-layer features from the quantised tokens; the prediction head is float32
    because its output goes straight into a cosine loss.
    """

    width: int = 768
    depth: int = 3
    num_heads: int = 12
    mlp_dim: int = 3072
    out_dim: int = 768
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z_q: jax.Array, patch_grid: tuple[int, int]) -> jax.Array:
        """z_q: `[B, N, code_dim]`; patch_grid: static (h, w) with h * w == N -> `[B, N, out_dim]` float32."""
        h, w = patch_grid
        if h * w != z_q.shape[1]:
            raise ValueError(f"Estimator: patch_grid {patch_grid} has {h * w} patches but z_q has {z_q.shape[1]}")
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=dense_init,
                     name="embed")(z_q.astype(self.dtype))
        x = x + jnp.asarray(sincos_2d(patch_grid, self.width), self.dtype)
        x = Transformer(self.depth, self.width, self.num_heads, self.mlp_dim, self.dtype, self.remat,
                        name="transformer")(x)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
        return nn.Dense(self.out_dim, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=dense_init,
                        name="head")(x.astype(jnp.float32))
