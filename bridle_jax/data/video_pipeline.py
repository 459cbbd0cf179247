"""Video input pipelines (Kinetics-400, any ``path,label`` CSV, the embedded moving-digits demo) for Grain.

Records are ``{"input": float32 [T, S, S, 3], "length": int32, "label": int32}``: T = ``num_frames`` frames taken
``sampling_rate`` apart, time first, ImageNet-normalised; ``length`` is the number of real frames (== T unless
``short_clip="pad"`` padded a short clip with zeros).

Train stream, in order, and why:
  source → shuffle(seed) → repeat (reshuffled per epoch) → decode the sampled frames (random start; an unreadable
  clip is replaced by the next readable record) → multi-scale crop → flip → normalise → pad → [p::P] → batch
The process shard comes *after* augmentation and batching and every random draw is keyed by the record's global
position, so the process blocks of a global batch are exactly the single-process global batch, in its row order;
MapDataset is lazy, so no process decodes a
clip it does not own. Eval: centre sampling → resize the short side to ``eval_short_side`` → centre crop → normalise.

``config.data`` fields (defaults in :func:`default_data_config`):
  name            "kinetics400" | "video_folder" | "moving_digits" (see ``DATASETS`` for each eval split)
  data_dir        kinetics400: the downloaders' ``k400/`` folder (``annotations/{train,val}.csv``,
                  ``{train,val}/<youtube_id>_<start:06d>_<end:06d>.mp4``); video_folder: the CSV paths' root;
                  moving_digits: unset = generated into ``$BRIDLE_JAX_CACHE`` (default ``~/.cache/bridle_jax``)
                  ``/moving_digits-v1`` on first use
  train_csv, eval_csv            CSV paths, relative to data_dir (or absolute). Defaults: kinetics400
                  ``annotations/train.csv`` / ``annotations/val.csv``; moving_digits ``clips.csv``; video_folder:
                  required. A CSV with a ``split`` column is filtered to the requested split ("train" / "test").
  train_clip_dir, eval_clip_dir  clip folders relative to data_dir. Defaults: kinetics400 ``train`` / ``val``;
                  others: data_dir itself.
  num_frames, sampling_rate      16 frames, 4 apart (VideoMAE 16x4)
  image_size      output side S (224)
  crop_scales, max_distort       GroupMultiScaleCrop scales (1, .875, .75, .66) and pairing distance 1
  flip            random horizontal flip of the whole clip (VideoMAE's pretraining has none: False reproduces it)
  mean, std       ImageNet, on the [0, 1] scale
  short_clip      "loop" (wrap around, length == T) or "pad" (zeros, length < T) for clips shorter than the span
  eval_short_side short side before the eval centre crop; unset = image_size (VideoMAE/BRIDLE K400 eval: "224
                  short side"); image_size / 0.875 gives the image-style 256 → 224 protocol
  num_threads, prefetch_buffer_size, max_eval_examples, max_skipped (the ceiling of unreadable clips)

Unreadable clips (missing, corrupt, truncated, zero-frame) are skipped, not fatal: each *distinct* file is counted
once per process (:func:`skipped_count`), logged with why, and remembered so it is not decoded again; its position
gets the next readable record (deterministic, static shapes, resumable). Counting distinct files keeps the ceiling
meaningful over hundreds of epochs. More than ``max_skipped`` raises a RuntimeError. Malformed CSV rows raise at
construction (see ``video_sources``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grain
import ml_collections
import numpy as np

from bridle_jax.config import IMAGENET_MEAN, IMAGENET_STD
from bridle_jax.data import csv_files, image_pipeline, pipeline, video, video_sources
from bridle_jax.validation import MISSING, fail, get, is_int

logger = logging.getLogger(__name__)

# Dataset name -> the labelled held-out split the probe is evaluated on.
DATASETS = {"kinetics400": "val", "video_folder": "test", "moving_digits": "test"}

# The demo's data are part of its contract (probe accuracies are reported on them): fixed parameters and seed.
MOVING_DIGITS = {"num_clips": 600, "num_frames": 16, "size": 32, "fps": 8, "seed": 20240601}
CACHE_ENV = "BRIDLE_JAX_CACHE"
_K400 = {"train_csv": "annotations/train.csv", "eval_csv": "annotations/val.csv"}
_DEMO_CSV = video_sources.MOVING_DIGITS_CSV
_DEFAULTS = {  # per dataset: the CSVs and clip folders (relative to data_dir) when config.data leaves them unset
    "kinetics400": {**_K400, "train_clip_dir": "train", "eval_clip_dir": "val"},
    "video_folder": {"train_csv": None, "eval_csv": None, "train_clip_dir": "", "eval_clip_dir": ""},
    "moving_digits": {"train_csv": _DEMO_CSV, "eval_csv": _DEMO_CSV, "train_clip_dir": "", "eval_clip_dir": ""},
}


def default_data_config() -> ml_collections.ConfigDict:
    """Every ``config.data`` field this module reads, with defaults (Kinetics-400 at VideoMAE's 16x4, 224)."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        dict(  # noqa: C408 (keyword form reads like the config fields)
            name="kinetics400",
            data_dir=placeholder(str),
            train_csv=placeholder(str),
            eval_csv=placeholder(str),
            train_clip_dir=placeholder(str),
            eval_clip_dir=placeholder(str),
            num_frames=16,
            sampling_rate=4,
            image_size=224,
            crop_scales=video.VIDEOMAE_SCALES,
            max_distort=1,
            flip=False,  # VideoMAE/BRIDLE pretraining has no flip (SPEC 1.8)
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            short_clip="loop",
            eval_short_side=placeholder(int),
            num_threads=8,
            prefetch_buffer_size=4,
            worker_count=0,  # Grain worker processes for the train stream (0: threads only; pipeline.py)
            max_eval_examples=placeholder(int),
            max_skipped=100,
        )
    )


# ------------------------------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class VideoDataSpec:
    """``config.data`` read once and checked, with the dataset defaults filled in."""

    name: str
    data_dir: str | None
    train_csv: str | None
    eval_csv: str | None
    train_clip_dir: str
    eval_clip_dir: str
    num_frames: int
    sampling_rate: int
    image_size: int
    crop_scales: tuple[float, ...]
    max_distort: int
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    short_clip: str
    eval_short_side: int
    num_threads: int
    prefetch_buffer_size: int
    max_eval_examples: int | None
    max_skipped: int


_HINT = "see video_pipeline.default_data_config()"  # the hint of a missing field's error


def _int(data_config, field: str, minimum: int, optional: bool = False) -> int | None:
    value = get(data_config, "data." + field, None if optional else MISSING, hint=_HINT)
    if value is None and optional:
        return None
    if not is_int(value) or value < minimum:
        fail("data." + field, f"{'None or ' if optional else ''}an int >= {minimum}", value)
    return int(value)


def _str(data_config, field: str) -> str | None:
    value = get(data_config, "data." + field, None)
    if value is not None and (not isinstance(value, str) or not value):
        fail("data." + field, "None or a non-empty path string", value)
    return value


def data_spec(data_config) -> VideoDataSpec:
    """Validates ``config.data``; every error names ``config.data.<field>`` and what was expected."""
    name = get(data_config, "data.name", hint=_HINT)
    if name not in DATASETS:
        fail("data.name", f"one of {sorted(DATASETS)}", name)
    defaults = _DEFAULTS[name]
    paths = {f: _str(data_config, f) for f in ("data_dir", "train_csv", "eval_csv", "train_clip_dir", "eval_clip_dir")}
    if name in ("kinetics400", "video_folder") and paths["data_dir"] is None:
        fail("data.data_dir", f"the dataset folder for name={name!r}", None)
    for f in ("train_csv", "eval_csv", "train_clip_dir", "eval_clip_dir"):
        if paths[f] is None:
            paths[f] = defaults[f]
    for f in ("train_csv", "eval_csv"):
        if paths[f] is None:
            fail("data." + f, f"the path of a 'path,label[,split]' CSV (relative to data_dir) for name={name!r}", None)
    scales = get(data_config, "data.crop_scales", hint=_HINT)
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        fail("data.crop_scales", "a non-empty sequence of numbers in (0, 1]", scales)
    if not scales or not all(0 < s <= 1 for s in scales):
        fail("data.crop_scales", "a non-empty sequence of numbers in (0, 1]", scales)
    flip = get(data_config, "data.flip", hint=_HINT)
    if not isinstance(flip, (bool, np.bool_)):
        fail("data.flip", "a bool", flip)
    short_clip = get(data_config, "data.short_clip", hint=_HINT)
    if short_clip not in video.SHORT_CLIP_MODES:
        fail("data.short_clip", f"one of {video.SHORT_CLIP_MODES}", short_clip)
    image_size = _int(data_config, "image_size", 1)
    eval_short_side = _int(data_config, "eval_short_side", 1, optional=True)
    if eval_short_side is None:
        eval_short_side = image_size
    elif eval_short_side < image_size:
        fail("data.eval_short_side", f"None or an int >= config.data.image_size={image_size}", eval_short_side)
    return VideoDataSpec(
        name=name,
        data_dir=paths["data_dir"],
        train_csv=paths["train_csv"],
        eval_csv=paths["eval_csv"],
        train_clip_dir=paths["train_clip_dir"],
        eval_clip_dir=paths["eval_clip_dir"],
        num_frames=_int(data_config, "num_frames", 1),
        sampling_rate=_int(data_config, "sampling_rate", 1),
        image_size=image_size,
        crop_scales=scales,
        max_distort=_int(data_config, "max_distort", 0),
        flip=bool(flip),
        mean=image_pipeline.rgb_triple("mean", get(data_config, "data.mean", hint=_HINT), positive=False),
        std=image_pipeline.rgb_triple("std", get(data_config, "data.std", hint=_HINT), positive=True),
        short_clip=short_clip,
        eval_short_side=eval_short_side,
        num_threads=_int(data_config, "num_threads", 0),
        prefetch_buffer_size=_int(data_config, "prefetch_buffer_size", 0),
        max_eval_examples=_int(data_config, "max_eval_examples", 1, optional=True),
        max_skipped=_int(data_config, "max_skipped", 0),
    )


def validate_data_config(data_config) -> None:
    """Raises ValueError naming ``config.data.<field>`` for the first bad field; touches no file."""
    data_spec(data_config)


# ---------------------------------------------------------------------------------------------------- sources


def cache_dir(name: str) -> str:
    """Where embedded demo data are generated: ``$BRIDLE_JAX_CACHE/<name>-v1`` (default ``~/.cache/bridle_jax``)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "bridle_jax")
    return os.path.join(base, f"{name}-v{video_sources.MOVING_DIGITS_VERSION}")


def _under(root: str, path: str) -> str:
    """``path`` under ``root`` (a local folder or a URL); an absolute path or a URL is used as given."""
    return path if csv_files.is_absolute(path) else csv_files.join(root, path)


def make_source(spec: VideoDataSpec, split: str):
    """The random-access ``{"path", "label"}`` source of ``split`` ("train" or the dataset's eval split)."""
    eval_split = DATASETS[spec.name]
    if split not in ("train", eval_split):
        raise ValueError(f"config.data.name={spec.name!r} has splits 'train' and {eval_split!r}, got {split!r}")
    train = split == "train"
    root = spec.data_dir
    if spec.name == "moving_digits" and root is None:
        root = cache_dir("moving_digits")
        video_sources.write_moving_digits(root, **MOVING_DIGITS)
    if not csv_files.is_dir(root):
        raise FileNotFoundError(f"config.data.data_dir={root!r} is not a folder (dataset {spec.name!r})")
    csv_path = _under(root, spec.train_csv if train else spec.eval_csv)
    clip_root = _under(root, spec.train_clip_dir if train else spec.eval_clip_dir)
    if spec.name == "kinetics400":
        # Class indices always come from the train CSV, so every split agrees on them.
        classes = video_sources.k400_classes(_under(root, spec.train_csv))
        return video_sources.Kinetics400Source(clip_root, csv_path, classes=classes)
    # As for Kinetics (and audio_folder): the train split's label mapping, so integer or class-name labels agree.
    classes, num_classes = video_sources.folder_classes(_under(root, spec.train_csv), "train")
    return video_sources.FolderCsvSource(clip_root, csv_path, split=split, classes=classes, num_classes=num_classes)


# -------------------------------------------------------------------------------------------- skipped records


SKIPPED = pipeline.SkippedRecords("video record", "video records", logger, verb="skipped")


def skipped_count() -> int:
    """How many distinct unreadable video files this process has skipped (for the training loop's logs)."""
    return SKIPPED.count


class DecodeOrNext(grain.MapDataset):
    """Decodes the clip at each position; an unreadable clip is replaced by the next readable record.

    ``load(path, rng)`` returns uint8 frames; ``rng`` is keyed by (``seed``, position, attempt), so the result does
    not depend on threads, on which other positions were read, or on where an iterator was restored. At most
    ``window`` consecutive records are tried (the source's length: every distinct clip once).
    """

    def __init__(self, parent: grain.MapDataset, load, *, seed: int | None, window: int, max_skipped: int):
        super().__init__(parent)
        self._load, self._seed, self._window, self._max_skipped = load, seed, window, max_skipped

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"DecodeOrNext(window={self._window})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        size = len(self._parent)
        for attempt in range(self._window):
            record = self._parent[(index + attempt) % size]
            path = record["path"]
            if SKIPPED.known(path):
                continue
            rng = None if self._seed is None else np.random.default_rng([self._seed, index, attempt])
            try:
                frames = self._load(path, rng)
            except video.VideoDecodeError as e:
                SKIPPED.record(path, str(e), self._max_skipped)
                continue
            return {"input": frames, "label": record["label"]}
        raise RuntimeError(f"no readable video among {self._window} consecutive records from position {index}")


def _loader(spec: VideoDataSpec):
    def load(path: str, rng: np.random.Generator | None) -> np.ndarray:
        def select(n: int) -> np.ndarray:
            return video.sample_indices(n, spec.num_frames, spec.sampling_rate, rng, spec.short_clip)

        return video.read_sampled(path, select)

    return load


def eval_transforms(spec: VideoDataSpec) -> list:
    """Resize the short side, centre crop, normalise, pad (all deterministic)."""
    return [
        video.ResizeCenterCropClip(spec.image_size, spec.eval_short_side),
        video.NormalizeClip(spec.mean, spec.std),
        video.PadClip(spec.num_frames),
    ]


# ------------------------------------------------------------------------------------------------------ train


def train_source(data_config):
    """The train split's records (random access; its length is one epoch), reading none of them."""
    return make_source(data_spec(data_config), "train")


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
    """This process's infinite, reshuffled-per-epoch, augmented stream of batches.

    Batches are ``{"input": float32 [b, T, S, S, 3], "length": int32 [b], "label": int32 [b]}``; deterministic in
    ``seed`` whatever the thread count, and resumable through ``to_iter_dataset(...)``'s ``get_state/set_state``.
    ``augment`` (fine-tuning's ``config.augment``) changes nothing here: clips keep the multi-scale crop and the
    ``config.data.flip`` flip (no clip RandAugment or erasing: docs/method.md, the K400 FT row).
    """
    del augment  # the same stream for pretraining and fine-tuning
    spec = data_spec(data_config)
    pipeline.check_stream_args(local_batch_size, process_index, process_count)
    source = make_source(spec, "train") if source is None else source  # `source`: train_source(...) made already
    shuffle_seed, sample_seed, crop_seed, flip_seed = pipeline.train_seeds(seed, 4)  # shuffle, temporal, crop, flip

    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None, reseed_each_epoch=True)
    ds = DecodeOrNext(ds, _loader(spec), seed=sample_seed, window=len(source), max_skipped=spec.max_skipped)
    ds = ds.random_map(video.MultiScaleCrop(spec.image_size, spec.crop_scales, spec.max_distort), seed=crop_seed)
    if spec.flip:
        ds = ds.random_map(video.RandomClipFlip(0.5), seed=flip_seed)
    ds = ds.map(video.NormalizeClip(spec.mean, spec.std)).map(video.PadClip(spec.num_frames))
    # Process p takes batches p, p + P, ...: global batch i is the P consecutive local batches iP..iP+P-1, so the
    # global array (process blocks in order) holds exactly the rows of the one-process batch, in its order.
    return ds.batch(int(local_batch_size), drop_remainder=True)[process_index::process_count]


# ------------------------------------------------------------------------------------------------------- eval


def eval_size(data_config, split: str, max_examples: int | None = None) -> pipeline.EvalSize:
    """How many clips :func:`eval_batches` reads from ``split`` (the first ``min(len, cap)``), from the source's
    length: no clip is decoded."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples)
    return pipeline.count_eval(len(make_source(spec, split)), max_examples, spec.max_eval_examples)


def num_classes(data_config) -> int | None:
    """The class count of the train CSV (Kinetics-400: its class names; a ``path,label`` CSV: its class names, or
    max + 1 of integer labels, the rule of every modality's CSVs)."""
    return getattr(make_source(data_spec(data_config), "train"), "num_classes", None)


def eval_labels(data_config, split: str, max_examples: int | None = None) -> np.ndarray:
    """The labels of the first :func:`eval_size` clips of ``split``, from the CSV (nothing decoded). Where a clip
    is unreadable the streamed label is its replacement's (:func:`eval_batches`); these are the CSV's."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples)
    source = make_source(spec, split)
    n = pipeline.count_eval(len(source), max_examples, spec.max_eval_examples).examples
    return pipeline.first_labels(source, n).astype(np.int32)


def eval_batches(data_config, split: str, max_examples: int | None = None, batch_size: int = 256):
    """The eval-preprocessed ``split`` in its stored order, ``batch_size`` clips at a time: ``{"input": float32
    [b, T, S, S, 3], "length": int32 [b], "label": int32 [b]}`` (the last batch shorter).

    Capped at ``max_examples``, else ``config.data.max_eval_examples``. An unreadable clip is replaced by the next
    readable one in stored order (counted once in :func:`skipped_count`; more than ``max_skipped`` raise), and its
    label comes with it, so every batch holds exactly ``batch_size`` labelled clips and the split always yields
    ``N`` (as in :func:`eval_arrays`; the authors' loaders re-decode the clips at every evaluation too). One batch
    (b·T·S²·12 bytes: 32 Kinetics clips at 16x224² are 308 MB) plus the loader's prefetch buffer is held at a time.
    The source is listed (and checked) when this is called.
    """
    return _eval_reader(data_config, split, max_examples, batch_size)[1]


def _eval_reader(data_config, split: str, max_examples: int | None, batch_size: int):
    """(N, the batches of eval_batches)."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples, batch_size)
    source = make_source(spec, split)
    n = pipeline.count_eval(len(source), max_examples, spec.max_eval_examples).examples
    ds = DecodeOrNext(
        grain.MapDataset.source(source), _loader(spec), seed=None, window=len(source), max_skipped=spec.max_skipped
    )[:n]
    for t in eval_transforms(spec):
        ds = ds.map(t)
    read_options = grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch_buffer_size)
    # ordered, whatever the thread count
    return n, pipeline.batch_records(ds.to_iter_dataset(read_options), n, int(batch_size), np.int32)


def eval_arrays(data_config, split: str, max_examples: int | None = None) -> dict:
    """The eval-preprocessed ``split`` in its stored order: ``{"input", "length", "label"}`` NumPy arrays, the
    batches of :func:`eval_batches` joined.

    Capped at ``max_examples``, else ``config.data.max_eval_examples``. Held in memory (N·T·S²·12 bytes: 1,000
    Kinetics clips at 16x224² are 9.6 GB), so cap large splits, or stream them with :func:`eval_batches`.
    """
    n, batches = _eval_reader(data_config, split, max_examples, 32)
    spec = data_spec(data_config)
    held = n * spec.num_frames * spec.image_size**2 * 3 * 4
    if held > 8 * 2**30:
        gb = held / 2**30
        logger.warning("eval_arrays(%r) holds %.1f GB in memory; cap config.data.max_eval_examples", split, gb)
    if n == 0:  # an empty split: empty arrays of the record's shapes
        shape = (0, spec.num_frames, spec.image_size, spec.image_size, 3)
        empty = np.empty((0,), np.int32)
        return {"input": np.empty(shape, np.float32), "length": empty, "label": empty.copy()}
    return pipeline.join_batches(batches, n)


def to_uint8_clip(clip, where: str, value_range=None) -> np.ndarray:
    """A raw clip ``[n, H, W, C]`` (C in {1, 3}) → uint8 RGB; floats are 0..1 unless ``value_range`` states otherwise.

    The frames of a clip follow the rules of a batch of raw images (`image_pipeline.to_uint8_images`): the scale is
    never inferred from the frames, so one bright frame or clip never rescales the others."""
    try:
        return image_pipeline.to_uint8_images(clip, value_range)
    except ValueError as e:
        raise ValueError(f"{where}: {str(e).replace('images', 'frames')}") from None


def preprocess_eval(data_config, raw, value_range=None) -> dict:
    """Eval preprocessing of raw clips: ``{"input": float32 [B, T, S, S, 3], "length": int32 [B]}``.

    ``raw`` is a list of clips, each a video file path (str / PathLike; decoded here, errors raise
    VideoDecodeError) or frames ``[n, H, W, C]`` (uint8, or floats in [0, 1], or in the ``value_range=(low, high)``
    stated for every float clip of the call, e.g. ``(0, 255)``); or one array ``[B, n, H, W, C]``. Each clip gets
    the eval sampling (centre, ``num_frames`` x ``sampling_rate``) and geometry.
    """
    spec = data_spec(data_config)
    image_pipeline.check_value_range(value_range)
    if isinstance(raw, (str, os.PathLike)):
        raise ValueError("preprocess_eval: raw must be a list of clips (paths or frame arrays), not one path")  # noqa: TRY004
    if isinstance(raw, np.ndarray) and raw.ndim != 5:
        raise ValueError(f"preprocess_eval: an array of clips must be [B, frames, H, W, C], got shape {raw.shape}")
    clips = list(raw)
    if not clips:
        raise ValueError("preprocess_eval: raw holds no clips")
    load = _loader(spec)
    transforms = eval_transforms(spec)
    out = {
        "input": np.empty((len(clips), spec.num_frames, spec.image_size, spec.image_size, 3), np.float32),
        "length": np.empty((len(clips),), np.int32),
    }
    for i, clip in enumerate(clips):
        if isinstance(clip, (str, os.PathLike)):
            frames = load(os.fspath(clip), None)
        else:
            frames = to_uint8_clip(clip, f"preprocess_eval clip {i}", value_range)
            idx = video.sample_indices(frames.shape[0], spec.num_frames, spec.sampling_rate, None, spec.short_clip)
            frames = frames[idx]
        record = {"input": frames}
        for t in transforms:
            record = t.map(record)
        out["input"][i], out["length"][i] = record["input"], record["length"]
    return out
