"""The one reader of annotation CSVs, for every modality (audio, video and image sources use it; README "Your own
data"), and the file access every reader shares: local paths, ``gs://`` and any other fsspec URL (see "Files" below).

One set of rules, so a CSV that one modality accepts the other accepts too:

- encoding ``utf-8-sig``: the byte-order mark spreadsheet exports put before the first column's name is dropped;
  undecodable bytes are a malformed row, not a crash;
- any line ending (LF, CRLF, CR) and quoted fields (``"a, b.mp4"``), parsed by the ``csv`` module (strict), with
  spaces after a delimiter and around a value ignored; blank lines are not rows;
- a header is required and must name every required column (extra columns are ignored); every row has the header's
  field count;
- the own-files CSV of every modality is ``path,label[,split]`` (:func:`read_path_labels`);
- labels (:func:`labels_from_rows`) are integers ``>= 0`` used as given, or class names mapped to the indices of
  their sorted set; pass the train split's ``classes`` / ``num_classes`` to the other splits so they share it;
- paths (:func:`resolve_inside`) are relative to the dataset root and may not leave it;
- every error names the file and the row (the line number an editor shows, the header being row 1), the field and
  what was expected. Metadata errors are systematic (a wrong file, a shifted column, a typo in a class name) and
  silently dropping rows would change the class balance or the splits, so they raise at construction.

Nothing is unpickled or executed.

Files: every data reader (CSVs, audio, video, images, IDX files) opens, tests and lists files through
:func:`open_binary`, :func:`is_file`, :func:`is_dir`, :func:`list_dir`, :func:`walk` and joins paths with
:func:`join`, so ``config.data.data_dir`` may be a local folder, ``gs://bucket/dir`` (a Cloud TPU VM's bucket) or any
fsspec URL (``s3://``, ``memory://``, ...) and nothing is copied to local disk first:

- local paths use ``os`` and ``open`` exactly as before (no extra calls, and the decoders keep getting a real file
  name: libsndfile, FFmpeg and PIL read a local file with their own buffered, seekable I/O, faster than through a
  Python file object);
- ``gs://``, ``s3://``, ``az://`` and ``hf://`` go through ``etils.epath`` (the workdir's own file layer: gcsfs /
  s3fs through fsspec, or ``tf.io.gfile`` where TensorFlow is installed);
- any other URL goes to fsspec directly (``fsspec.core.url_to_fs``): ``etils.epath`` registers only the four schemes
  above, and its fsspec backend would send any other URL to the local file system.

URLs are joined with ``/`` (``os.path.join`` is for local paths, and ``os.path.abspath('gs://b')`` would give
``'/cwd/gs:/b'``); :func:`resolve_inside` refuses CSV paths that leave the root for URLs too. Remote files are
streamed through a file object (fsspec reads them in large blocks, so a clip costs about one request).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

_INT = re.compile(r"^[0-9]+$")
_NEGATIVE_INT = re.compile(r"^-[0-9]+$")


def where(path: str, row: int) -> str:
    """The location every CSV error starts with: ``CSV file '<path>' row <n>``."""
    return f"CSV file {os.fspath(path)!r} row {row}"


def read_csv(path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Yields ``(row number, {column: stripped value})`` for every data row (every header column, so optional
    columns are read with ``row.get``); the header must name every ``required`` column."""
    path = os.fspath(path)
    if not is_file(path):
        raise FileNotFoundError(f"annotation CSV file {path!r} not found (no such file)")
    with open_text(path) as f:
        reader = csv.reader(f, skipinitialspace=True, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"CSV file {path!r} is empty: expected a header with columns {list(required)}")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(
                    f"CSV file {path!r}: header {header} lacks column(s) {missing} (expected {list(required)})"
                )
            for fields in reader:
                number = reader.line_num  # the physical line (a quoted field may span lines)
                if not fields or all(not x.strip() for x in fields):
                    continue
                if len(fields) != len(header):
                    raise ValueError(
                        f"{where(path, number)}: expected {len(header)} fields ({','.join(header)}), "
                        f"got {len(fields)}: {fields}"
                    )
                yield number, {h: x.strip() for h, x in zip(header, fields)}
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{where(path, reader.line_num + 1)}: malformed ({e})") from None


def parse_int(value: str, where_: str, field: str, minimum: int = 0) -> int:
    """A decimal integer field ``>= minimum`` (digits only: no sign, no spaces, no ``_``)."""
    if not _INT.match(value) or int(value) < minimum:
        raise ValueError(f"{where_}: {field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def resolve_inside(root: str, relative: str, where_: str) -> str:
    """``root/relative``, refusing absolute paths and ``..`` components so a CSV can never point outside ``root``.

    The check is lexical, so a dataset root (or a folder inside it) that is a symlink still works; a URL root
    (``gs://bucket/data``) is joined with ``/``, and a URL as the relative path is refused as absolute.
    """
    root = os.fspath(root)
    if not relative:
        raise ValueError(f"{where_}: empty path")
    if is_url(relative):
        raise ValueError(
            f"{where_}: path {relative!r} is absolute (a URL); it must be relative to the dataset root {root!r}"
        )
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise ValueError(f"{where_}: path {relative!r} is absolute; it must be relative to the dataset root {root!r}")
    parts = re.split(r"[/\\]", relative)
    if ".." in parts:
        raise ValueError(f"{where_}: path {relative!r} escapes the dataset root {root!r} ('..' is not allowed)")
    return join(root, *[p for p in parts if p not in ("", ".")])


def labels_from_rows(
    path, rows: Sequence[tuple[int, str]], *, classes: Sequence[str] | None = None, num_classes: int | None = None
) -> tuple[np.ndarray, list[str] | None, int]:
    """``(row number, label text)`` pairs → ``(int32 labels, classes, num_classes)``, one rule for every modality.

    With ``classes``: each label must be one of them (its index). With ``num_classes`` only: integer labels in
    ``0..num_classes - 1``. With neither (the train split): if every label is an integer they are used as given
    (``num_classes = max + 1``, ``classes`` None); otherwise the sorted distinct names become ``classes``. A label
    like ``-1`` is refused rather than taken as a class name (it is almost always a "no label" marker).
    """
    path = os.fspath(path)
    for number, text in rows:
        if not text:
            raise ValueError(f"{where(path, number)}: empty label (expected an integer >= 0 or a class name)")
        if _NEGATIVE_INT.match(text) and (classes is None or text not in classes):
            raise ValueError(
                f"{where(path, number)}: label {text!r} is negative; expected an integer >= 0 or a class name"
            )
    if classes is None and num_classes is None:
        if all(_INT.match(text) for _, text in rows):
            labels = [int(text) for _, text in rows]
            return np.asarray(labels, np.int32), None, (max(labels) + 1 if labels else 0)
        classes = sorted({text for _, text in rows})
    if classes is not None:
        classes = [str(c) for c in classes]
        lookup = {c: i for i, c in enumerate(classes)}
        labels = []
        for number, text in rows:
            if text not in lookup:
                shown = ", ".join(repr(c) for c in classes[:10]) + (", ..." if len(classes) > 10 else "")
                raise ValueError(
                    f"{where(path, number)}: unknown label {text!r} (not one of the {len(classes)} classes: {shown})"
                )
            labels.append(lookup[text])
        return np.asarray(labels, np.int32), classes, len(classes)
    labels = []
    for number, text in rows:
        if not _INT.match(text):
            raise ValueError(
                f"{where(path, number)}: label {text!r}: expected an integer in 0..{num_classes - 1} (the train "
                "split's labels are integers)"
            )
        label = int(text)
        if label >= num_classes:
            raise ValueError(f"{where(path, number)}: label {label} is out of range (expected 0..{num_classes - 1})")
        labels.append(label)
    return np.asarray(labels, np.int32), None, int(num_classes)


class PathLabels(NamedTuple):
    """A ``path,label[,split]`` CSV read by :func:`read_path_labels`: one entry per kept row, in the CSV's order."""

    paths: list[str]  # resolved inside the dataset root
    labels: np.ndarray  # int32
    classes: list[str] | None  # the class names of name labels (None: integer labels)
    num_classes: int


def path_label_rows(path, split: str | None = None) -> list[tuple[int, dict]]:
    """The rows of a ``path,label[,split]`` CSV (header required, extra columns ignored): those of ``split`` when
    it is given and the CSV has a ``split`` column, else every row. No row at all is an error."""
    path = os.fspath(path)
    rows, splits, read = [], set(), 0
    for number, row in read_csv(path, ("path", "label")):
        read += 1
        if "split" in row:
            splits.add(row["split"])
            if split is not None and row["split"] != split:
                continue
        rows.append((number, row))
    if not read:
        raise ValueError(f"CSV file {path!r} has a header but no rows")
    if not rows:
        found = f"; its split column holds {sorted(splits)}" if splits else ""
        raise ValueError(f"CSV file {path!r}: no rows for split {split!r}{found}")
    return rows


def path_label_classes(path, split: str | None = None) -> tuple[list[str] | None, int]:
    """``(classes, num_classes)`` of a ``path,label[,split]`` CSV's ``split``: what the other splits must share."""
    path = os.fspath(path)
    _, classes, num_classes = labels_from_rows(path, [(n, row["label"]) for n, row in path_label_rows(path, split)])
    return classes, num_classes


def read_path_labels(
    path,
    root,
    *,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> PathLabels:
    """The ``path,label[,split]`` CSV of every modality's own-files source (audio, video and image folders).

    Rows as :func:`path_label_rows`; paths relative to ``root`` and kept inside it (:func:`resolve_inside`); labels
    by :func:`labels_from_rows` (pass the train split's ``classes`` / ``num_classes`` to the other splits).
    """
    path = os.fspath(path)
    rows = path_label_rows(path, split)
    paths = [resolve_inside(root, row["path"], where(path, number)) for number, row in rows]
    labels, classes, num_classes = labels_from_rows(
        path, [(number, row["label"]) for number, row in rows], classes=classes, num_classes=num_classes
    )
    return PathLabels(paths, np.asarray(labels, np.int32), classes, int(num_classes))


# --------------------------------------------------------------------------------- files: local paths and URLs

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
EPATH_SCHEMES = ("gs", "s3", "az", "hf")
"""The URL schemes ``etils.epath`` opens itself; any other URL scheme is handed to fsspec directly."""


def url_scheme(path) -> str | None:
    """``"gs"`` for ``"gs://bucket/x"``; None for a local path."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    match = _URL.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_url(path) -> bool:
    """True for ``scheme://...`` (``gs://``, ``memory://``, ``file://``, ...), False for a local path."""
    return url_scheme(path) is not None


def is_absolute(path) -> bool:
    """A URL or an absolute local path: a config path used as given rather than joined onto ``data_dir``."""
    return is_url(path) or os.path.isabs(os.fspath(path))


def absolute(path) -> str:
    """``os.path.abspath`` for a local path; a URL unchanged (``abspath`` would turn ``gs://b`` into ``/cwd/gs:/b``)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def join(root, *parts) -> str:
    """``os.path.join`` for a local ``root``; for a URL, the parts appended with ``/`` (a URL part replaces it)."""
    root = os.fspath(root)
    if not is_url(root):
        return os.path.join(root, *parts)
    out = root
    for part in map(os.fspath, parts):
        if is_url(part):
            out = part
        elif part:
            out = (out if out.endswith("/") else out + "/") + part.lstrip("/")
    return out


class _FsspecPath:
    """The few ``epath.Path`` calls the readers make, for a URL ``etils.epath`` has no backend for (``memory://``,
    ``http(s)://``, any other fsspec protocol)."""

    def __init__(self, url: str):
        import fsspec  # a dependency of etils[epath]; imported only when a URL is read

        self._fs, self._path = fsspec.core.url_to_fs(url)

    def is_file(self) -> bool:
        return self._fs.isfile(self._path)

    def is_dir(self) -> bool:
        return self._fs.isdir(self._path)

    def open(self, mode: str = "rb"):
        from fsspec.implementations.memory import MemoryFile

        f = self._fs.open(self._path, mode)
        if isinstance(f, MemoryFile) and "r" in mode:
            # memory:// hands every reader of a path the same file object ("each path should only be active once
            # at any moment"), so Grain's threads would share one read position: each reader gets its own.
            return io.BytesIO(f.getbuffer())
        return f

    def entries(self) -> tuple[list[str], list[str]]:
        dirs, files = [], []
        for entry in self._fs.ls(self._path, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            (dirs if entry["type"] == "directory" else files).append(name)
        return dirs, files


def _remote(path: str, call):
    """``call(p)`` on the path object of the URL ``path``: ``etils.epath.Path`` for the schemes it knows, else
    :class:`_FsspecPath`. A missing filesystem package becomes an ImportError naming the URL and the install."""
    try:
        if url_scheme(path) in EPATH_SCHEMES:
            from etils import epath

            return call(epath.Path(path))
        return call(_FsspecPath(path))
    except ImportError as e:
        hint = "pip install gcsfs (or bridle_jax[tpu])" if url_scheme(path) in ("gs", "gcs") else "install its package"
        raise ImportError(f"{path!r}: no filesystem for {url_scheme(path)}:// is installed ({e}); {hint}") from e


def is_file(path) -> bool:
    """``os.path.isfile`` for any path or URL."""
    path = os.fspath(path)
    return os.path.isfile(path) if not is_url(path) else _remote(path, lambda p: p.is_file())


def is_dir(path) -> bool:
    """``os.path.isdir`` for any path or URL (an object-store "folder" is a prefix that holds objects)."""
    path = os.fspath(path)
    return os.path.isdir(path) if not is_url(path) else _remote(path, lambda p: p.is_dir())


def _epath_entries(p) -> tuple[list[str], list[str]]:
    dirs, files = [], []
    for child in p.iterdir():  # one listing; gcsfs answers each is_dir from that listing's cache
        (dirs if child.is_dir() else files).append(child.name)
    return dirs, files


def list_dir(path) -> tuple[list[str], list[str]]:
    """``(sub-folder names, other entry names)`` of the folder ``path``, unsorted (symlinks followed, as
    ``os.scandir``'s ``is_dir``); FileNotFoundError / NotADirectoryError when it is not a folder."""
    path = os.fspath(path)
    if not is_url(path):
        dirs, files = [], []
        with os.scandir(path) as entries:
            for entry in entries:
                (dirs if entry.is_dir() else files).append(entry.name)
        return dirs, files
    return _remote(path, lambda p: p.entries() if isinstance(p, _FsspecPath) else _epath_entries(p))


def walk(top) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, followlinks=True)`` for any path or URL: ``(folder, sub-folder names, file names)``, top-down,
    so removing names from the yielded sub-folder list prunes them. URL folders are joined onto ``top``."""
    top = os.fspath(top)
    if not is_url(top):
        yield from os.walk(top, followlinks=True)
        return
    pending = [top]
    while pending:
        folder = pending.pop()
        dirs, files = list_dir(folder)
        yield folder, dirs, files
        pending.extend(join(folder, d) for d in reversed(dirs))


def existing_files(paths: Iterable[str]) -> set[str]:
    """The members of ``paths`` that are files: one ``isfile`` each on local disk; for URLs one listing per folder
    instead of one request per path (a Kinetics CSV names 240k clips)."""
    found, by_folder = set(), {}
    for path in paths:
        if not is_url(path):
            if os.path.isfile(path):
                found.add(path)
            continue
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    for folder, names in by_folder.items():
        try:
            files = set(list_dir(folder)[1])
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.update(f"{folder}/{name}" for name in names & files)
    return found


def open_binary(path):
    """``open(path, "rb")`` for any path or URL (a remote file is streamed: fsspec reads it in large blocks).

    A missing remote file is a FileNotFoundError naming the URL, whatever the backend raised.
    """
    path = os.fspath(path)
    if not is_url(path):
        return open(path, "rb")  # the caller closes it
    try:
        return _remote(path, lambda p: p.open("rb"))
    except (FileNotFoundError, ImportError):
        raise
    except Exception as e:  # e.g. tf.io.gfile's NotFoundError, which is no OSError
        if not is_file(path):
            raise FileNotFoundError(f"{path!r}: no such file") from e
        raise OSError(f"{path!r}: cannot open ({type(e).__name__}: {e})") from e


def open_text(path):
    """A CSV's text for any path or URL: UTF-8 with an optional byte-order mark, line ends left to ``csv``."""
    path = os.fspath(path)
    if not is_url(path):
        return open(path, newline="", encoding="utf-8-sig")  # the caller closes it
    return io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="")
