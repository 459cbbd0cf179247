"""The tokenizer T, the iteration-1 cold-start tokenizer and the tokenizer estimator TE (SPEC 1.5, 1.6, A8).

All three return float32 (the quantiser's math is float32 whatever the model dtype). The codebooks live in
`bridle_jax.quantizer`, not here: these modules produce the latents z and consume the quantised z_q.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridle_jax.models.patch_embed import Dtype, make_stem
from bridle_jax.models.vit import Transformer, ViTEncoder, dense_init, position_table
from bridle_jax.sharding import logical


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
    cls_token: bool = True
    tubelet_size: int = 2
    pos_layout: str = "grid"  # see vit.position_table
    attention: str = "auto"  # the attention kernel (config.model.attention)

    @nn.compact
    def __call__(self, x: jax.Array, keep_idx: jax.Array | None = None) -> jax.Array:
        """x: the unmasked input (any stem's) -> z `[B, N, code_dim]` float32. `keep_idx` `[B, n]`: only those
        patches go through the ViT (the authors' video tokenizer in the encoder phase sees the masked tokens only,
        config.model.video_tokenizer_masked_only) -> z `[B, n, code_dim]`."""
        _, inter = ViTEncoder(
            self.width,
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.patch_size,
            self.stem,
            self.dtype,
            self.remat,
            self.cls_token,
            self.tubelet_size,
            pos_layout=self.pos_layout,
            attention=self.attention,
            name="vit",
        )(x, keep_idx)
        dense = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        z = nn.Dense(self.width, **dense, kernel_init=logical(dense_init, ("embed", "mlp")), name="head_in")(
            inter["patches"].astype(jnp.float32)
        )
        return nn.Dense(self.code_dim, **dense, kernel_init=logical(dense_init, ("mlp", "code")), name="head_out")(
            jnp.tanh(z)
        )


class ColdStartTokenizer(nn.Module):
    """Iteration-1 tokenizer (SPEC A8): random patch embedding + fixed pos + random Linear(width -> code_dim, no bias).

    No transformer: its params are drawn once and stay frozen, so the first targets are a fixed random projection
    of the patches, made discrete by k-means-initialised codebooks. Always float32 (it is cheap and defines targets).
    """

    width: int
    patch_size: int
    code_dim: int = 256
    stem: str = "image"
    tubelet_size: int = 2
    pos_layout: str = "grid"  # see vit.position_table

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: the input (any stem's) -> z `[B, N, code_dim]` float32."""
        stem = make_stem(self.stem, self.width, self.patch_size, jnp.float32, self.tubelet_size)
        patches, grid = stem(x.astype(jnp.float32))
        patches = patches + jnp.asarray(position_table(grid, self.width, self.pos_layout))
        return nn.Dense(
            self.code_dim,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init, ("embed", "code")),
            name="proj",
        )(patches)


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
    pos_layout: str = "grid"  # see vit.position_table
    embed_bias: bool = True  # False: VideoMAE's bias-free `encoder_to_decoder` (config.model.input_proj_bias)
    attention: str = "auto"  # the attention kernel (config.model.attention)

    @nn.compact
    def __call__(self, z_q: jax.Array, patch_grid: tuple[int, ...]) -> jax.Array:
        """z_q: `[B, N, code_dim]`; patch_grid: the static grid, prod == N -> `[B, N, out_dim]` float32."""
        if math.prod(patch_grid) != z_q.shape[1]:
            raise ValueError(
                f"Estimator: patch_grid {patch_grid} has {math.prod(patch_grid)} patches but z_q has {z_q.shape[1]}"
            )
        embed_init = logical(dense_init, ("code", "embed"))
        x = nn.Dense(
            self.width,
            use_bias=self.embed_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=embed_init,
            name="embed",
        )(z_q.astype(self.dtype))
        x = x + jnp.asarray(position_table(patch_grid, self.width, self.pos_layout), self.dtype)
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
        head_init = logical(dense_init, ("embed", "features"))
        return nn.Dense(self.out_dim, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=head_init, name="head")(
            x.astype(jnp.float32)
        )
