"""Modality stems: raw input -> a row-major grid of patch tokens.

A stem maps its input to `([B, N, width], (h, w))`, N == h * w, tokens ordered row-major (index = row * w + col), so
the encoder, the fixed 2-D position embedding, the masking and the decoder never need to know the modality. Audio
(spectrograms `[B, T, F, 1]`, time as rows) and video stems plug into `STEMS` with the same fields and return shape.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

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
            raise ValueError(
                f"ImagePatchEmbed: input spatial size {height}x{width} is not divisible by patch_size {p}"
            )
        y = nn.Conv(
            self.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=True,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=flat_xavier_uniform,
            bias_init=torch_default_bias(p * p * channels),
            name="conv",
        )(x)
        h, w = height // p, width // p
        return y.reshape(y.shape[0], h * w, self.width), (h, w)


STEMS: dict[str, type[nn.Module]] = {"image": ImagePatchEmbed}
"""Stem name (the models' `stem` field) -> module class with fields (width, patch_size, dtype)."""


def make_stem(stem: str, width: int, patch_size: int, dtype: Dtype, name: str = "patch_embed") -> nn.Module:
    """Looks `stem` up in STEMS with an error that lists the known stems."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; known stems: {sorted(STEMS)}")
    return STEMS[stem](width=width, patch_size=patch_size, dtype=dtype, name=name)
