"""Modality stems: raw input -> a row-major grid of patch tokens.

A stem maps its input to `([B, N, width], grid)`, N == prod(grid), tokens ordered row-major over the grid, so the
encoder, the fixed position embedding, the masking and the decoders never need to know the modality:
  image  `[B, H, W, C]`            -> grid (H/p, W/p)
  audio  `[B, T, F, 1]` log-mels    -> grid (T/p, F/p): time is the row axis, so tokens are time-major (SPEC 1.2)
  video  `[B, T, H, W, C]` clips    -> grid (T/t, H/p, W/p) with tubelets t x p x p (SPEC 1.8)
The first grid axis is always the one padding can cut short (audio frames, video frames), which is how a frame
count becomes a per-patch validity mask (`BridleModels.frontend`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridle_jax.sharding import logical

Dtype = jnp.dtype | type


def flat_xavier_uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Xavier-uniform on the kernel flattened to (p*p*C, width), as MAE initialises its Conv2d (fan_in = C*p*p,
    fan_out = width). jax's conv-kernel xavier would multiply fan_out by the receptive field and shrink the init."""
    fan_in = math.prod(shape[:-1])
    flat = nn.initializers.xavier_uniform()(key, (fan_in, shape[-1]), dtype)
    return flat.reshape(shape)


def torch_default_bias(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's Conv2d bias default, which MAE leaves in place. It matters for the
    cold-start tokenizer, whose random frozen patch embedding (bias included) defines the first-iteration targets."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ImagePatchEmbed(nn.Module):
    """Non-overlapping p x p convolution (stride p, with bias): `[B, H, W, C]` -> `([B, h*w, width], (h, w))`."""

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        if x.ndim != 4:
            raise ValueError(f"ImagePatchEmbed expects [B, H, W, C] input, got shape {x.shape}")
        _, height, width, channels = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"ImagePatchEmbed: input spatial size {height}x{width} is not divisible by patch_size {p}")
        y = nn.Conv(
            self.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=True,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(flat_xavier_uniform, (None, None, None, "embed")),
            bias_init=torch_default_bias(p * p * channels),
            name="conv",
        )(x)
        h, w = height // p, width // p
        return y.reshape(y.shape[0], h * w, self.width), (h, w)


class TubeletEmbed(nn.Module):
    """VideoMAE's Conv3d tubelet embedding (kernel = stride = t x p x p, with bias):
    `[B, T, H, W, C]` -> `([B, (T/t)*(H/p)*(W/p), width], (T/t, H/p, W/p))`."""

    width: int
    patch_size: int
    tubelet_size: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        if x.ndim != 5:
            raise ValueError(f"TubeletEmbed expects [B, T, H, W, C] input, got shape {x.shape}")
        _, frames, height, width, channels = x.shape
        t, p = self.tubelet_size, self.patch_size
        if frames % t or height % p or width % p:
            raise ValueError(
                f"TubeletEmbed: input {frames}x{height}x{width} (frames x height x width) is not divisible by the "
                f"tubelet {t}x{p}x{p}"
            )
        y = nn.Conv(
            self.width,
            kernel_size=(t, p, p),
            strides=(t, p, p),
            padding="VALID",
            use_bias=True,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=logical(flat_xavier_uniform, (None, None, None, None, "embed")),
            bias_init=torch_default_bias(t * p * p * channels),
            name="conv",
        )(x)
        grid = (frames // t, height // p, width // p)
        return y.reshape(y.shape[0], math.prod(grid), self.width), grid


STEMS: dict[str, type[nn.Module]] = {"image": ImagePatchEmbed, "audio": ImagePatchEmbed, "video": TubeletEmbed}
"""Stem name (the models' `stem` field, = config.modality) -> module class. A spectrogram is a one-channel image whose
rows are time frames, so audio reuses the image stem (SPEC 1.3: the same Conv2d with in_chans = 1)."""


def make_stem(
    stem: str, width: int, patch_size: int, dtype: Dtype, tubelet_size: int = 2, name: str = "patch_embed"
) -> nn.Module:
    """Looks `stem` up in STEMS with an error that lists the known stems."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; known stems: {sorted(STEMS)}")
    if STEMS[stem] is TubeletEmbed:
        return TubeletEmbed(width=width, patch_size=patch_size, tubelet_size=tubelet_size, dtype=dtype, name=name)
    return STEMS[stem](width=width, patch_size=patch_size, dtype=dtype, name=name)
