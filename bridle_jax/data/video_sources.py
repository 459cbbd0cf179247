"""Random-access video sources for Grain, and the embedded moving-digits demo writer.

Sources yield ``{"path": str, "label": np.int32}`` only: decoding happens in the pipeline's map, so a process
decodes only the clips it owns and only the frames it samples. Sources are built from CSV annotation files:

* :class:`Kinetics400Source` reads the official Kinetics-400 CSV (``label,youtube_id,time_start,time_end,split``)
  and finds each clip as ``root/{youtube_id}_{time_start:06d}_{time_end:06d}.{mp4,webm,mkv,avi}`` — a **flat**
  folder per split, the naming of the common K400 downloaders (cvdfoundation/kinetics-dataset gives
  ``k400/annotations/{train,val,test}.csv`` and ``k400/{train,val,test}/*.mp4``; pass ``root=k400/train``).
* :class:`FolderCsvSource` reads a generic ``path,label[,split]`` CSV, paths relative to ``root``, labels integers or
  class names.

Missing clips are counted and reported at construction ("N of M clips present, K missing"), never fatal; a source
with no clip present at all is an error. CSVs are read by the reader every modality shares (``csv_files``: BOM, any
line ending, quoted commas): a malformed row (wrong field count, bad integer, unknown label, a path that leaves the
root) raises ValueError naming the CSV file and its row, since annotation files are small and fixable and silently
dropping rows would change the label set or the split without anyone noticing.

Security: CSV paths are data, so they must stay inside the root — absolute paths and ``..`` components are rejected
(checked lexically, so a dataset root that is itself a symlink still works). Nothing is unpickled or executed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import uuid

import numpy as np
from PIL import Image

from bridle_jax.data import csv_files, video
from bridle_jax.validation import is_int

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")
K400_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]+$")

MOVING_DIGITS_CSV = "clips.csv"
MOVING_DIGITS_MANIFEST = "complete.json"
MOVING_DIGITS_VERSION = 2
MOVING_DIGITS_TEST_FRACTION = 0.2


# ------------------------------------------------------------------------------------------------- reporting


def _report(kind: str, csv_path: str, present: int, total: int, examples: list[str]) -> str:
    missing = total - present
    message = f"{kind} {csv_path}: {present} of {total} clips present, {missing} missing"
    if missing:
        logger.warning("%s (e.g. %s)", message, ", ".join(examples[:3]))
    else:
        logger.info("%s", message)
    if present == 0:
        raise FileNotFoundError(f"{message}: no clip of this CSV exists (looked for e.g. {', '.join(examples[:3])})")
    return message


class _PathLabelSource:
    """Shared random access over (path, label) arrays."""

    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"path": self.paths[index], "label": np.int32(self.labels[index])}


# ---------------------------------------------------------------------------------------------------- Kinetics


def k400_clip_stem(youtube_id: str, time_start: int, time_end: int) -> str:
    """The downloaders' clip name without extension: ``{youtube_id}_{time_start:06d}_{time_end:06d}``."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def read_k400_rows(csv_path) -> list[tuple[int, str, str, int, int]]:
    """Parsed rows ``(line, label, youtube_id, time_start, time_end)`` of an official Kinetics CSV."""
    csv_path = os.fspath(csv_path)
    rows = []
    for line, row in csv_files.read_csv(csv_path, K400_COLUMNS):
        where = csv_files.where(csv_path, line)
        if not row["label"]:
            raise ValueError(f"{where}: empty label")
        if not _YOUTUBE_ID.match(row["youtube_id"]):
            raise ValueError(f"{where}: youtube_id must match [A-Za-z0-9_-]+, got {row['youtube_id']!r}")
        start = csv_files.parse_int(row["time_start"], where, "time_start")
        end = csv_files.parse_int(row["time_end"], where, "time_end")
        rows.append((line, row["label"], row["youtube_id"], start, end))
    return rows


def k400_classes(csv_path) -> tuple[str, ...]:
    """Sorted class names of a Kinetics CSV (use the train CSV's for every split so indices agree)."""
    return tuple(sorted({label for _, label, *_ in read_k400_rows(csv_path)}))


class Kinetics400Source(_PathLabelSource):
    """Kinetics-400 clips of one split: the official CSV plus a flat folder ``root`` of downloaded clips.

    Labels are indices into ``classes`` (default: this CSV's sorted class names; pass the train CSV's
    :func:`k400_classes` for val/test so indices agree). A label outside ``classes`` is a malformed row. Clips not on
    disk are left out and counted (``num_missing``, ``report``).
    """

    def __init__(self, root, csv_path, classes: tuple[str, ...] | None = None, extensions=VIDEO_EXTENSIONS):
        root, csv_path = csv_files.absolute(root), os.fspath(csv_path)
        if not csv_files.is_dir(root):
            raise FileNotFoundError(f"Kinetics-400 clip folder {root} does not exist (expected root/<youtube_id>_...)")
        rows = read_k400_rows(csv_path)
        self.classes = tuple(classes) if classes is not None else tuple(sorted({r[1] for r in rows}))
        index = {name: i for i, name in enumerate(self.classes)}
        on_disk: dict[str, str] = {}
        rank = {ext: i for i, ext in enumerate(extensions)}
        # One listing (of a local folder or a bucket prefix) instead of len(extensions) stat calls per row.
        for name in csv_files.list_dir(root)[1]:
            stem, ext = os.path.splitext(name)
            if ext.lower() in rank and (stem not in on_disk or rank[ext.lower()] < rank[on_disk[stem][1]]):
                on_disk[stem] = (name, ext.lower())
        paths, labels, missing = [], [], []
        for line, label, youtube_id, start, end in rows:
            if label not in index:
                raise ValueError(
                    f"{csv_files.where(csv_path, line)}: label {label!r} is not one of the {len(index)} classes"
                )
            stem = k400_clip_stem(youtube_id, start, end)
            if stem in on_disk:
                paths.append(csv_files.join(root, on_disk[stem][0]))
                labels.append(index[label])
            else:
                missing.append(stem + extensions[0])
        self.root, self.csv_path = root, csv_path
        self.paths, self.labels = paths, np.asarray(labels, np.int32)
        self.num_rows, self.num_missing = len(rows), len(missing)
        self.report = _report("Kinetics-400", csv_path, len(paths), len(rows), missing)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"Kinetics400Source({self.csv_path!r}, len={len(self)}, missing={self.num_missing})"


# ------------------------------------------------------------------------------------------------- generic CSV


def folder_classes(csv_path, split: str | None = "train") -> tuple[list[str] | None, int]:
    """``(classes, num_classes)`` of a ``path,label[,split]`` CSV's ``split``: what the other splits must share."""
    return csv_files.path_label_classes(csv_path, split)


class FolderCsvSource(_PathLabelSource):
    """Clips listed in a ``path,label[,split]`` CSV (``csv_files.read_path_labels``, the reader of the audio and image
    folder CSVs too); paths relative to ``root``.

    Labels follow ``csv_files.labels_from_rows``, the rule of every modality: integers ``>= 0`` as given, else the
    sorted class names (``classes``). Pass the train split's ``classes`` / ``num_classes`` (:func:`folder_classes`)
    when building another split so every split shares one mapping. With ``split`` given and a ``split`` column
    present, only that split's rows are kept (one CSV can hold every split); without a ``split`` column every row is
    used. The mapping is taken from the rows, before missing clips are left out, so it never depends on which clips
    happen to be on disk.
    """

    def __init__(
        self,
        root,
        csv_path,
        split: str | None = None,
        *,
        classes: tuple[str, ...] | list[str] | None = None,
        num_classes: int | None = None,
    ):
        root, csv_path = csv_files.absolute(root), os.fspath(csv_path)
        if not csv_files.is_dir(root):
            raise FileNotFoundError(f"dataset root {root} does not exist")
        table = csv_files.read_path_labels(csv_path, root, split=split, classes=classes, num_classes=num_classes)
        self.classes, self._num_classes = table.classes, table.num_classes
        paths, labels, missing = [], [], []
        present = csv_files.existing_files(table.paths)  # URLs: one listing per folder, not a request per row
        for path, label in zip(table.paths, table.labels):
            if path in present:
                paths.append(path)
                labels.append(label)
            else:
                missing.append(path)
        self.root, self.csv_path, self.split = root, csv_path, split
        self.paths, self.labels = paths, np.asarray(labels, np.int32)
        self.num_rows, self.num_missing = len(table.paths), len(missing)
        self.report = _report("Video CSV", csv_path, len(paths), len(table.paths), missing)

    @property
    def num_classes(self) -> int:
        return int(self._num_classes)

    def __repr__(self) -> str:
        return f"FolderCsvSource({self.csv_path!r}, split={self.split!r}, len={len(self)}, missing={self.num_missing})"


# -------------------------------------------------------------------------------------- embedded moving digits


def _stratified_test_mask(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    is_test = np.zeros(len(labels), bool)
    for c in range(10):  # fixed class order: the rng stream is consumed identically every time
        members = np.flatnonzero(labels == c)
        is_test[rng.permutation(members)[: round(MOVING_DIGITS_TEST_FRACTION * len(members))]] = True
    return is_test


def _trajectory(rng: np.random.Generator, num_frames: int, room: int) -> np.ndarray:
    """Integer top-left positions [T, 2] of a constant-speed path that bounces off the walls (0..room)."""
    pos = rng.uniform(0, room, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    vel = rng.uniform(1.0, 2.5) * np.array([np.sin(angle), np.cos(angle)])
    out = np.empty((num_frames, 2), np.int64)
    for t in range(num_frames):
        out[t] = np.rint(pos)
        pos = pos + vel
        for k in range(2):  # reflect: the path stays smooth, only the velocity's sign flips
            if pos[k] < 0:
                pos[k], vel[k] = -pos[k], -vel[k]
            elif pos[k] > room:
                pos[k], vel[k] = 2 * room - pos[k], -vel[k]
    return np.clip(out, 0, room)


def render_moving_digit(
    digit: np.ndarray, rng: np.random.Generator, num_frames: int, size: int, distractor: bool
) -> np.ndarray:
    """One clip uint8 [T, size, size, 3]: an 8x8 digit (0..16) upsampled to 55-75% of the frame side (18-24 px at
    32), coloured, bouncing around. Large enough that the digit's shape spans several patches of the demo's tubelets
    and survives the multi-scale crop."""
    side = int(rng.integers(int(0.55 * size), int(0.75 * size) + 1))
    glyph = Image.fromarray(np.round(digit * (255.0 / 16.0)).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    colour = rng.uniform(0.6, 1.0, size=3)
    sprite = np.asarray(glyph, np.float32)[..., None] * colour
    clip = np.zeros((num_frames, size, size, 3), np.float32)
    for t, (y, x) in enumerate(_trajectory(rng, num_frames, size - side)):
        clip[t, y : y + side, x : x + side] = np.maximum(clip[t, y : y + side, x : x + side], sprite)
    if distractor:  # a small grey square on its own path: motion that carries no label
        for t, (y, x) in enumerate(_trajectory(rng, num_frames, size - 3)):
            clip[t, y : y + 3, x : x + 3] = np.maximum(clip[t, y : y + 3, x : x + 3], 160.0)
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def _moving_digits_params(num_clips, num_frames, size, fps, seed, distractor) -> dict:
    for name, value, low in (
        ("num_clips", num_clips, 10),
        ("num_frames", num_frames, 1),
        ("size", size, 18),
        ("fps", fps, 1),
    ):
        if not is_int(value) or value < low:
            raise ValueError(f"write_moving_digits: {name} must be an int >= {low}, got {value!r}")
    if size % 2:
        raise ValueError(f"write_moving_digits: size must be even (yuv420p), got {size}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"write_moving_digits: seed must be a non-negative int, got {seed!r}")
    return {
        "version": MOVING_DIGITS_VERSION,
        "num_clips": int(num_clips),
        "num_frames": int(num_frames),
        "size": int(size),
        "fps": int(fps),
        "seed": int(seed),
        "distractor": bool(distractor),
    }


def moving_digits_complete(root) -> dict | None:
    """The manifest of a finished moving-digits folder, or None if ``root`` is not one."""
    try:
        with open(os.path.join(os.fspath(root), MOVING_DIGITS_MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def write_moving_digits(
    root,
    *,
    num_clips: int = 600,
    num_frames: int = 16,
    size: int = 32,
    fps: int = 8,
    seed: int = 0,
    distractor: bool = False,
) -> str:
    """Renders the moving-digits demo into ``root`` (atomically) and returns the CSV path.

    Each clip shows one of scikit-learn's bundled 8x8 handwritten digits (upsampled to 55-75% of the frame side, random
    colour)
    moving along a straight path that bounces off the walls of a ``size`` x ``size`` canvas; the label is the digit
    class (balanced). ``distractor`` adds a moving grey square. Clips are real mp4 files (h264, else mpeg4) at
    ``root/clips/{i:05d}.mp4``, listed in ``root/clips.csv`` as ``path,label,split`` (the generic
    :class:`FolderCsvSource` form). The split is stratified ~80/20 ("train"/"test") and test clips only use digit
    images of the digits demo's test split, so no handwritten sample appears in both.

    Everything depends only on the arguments (a fixed ``seed`` gives identical frames). The folder is written as a
    temporary sibling and renamed into place with a manifest; an existing complete folder with the same parameters
    is reused, so two processes racing to create it both end up reading one complete copy.
    """
    if csv_files.is_url(root):
        raise ValueError(
            f"write_moving_digits: {os.fspath(root)!r} is a URL; the demo clips are written to local disk only"
        )
    root = os.path.abspath(os.fspath(root))
    params = _moving_digits_params(num_clips, num_frames, size, fps, seed, distractor)
    csv_path = os.path.join(root, MOVING_DIGITS_CSV)
    existing = moving_digits_complete(root)
    if existing is not None:
        if existing != params:
            raise ValueError(f"{root} holds moving digits made with {existing}, not the requested {params}")
        return csv_path
    if os.path.exists(root):
        if moving_digits_complete(root) == params:  # another process renamed its copy into place meanwhile
            return csv_path
        raise FileExistsError(f"{root} exists but is not a complete moving-digits folder; remove it to regenerate")

    from sklearn.datasets import load_digits  # slow import, needed only here

    from bridle_jax.data.sources import digits_split_indices

    digits = load_digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, MOVING_DIGITS_VERSION]))
    labels = rng.permutation(np.arange(num_clips) % 10)
    is_test = _stratified_test_mask(labels, rng)
    pools = {
        split: [idx[digits.target[idx] == c] for c in range(10)]
        for split in ("train", "test")
        for idx in [digits_split_indices(digits.target, split)]
    }

    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.join(tmp, "clips"))
        rows = []
        for i, (label, test) in enumerate(zip(labels.tolist(), is_test.tolist())):
            split = "test" if test else "train"
            image = digits.images[rng.choice(pools[split][label])]
            clip = render_moving_digit(image, rng, num_frames, size, distractor)
            relpath = f"clips/{i:05d}.mp4"
            video.write_video(os.path.join(tmp, relpath), clip, fps=fps)
            rows.append((relpath, label, split))
        with open(os.path.join(tmp, MOVING_DIGITS_CSV), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("path", "label", "split"))
            writer.writerows(rows)
        with open(os.path.join(tmp, MOVING_DIGITS_MANIFEST), "w", encoding="utf-8") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)
        except OSError:
            if moving_digits_complete(root) != params:  # lost a race to a different request, or a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return csv_path
