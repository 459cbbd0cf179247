"""Typed Grain transforms for images (NumPy + PIL), one class per operation.

These replace big_vision's string pp ops: a config holds typed fields and ``pipeline.py`` builds an explicit list of
these objects, so a typo fails at construction with the field's name instead of deep inside a worker thread.
Records are dicts; each transform replaces ``"image"`` and passes every other key (``"label"``) through untouched.
Random transforms take their ``np.random.Generator`` from Grain's ``random_map``, which seeds it from the pipeline
seed and the record's position, so augmentation is the same whatever the thread count or the resume point.
"""

from __future__ import annotations

import math
from typing import Sequence

import grain
import numpy as np
from PIL import Image

from bridle_jax.validation import is_int


def _check_size(name: str, size) -> int:
    if not is_int(size) or size < 1:
        raise ValueError(f"{name}: size must be a positive int, got {size!r}")
    return int(size)


def _check_range(name: str, field: str, value, upper: float | None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {field} must be a pair (low, high), got {value!r}") from None
    if not (0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name}: {field} must satisfy 0 < low <= high{bound}, got {value!r}")
    return lo, hi


def _as_image(element: dict, name: str) -> np.ndarray:
    image = element["image"]
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(
            f"{name}: record 'image' must be an array [H, W, C], got {getattr(image, 'shape', type(image))}"
        )
    return image


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a uint8 [H, W, 3] image (a strided view too: PIL copies only its pixels)."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


class RandomResizedCrop(grain.transforms.RandomMap):
    """Inception-style crop with torchvision's exact sampling rule (SPEC 1.7: scale (0.2, 1), bicubic).

    Up to 10 tries draw an area fraction ``U(scale)`` and a log-uniform aspect ratio ``w/h`` in ``ratio``; the first
    crop that fits is taken at a uniform position. If none fits, the fallback is a centre crop of the whole image
    clamped to ``ratio``. The crop (a NumPy view) is then resized to ``size``x``size``, bicubic, which is exactly
    torchvision's ``resized_crop`` on a PIL image (crop, then resize). PIL's ``resize(box=...)`` would differ: its
    filter reads pixels beyond the box's edges (up to 16 levels apart on noise), and it is slower, as is converting
    the whole image rather than the crop.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size = _check_size("RandomResizedCrop", size)
        self.scale = _check_range("RandomResizedCrop", "scale", scale, upper=1.0)
        self.ratio = _check_range("RandomResizedCrop", "ratio", ratio, upper=None)

    def get_params(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, crop_height, crop_width) as torchvision's ``RandomResizedCrop.get_params``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = _as_image(element, "RandomResizedCrop")
        top, left, h, w = self.get_params(image.shape[0], image.shape[1], rng)
        out = _resize(image[top : top + h, left : left + w], self.size, self.size)
        return {**element, "image": out}

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal (left-right) mirror with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomFlip: p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = _as_image(element, "RandomFlip")
        if rng.random() < self.p:
            image = np.ascontiguousarray(image[:, ::-1])
        return {**element, "image": image}

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


class Normalize(grain.transforms.Map):
    """0..255 pixels → float32 ``(x / 255 - mean) / std`` per channel (mean/std given on the [0, 1] scale)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean = np.asarray(mean, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        if mean.shape != (3,) or std.shape != (3,):
            raise ValueError(
                f"Normalize: mean and std must have 3 values (RGB), got {mean.tolist()} and {std.tolist()}"
            )
        if not np.all(std > 0) or not np.all(np.isfinite(mean)):
            raise ValueError(
                f"Normalize: std must be positive and mean finite, got mean={mean.tolist()} std={std.tolist()}"
            )
        self.mean, self.std = tuple(mean.tolist()), tuple(std.tolist())
        # One fused multiply-add per pixel: x * scale - offset.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (mean / std).astype(np.float32)

    def map(self, element: dict) -> dict:
        image = _as_image(element, "Normalize")
        if image.shape[-1] != 3:
            raise ValueError(f"Normalize: record 'image' must have 3 channels, got shape {image.shape}")
        out = np.multiply(image, self._scale, dtype=np.float32)  # the cast inside the multiply: one pass, not two
        out -= self._offset
        return {**element, "image": out}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class ResizeCenterCrop(grain.transforms.Map):
    """Eval geometry: resize the short side to ``floor(size / crop_fraction)`` (bicubic), then centre-crop ``size``.

    With ``size=224, crop_fraction=0.875`` this is the standard 256 → 224 protocol (MAE/timm ``crop_pct``).
    """

    def __init__(self, size: int, crop_fraction: float = 0.875):
        self.size = _check_size("ResizeCenterCrop", size)
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"ResizeCenterCrop: crop_fraction must be in (0, 1], got {crop_fraction!r}")
        self.crop_fraction = float(crop_fraction)
        self.resize_to = max(self.size, int(math.floor(self.size / self.crop_fraction + 1e-6)))

    def map(self, element: dict) -> dict:
        image = _as_image(element, "ResizeCenterCrop")
        height, width = image.shape[:2]
        short = min(height, width)
        # torchvision Resize(int): the long side is truncated, the short side is exact.
        new_h = self.resize_to if height == short else int(self.resize_to * height / short)
        new_w = self.resize_to if width == short else int(self.resize_to * width / short)
        resized = _resize(image, new_w, new_h)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        out = np.ascontiguousarray(resized[top : top + self.size, left : left + self.size])
        return {**element, "image": out}

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size}, crop_fraction={self.crop_fraction})"
