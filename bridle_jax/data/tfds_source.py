"""Any prepared TFDS image dataset by name: ``config.data.name="tfds:<name>[:<version>]"``.

``<name>`` is what ``tfds build`` takes (``cifar10``, ``oxford_flowers102``, ``imagenet2012_subset/1pct`` with a
config), the version is optional (``tfds:oxford_flowers102:2.1.0``; default: the newest prepared one). The dataset is
read as ArrayRecord with ``tfds.data_source(..., download=False)``: random access, no TensorFlow at read time, never a
download. Images are decoded by TFDS (PIL); the record's image and label are the features named by
``config.data.image_key`` (default "image") and ``config.data.label_key`` (default "label"); splits are
``config.data.train_split`` / ``eval_split`` and may use TFDS slicing (``"train[:90%]"``, ``"train[90%:]"``).

A dataset that is not prepared under ``config.data.data_dir`` (default: TFDS's, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``) is a FileNotFoundError naming it, the folder and the ``tfds build`` command; nothing is
created in ``data_dir`` then.
"""

from __future__ import annotations

import os
import re

from bridle_jax.data import csv_files
from bridle_jax.validation import fail

PREFIX = "tfds:"
# dataset_name[/config_name][:version], TFDS's own naming (the name's "[/kwargs]" form is not accepted here).
_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.+-]+)?(:[0-9*]+\.[0-9*]+\.[0-9*]+)?$")

PREPARE_HELP = """\
{name} is not prepared as TFDS ArrayRecord under data_dir={data_dir!r} (split {split!r}).
bridle_jax reads prepared TFDS datasets and never downloads. To prepare it once, in an environment with TensorFlow
(e.g. `pip install tensorflow-cpu tensorflow-datasets array_record`), run
    tfds build {tfds_name} --file_format=array_record --data_dir=TFDS_DIR
(datasets that need a manual download also take --manual_dir=DIR), then train with --config.data.data_dir=TFDS_DIR
(the folder that contains {base}/).
TFDS said: {cause}"""


def is_tfds(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_name(name: str) -> str:
    """``"tfds:<name>[:<version>]"`` → the TFDS name (``"<name>[:<version>]"``); ValueError naming the field."""
    tfds_name = name[len(PREFIX) :] if is_tfds(name) else ""
    if not _NAME.match(tfds_name):
        fail(
            "data.name",
            "'tfds:<name>[:<version>]' with a TFDS dataset name (e.g. 'tfds:cifar10', "
            "'tfds:oxford_flowers102:2.1.0', 'tfds:imagenet2012_subset/1pct')",
            name,
        )
    return tfds_name


def default_data_dir() -> str:
    """Where TFDS looks when ``config.data.data_dir`` is unset."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _base_name(tfds_name: str) -> str:
    return tfds_name.split(":")[0].split("/")[0]


def open_data_source(tfds_name: str, split: str, data_dir: str | None, *, name: str, help_text: str = PREPARE_HELP):
    """``tfds.data_source(tfds_name, split, data_dir, download=False)``, with the preparation recipe in the error
    when the dataset is not there and the available splits when ``split`` is not one of them."""
    import tensorflow_datasets as tfds  # ~0.3 s import, paid only by TFDS runs

    base = _base_name(tfds_name)

    def not_prepared(cause):
        shown = data_dir if data_dir is not None else f"{default_data_dir()} (TFDS's default)"
        return FileNotFoundError(
            help_text.format(name=name, tfds_name=tfds_name, base=base, data_dir=shown, split=split, cause=cause)
        )

    # Checked first so that a missing dataset leaves data_dir untouched (TFDS would create data_dir/downloads).
    folder = csv_files.join(data_dir if data_dir is not None else default_data_dir(), base)  # gs:// too
    if not csv_files.is_dir(folder):
        raise not_prepared(f"no folder {folder!r}")
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, FileNotFoundError, AssertionError, tfds.core.DatasetNotFoundError) as e:
        # Without prepared ArrayRecord files TFDS falls back to TFRecord and raises a NotImplementedError about it.
        raise not_prepared(e) from e
    except (ValueError, KeyError) as e:
        if "split" not in str(e).lower():
            raise
        raise ValueError(
            f"config.data.name={name!r}: no split {split!r} ({e}); set config.data.train_split / "
            "config.data.eval_split to the dataset's splits (TFDS slicing like 'train[:90%]' works too)"
        ) from e


class TfdsImageSource:
    """A prepared TFDS dataset's split as ``{"image", "label"}`` records (the features ``image_key``/``label_key``);
    the pipeline validates each record (``sources.check_record``)."""

    def __init__(
        self, name: str, split: str, data_dir: str | None, *, image_key: str = "image", label_key: str = "label"
    ):
        self.name = name
        self.tfds_name = parse_name(name)
        self.split = split
        self._source = open_data_source(self.tfds_name, split, data_dir, name=name)
        features = self._source.dataset_info.features
        keys = sorted(features.keys())
        for field, key in (("image_key", image_key), ("label_key", label_key)):
            if key not in features:
                fail("data." + field, f"a feature of {name!r}, one of {keys}", key)
        self.image_key, self.label_key = image_key, label_key
        # A ClassLabel feature declares its class count; other integer labels do not.
        self.num_classes = getattr(features[label_key], "num_classes", None)

    def __len__(self) -> int:
        return len(self._source)

    def path(self, index: int) -> str:
        return f"{self.name}[{self.split}] record {index}"

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        return {"image": record[self.image_key], "label": record[self.label_key]}

    def __repr__(self) -> str:
        return f"TfdsImageSource({self.name!r}, split={self.split!r}, len={len(self)})"
