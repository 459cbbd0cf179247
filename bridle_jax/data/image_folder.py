"""Your own images (``config.data.name="image_folder"``): the torchvision ImageFolder layout, or ``path,label`` CSVs.

Both read image files under the dataset root ``config.data.data_dir`` (a local folder, ``gs://...`` or any fsspec
URL: the file access of :mod:`bridle_jax.data.csv_files`) and decode them with PIL, lazily, in Grain's threads; the
pipeline wraps these sources in :class:`bridle_jax.data.sources.ReadableImages`, which counts and skips files that
fail to decode.

Folder layout (``torchvision.datasets.ImageFolder``)::

    root/<split>/<class>/**/<image>.{jpg,jpeg,png,webp,bmp}      extensions case-insensitive

- classes are the sorted sub-folder names of the train split (``config.data.train_split``, default "train"); every
  other split uses that mapping, and a class folder the train split lacks is an error naming it (a split may lack a
  class: its index stays that of the train split, never shifted);
- files are walked recursively (symlinks followed) in sorted order, as torchvision does, so record ``i`` is
  torchvision's sample ``i``; other files are ignored, and so are hidden entries (``.name``, e.g.
  ``.ipynb_checkpoints``, which torchvision would take for a class);
- a class folder without any image file is an error (as in torchvision).

CSV layout (``config.data.train_csv`` / ``eval_csv``, relative to ``data_dir``)::

    path,label                          header required, extra columns ignored
    cats/0001.jpg,cat

read by :mod:`bridle_jax.data.csv_files`, the reader of the audio and video CSVs (a UTF-8 BOM, any line ending and
quoted fields are fine; labels are integers used as given or class names mapped to their sorted index, the train
CSV's mapping for every split; errors name the file and row). Image paths are relative to ``data_dir``, as in the
audio and video CSVs, and may not leave it (absolute paths and ``..`` are rejected); any format PIL reads is accepted.
A listed file that is
missing is not an error here: like a corrupt one, it fails when read and is counted as skipped.

Decoding (:func:`decode_image`) gives uint8 ``[H, W, 3]`` at the file's own size (the crops resize):
RGB as stored; greyscale (L, 1-bit) replicated to the three channels; 16-bit greyscale scaled to 8 bits by its high
byte; an alpha channel (RGBA, LA, transparent palettes) is **dropped**, keeping the colour stored under transparent
pixels (``PIL.Image.convert("RGB")``, what torchvision's ``pil_loader`` does; it is not composited on a background);
palette, CMYK and YCbCr images are converted to RGB. EXIF orientation is not applied (neither torchvision nor TFDS
does). Whatever cannot be decoded (corrupt, truncated, not an image, unreadable) raises :class:`ImageDecodeError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from bridle_jax.data import csv_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageDecodeError(OSError):
    """An image file that PIL cannot decode into pixels (the pipeline counts and skips it)."""


def decode_image(path: str) -> np.ndarray:
    """The image file at ``path`` as uint8 ``[H, W, 3]`` RGB (see the module docstring for the mode rules).

    A local file is opened by name (PIL's own buffered file: the fast path); a URL (``gs://``, any fsspec URL) is
    streamed through a file object (``csv_files.open_binary``), never copied to local disk first.
    """
    path = os.fspath(path)
    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(csv_files.open_binary(path)) if csv_files.is_url(path) else path
            image = stack.enter_context(Image.open(source))
            image.load()  # decodes everything now: a truncated file fails here, not in a later transform
            mode = image.mode
            if mode.startswith("I;16"):  # 16-bit greyscale (PNG): its high byte, not PIL's clipping to 255
                grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            elif mode == "L":
                grey = np.asarray(image, dtype=np.uint8)
            elif mode in ("I", "F"):  # 32-bit pixels have no fixed 8-bit scale: refused rather than clipped
                raise ValueError(f"unsupported {mode!r} (32-bit) pixels: convert the file to 8-bit RGB or greyscale")
            else:
                rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
                grey = None
    except Exception as e:  # PIL raises many types for bad files: OSError, SyntaxError, struct.error, …
        raise ImageDecodeError(f"cannot decode image {path!r}: {type(e).__name__}: {e}") from e
    if grey is not None:
        rgb = np.repeat(grey[:, :, None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or min(rgb.shape[:2]) < 1:
        raise ImageDecodeError(f"cannot decode image {path!r}: got pixels of shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _require_dir(path: str, what: str) -> str:
    if not csv_files.is_dir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a directory")
    return path


class _FileSource:
    """Random access over (path, label): ``{"image": uint8 [H, W, 3], "label": int32}``, decoded when read."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str] | None
    num_classes: int
    description: str

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> dict:
        return {"image": decode_image(self.paths[index]), "label": np.int32(self.labels[index])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, len={len(self)}, num_classes={self.num_classes})"


def split_dir(root: str, split: str) -> str:
    """``root/<split>``, or FileNotFoundError naming it, the splits that exist and the config fields to set."""
    root = _require_dir(os.fspath(root), "image folder root (config.data.data_dir)")
    path = csv_files.join(root, split)
    if not csv_files.is_dir(path):
        found = sorted(name for name in csv_files.list_dir(root)[0] if not name.startswith("."))
        raise FileNotFoundError(
            f"image folder split {split!r}: {path!r} is not a directory (expected root/<split>/<class>/<image>; the "
            f"root holds the folders {found}; choose them with config.data.train_split / config.data.eval_split)"
        )
    return path


def folder_classes(root: str, split: str) -> list[str]:
    """The sorted class-folder names of ``root/<split>`` (hidden entries ignored)."""
    path = split_dir(root, split)
    names = sorted(name for name in csv_files.list_dir(path)[0] if not name.startswith("."))
    if not names:
        raise FileNotFoundError(
            f"image folder split {split!r}: {path!r} has no class folders (expected {path}/<class>/<image>)"
        )
    return names


def _image_files(class_dir: str) -> list[str]:
    """Every image file under ``class_dir`` (recursively, symlinks followed), in torchvision's sorted order: folders
    sorted by path, the files of each sorted by name. Hidden sub-folders are pruned while walking (sorting the walk
    first, as torchvision does, would read them all and prune nothing)."""
    folders = []
    for folder, dirs, files in csv_files.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        folders.append((folder, files))
    found = []
    for folder, files in sorted(folders):
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(csv_files.join(folder, name))
    return found


class ImageFolderSource(_FileSource):
    """``root/<split>/<class>/**/<image>``; ``classes`` (the train split's) fixes the label mapping of other splits."""

    def __init__(self, root, split: str, *, classes: Sequence[str] | None = None):
        root = os.fspath(root)
        found = folder_classes(root, split)
        if classes is None:
            classes = found
        classes = [str(c) for c in classes]
        index = {c: i for i, c in enumerate(classes)}
        unknown = [c for c in found if c not in index]
        if unknown:
            raise ValueError(
                f"image folder split {split!r}: class folder(s) {unknown} are not classes of the train split "
                f"({len(classes)} classes: {classes[:10]}{' …' if len(classes) > 10 else ''}); every split must use "
                "the train split's class folders"
            )
        paths, labels = [], []
        for name in found:
            files = _image_files(csv_files.join(root, split, name))
            if not files:
                raise FileNotFoundError(
                    f"image folder split {split!r}: class folder {csv_files.join(root, split, name)!r} holds no image "
                    f"file (extensions {', '.join(IMAGE_EXTENSIONS)}, any case); add images or remove the folder"
                )
            paths.extend(files)
            labels.extend([index[name]] * len(files))
        self.root, self.split = root, split
        self.paths, self.labels = paths, np.asarray(labels, np.int32)
        self.classes, self.num_classes = classes, len(classes)
        self.description = f"{csv_files.join(root, split)!r}"


class ImageCsvSource(_FileSource):
    """A ``path,label`` CSV read by ``csv_files.read_path_labels`` (the reader of the audio and video folder CSVs);
    image paths relative to ``root`` (``data_dir``). Pass the train CSV's ``classes`` (class-name labels) or
    ``num_classes`` (integer labels) when building another split, so every split shares one mapping."""

    def __init__(self, csv_path, root, *, classes: Sequence[str] | None = None, num_classes: int | None = None):
        csv_path = os.fspath(csv_path)
        table = csv_files.read_path_labels(csv_path, csv_files.absolute(root), classes=classes, num_classes=num_classes)
        self.paths, self.labels, self.classes, self.num_classes = table
        self.csv_path = csv_path
        self.description = f"{csv_path!r}"
