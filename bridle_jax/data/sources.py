"""Random-access image sources for Grain: the embedded digits demo, Fashion-MNIST (IDX files), ImageNet-1K (TFDS
ArrayRecord), any prepared TFDS image dataset (``tfds:<name>[:<version>]``) and your own image files
(``image_folder``: the ImageFolder layout or ``path,label`` CSVs).

Every source here has ``__len__``/``__getitem__`` and yields ``{"image": uint8 [H, W, 3], "label": int32}`` so the
transforms and the pipeline never need to know which dataset they read. Records are checked as they are read: a
malformed record fails with its index and what was expected instead of surfacing as a shape error in a jitted step.

Sources that decode (files, TFDS) are wrapped in :class:`ReadableImages`: a record that cannot be decoded (corrupt,
truncated, not an image, missing) is logged with why, counted once per process (:func:`skipped_count`, the metric
``data/skipped_records``) and replaced by the next readable record in stored order (train) or dropped (eval); more
than ``config.data.max_skipped`` raise. A *malformed* record (wrong dtype or shape, a bad label) still raises at once:
it is systematic (a wrong ``image_key``, a broken preparation), not one bad file.

Splits: the train stream reads the split ``"train"``, which stands for ``config.data.train_split`` (default
"train"); the probe and fine-tuning score :func:`eval_split` (``config.data.eval_split``, else the dataset's default
in ``EVAL_SPLIT``). Any other name is read as given (a folder of ``image_folder``, a TFDS split or slice).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from bridle_jax.config import DEFAULT_MAX_SKIPPED  # config.data.max_skipped's default
from bridle_jax.data import csv_files, pipeline, tfds_source
from bridle_jax.validation import fail, is_int

log = logging.getLogger(__name__)

TFDS_NAME = pipeline.TFDS_NAME  # the registry key of every "tfds:<name>[:<version>]"
DATASETS = ("digits", "fashion_mnist", "imagenet2012", "image_folder", TFDS_NAME)
# The labelled held-out split each dataset is evaluated (probed) on when config.data.eval_split is unset. Your own
# data (image_folder, tfds:*) default to "test", as audio_folder and video_folder do (and the probe's test_split).
EVAL_SPLIT = {
    "digits": "test",
    "fashion_mnist": "test",
    "imagenet2012": "validation",
    "image_folder": "test",
    TFDS_NAME: "test",
}

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

    Greyscale images ([H, W] or [H, W, 1]) are replicated to RGB because a few ImageNet JPEGs are stored that way;
    RGBA ([H, W, 4]) loses its alpha channel, the rule of image files too (``image_folder.decode_image``).
    """
    where = f"{source} record {index}"
    if "image" not in record or "label" not in record:
        raise ValueError(f"{where}: expected keys 'image' and 'label', got {sorted(record)}")
    image = np.asarray(record["image"])
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: 'image' must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(
            f"{where}: 'image' must be [H, W, 3] (or greyscale [H, W, 1], RGBA [H, W, 4]), got shape {image.shape}"
        )
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = np.ascontiguousarray(image[:, :, :3])
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
        from sklearn.datasets import (
            load_digits,
        )  # imported here: scikit-learn is slow to import and only digits needs it

        digits = load_digits()
        indices = digits_split_indices(digits.target, split)
        grey = np.round(digits.images[indices] * (255.0 / 16.0)).astype(np.uint8)
        self._images = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))
        self._labels = digits.target[indices].astype(np.int32)
        self.split = split

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

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

    def path(self, index: int) -> str:
        path = getattr(self._source, "path", None)
        return path(index) if path is not None else f"{self._name} record {index}"

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


# ------------------------------------------------------------------------------------------ splits and fields


def registry_name(name) -> str:
    """The key of ``name`` in ``DATASETS``/``EVAL_SPLIT``: every ``tfds:...`` name shares ``TFDS_NAME``."""
    return TFDS_NAME if tfds_source.is_tfds(name) else name


def _optional_str(data_config, field: str) -> str | None:
    value = getattr(data_config, field, None)  # configs (and config.json files) from before the field read as None
    if value is not None and (not isinstance(value, str) or not value.strip()):
        fail("data." + field, "None or a non-empty string", value)
    return value


def train_split(data_config) -> str:
    """The split the train stream reads: ``config.data.train_split`` (default "train")."""
    return _optional_str(data_config, "train_split") or "train"


def eval_split(data_config) -> str:
    """The labelled split the probe and fine-tuning score: ``config.data.eval_split``, else the dataset's default."""
    return _optional_str(data_config, "eval_split") or EVAL_SPLIT[registry_name(data_config.name)]


def resolve_split(data_config, split: str) -> str:
    """``"train"`` (the train stream's split) → ``config.data.train_split``; any other name as given."""
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    return train_split(data_config) if split == "train" else split


def max_skipped(data_config) -> int:
    value = getattr(data_config, "max_skipped", None)
    if value is None:
        return DEFAULT_MAX_SKIPPED
    if not is_int(value) or value < 0:
        fail("data.max_skipped", "an int >= 0", value)
    return int(value)


def check_fields(data_config) -> None:
    """Validates the fields of this module (names, splits, CSVs, TFDS keys); errors name ``config.data.<field>``."""
    name = getattr(data_config, "name", None)
    if registry_name(name) not in DATASETS:
        fail("data.name", f"one of {DATASETS}", name)
    if tfds_source.is_tfds(name):
        tfds_source.parse_name(name)
    for field in ("train_split", "eval_split", "train_csv", "eval_csv", "image_key", "label_key"):
        _optional_str(data_config, field)
    max_skipped(data_config)
    if name != "image_folder":
        return
    data_dir = getattr(data_config, "data_dir", None)
    if data_dir is None:
        fail(
            "data.data_dir",
            "the image folder's root (root/<split>/<class>/<image>, or the folder of "
            "config.data.train_csv / eval_csv) for name='image_folder'",
            None,
        )
    csvs = {f: getattr(data_config, f, None) for f in ("train_csv", "eval_csv")}
    if (csvs["train_csv"] is None) != (csvs["eval_csv"] is None):
        missing, given = ("eval_csv", "train_csv") if csvs["eval_csv"] is None else ("train_csv", "eval_csv")
        fail(
            "data." + missing,
            f"a 'path,label' CSV too, as config.data.{given}={csvs[given]!r} is set (the CSV "
            "variant of image_folder needs one for both splits)",
            None,
        )
    if csvs["train_csv"] is None:
        for field, split in (("train_split", train_split(data_config)), ("eval_split", eval_split(data_config))):
            if split in (".", "..") or "/" in split or "\\" in split:
                fail("data." + field, "a folder name under data_dir (no '/', '\\', '.' or '..')", split)


# ----------------------------------------------------------------------------------------------- skip counter


SKIPPED = pipeline.SkippedRecords("image", "images", log)  # unreadable images seen by this process


def skipped_count() -> int:
    """Unreadable images skipped so far by this process (train and eval together), for the training loop's logs."""
    return SKIPPED.count


class ReadableImages(pipeline.ReadableSource):
    """:class:`pipeline.ReadableSource` over images: ``image_folder.ImageDecodeError``, PIL's errors inside TFDS
    decoding and missing files (all ``OSError``) are counted in ``SKIPPED``."""

    WHAT = "images"

    def skipped(self) -> pipeline.SkippedRecords:
        return SKIPPED


# ---------------------------------------------------------------------------------------------------- sources


def _under(root: str, path: str) -> str:
    """``path`` under ``root`` (a local folder or a URL); an absolute path or a URL is used as given."""
    return path if csv_files.is_absolute(path) else csv_files.join(root, path)


def image_folder_source(data_config, split: str):
    """The ``image_folder`` source of ``split`` (already resolved): the folder layout, or the CSVs when
    ``config.data.train_csv`` is set; the label mapping always comes from the train split."""
    from bridle_jax.data import image_folder

    root = os.fspath(data_config.data_dir)
    train, evaluation = train_split(data_config), eval_split(data_config)
    train_csv = getattr(data_config, "train_csv", None)
    if train_csv is None:
        classes = image_folder.folder_classes(root, train)
        return image_folder.ImageFolderSource(root, split, classes=classes)
    if not csv_files.is_dir(root):
        raise FileNotFoundError(f"config.data.data_dir={root!r} is not a directory (image_folder's CSVs are under it)")
    csvs = {train: _under(root, train_csv), evaluation: _under(root, data_config.eval_csv)}
    if split not in csvs:
        raise ValueError(
            f"config.data.name='image_folder' with CSVs has the splits {sorted(csvs)} (config.data.train_split -> "
            f"train_csv, config.data.eval_split -> eval_csv), got split {split!r}"
        )
    train_source = image_folder.ImageCsvSource(csvs[train], root)
    if split == train:
        return train_source
    return image_folder.ImageCsvSource(
        csvs[split],
        root,
        classes=train_source.classes,
        num_classes=None if train_source.classes else train_source.num_classes,
    )


def raw_source(data_config, split: str):
    """The source of ``split`` ("train" = ``config.data.train_split``) before undecodable records are skipped."""
    check_fields(data_config)
    name = data_config.name
    split = resolve_split(data_config, split)
    data_dir = getattr(data_config, "data_dir", None)
    if name == "digits":
        return DigitsSource(split)
    if name == "fashion_mnist":
        from bridle_jax.data import fashion_mnist

        return fashion_mnist.FashionMnistSource(split, data_dir)
    if name == "imagenet2012":
        return imagenet2012_source(split, data_dir)
    if name == "image_folder":
        return image_folder_source(data_config, split)
    source = tfds_source.TfdsImageSource(
        name,
        split,
        data_dir,
        image_key=getattr(data_config, "image_key", None) or "image",
        label_key=getattr(data_config, "label_key", None) or "label",
    )
    return _CheckedSource(source, f"{name}[{split}]")


def make_source(data_config, split: str, *, replace: bool = True):
    """The source named by ``config.data.name`` for ``split`` ("train" = ``config.data.train_split``, or e.g.
    :func:`eval_split`). Decoding sources come wrapped in :class:`ReadableImages` (``replace``: see there); the
    in-memory ones (digits, Fashion-MNIST) cannot fail to decode and come as they are."""
    source = raw_source(data_config, split)
    if data_config.name in ("digits", "fashion_mnist"):
        return source
    return ReadableImages(source, max_skipped(data_config), replace=replace)


DECLARED_CLASSES = {"digits": 10, "fashion_mnist": 10, "imagenet2012": 1000}  # fixed datasets: nothing to read


def num_classes(data_config) -> int | None:
    """The class count the data declare (the fixed datasets' ``DECLARED_CLASSES``; image folders: the train split's
    class folders or CSV labels; TFDS: a ClassLabel's), or None where only the labels tell."""
    if data_config.name in DECLARED_CLASSES:
        return DECLARED_CLASSES[data_config.name]
    source = raw_source(data_config, "train")
    if isinstance(source, _CheckedSource):
        source = source._source  # pylint: disable=protected-access
    return getattr(source, "num_classes", None)


def listed_labels(source) -> np.ndarray | None:
    """A raw source's labels, as its index holds them (in-memory arrays, class folders, CSV rows: nothing decoded),
    or None where each label is inside an encoded record (TFDS, ImageNet)."""
    if isinstance(source, _CheckedSource):
        return None
    labels = getattr(source, "labels", None)
    if labels is None:  # FashionMnistSource keeps its in-memory labels private
        labels = getattr(source, "_labels", None)
    return None if labels is None else np.asarray(labels)
