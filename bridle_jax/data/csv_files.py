"""The one reader of annotation CSVs, for every modality (audio and video sources use it; README "Your own data").

One set of rules, so a CSV that one modality accepts the other accepts too:

- encoding ``utf-8-sig``: the byte-order mark spreadsheet exports put before the first column's name is dropped;
  undecodable bytes are a malformed row, not a crash;
- any line ending (LF, CRLF, CR) and quoted fields (``"a, b.mp4"``), parsed by the ``csv`` module (strict), with
  spaces after a delimiter and around a value ignored; blank lines are not rows;
- a header is required and must name every required column (extra columns are ignored); every row has the header's
  field count;
- labels (:func:`labels_from_rows`) are integers ``>= 0`` used as given, or class names mapped to the indices of
  their sorted set; pass the train split's ``classes`` / ``num_classes`` to the other splits so they share it;
- paths (:func:`resolve_inside`) are relative to the dataset root and may not leave it;
- every error names the file and the row (the line number an editor shows, the header being row 1), the field and
  what was expected. Metadata errors are systematic (a wrong file, a shifted column, a typo in a class name) and
  silently dropping rows would change the class balance or the splits, so they raise at construction.

Nothing is unpickled or executed.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Sequence

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
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation CSV file {path!r} not found (no such file)")
    with open(path, newline="", encoding="utf-8-sig") as f:
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

    The check is lexical, so a dataset root (or a folder inside it) that is a symlink still works.
    """
    root = os.fspath(root)
    if not relative:
        raise ValueError(f"{where_}: empty path")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        raise ValueError(f"{where_}: path {relative!r} is absolute; it must be relative to the dataset root {root!r}")
    parts = re.split(r"[/\\]", relative)
    if ".." in parts:
        raise ValueError(f"{where_}: path {relative!r} escapes the dataset root {root!r} ('..' is not allowed)")
    return os.path.join(root, *[p for p in parts if p not in ("", ".")])


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
