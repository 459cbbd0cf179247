"""Audio input pipelines: fixed-length 16 kHz waveforms for the on-device log-mel front-end (``fbank.log_mel``).

Implements the modality pipeline contract of :mod:`bridle_jax.data.pipeline`. Batches are
``{"input": float32 [b, S], "length": int32 [b], "label": int32 [b] | float32 [b, num_classes]}``: zero-padded
waveforms, the number of real samples of each, and the label (multi-hot for AudioSet). ``S`` is
``fbank.samples_for_frames(config.data.target_frames, spec)``, so a full clip gives exactly ``target_frames`` frames
and the front-end (run inside the jitted step) sees the same clip the authors' AudioMAE loader would.

Datasets (``config.data.name`` → its splits; the probe tests on the split in ``DATASETS``):
  sounds        the embedded demo: synthesised sound classes as real WAV files in the ESC-50 layout, generated at
                run time into ``$BRIDLE_JAX_CACHE/sounds-v1`` (default ``~/.cache/bridle_jax``) when ``data_dir``
                is unset; "train" = ``train_folds``, "test" = ``test_folds``
  esc50         ESC-50 under ``data_dir`` (``audio/``, ``meta/esc50.csv``); "train"/"test" from the folds
  audioset      official segments/class-index CSVs under ``data_dir``; "train"/"eval" clips in the folders
                ``audioset_train_audio_dir``/``audioset_eval_audio_dir`` (relative to ``data_dir``)
  audio_folder  ``path,label`` CSVs under ``data_dir``, one per split (``csv_files``: split → CSV; needs "train"
                and "test"); the class mapping comes from the train CSV

Order of the train stream:
  source (decode, unreadable → next readable) → shuffle(seed) → repeat (reshuffled per epoch)
  → roll_mag_aug (real samples only: the gain; with roll_shift a roll first) → crop_or_pad(S) → batch
  → [process_index::process_count]
MapDataset is lazy, so a process decodes only the records it owns, while each record's augmentation is keyed by its
global position: the process blocks of a global batch are exactly the single-process batch, in its row order.

Unreadable records (missing, corrupt, truncated, empty, NaN/Inf): one warning names the file and why; the file is
counted once per process (:func:`skipped_count`) and replaced by the next readable record in stored order (train)
or dropped (eval), so batches keep static shapes and the stream stays deterministic and resumable. Beyond
``config.data.max_skipped`` skipped files the pipeline raises ``RuntimeError``. Problems with the dataset as a whole
(missing ``data_dir`` or CSV, bad header, malformed row, unknown label, unknown split, nothing readable) raise at
once: see :mod:`bridle_jax.data.audio_sources`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from bridle_jax import fbank
from bridle_jax.data import audio, audio_sources, csv_files, pipeline, weighted_sampler
from bridle_jax.validation import fail, get, is_int

log = logging.getLogger(__name__)

DATASETS = {"sounds": "test", "esc50": "test", "audioset": "eval", "audio_folder": "test"}

# The demo set is part of the demo's contract (its probe accuracy is reported): fixed parameters and seed.
SOUNDS_VERSION = "sounds-v1"
SOUNDS_SEED = 20240601
SOUNDS_PARAMS = {"num_classes": 10, "clips_per_class": 40, "duration": 1.28, "sample_rate": 16000}


def default_data_config() -> ml_collections.ConfigDict:
    """Every ``config.data`` field the audio pipeline reads; defaults are the AudioSet BRIDLE recipe (SPEC §1.2)."""
    return ml_collections.ConfigDict(
        {
            "name": "audioset",
            "data_dir": ml_collections.config_dict.placeholder(str),
            # Front-end (fbank.FrontendSpec): the log-mel runs on device; the pipeline only needs the length S.
            "frontend": "bridle",  # "bridle" (AudioMAE/BRIDLE) or "beats"
            "sample_rate": 16000,
            "num_mel_bins": 128,
            "target_frames": 1024,  # 10.24 s; ESC-50 recipe 512
            "norm_mean": -4.4446096,  # AudioSet "new analytical stats"; ESC-50 -6.6268077
            "norm_std": 3.3216383,  # ESC-50 5.358466
            # On in every one of the authors' audio pretrain/finetune scripts. As their code runs it, it is only a
            # gain, waveform x (Beta(10, 10) + 0.5): the roll they meant is a no-op (shift drawn from len() of a
            # [1, N] tensor, always 0).
            "roll_mag_aug": True,
            # True: a real random circular roll before the gain (a deviation from the as-run recipe). None (the
            # default, so workdirs started before this field existed resume unchanged) or False: no roll.
            "roll_shift": ml_collections.config_dict.placeholder(bool),
            # ESC-50 and the sounds demo: 5-fold CV, train on 4 folds, test on the 5th.
            "train_folds": (1, 2, 3, 4),
            "test_folds": (5,),
            # AudioSet: paths relative to data_dir (absolute paths are used as given).
            "audioset_train_csv": "balanced_train_segments.csv",
            "audioset_eval_csv": "eval_segments.csv",
            "audioset_class_index_csv": "class_labels_indices.csv",
            "audioset_train_audio_dir": "balanced_train",
            "audioset_eval_audio_dir": "eval",
            # audio_folder: split -> "path,label" CSV relative to data_dir.
            "csv_files": ml_collections.ConfigDict({"train": "train.csv", "test": "test.csv"}),
            "num_threads": 8,
            "prefetch_buffer_size": 4,
            "worker_count": 0,  # Grain worker processes for the train stream (0: threads only; pipeline.py)
            "max_eval_examples": ml_collections.config_dict.placeholder(int),
            "max_skipped": 1000,  # unreadable files tolerated per process before the pipeline stops the run
        }
    )


# ------------------------------------------------------------------------------------------------- config spec


@dataclasses.dataclass(frozen=True)
class AudioDataSpec:
    """``config.data`` read once and checked, so every error names the config field and what was expected."""

    name: str
    data_dir: str | None
    frontend: fbank.FrontendSpec
    num_samples: int
    roll_mag_aug: bool
    roll_shift: bool
    train_folds: tuple[int, ...]
    test_folds: tuple[int, ...]
    audioset: dict
    csv_files: dict
    num_threads: int
    prefetch_buffer_size: int
    max_eval_examples: int | None
    max_skipped: int


_HINT = "see audio_pipeline.default_data_config()"  # the hint of a missing field's error


def _int(data_config, field: str, minimum: int) -> int:
    value = get(data_config, "data." + field, hint=_HINT)
    if not is_int(value) or value < minimum:
        fail("data." + field, f"an int >= {minimum}", value)
    return int(value)


def _folds(data_config, field: str) -> tuple[int, ...]:
    value = get(data_config, "data." + field, hint=_HINT)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        fail("data." + field, "a non-empty tuple of fold numbers >= 1", value)
    if not all(is_int(f) and f >= 1 for f in value):
        fail("data." + field, "a non-empty tuple of fold numbers >= 1", value)
    return tuple(int(f) for f in value)


def _nonempty_str(data_config, field: str) -> str:
    value = get(data_config, "data." + field, hint=_HINT)
    if not isinstance(value, str) or not value:
        fail("data." + field, "a non-empty path string", value)
    return value


def data_spec(data_config) -> AudioDataSpec:
    """Validates ``config.data`` (a ConfigDict or any object with these attributes) into an :class:`AudioDataSpec`."""
    name = get(data_config, "data.name", hint=_HINT)
    if name not in DATASETS:
        fail("data.name", f"one of {sorted(DATASETS)}", name)
    data_dir = get(data_config, "data.data_dir", hint=_HINT)
    if data_dir is not None and (not isinstance(data_dir, (str, os.PathLike)) or not os.fspath(data_dir)):
        fail("data.data_dir", "None or a non-empty path", data_dir)
    if data_dir is None and name != "sounds":
        fail(
            "data.data_dir", f"the folder holding {name!r} (only the 'sounds' demo is generated when it is unset)", None
        )
    spec = fbank.frontend_spec(data_config, hint=_HINT)
    try:
        num_samples = fbank.samples_for_frames(spec.target_frames, spec)
    except ValueError as e:
        fail("data.sample_rate", f"a rate that gives whole 25 ms / 10 ms frames ({e})", spec.sample_rate)
    roll = get(data_config, "data.roll_mag_aug", hint=_HINT)
    if not isinstance(roll, (bool, np.bool_)):
        fail("data.roll_mag_aug", "a bool", roll)
    # An older config (or config.json) without the field reads as None: no roll, the authors' as-run behaviour.
    shift = getattr(data_config, "roll_shift", None)
    if shift is not None and not isinstance(shift, (bool, np.bool_)):
        fail("data.roll_shift", "None or a bool (True: a random circular roll before the roll_mag_aug gain)", shift)
    if shift and not roll:
        fail("data.roll_shift", "None or False when config.data.roll_mag_aug is False (the roll is part of it)", shift)
    audioset, csv_files = {}, {}
    if name == "audioset":
        for field in ("train_csv", "eval_csv", "class_index_csv", "train_audio_dir", "eval_audio_dir"):
            audioset[field] = _nonempty_str(data_config, f"audioset_{field}")
    if name == "audio_folder":
        value = get(data_config, "data.csv_files", hint=_HINT)
        items = dict(value.items()) if hasattr(value, "items") else None
        if not items or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in items.items()):
            fail("data.csv_files", "a mapping split -> CSV path (relative to data_dir)", value)
        for split in ("train", DATASETS["audio_folder"]):
            if split not in items:
                fail("data.csv_files", f"a mapping that has the split {split!r}", value)
        csv_files = items
    max_eval = get(data_config, "data.max_eval_examples", hint=_HINT)
    if max_eval is not None and (not is_int(max_eval) or max_eval < 1):
        fail("data.max_eval_examples", "None or an int >= 1", max_eval)
    return AudioDataSpec(
        name=name,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        frontend=spec,
        num_samples=int(num_samples),
        roll_mag_aug=bool(roll),
        roll_shift=bool(shift),
        train_folds=_folds(data_config, "train_folds"),
        test_folds=_folds(data_config, "test_folds"),
        audioset=audioset,
        csv_files=csv_files,
        num_threads=_int(data_config, "num_threads", 0),
        prefetch_buffer_size=_int(data_config, "prefetch_buffer_size", 0),
        max_eval_examples=None if max_eval is None else int(max_eval),
        max_skipped=_int(data_config, "max_skipped", 0),
    )


def validate_data_config(data_config) -> None:
    """Raises ``ValueError`` naming ``config.data.<field>`` and what was expected."""
    data_spec(data_config)


def num_samples(data_config) -> int:
    """``S``, the fixed waveform length of every batch: the samples of ``target_frames`` 25 ms / 10 ms frames."""
    return data_spec(data_config).num_samples


# ---------------------------------------------------------------------------------------------------- sources


def cache_root() -> str:
    """Where generated demo data live: ``$BRIDLE_JAX_CACHE`` or ``~/.cache/bridle_jax``."""
    return os.environ.get("BRIDLE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bridle_jax")


def sounds_root(data_dir: str | None = None) -> str:
    """The demo set's folder (``data_dir`` or the cache), generated deterministically on first use."""
    root = data_dir if data_dir is not None else os.path.join(cache_root(), SOUNDS_VERSION)
    return audio_sources.write_synthetic_sounds(root, seed=SOUNDS_SEED, **SOUNDS_PARAMS)


def _under(data_dir: str, path: str) -> str:
    """``path`` under ``data_dir`` (a local folder or a URL); an absolute path or a URL is used as given."""
    return path if csv_files.is_absolute(path) else csv_files.join(data_dir, path)


def _splits(spec: AudioDataSpec) -> tuple[str, ...]:
    if spec.name == "audio_folder":
        return tuple(spec.csv_files)
    return ("train", DATASETS[spec.name])


def make_source(spec: AudioDataSpec, split: str):
    """The raw (decoding) source of ``split``; dataset-level problems raise here, with the field or file named."""
    if split not in _splits(spec):
        raise ValueError(f"config.data.name={spec.name!r} has splits {_splits(spec)}, got split {split!r}")
    if spec.data_dir is not None and not csv_files.is_dir(spec.data_dir):
        raise FileNotFoundError(f"config.data.data_dir={spec.data_dir!r} is not a directory")
    rate = spec.frontend.sample_rate
    if spec.name in ("sounds", "esc50"):
        root = sounds_root(spec.data_dir) if spec.name == "sounds" else spec.data_dir
        folds = spec.train_folds if split == "train" else spec.test_folds
        return audio_sources.ESC50Source(root, folds, sample_rate=rate)
    if spec.name == "audioset":
        a = spec.audioset
        return audio_sources.AudioSetSource(
            _under(spec.data_dir, a[f"{split}_audio_dir"]),
            _under(spec.data_dir, a[f"{split}_csv"]),
            _under(spec.data_dir, a["class_index_csv"]),
            sample_rate=rate,
        )
    train = audio_sources.FolderCsvSource(spec.data_dir, spec.csv_files["train"], sample_rate=rate)
    if split == "train":
        return train
    return audio_sources.FolderCsvSource(
        spec.data_dir,
        spec.csv_files[split],
        classes=train.classes,
        num_classes=train.num_classes,
        sample_rate=rate,
    )


# ----------------------------------------------------------------------------------------------- skip counter


SKIPPED = pipeline.SkippedRecords("audio record", "audio files", log)  # unreadable files, this process


def skipped_count() -> int:
    """Unreadable files skipped so far by this process (train and eval together), for the training loop's logs."""
    return SKIPPED.count


class ReadableSource(pipeline.ReadableSource):
    """:class:`pipeline.ReadableSource` over audio files: an undecodable clip is counted in ``SKIPPED``."""

    ERRORS = (audio.AudioDecodeError, OSError)

    def skipped(self) -> pipeline.SkippedRecords:
        return SKIPPED


# -------------------------------------------------------------------------------------------------- transforms


class RollMagAug(grain.transforms.RandomMap):
    """``audio.roll_mag_aug`` on the record's (real, unpadded) waveform; rng from Grain's ``random_map`` (seeded per
    record). ``roll_shift=False``: the gain only, as the authors' code runs it; True: a circular roll first."""

    def __init__(self, roll_shift: bool = False):
        self.roll_shift = bool(roll_shift)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return {**element, "waveform": audio.roll_mag_aug(element["waveform"], rng, roll=self.roll_shift)}

    def __repr__(self) -> str:
        return f"RollMagAug(roll_shift={self.roll_shift})"


class CropOrPad(grain.transforms.Map):
    """``{"waveform", "label", "path"}`` → the contract's ``{"input": [S], "length", "label"}`` (first S samples)."""

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)

    def map(self, element: dict) -> dict:
        padded, length = audio.crop_or_pad(element["waveform"], self.num_samples)
        return {"input": padded, "length": np.int32(length), "label": element["label"]}

    def __repr__(self) -> str:
        return f"CropOrPad(num_samples={self.num_samples})"


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
    """The infinite, shuffled, augmented train stream of this process, batched (drop_remainder).

    Deterministic in ``seed`` whatever the thread count; wrap with ``.to_iter_dataset(grain.ReadOptions(...))``,
    whose iterator's ``get_state``/``set_state`` resume bit-identically. ``augment`` (fine-tuning's
    ``config.augment``; None: pretraining's stream): with ``augment.weighted_sampler`` AST's class-balancing sampler
    (:mod:`bridle_jax.data.weighted_sampler`, ``augment.epoch_len`` draws per epoch, 0 = the split's size) takes the
    place of shuffle-and-repeat; its other fields are applied on device by the fine-tune step.
    """
    spec = data_spec(data_config)
    pipeline.check_stream_args(local_batch_size, process_index, process_count)
    source = make_source(spec, "train") if source is None else source  # `source`: train_source(...) made already
    if len(source) == 0:
        raise ValueError(f"config.data.name={spec.name!r}: the train split is empty")
    order_seed, aug_seed = pipeline.train_seeds(seed, 2)  # shuffle (or sampler) and augmentation

    ds = grain.MapDataset.source(ReadableSource(source, spec.max_skipped, replace=True))
    if augment is not None and augment.weighted_sampler:
        epoch_len = int(augment.epoch_len) or len(source)
        ds = weighted_sampler.WeightedSample(ds, weighted_sampler.sampler_weights(source), epoch_len, order_seed)
    else:
        ds = ds.shuffle(seed=order_seed).repeat(None, reseed_each_epoch=True)
    if spec.roll_mag_aug:
        ds = ds.random_map(RollMagAug(spec.roll_shift), seed=aug_seed)
    ds = ds.map(CropOrPad(spec.num_samples))
    # Process p takes batches p, p + P, ...: global batch i is the P consecutive local batches iP..iP+P-1, so the
    # global array (process blocks in order) holds exactly the rows of the one-process batch, in its order.
    return ds.batch(int(local_batch_size), drop_remainder=True)[process_index::process_count]


def num_classes(data_config) -> int | None:
    """The class count the train split's source declares (ESC-50 and the demo: max target + 1 over all rows;
    AudioSet: the class index CSV; audio_folder: the train CSV's class names or max + 1)."""
    return getattr(make_source(data_spec(data_config), "train"), "num_classes", None)


def eval_labels(data_config, split: str, max_examples: int | None = None) -> np.ndarray:
    """The labels of the first :func:`eval_size` clips of ``split``, from the CSVs (nothing decoded)."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples)
    source = make_source(spec, split)
    n = pipeline.count_eval(len(source), max_examples, spec.max_eval_examples).examples
    return pipeline.first_labels(source, n, source.label)


def eval_size(data_config, split: str, max_examples: int | None = None) -> pipeline.EvalSize:
    """How many clips :func:`eval_batches` reads from ``split`` (the first ``min(len, cap)``), from the source's
    length: no clip is decoded."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples)
    return pipeline.count_eval(len(make_source(spec, split)), max_examples, spec.max_eval_examples)


def eval_batches(data_config, split: str, max_examples: int | None = None, batch_size: int = 256):
    """The eval-preprocessed split (no augmentation) in stored order, ``batch_size`` clips at a time:
    ``{"input": float32 [b, S], "length": int32 [b], "label": int32 [b] | float32 [b, num_classes]}`` (the last
    batch shorter).

    Unreadable records are dropped (counted as skipped); the first ``max_examples`` (else
    ``config.data.max_eval_examples``) readable records are read. One batch (4·S bytes per clip) plus the loader's
    prefetch buffer is held at a time. The source is listed (and checked) when this is called.
    """
    return _eval_reader(data_config, split, max_examples, batch_size)[1]


def _eval_reader(data_config, split: str, max_examples: int | None, batch_size: int):
    """(N, the batches of eval_batches)."""
    spec = data_spec(data_config)
    pipeline.check_eval_args(max_examples, batch_size)
    source = make_source(spec, split)
    n = pipeline.count_eval(len(source), max_examples, spec.max_eval_examples).examples
    ds = grain.MapDataset.source(ReadableSource(source, spec.max_skipped, replace=False)).map(
        CropOrPad(spec.num_samples)
    )
    read_options = grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch_buffer_size)
    # ordered whatever the thread count; None (unreadable) records are dropped by Grain
    batches = pipeline.batch_records(ds.to_iter_dataset(read_options), n, int(batch_size))
    return n, pipeline.nonempty(batches, spec.name, split)


def eval_arrays(data_config, split: str, max_examples: int | None = None) -> dict:
    """The eval-preprocessed split (no augmentation) in stored order, as NumPy arrays: the batches of
    :func:`eval_batches` joined.

    ``{"input": float32 [N, S], "length": int32 [N], "label": int32 [N] | float32 [N, num_classes]}``. Unreadable
    records are dropped (counted as skipped); ``N`` is the first ``max_examples`` (else
    ``config.data.max_eval_examples``) readable records. Held in memory: 4·S bytes per clip (AudioSet's 10.24 s
    clips take 655 kB each, so cap large splits, or stream them with :func:`eval_batches`).
    """
    n, batches = _eval_reader(data_config, split, max_examples, 256)
    return pipeline.join_batches(batches, n)


def _raw_waveform(item, index: int, rate: int) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return audio.load_audio(item, rate)
    wav = np.asarray(item)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"raw[{index}]: expected a non-empty 1-D waveform (or a file path), got shape {wav.shape}")
    if wav.dtype == np.int16:
        wav = wav.astype(np.float32) / 32768.0
    elif not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"raw[{index}]: expected float samples in [-1, 1] or int16, got dtype {wav.dtype}")
    if not np.all(np.isfinite(wav)):
        raise ValueError(f"raw[{index}]: waveform has NaN/Inf samples")
    problem = audio.float_scale_problem(wav)
    if problem:  # never rescaled silently: the scale is the caller's rule, not inferred from the clip
        raise ValueError(f"raw[{index}]: {problem} (or pass the int16 array itself)")
    return wav.astype(np.float32)


def preprocess_eval(data_config, raw) -> dict:
    """Eval preprocessing of raw user audio → ``{"input": float32 [B, S], "length": int32 [B]}``.

    ``raw`` is a list of clips, each a file path (decoded and resampled like the dataset) or a mono waveform at
    ``config.data.sample_rate`` (float in [-1, 1], or int16, scaled by 1/32768), or a 2-D float array ``[B, n]`` of
    equal-length waveforms. A float clip peaking above ``audio.MAX_FLOAT_PEAK`` (int16 scale) is refused, never
    rescaled; a smaller overshoot is kept, as from a file. Clips are cropped to their first ``S`` samples or
    zero-padded, as in :func:`eval_arrays`.
    """
    spec = data_spec(data_config)
    if isinstance(raw, (str, os.PathLike)):
        raise TypeError("raw must be a list of clips (paths or waveforms), not a single path; wrap it in a list")
    if isinstance(raw, np.ndarray) and raw.ndim != 2:
        raise ValueError(f"raw as an array must be [B, n] waveforms, got shape {raw.shape}")
    items = list(raw)
    if not items:
        raise ValueError("raw is empty: expected at least one clip")
    out = np.zeros((len(items), spec.num_samples), np.float32)
    lengths = np.zeros((len(items),), np.int32)
    for i, item in enumerate(items):
        out[i], lengths[i] = audio.crop_or_pad(_raw_waveform(item, i, spec.frontend.sample_rate), spec.num_samples)
    return {"input": out, "length": lengths}
