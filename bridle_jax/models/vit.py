"""The ViT encoder E (SPEC 1.3) and the transformer pieces shared by D, T and TE.

Parameters are always float32; `dtype` is the compute dtype (bfloat16 or float32). Position embeddings are fixed
2-D sin-cos constants, never parameters, so they cost nothing to checkpoint and can be rebuilt for any grid. Blocks
are unrolled and named `block_{i}` so that layer-wise learning-rate decay can address them by name.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax.models.attention import attend
from bridle_jax.models.patch_embed import Dtype, make_stem
from bridle_jax.sharding import RESIDUAL, logical

VARIANTS: dict[str, tuple[int, int, int, int]] = {
    # name: (width, depth, num_heads, mlp_dim)
    "mu": (64, 2, 4, 128),  # micro model for tests and the CPU demo
    "nano": (128, 4, 4, 512),  # the Fashion-MNIST study's encoder (2 CPU cores)
    "pico": (32, 2, 4, 128),  # the parity tests' size (the authors' models at tiny sizes, README "Parity")
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}

_VARIANT_RE = re.compile(r"^(?P<name>[A-Za-z]+)/(?P<patch>[0-9]+)$")

# SPEC 1.3: Linear xavier-uniform with zero bias; cls and mask tokens N(0, 0.02).
dense_init = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)


def decode_variant(variant: str) -> dict:
    """ "B/16" -> {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072, "patch_size": 16}."""
    match = _VARIANT_RE.match(variant) if isinstance(variant, str) else None
    if match is None:
        raise ValueError(
            f"model variant {variant!r} is not of the form '<name>/<patch_size>' (e.g. 'B/16'); "
            f"names: {sorted(VARIANTS)}"
        )
    name, patch = match["name"], int(match["patch"])
    if name not in VARIANTS:
        raise ValueError(f"model variant {variant!r}: unknown name {name!r}; known names: {sorted(VARIANTS)}")
    if patch <= 0:
        raise ValueError(f"model variant {variant!r}: patch size must be positive, got {patch}")
    width, depth, num_heads, mlp_dim = VARIANTS[name]
    return {"width": width, "depth": depth, "num_heads": num_heads, "mlp_dim": mlp_dim, "patch_size": patch}


def _sincos_1d(width: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(grid_hw: tuple[int, int], width: int) -> np.ndarray:
    """Fixed MAE 2-D sin-cos table `[h*w, width]` (float32), row-major (index = row * w + col).

    As in MAE's `get_2d_sincos_pos_embed`, the first half of the channels encodes the column and the second half the
    row. This is the *correct* grid for non-square inputs (SPEC A10), not AudioMAE's transposed one.
    """
    h, w = grid_hw
    if width % 4:
        raise ValueError(f"sincos_2d: width must be a multiple of 4, got {width}")
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    table = np.concatenate([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], axis=1)
    return table.astype(np.float32)


def sinusoid_1d(num_positions: int, width: int) -> np.ndarray:
    """VideoMAE's fixed 1-D sinusoid table `[n, width]` (`get_sinusoid_encoding_table`): angle pos /
    10000^(2(i//2)/width),
    sin on even channels, cos on odd ones."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    i = np.arange(width)[None, :]
    angle = pos / np.power(10000.0, 2 * (i // 2) / width)
    return np.where(i % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


POS_LAYOUTS = ("grid", "transposed")


def position_table(grid: tuple[int, ...], width: int, layout: str = "grid") -> np.ndarray:
    """The fixed position embedding of a patch grid: 2-D sin-cos for (rows, cols) grids (image, audio), VideoMAE's 1-D
    sinusoid over the flattened tokens for (time, rows, cols) grids (SPEC 1.8).

    `layout="transposed"` (config.model.pos_layout) is AudioMAE's table for a 2-D grid (h, w): the table of the
    (w, h) grid read row-major over the h*w tokens (SPEC A10), which the authors' audio models use; "grid" is the
    correct table and the default."""
    if layout not in POS_LAYOUTS:
        raise ValueError(f"position_table: layout {layout!r} is not one of {POS_LAYOUTS}")
    if len(grid) == 2:
        return sincos_2d(tuple(grid)[::-1] if layout == "transposed" else tuple(grid), width)
    if len(grid) == 3:
        return sinusoid_1d(int(np.prod(grid)), width)
    raise ValueError(f"position_table: expected a 2-D or 3-D patch grid, got {grid}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (bias on), as timm's `Attention`.

    The fused (width -> 3*width) kernel gets xavier-uniform over its full shape, matching MAE's init of `qkv`.
    As timm's explicit path: q is scaled by head_dim^-1/2 before q kᵀ; logits and softmax are float32 whatever the
    compute dtype. `attention` picks the kernel (config.model.attention, see `bridle_jax.models.attention`);
    `key_valid` `[B, N]` bool (None: all) masks keys out of every softmax.
    """

    width: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        if self.width % self.num_heads:
            raise ValueError(f"Attention: width {self.width} is not divisible by num_heads {self.num_heads}")
        b, n, _ = x.shape
        head_dim = self.width // self.num_heads
        qkv = nn.Dense(
            3 * self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(dense_init, ("embed", "qkv")),
            name="qkv",
        )(x)
        # timm's layout [B, N, 3, H, hd], so torch weights map 1:1; heads-major [3, B, H, N, hd] for the batched dots
        qkv = jnp.transpose(qkv.reshape(b, n, 3, self.num_heads, head_dim), (2, 0, 3, 1, 4))
        out = attend(qkv[0] * head_dim**-0.5, qkv[1], qkv[2], key_valid=key_valid, backend=self.attention)
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, n, self.width)
        proj_init = logical(dense_init, ("heads", "embed"))
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=proj_init, name="proj")(out)


class Block(nn.Module):
    """Pre-LN transformer block (timm `Block`): x + Attn(LN(x)), then x + MLP(LN(x)); LN eps 1e-6, exact GELU.

    `drop_path` > 0 with `deterministic=False` is timm's stochastic depth (fine-tuning only, SPEC 4): each residual
    branch is dropped for a whole example with probability `drop_path` (two independent draws per block, from the
    "dropout" rng) and the kept ones are scaled by 1 / (1 - drop_path). Pretraining never sets it.
    """

    width: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    drop_path: float = 0.0
    deterministic: bool = True
    attention: str = "auto"  # the attention kernel (config.model.attention)

    def _drop_path(self, branch: jax.Array) -> jax.Array:
        if self.deterministic or self.drop_path == 0.0:
            return branch
        keep = 1.0 - self.drop_path
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)  # one draw per example: the whole branch goes
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return branch * (mask.astype(branch.dtype) / jnp.asarray(keep, branch.dtype))

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
        ln = dict(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32)
        attn = Attention(self.width, self.num_heads, self.dtype, self.attention, name="attn")
        y = attn(nn.LayerNorm(**ln, name="norm1")(x), key_valid)
        x = x + self._drop_path(y)
        y = nn.LayerNorm(**ln, name="norm2")(x)
        y = nn.Dense(self.mlp_dim, **dense, kernel_init=logical(dense_init, ("embed", "mlp")), name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.width, **dense, kernel_init=logical(dense_init, ("mlp", "embed")), name="fc2")(y)
        return x + self._drop_path(y)


class Transformer(nn.Module):
    """`depth` Blocks named `block_{i}`; with `remat`, each block's activations are recomputed in the backward pass.

    The residual stream is constrained to ("batch", "length", "embed") between blocks (a no-op unless a step sets
    the logical rules, see `sharding.activation_rules`): under FSDP it stays split by example, width whole.
    """

    depth: int
    width: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    drop_path: float = 0.0  # stochastic depth of the last block; block i gets drop_path * i / (depth - 1) (timm)
    attention: str = "auto"  # the attention kernel (config.model.attention)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, key_valid: jax.Array | None = None) -> jax.Array:
        block = nn.remat(Block) if self.remat else Block
        rates = np.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else [self.drop_path]
        x = nn.with_logical_constraint(x, RESIDUAL)
        for i in range(self.depth):
            x = block(
                self.width,
                self.num_heads,
                self.mlp_dim,
                self.dtype,
                drop_path=float(rates[i]),
                deterministic=deterministic,
                attention=self.attention,
                name=f"block_{i}",
            )(x, key_valid)
            x = nn.with_logical_constraint(x, RESIDUAL)
        return x


class ViTEncoder(nn.Module):
    """The encoder E: stem -> + fixed pos -> (gather visible tokens) -> prepend cls -> blocks -> LayerNorm.

    Position embeddings are added *before* the gather so that each visible token keeps its original position, as in
    MAE. The cls token's position slot is zero, so it is prepended after the addition. VideoMAE has no cls token
    (`cls_token=False`); every consumer reads the patch tokens from the "patches" intermediate, never by offset.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    stem: str = "image"
    dtype: Dtype = jnp.float32
    remat: bool = False
    cls_token: bool = True
    tubelet_size: int = 2  # video only: frames per tubelet
    drop_path: float = 0.0  # stochastic depth (fine-tuning only; active when called with deterministic=False)
    pos_layout: str = "grid"  # see position_table
    attention: str = "auto"  # the attention kernel (config.model.attention)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        keep_idx: jax.Array | None = None,
        *,
        deterministic: bool = True,
        key_valid: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """x: one batch of the stem's input (see patch_embed); keep_idx: optional `[B, n_keep]` int indices of the
        visible patches; deterministic=False turns on drop-path (needs a "dropout" rng); key_valid: optional
        `[B, N]` bool patch validity in patch order (taken through keep_idx like the tokens; the cls token is
        always valid): invalid patches are masked out as attention keys. The training steps do not pass it (the
        encoder attends to padded audio patches, as the authors' code does).

        Returns `(tokens [B, c+n, width] in dtype (c = 1 with a cls token, else 0), intermediates)` with:
          "patch_grid": the static grid;  "embedded": `[B, n, width]` patch tokens + pos after the gather
          (the transformer's input without cls);  "patches": `[B, n, width]` final tokens without cls (features
          to pool for probes, and the teacher targets of SPEC A15);  "pre_norm": the same tokens before the final
          LayerNorm (fine-tuning pools these: MAE's global pool replaces that norm by its fc_norm, SPEC 4).
        """
        patches, grid = make_stem(self.stem, self.width, self.patch_size, self.dtype, self.tubelet_size)(x)
        tokens = patches + jnp.asarray(position_table(grid, self.width, self.pos_layout), self.dtype)
        if keep_idx is not None:
            if keep_idx.ndim != 2 or keep_idx.shape[0] != tokens.shape[0]:
                raise ValueError(f"keep_idx must be [B={tokens.shape[0]}, n_keep], got shape {keep_idx.shape}")
            tokens = jnp.take_along_axis(tokens, keep_idx[:, :, None].astype(jnp.int32), axis=1)
            if key_valid is not None:
                key_valid = jnp.take_along_axis(key_valid, keep_idx.astype(jnp.int32), axis=1)
        embedded = tokens
        prefix = 0
        if self.cls_token:
            cls = self.param("cls", token_init, (1, 1, self.width), jnp.float32)
            cls = jnp.broadcast_to(cls.astype(self.dtype), (tokens.shape[0], 1, self.width))
            tokens = jnp.concatenate([cls, tokens], axis=1)
            prefix = 1
            if key_valid is not None:
                key_valid = jnp.concatenate([jnp.ones((tokens.shape[0], 1), bool), key_valid.astype(bool)], axis=1)
        tokens = Transformer(
            self.depth,
            self.width,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.remat,
            drop_path=self.drop_path,
            attention=self.attention,
            name="transformer",
        )(tokens, deterministic, key_valid)
        pre_norm = tokens[:, prefix:]
        tokens = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(tokens)
        inter = {"patch_grid": tuple(grid), "embedded": embedded, "patches": tokens[:, prefix:], "pre_norm": pre_norm}
        return tokens, inter
