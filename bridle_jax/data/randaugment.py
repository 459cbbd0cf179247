"""Host-side image (and clip) augmentations of the fine-tuning train stream, Grain transforms on NumPy/PIL with the
rng from Grain's `random_map` (seeded per record, so the stream stays deterministic and resumable):
  `RandAugment`    timm's `rand-m9-mstd0.5-inc1`: 2 ops drawn with replacement from the 15 "increasing" ops, each
                   applied with probability 0.5 at a magnitude ~ N(9, 0.5) clipped to [0, 10]
  `RandomErasing`  timm's `RandomErasing(0.25, mode="pixel")` on the normalised image (or on each frame of a clip)
`image_pipeline.train_dataset(..., augment=config.augment)` applies them (docs/method.md, the IN-1K FT row).
"""

from __future__ import annotations

import math

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# ------------------------------------------------------------------------------------------------- RandAugment

_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _negate(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, matrix, fill, resample):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` most significant bits (0 bits: black, as PIL's posterize did before it rejected 0)."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


# timm's _RAND_INCREASING_TRANSFORMS: name -> (level, rng, hparams) -> op(img, fill, resample)
def _op_table():
    def level_rotate(m, rng, hp):
        return _negate(m / _MAX_LEVEL * 30.0, rng)

    def level_enhance(m, rng, hp):
        return 1.0 + _negate(m / _MAX_LEVEL * 0.9, rng)

    def level_shear(m, rng, hp):
        return _negate(m / _MAX_LEVEL * 0.3, rng)

    def level_translate(m, rng, hp):
        return _negate(m / _MAX_LEVEL * hp["translate_pct"], rng)

    return {
        "AutoContrast": (None, lambda img, a, fill, rs: ImageOps.autocontrast(img)),
        "Equalize": (None, lambda img, a, fill, rs: ImageOps.equalize(img)),
        "Invert": (None, lambda img, a, fill, rs: ImageOps.invert(img)),
        "Rotate": (level_rotate, lambda img, a, fill, rs: img.rotate(a, resample=rs, fillcolor=fill)),
        "PosterizeIncreasing": (
            lambda m, rng, hp: 4 - int(m / _MAX_LEVEL * 4),
            lambda img, a, fill, rs: _posterize(img, a),
        ),
        "SolarizeIncreasing": (
            lambda m, rng, hp: 256 - int(m / _MAX_LEVEL * 256),
            lambda img, a, fill, rs: ImageOps.solarize(img, a),
        ),
        "SolarizeAdd": (lambda m, rng, hp: int(m / _MAX_LEVEL * 110), lambda img, a, fill, rs: _solarize_add(img, a)),
        "ColorIncreasing": (level_enhance, lambda img, a, fill, rs: ImageEnhance.Color(img).enhance(a)),
        "ContrastIncreasing": (level_enhance, lambda img, a, fill, rs: ImageEnhance.Contrast(img).enhance(a)),
        "BrightnessIncreasing": (level_enhance, lambda img, a, fill, rs: ImageEnhance.Brightness(img).enhance(a)),
        "SharpnessIncreasing": (level_enhance, lambda img, a, fill, rs: ImageEnhance.Sharpness(img).enhance(a)),
        "ShearX": (level_shear, lambda img, a, fill, rs: _affine(img, (1, a, 0, 0, 1, 0), fill, rs)),
        "ShearY": (level_shear, lambda img, a, fill, rs: _affine(img, (1, 0, 0, a, 1, 0), fill, rs)),
        "TranslateXRel": (
            level_translate,
            lambda img, a, fill, rs: _affine(img, (1, 0, a * img.size[0], 0, 1, 0), fill, rs),
        ),
        "TranslateYRel": (
            level_translate,
            lambda img, a, fill, rs: _affine(img, (1, 0, 0, 0, 1, a * img.size[1]), fill, rs),
        ),
    }


RAND_INCREASING_OPS = tuple(_op_table())


class RandAugment(grain.transforms.RandomMap):
    """timm's RandAugment (`rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1`) on uint8 `"image"` records.

    Each of `num_ops` ops is drawn uniformly with replacement from `RAND_INCREASING_OPS`, applied with probability
    `prob`, at magnitude N(magnitude, magnitude_std) clipped to [0, 10] (redrawn per op); signed arguments are
    negated with probability 1/2. Geometric ops fill with the dataset mean colour (timm: `img_mean`) and resample
    bicubically (the recipe's interpolation). A clip `[T, H, W, 3]` gets the same ops and arguments on every frame
    (VideoMAE's clip-consistent RandAugment).
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        fill=_FILL,
        translate_pct: float = 0.45,
        ops: tuple[str, ...] = RAND_INCREASING_OPS,
    ):
        table = _op_table()
        unknown = [o for o in ops if o not in table]
        if unknown:
            raise ValueError(f"RandAugment: unknown ops {unknown}; known: {sorted(table)}")
        if num_ops < 0 or not 0.0 <= magnitude <= _MAX_LEVEL or magnitude_std < 0 or not 0.0 <= prob <= 1.0:
            raise ValueError(
                f"RandAugment: expected num_ops >= 0, magnitude in [0, 10], magnitude_std >= 0, prob in [0, 1]; got "
                f"{num_ops}, {magnitude}, {magnitude_std}, {prob}"
            )
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = int(num_ops), magnitude, magnitude_std, prob
        self.fill = tuple(int(c) for c in fill)
        self.hparams = {"translate_pct": float(translate_pct)}
        self.ops = tuple(ops)
        self._table = {name: table[name] for name in self.ops}

    def plan(self, rng: np.random.Generator) -> list[tuple[str, object]]:
        """The (op, argument) pairs applied to one image (or clip), in order."""
        steps = []
        for name in rng.choice(len(self.ops), self.num_ops, replace=True):
            name = self.ops[int(name)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            m = min(_MAX_LEVEL, max(0.0, m))
            level_fn, _ = self._table[name]
            steps.append((name, None if level_fn is None else level_fn(m, rng, self.hparams)))
        return steps

    def apply(self, image: np.ndarray, steps) -> np.ndarray:
        img = Image.fromarray(image)
        for name, arg in steps:
            img = self._table[name][1](img, arg, self.fill, Image.Resampling.BICUBIC)
        return np.asarray(img)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape[-1] != 3:
            raise ValueError(f"RandAugment: record 'image' must be uint8 [..., H, W, 3], got {image.shape}")
        steps = self.plan(rng)
        if image.ndim == 4:
            out = np.stack([self.apply(frame, steps) for frame in image])
        else:
            out = self.apply(image, steps)
        return {**element, "image": out}

    def __repr__(self) -> str:
        return f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, p={self.prob})"


class RandomErasing(grain.transforms.RandomMap):
    """timm's `RandomErasing(probability, mode="pixel", max_count=1)` on the normalised float `key` of a record.

    With probability `prob`: up to 10 tries draw an area fraction U(min_area, max_area) and a log-uniform aspect in
    (min_aspect, 1 / min_aspect); the first box that fits strictly inside is filled with N(0, 1) noise per pixel and
    channel. `[H, W, C]` images, or `[T, H, W, C]` clips erased frame by frame (VideoMAE treats frames as a batch).
    """

    def __init__(
        self,
        prob: float = 0.25,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        key: str = "image",
    ):
        if not 0.0 <= prob <= 1.0 or not 0.0 < min_area <= max_area <= 1.0 or not 0.0 < min_aspect <= 1.0:
            raise ValueError(
                f"RandomErasing: expected prob in [0, 1], 0 < min_area <= max_area <= 1, min_aspect in (0, 1]; got "
                f"{prob}, {min_area}, {max_area}, {min_aspect}"
            )
        self.prob, self.min_area, self.max_area = float(prob), float(min_area), float(max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.key = key

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of the erased box, or None (not erased this time)."""
        if rng.random() > self.prob:
            return None
        area = height * width
        for _ in range(10):
            target = rng.uniform(self.min_area, self.max_area) * area
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(target * aspect))
            w = round(math.sqrt(target / aspect))
            if w < width and h < height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        return None

    def _erase(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        found = self.box(image.shape[0], image.shape[1], rng)
        if found is None:
            return image
        top, left, h, w = found
        image = image.copy()
        image[top : top + h, left : left + w] = rng.standard_normal((h, w, image.shape[2])).astype(image.dtype)
        return image

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        x = element[self.key]
        if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating) or x.ndim not in (3, 4):
            raise ValueError(
                f"RandomErasing: record {self.key!r} must be a normalised float [H, W, C] image or [T, H, W, C] clip, "
                f"got {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}"
            )
        out = np.stack([self._erase(f, rng) for f in x]) if x.ndim == 4 else self._erase(x, rng)
        return {**element, self.key: out}

    def __repr__(self) -> str:
        return f"RandomErasing(prob={self.prob}, area=({self.min_area}, {self.max_area}))"
