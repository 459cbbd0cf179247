"""Random-access image sources for Grain: the embedded digits demo, Fashion-MNIST (IDX files) and ImageNet-1K
(TFDS ArrayRecord).

Every source here has ``__len__``/``__getitem__`` and yields ``{"image": uint8 [H, W, 3], "label": int32}`` so the
transforms and the pipeline never need to know which dataset they read. Records are checked as they are read: a
malformed record fails with its index and what was expected instead of surfacing as a shape error in a jitted step.
"""
from __future__ import annotations

import numpy as np

DATASETS = ("digits", "fashion_mnist", "imagenet2012")
# The labelled held-out split each dataset is evaluated (probed) on.
EVAL_SPLIT = {"digits": "test", "fashion_mnist": "test", "imagenet2012": "validation"}

# The digits split is part of the demo's contract (the probe's accuracy is reported on it): a fixed seed and a
# per-class split that depends only on NumPy's PCG64 stream, not on scikit-learn's splitter implementation.
DIGITS_SPLIT_SEED = 20240601
DIGITS_TEST_FRACTION = 0.2

IMAGENET_PREPARE_HELP = """\
imagenet2012 is not prepared as TFDS ArrayRecord under data_dir={data_dir!r} (split {split!r}).
bridle_jax never downloads ImageNet. To prepare it once:
  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (login required)
     into a folder, e.g. ~/imagenet_manual.
  2. In an environment with TensorFlow (e.g. `pip install tensorflow-cpu tensorflow-datasets array_record`), run
       tfds build imagenet2012 --file_format=array_record --manual_dir=~/imagenet_manual --data_dir=TFDS_DIR
  3. Train with --config.data.data_dir=TFDS_DIR (the folder that contains imagenet2012/).
TFDS said: {cause}"""


def check_record(record: dict, index: int, source: str) -> dict:
  """Validates one raw record and returns it as ``{"image": uint8 [H, W, 3], "label": int32}``.

  Greyscale images ([H, W] or [H, W, 1]) are replicated to RGB because a few ImageNet JPEGs are stored that way.
  """
  where = f"{source} record {index}"
  if "image" not in record or "label" not in record:
    raise ValueError(f"{where}: expected keys 'image' and 'label', got {sorted(record)}")
  image = np.asarray(record["image"])
  if image.dtype != np.uint8:
    raise ValueError(f"{where}: 'image' must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or min(image.shape[:2]) < 1:
    raise ValueError(f"{where}: 'image' must be [H, W, 3] (or greyscale [H, W, 1]), got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  label = np.asarray(record["label"])
  if label.shape != () or not np.issubdtype(label.dtype, np.integer) or label < 0:
    raise ValueError(f"{where}: 'label' must be a non-negative integer scalar, got {label!r}")
  return {"image": image, "label": np.int32(label)}


def digits_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """Sorted indices of ``split`` in a stratified ~80/20 split: per class, a seeded permutation's first 20% is test."""
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  test = []
  for c in np.unique(labels):  # fixed class order, so the rng stream is consumed identically every time
    members = np.flatnonzero(labels == c)
    num_test = int(round(DIGITS_TEST_FRACTION * len(members)))
    test.append(rng.permutation(members)[:num_test])
  is_test = np.zeros(len(labels), dtype=bool)
  is_test[np.concatenate(test)] = True
  return np.flatnonzero(is_test if split == "test" else ~is_test)


class DigitsSource:
  """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download) as a Grain random-access source.

  ``split="train"`` (1,438 images) and ``split="test"`` (359) are fixed by :func:`digits_split_indices`: stratified
  per class, disjoint, and identical on every machine, so probe accuracies are comparable across runs. Pixels (0..16)
  are scaled to 0..255 and the grey channel replicated to RGB, so the ImageNet transforms apply unchanged.
  """

  def __init__(self, split: str):
    if split not in ("train", "test"):
      raise ValueError(f"DigitsSource: split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import and only digits needs it

    digits = load_digits()
    indices = digits_split_indices(digits.target, split)
    grey = np.round(digits.images[indices] * (255.0 / 16.0)).astype(np.uint8)
    self._images = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
    self._labels = digits.target[indices].astype(np.int32)
    self.split = split

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"DigitsSource(split={self.split!r}, len={len(self)})"


class _CheckedSource:
  """Wraps a TFDS data source: keeps only image and label, and validates each record as it is read."""

  def __init__(self, source, name: str):
    self._source = source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return check_record(self._source[index], index, self._name)

  def __repr__(self) -> str:
    return f"{self._name}(len={len(self)})"


def imagenet2012_source(split: str, data_dir: str | None):
  """ImageNet-1K from TFDS ArrayRecord files (random access, no TensorFlow needed at read time; never downloads).

  Raises FileNotFoundError with the preparation recipe when the ArrayRecord files are not there.
  """
  import tensorflow_datasets as tfds  # ~0.3 s import, paid only by ImageNet runs

  try:
    source = tfds.data_source("imagenet2012", split=split, data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError, AssertionError, tfds.core.DatasetNotFoundError) as e:
    # Without prepared files TFDS falls back to the TFRecord format and raises a NotImplementedError about it.
    raise FileNotFoundError(IMAGENET_PREPARE_HELP.format(data_dir=data_dir, split=split, cause=e)) from e
  return _CheckedSource(source, f"imagenet2012[{split}]")


def make_source(data_config, split: str):
  """The source named by ``config.data.name`` for ``split`` ("train" or the eval split: digits and Fashion-MNIST
  "test", ImageNet "validation")."""
  name = data_config.name
  if name == "digits":
    return DigitsSource(split)
  if name == "fashion_mnist":
    from bridle_jax.data import fashion_mnist

    return fashion_mnist.FashionMnistSource(split, getattr(data_config, "data_dir", None))
  if name == "imagenet2012":
    return imagenet2012_source(split, getattr(data_config, "data_dir", None))
  raise ValueError(f"config.data.name must be one of {DATASETS}, got {name!r}")
