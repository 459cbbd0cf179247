"""Image input pipelines: ``config.data`` fields → an explicit list of typed Grain transforms (no string pp DSL).

Implements the modality pipeline contract of :mod:`bridle_jax.data.pipeline` (batches ``{"input", "length",
"label"}``; for images ``length`` is the image height: nothing is ever padded).

Train: an infinite, checkpointable stream of normalised crops, sharded across processes. Eval: the whole split,
ordered and deterministic, as NumPy arrays — and the same eval preprocessing for raw user images
(:func:`preprocess_eval`, used by the public feature API).

Order of the train stream and why:
  source → shuffle(seed) → repeat (reshuffled per epoch) → augment → normalise → batch(local_batch_size)
  → [process_index::process_count] → to_iter_dataset(ReadOptions)
Augmentation is applied *before* the process shard. MapDataset is lazy, so no process decodes a record it does not
own, but each record's random crop/flip is keyed by its *global* position: the process blocks of a global batch are
exactly the single-process global batch, rows in the same order (augmentations included), whatever
``process_count`` is.

Datasets (``config.data.name``; :mod:`bridle_jax.data.sources`): ``digits``, ``fashion_mnist``, ``imagenet2012``,
``image_folder`` (your own files: :mod:`bridle_jax.data.image_folder`) and ``tfds:<name>[:<version>]`` (any prepared
TFDS image dataset: :mod:`bridle_jax.data.tfds_source`). Images of any size and mode (grey, RGBA, palette) arrive as
uint8 RGB at their own size; the crops resize them.

Undecodable images (corrupt, truncated, not an image, missing): logged, counted once per process
(:func:`skipped_count`), replaced by the next readable record in stored order in the train stream (a rule of the files
alone, so the stream stays deterministic, resumable and identically sharded) and dropped from eval arrays; more than
``config.data.max_skipped`` raise ``RuntimeError``.
"""

from __future__ import annotations

import dataclasses
import warnings

import grain
import ml_collections
import numpy as np

from bridle_jax import config as config_lib
from bridle_jax.data import pipeline, randaugment, sources, transforms
from bridle_jax.validation import fail, get, is_int

DATASETS = dict(sources.EVAL_SPLIT)  # name -> the labelled split the probe tests on (config.data.eval_split unset)


def default_data_config() -> ml_collections.ConfigDict:
    """Every ``config.data`` field the image pipeline reads (the ImageNet recipe's values; kept with the other defaults
    in :func:`bridle_jax.config.image_data_config`, so ``base_config`` needs no data module)."""
    return config_lib.image_data_config()


def validate_data_config(data_config) -> None:
    data_spec(data_config)


def skipped_count() -> int:
    """Undecodable images skipped so far by this process (train and eval together), for the training loop's logs."""
    return sources.skipped_count()


def eval_split(data_config) -> str:
    """The labelled split the probe and fine-tuning score: ``config.data.eval_split``, else ``DATASETS[name]``."""
    return sources.eval_split(data_config)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``config.data`` read once and checked, so every error names the config field and what was expected."""

    name: str
    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_crop_fraction: float
    num_threads: int
    prefetch_buffer_size: int
    max_eval_examples: int | None
    train_split: str
    eval_split: str
    max_skipped: int


def _pair(data_config, field: str, upper: float | None) -> tuple[float, float]:
    value = get(data_config, "data." + field)
    expected = "a pair (low, high) with 0 < low <= high" + (f" <= {upper}" if upper is not None else "")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        fail("data." + field, expected, value)
    if not (0 < lo <= hi) or (upper is not None and hi > upper):
        fail("data." + field, expected, value)
    return lo, hi


def rgb_triple(field: str, value, positive: bool) -> tuple[float, float, float]:
    """``config.data.<field>`` (mean or std) as 3 floats; shared by the image and video pipelines."""
    expected = "3 finite numbers (RGB, on the [0, 1] pixel scale)" + (", all positive" if positive else "")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        fail("data." + field, expected, value)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        fail("data." + field, expected, value)
    return tuple(arr.tolist())


def data_spec(data_config) -> DataSpec:
    """Validates ``config.data`` (an ml_collections ConfigDict or any object with these attributes)."""
    name = get(data_config, "data.name")
    sources.check_fields(data_config)  # name, splits, CSVs, TFDS keys, max_skipped
    image_size = get(data_config, "data.image_size")
    if not is_int(image_size) or image_size < 1:
        fail("data.image_size", "a positive int", image_size)
    flip = get(data_config, "data.flip")
    if not isinstance(flip, (bool, np.bool_)):
        fail("data.flip", "a bool", flip)
    fraction = get(data_config, "data.eval_crop_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        fail("data.eval_crop_fraction", "a number in (0, 1]", fraction)
    ints = {}
    for field in ("num_threads", "prefetch_buffer_size"):
        ints[field] = get(data_config, "data." + field)
        if not is_int(ints[field]) or ints[field] < 0:
            fail("data." + field, "an int >= 0", ints[field])
    max_eval = get(data_config, "data.max_eval_examples", None)
    if max_eval is not None and (not is_int(max_eval) or max_eval < 1):
        fail("data.max_eval_examples", "None or a positive int", max_eval)
    return DataSpec(
        name=name,
        image_size=int(image_size),
        crop_scale=_pair(data_config, "crop_scale", upper=1.0),
        crop_ratio=_pair(data_config, "crop_ratio", upper=None),
        flip=bool(flip),
        mean=rgb_triple("mean", get(data_config, "data.mean"), positive=False),
        std=rgb_triple("std", get(data_config, "data.std"), positive=True),
        eval_crop_fraction=float(fraction),
        num_threads=int(ints["num_threads"]),
        prefetch_buffer_size=int(ints["prefetch_buffer_size"]),
        max_eval_examples=None if max_eval is None else int(max_eval),
        train_split=sources.train_split(data_config),
        eval_split=sources.eval_split(data_config),
        max_skipped=sources.max_skipped(data_config),
    )


def eval_transforms(spec: DataSpec) -> list:
    """Resize the short side to ``image_size / eval_crop_fraction``, centre-crop ``image_size``, normalise."""
    return [
        transforms.ResizeCenterCrop(spec.image_size, spec.eval_crop_fraction),
        transforms.Normalize(spec.mean, spec.std),
    ]


def train_source(data_config):
    """The train split's records (random access; its length is one epoch), reading none of them."""
    return sources.make_source(data_config, "train")


def train_dataset(
    data_config,
    *,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
    augment=None,
) -> grain.MapDataset:
    """The infinite train stream of this process as a (lazy, random-access) MapDataset of batches; `source`, when
    given, is `train_source(data_config)` made already (it is not listed twice).

    ``augment`` (fine-tuning's ``config.augment``; None: pretraining's stream) is timm's fine-tune transform:
    RandomResizedCrop with ``augment.crop_scale``/``crop_ratio``, flip when ``augment.flip``, RandAugment
    (``randaugment_ops`` > 0), normalise, random erasing (``random_erasing`` > 0), from 5 seeds (shuffle, crop, flip,
    RandAugment, erasing; the first 3 are pretraining's).
    """
    spec = data_spec(data_config)
    pipeline.check_stream_args(local_batch_size, process_index, process_count)
    source = train_source(data_config) if source is None else source
    if len(source) == 0:
        raise ValueError(f"config.data.name={spec.name!r}: the train split is empty")
    if augment is None:
        shuffle_seed, crop_seed, flip_seed = pipeline.train_seeds(seed, 3)
        scale, ratio, flip = spec.crop_scale, spec.crop_ratio, spec.flip
    else:
        shuffle_seed, crop_seed, flip_seed, aug_seed, erase_seed = pipeline.train_seeds(seed, 5)
        scale, ratio, flip = tuple(augment.crop_scale), tuple(augment.crop_ratio), bool(augment.flip)

    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None, reseed_each_epoch=True)
    ds = ds.random_map(transforms.RandomResizedCrop(spec.image_size, scale, ratio), seed=crop_seed)
    if flip:
        ds = ds.random_map(transforms.RandomFlip(0.5), seed=flip_seed)
    if augment is not None and augment.randaugment_ops:
        fill = tuple(min(255, round(255 * m)) for m in spec.mean)  # timm: img_mean
        ra = randaugment.RandAugment(
            augment.randaugment_ops, augment.randaugment_magnitude, augment.randaugment_magnitude_std, fill=fill
        )
        ds = ds.random_map(ra, seed=aug_seed)
    ds = ds.map(transforms.Normalize(spec.mean, spec.std))
    if augment is not None and augment.random_erasing:
        ds = ds.random_map(randaugment.RandomErasing(augment.random_erasing), seed=erase_seed)
    ds = ds.map(_ToModelRecord(spec.image_size))
    # Process p takes batches p, p + P, ...: global batch i is the P consecutive local batches iP..iP+P-1, so the
    # global array (process blocks in order) holds exactly the rows of the one-process batch, in its order.
    return ds.batch(int(local_batch_size), drop_remainder=True)[process_index::process_count]


def num_classes(data_config) -> int | None:
    """The class count the data declare (see :func:`sources.num_classes`)."""
    data_spec(data_config)
    return sources.num_classes(data_config)


def eval_labels(data_config, split: str, max_examples: int | None = None):
    """The labels of the first :func:`eval_size` records of ``split``, nothing decoded; None for TFDS and ImageNet
    (their labels are inside the encoded records)."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples)
    labels = sources.listed_labels(sources.raw_source(data_config, split))
    if labels is None:
        return None
    return np.asarray(
        labels[: pipeline.count_eval(len(labels), max_examples, spec.max_eval_examples).examples], np.int32
    )


class _ToModelRecord(grain.transforms.Map):
    """``{"image", "label"}`` → the contract's ``{"input", "length", "label"}``."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, element: dict) -> dict:
        return {"input": element["image"], "length": np.int32(self.image_size), "label": element["label"]}


def eval_size(data_config, split: str, max_examples: int | None = None) -> pipeline.EvalSize:
    """How many records :func:`eval_batches` reads from ``split`` (the first ``min(len, cap)``), from the source's
    length: no image is decoded."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples)
    return pipeline.count_eval(
        len(sources.make_source(data_config, split, replace=False)), max_examples, spec.max_eval_examples
    )


def eval_batches(data_config, split: str, max_examples: int | None = None, batch_size: int = 256):
    """The eval-preprocessed split in its stored order, ``batch_size`` images at a time: ``{"input": float32
    [b, S, S, 3], "length": int32 [b], "label": int32 [b]}`` (the last batch shorter).

    The first ``N`` readable records, ``N`` capped by ``max_examples``, else by ``config.data.max_eval_examples``;
    undecodable ones are dropped and counted as skipped. One batch (b·S²·12 bytes: 256 images at 224 are 154 MB) plus
    the loader's prefetch buffer is held at a time. The source is listed (and checked) when this is called; the
    images are read as the batches are asked for.
    """
    return _eval_reader(data_config, split, max_examples, batch_size)[1]


def _eval_reader(data_config, split: str, max_examples: int | None, batch_size: int):
    """(N, the batches of eval_batches)."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples, batch_size)
    source = sources.make_source(data_config, split, replace=False)
    n = pipeline.count_eval(len(source), max_examples, spec.max_eval_examples).examples
    ds = grain.MapDataset.source(source)
    if not isinstance(source, sources.ReadableImages):
        ds = ds[:n]  # nothing is dropped: read exactly the first n
    for t in eval_transforms(spec):
        ds = ds.map(t)
    ds = ds.map(_ToModelRecord(spec.image_size))
    read_options = grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch_buffer_size)
    # ordered, whatever the thread count; None (undecodable) records are dropped by Grain
    batches = pipeline.batch_records(ds.to_iter_dataset(read_options), n, int(batch_size), np.int32)
    return n, pipeline.nonempty(batches, spec.name, split, "image")


def eval_arrays(data_config, split: str, max_examples: int | None = None) -> dict:
    """The eval-preprocessed split in its stored order: ``{"input": float32 [N, S, S, 3], "length": int32 [N],
    "label": int32 [N]}``: the batches of :func:`eval_batches` joined.

    ``N`` is capped by ``max_examples``, else by ``config.data.max_eval_examples`` (the first ``N`` readable records;
    undecodable ones are dropped and counted as skipped). The result is held in memory (N·S²·12 bytes: 50k ImageNet
    images at 224 are 30 GB, so cap it for large splits, or stream them with :func:`eval_batches`).
    """
    n, batches = _eval_reader(data_config, split, max_examples, 256)
    return pipeline.join_batches(batches, n)


# Float pixels may overshoot their stated range by this fraction of its span (a bicubic or Lanczos resize rings by a
# few percent at sharp edges); such values are clipped, with a warning once they would change a uint8 value. Beyond
# it the range itself is wrong (0..255 floats read as 0..1), so the batch is refused with the fix named.
FLOAT_RANGE_TOLERANCE = 0.1


def check_value_range(value_range) -> tuple[float, float]:
    """``value_range``: None (floats are 0..1) or ``(low, high)``, two finite numbers with low < high."""
    if value_range is None:
        return 0.0, 1.0
    try:
        low, high = (float(v) for v in value_range)
        ok = np.isfinite(low) and np.isfinite(high) and low < high and not isinstance(value_range, (str, bytes))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"value_range: expected None (floats are 0..1) or (low, high) with low < high, e.g. (0, 255); got "
            f"{value_range!r}"
        )
    return low, high


def to_uint8_images(images, value_range=None) -> np.ndarray:
    """Raw ``[B, H, W, C]`` images (C in {1, 3}) → uint8 RGB, the form the train pipeline reads.

    Integers must lie in 0..255. Floats are 0..1, or the ``value_range=(low, high)`` the caller states (e.g.
    ``(0, 255)``): the scale is a rule of the call, never inferred from the data, so one image's pixels never change
    how another image of the batch is read. Floats are rounded to uint8 so eval preprocessing is identical to what
    the stored (uint8) dataset images get. Values outside the range by at most ``FLOAT_RANGE_TOLERANCE`` of its span
    are clipped (with a warning when that changes a pixel); further out, the batch is refused with the fix named.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels in the last axis, got shape {images.shape}")
    if images.shape[0] == 0 or min(images.shape[1:3]) < 1:
        raise ValueError(f"images must be non-empty, got shape {images.shape}")
    is_float = np.issubdtype(images.dtype, np.floating)
    if value_range is not None and not is_float:
        low, high = check_value_range(value_range)
        if (low, high) != (0.0, 255.0):
            raise ValueError(
                f"value_range={value_range!r} applies to float images; {images.dtype} images are always 0..255 (pass "
                "floats, or leave value_range unset)"
            )
    if images.dtype == np.uint8:
        out = images
    elif np.issubdtype(images.dtype, np.integer):
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"integer images must lie in 0..255, got [{images.min()}, {images.max()}]")
        out = images.astype(np.uint8)
    elif is_float:
        low, high = check_value_range(value_range)
        lo, hi = float(np.min(images)), float(np.max(images))
        slack = FLOAT_RANGE_TOLERANCE * (high - low)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < low - slack or hi > high + slack:
            stated = "value_range=None: 0..1" if value_range is None else f"value_range={value_range!r}"
            fix = (
                "; for 0..255 floats pass value_range=(0, 255) (or convert to uint8)"
                if value_range is None and hi > 1
                else "; state the images' range with value_range=(low, high)"
            )
            raise ValueError(
                f"float images must be finite and within {stated} (tolerance {FLOAT_RANGE_TOLERANCE:g} of the span), "
                f"got [{lo}, {hi}]{fix}"
            )
        scaled = np.rint((images.astype(np.float64) - low) * (255.0 / (high - low)))
        clipped = int(np.count_nonzero((scaled < 0) | (scaled > 255)))
        if clipped:
            warnings.warn(
                f"{clipped} float pixel value(s) outside {(low, high)} (up to [{lo}, {hi}]) were clipped to the range",
                stacklevel=2,
            )
        out = np.clip(scaled, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"images must be uint8, integer or float, got dtype {images.dtype}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def preprocess_eval(data_config, images, value_range=None) -> dict:
    """Eval preprocessing of raw images in their natural form: ``[B, H, W, C]`` → ``{"input": float32 [B, S, S, 3],
    "length"}``. Floats are 0..1 unless ``value_range`` states otherwise (see :func:`to_uint8_images`)."""
    spec = data_spec(data_config)
    resize, normalize = eval_transforms(spec)
    batch = to_uint8_images(images, value_range)
    out = np.empty((batch.shape[0], spec.image_size, spec.image_size, 3), np.float32)
    for i, image in enumerate(batch):
        out[i] = normalize.map(resize.map({"image": image}))["image"]
    return {"input": out, "length": np.full((len(out),), spec.image_size, np.int32)}
