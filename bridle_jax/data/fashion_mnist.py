"""Fashion-MNIST from its four official IDX files: the real-data study's dataset (README "Does it learn?").

60,000 train and 10,000 test grayscale 28x28 images of 10 clothing classes. Nothing is downloaded: the files are read
from ``config.data.data_dir`` (default :data:`DEFAULT_DIR`, where Debian's and Ubuntu's ``dataset-fashion-mnist``
package puts them; a ``gs://`` or other fsspec URL works too), each either plain or gzipped. An IDX file is checked as
it is read (magic number, dimensions,
length, label range), so a truncated or corrupt file fails with its path instead of as a shape error later.
"""

from __future__ import annotations

import contextlib
import gzip
import os

import numpy as np

from bridle_jax.data import csv_files

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08


class IdxError(ValueError):
    """An IDX file whose header or length is not what the format (and Fashion-MNIST) requires."""


def _find(folder: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = csv_files.join(folder, name)
        if csv_files.is_file(path):
            return path
    return None


def _missing_help(folder: str) -> str:
    names = ", ".join(f"{stem}[.gz]" for pair in FILES.values() for stem in pair)
    return (
        f"fashion_mnist: the IDX files are not all in {folder!r}; expected the four official files {names}. "
        "bridle_jax never downloads data: on Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
        f"{DEFAULT_DIR} (the default), or set --config.data.data_dir to the folder that holds them."
    )


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (plain or ``.gz``) with ``ndim`` dimensions, checked against its header."""
    try:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(csv_files.open_binary(path))  # a local file, gs:// or any fsspec URL
            if path.endswith(".gz"):
                f = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for a truncated or corrupt stream
        raise IdxError(f"IDX file {path!r}: cannot read ({e})") from e
    if len(data) < 4 + 4 * ndim:
        raise IdxError(f"IDX file {path!r}: {len(data)} bytes, too short for a {ndim}-dimension IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or data[3] != ndim:
        raise IdxError(
            f"IDX file {path!r}: bad magic number {data[:4].hex()}, expected 000008{ndim:02x} (unsigned "
            f"bytes, {ndim} dimension(s))"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise IdxError(
            f"IDX file {path!r}: {len(data)} bytes, but its header {shape} needs {expected} (truncated or corrupt)"
        )
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int32 [N])`` of ``split`` ("train" or "test"), read and checked."""
    if split not in FILES:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    folder = data_dir or DEFAULT_DIR
    folder = folder if csv_files.is_url(folder) else os.path.expanduser(folder)
    paths = [_find(folder, stem) for pair in FILES.values() for stem in pair]
    if any(p is None for p in paths):
        raise FileNotFoundError(_missing_help(folder))
    image_path, label_path = (_find(folder, stem) for stem in FILES[split])
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if images.shape[1:] != (28, 28):
        raise IdxError(f"IDX file {image_path!r}: images of shape {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise IdxError(f"IDX files {image_path!r} and {label_path!r}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IdxError(f"IDX file {label_path!r}: label {int(labels.max())}, expected 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int32)


class FashionMnistSource:
    """A Grain random-access source of ``{"image": uint8 [28, 28, 3], "label": int32}`` (grey replicated to RGB so
    the image transforms apply unchanged); the whole split is held as uint8 (47 MB for train)."""

    def __init__(self, split: str, data_dir: str | None = None):
        self._images, self._labels = load_split(split, data_dir)
        self.split = split

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        grey = self._images[index]
        return {"image": np.repeat(grey[:, :, None], 3, axis=-1), "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"FashionMnistSource(split={self.split!r}, len={len(self)})"
