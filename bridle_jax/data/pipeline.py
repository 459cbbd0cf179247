"""The input pipeline of any dataset: `config.data.name` picks the modality's pipeline module.

Every modality module (image_pipeline, audio_pipeline, video_pipeline) implements one contract, so the training loop,
the probe, fine-tuning and `load_encoder` never branch on the modality:
  DATASETS                     name -> the labelled split the probe tests on (a module may also define
                               eval_split(d) when the split is configurable, as images do: config.data.eval_split)
  default_data_config()        every `config.data` field the module reads, with the defaults its recipes start from
  validate_data_config(d)      errors name `config.data.<field>` and what was expected
  train_source(d) -> the train split's records, none read (len() = one epoch; recipes in epochs need it)
  train_dataset(d, *, local_batch_size, seed, process_index, process_count, source=None, augment=None) ->
      grain.MapDataset of batches (`source`: train_source(d) made already)
      {"input": float32 [b, ...], "length": int32 [b], "label": ...}; infinite, reshuffled per epoch, augmented,
      sharded by process after augmentation (the process shards together are the 1-process global batch).
      `augment`: None = pretraining's stream; fine-tuning passes its `config.augment` and each module applies the
      fields that concern it (image: crop_scale/crop_ratio/flip replace config.data's, RandAugment, random erasing;
      audio: weighted_sampler/epoch_len, AST's class-balancing sampler; video: none, its multi-scale crop + flip)
  eval_batches(d, split, max_examples, batch_size) -> iterator of {"input", "length", "label"} NumPy batches of
      the eval-preprocessed split, stored order (the last batch shorter); one batch decoded at a time, so a split
      of any size is scored in the memory of one batch. An unreadable record is counted in skipped_count(): images
      and audio drop it (and read on, so the count stays N where the split allows), video replaces it with the
      next readable clip; either way every label comes with its own record
  eval_size(d, split, max_examples) -> EvalSize(examples, total, capped) from the source's length, nothing decoded
  eval_labels(d, split, max_examples) -> the labels of the records eval_size counts, from the source's index
      (nothing decoded), or None where only decoding tells (TFDS, ImageNet): checks a label set before compiling
  num_classes(d) -> int | None: the class count the data declare (a fixed dataset's, the train split's class
      folders / CSV labels / ClassLabel), None where only the labels tell
  eval_arrays(d, split, max_examples) -> {"input", "length", "label"} NumPy arrays, stored order: the batches of
      eval_batches joined (the whole split in memory: for small splits)
  preprocess_eval(d, raw, [value_range]) -> {"input", "length"} for raw user inputs; image and video take
      value_range=(low, high) for float pixels (default 0..1, never inferred from the batch); audio floats are
      always [-1, 1]
  skipped_count() -> unreadable records skipped so far in this process (they are replaced, never fatal alone);
      every module counts them in one `SkippedRecords` (its `SKIPPED`), each distinct file once
"length" counts the real (unpadded) steps along the input's first axis: audio samples, video frames, image rows.
The model side (`BridleModels.model_input`) turns it into a per-patch validity mask.
"""

from __future__ import annotations

import collections
import importlib
import logging
import threading
import typing

import grain
import numpy as np

from bridle_jax.validation import fail, is_int

_MODULES = {
    "image": "bridle_jax.data.image_pipeline",
    "audio": "bridle_jax.data.audio_pipeline",
    "video": "bridle_jax.data.video_pipeline",
}


def check_stream_args(local_batch_size, process_index, process_count) -> None:
    """The arguments every modality's `train_dataset` takes, checked once, with the same messages."""

    if not is_int(local_batch_size) or local_batch_size < 1:
        raise ValueError(f"local_batch_size must be a positive int, got {local_batch_size!r}")
    if not is_int(process_count) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be an int in [0, {process_count}), got {process_index!r}")


def module_for_modality(modality: str):
    if modality not in _MODULES:
        raise ValueError(f"config.modality: expected one of {sorted(_MODULES)}, got {modality!r}")
    return importlib.import_module(_MODULES[modality])


# The registry key of every `config.data.name="tfds:<name>[:<version>]"`: any prepared TFDS image dataset.
TFDS_NAME = "tfds:<name>[:<version>]"


class _Registry(dict):
    """name -> modality, where every "tfds:..." name is found under the one key `TFDS_NAME`."""

    @staticmethod
    def _key(name):
        return TFDS_NAME if isinstance(name, str) and name.startswith("tfds:") else name

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, self._key(name))

    def __getitem__(self, name):
        return dict.__getitem__(self, self._key(name))

    def get(self, name, default=None):
        return dict.get(self, self._key(name), default)


# Every dataset name -> its modality (the module's DATASETS must list the same names; a test checks it).
DATASETS = _Registry(
    {
        "digits": "image",  # embedded demo: scikit-learn's handwritten digits
        "fashion_mnist": "image",  # the real-data study: the four official IDX files (README "Does it learn?")
        "imagenet2012": "image",
        "image_folder": "image",  # your own images: root/<split>/<class>/<image>, or path,label CSVs
        TFDS_NAME: "image",  # any prepared TFDS image dataset, read as ArrayRecord (tfds:cifar10, ...)
        "sounds": "audio",  # embedded demo: synthesised sound classes in the ESC-50 layout
        "esc50": "audio",
        "audioset": "audio",
        "audio_folder": "audio",
        "moving_digits": "video",  # embedded demo: rendered mp4 clips of moving digits
        "kinetics400": "video",
        "video_folder": "video",
    }
)


def modality_of(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"config.data.name: expected one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def module_for(data_config):
    """The pipeline module that reads `config.data.name`."""
    return module_for_modality(modality_of(getattr(data_config, "name", None)))


def eval_split(data_config) -> str:
    """The labelled split the probe and fine-tuning score: the module's `eval_split(data_config)` where it is
    configurable (images: `config.data.eval_split`), else the module's `DATASETS` entry."""
    module = module_for(data_config)
    if hasattr(module, "eval_split"):
        return module.eval_split(data_config)
    return module.DATASETS[data_config.name]


def train_source(data_config):
    """The train split's records, none of them read: `len()` is the split's size (one epoch, all processes
    together). Pass it to `train_iterator` so the split is listed once."""
    return module_for(data_config).train_source(data_config)


def train_iterator(
    data_config,
    *,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
    augment=None,
) -> grain.DatasetIterator:
    """The checkpointable infinite iterator of this process's batches (see the module docstring for the record).

    Deterministic in `seed` (independent of `num_threads`); `get_state`/`set_state` and
    `grain.checkpoint.CheckpointSave`/`CheckpointRestore` resume it bit-identically. `source`: the split's
    `train_source(data_config)`, when the caller made it already. `augment`: fine-tuning's `config.augment` (the
    fine-tune stream of the module docstring), None for pretraining's.
    """
    ds = module_for(data_config).train_dataset(
        data_config,
        local_batch_size=local_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        source=source,
        augment=augment,
    )
    read_options = grain.ReadOptions(
        num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch_buffer_size
    )
    stream = ds.to_iter_dataset(read_options)
    workers = worker_count(data_config)
    if workers:  # decoding and augmentation in worker processes, in the same order (and state) as with threads
        from absl import flags  # Grain's workers read absl flags: a library caller may not have parsed any

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(stream)


def worker_count(data_config) -> int:
    """`config.data.worker_count`: Grain worker processes that decode and augment the train stream (0: threads in
    this process only, `num_threads` of them). Processes sidestep the GIL where the per-record Python work (JPEG
    decoding and crops, resampling, PyAV) outgrows the threads; the batches and their order, and the iterator's
    checkpointed state, are the same either way (tests/test_data.py)."""
    value = data_config.get("worker_count", 0)
    if not is_int(value) or value < 0:
        fail("data.worker_count", "an int >= 0 (0: threads only)", value)
    return int(value)


def validate_data_config(data_config) -> None:
    """The dataset's module's checks, plus the loader fields every modality shares."""
    module_for(data_config).validate_data_config(data_config)
    worker_count(data_config)


class EvalSize(typing.NamedTuple):
    """How much of a labelled split the eval readers take, from the source's length (nothing decoded)."""

    examples: int  # the records eval_batches / eval_arrays read: the first min(total, cap) (fewer if unreadable)
    total: int  # the records the split lists
    capped: bool  # a cap applies and the split holds at least that many ("the first N")


def eval_size(data_config, split: str, max_examples: int | None = None) -> EvalSize:
    """The size of what `eval_batches(data_config, split, max_examples)` reads, without decoding a record. A cap is
    `max_examples`, else `config.data.max_eval_examples`. Unreadable records (images, audio: dropped) make the count
    actually read smaller; the number listed is what this returns."""
    return module_for(data_config).eval_size(data_config, split, max_examples)


def eval_labels(data_config, split: str, max_examples: int | None = None) -> np.ndarray | None:
    """The labels of the first `eval_size(...).examples` records `split` lists, read from the source's index with
    nothing decoded; None where only decoding a record tells its label (TFDS, ImageNet). A label set that does not
    fit the model can so be refused before anything is compiled."""
    return module_for(data_config).eval_labels(data_config, split, max_examples)


def num_classes(data_config) -> int | None:
    """The class count the data declare: digits and Fashion-MNIST 10, ImageNet 1000, else the train split's (class
    folders, CSV labels: class names or max + 1, a TFDS ClassLabel, an audio or video source's classes); None where
    only the labels tell. Fine-tuning checks `config.num_classes` against it."""
    return module_for(data_config).num_classes(data_config)


def eval_batches(data_config, split: str, max_examples: int | None = None, batch_size: int = 256):
    """The eval-preprocessed `split` as an iterator of NumPy batches `{"input", "length", "label"}` of `batch_size`
    records (the last one shorter), in stored order: the very records and values of `eval_arrays`, of which only
    one batch (plus the loader's prefetch buffer) is decoded and held at a time. Iterate it once; every call starts
    a fresh, deterministic pass."""
    return module_for(data_config).eval_batches(data_config, split, max_examples, batch_size)


def eval_arrays(data_config, split: str, max_examples: int | None = None) -> dict:
    """The whole eval-preprocessed `split` as NumPy arrays (the batches of `eval_batches` joined). Held in memory:
    for small splits; stream large ones with `eval_batches`."""
    return module_for(data_config).eval_arrays(data_config, split, max_examples)


# ------------------------------------------------------------------------------- shared by the modules' eval readers


def train_seeds(seed, n: int) -> list[int]:
    """`n` independent seeds from one integer (SeedSequence avoids correlated streams). The first k of n equal the
    k of k, so a stream that draws more (fine-tuning's RandAugment, erasing) keeps the shuffle and crop seeds."""
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)]


def first_labels(source, n: int, label=None) -> np.ndarray:
    """The labels of a source's first `n` records, by `label(i)` (default `source[i]["label"]`, for sources that
    decode nothing on access) stacked into one array."""
    read = label if label is not None else (lambda i: source[i]["label"])
    labels = [np.asarray(read(i)) for i in range(min(int(n), len(source)))]
    return np.stack(labels) if labels else np.zeros((0,), np.int32)


def check_eval_args(max_examples, batch_size=1) -> None:
    """The arguments of every module's eval readers, checked with the same messages."""

    if max_examples is not None and (not is_int(max_examples) or max_examples < 1):
        raise ValueError(f"max_examples must be None or a positive int, got {max_examples!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def count_eval(total: int, max_examples: int | None, max_eval_examples: int | None) -> EvalSize:
    """`EvalSize` of a source of `total` records under the cap `max_examples`, else `max_eval_examples`."""
    cap = max_examples if max_examples is not None else max_eval_examples
    total = int(total)
    if cap is None:
        return EvalSize(total, total, False)
    return EvalSize(min(total, int(cap)), total, total >= int(cap))


def batch_records(records, n: int, batch_size: int, label_dtype=None):
    """The first `n` records of the iterable `records` (dicts {"input", "length", "label"}) stacked into NumPy
    batches of `batch_size` (the last one shorter): input float32, length int32, label as `label_dtype` (None: as
    the records hold it). Only the batch being filled is held here; nothing is yielded for n = 0."""
    buffer, count = [], 0
    if n <= 0:
        return
    for record in records:
        buffer.append(record)
        count += 1
        if len(buffer) == batch_size or count == n:
            yield _stack(buffer, label_dtype)
            buffer = []
        if count == n:
            return
    if buffer:
        yield _stack(buffer, label_dtype)


def nonempty(batches, name: str, split: str, what: str = "record"):
    """The batches of an eval reader, passed through; a ValueError naming the dataset and split when there is none
    (every record of the split unreadable)."""
    any_batch = False
    for batch in batches:
        any_batch = True
        yield batch
    if not any_batch:
        raise ValueError(f"config.data.name={name!r} split {split!r}: no readable {what}")


def _stack(records: list, label_dtype) -> dict:
    labels = np.stack([np.asarray(r["label"]) for r in records])
    return {
        "input": np.stack([np.asarray(r["input"], np.float32) for r in records]),
        "length": np.asarray([r["length"] for r in records], np.int32),
        "label": labels if label_dtype is None else labels.astype(label_dtype),
    }


def join_batches(batches, n: int) -> dict:
    """The batches of an eval reader joined into arrays of at most `n` rows, filled in place (the whole split plus
    one batch in memory at the peak, never two copies of the split)."""
    out, count = None, 0
    for batch in batches:
        size = len(batch["input"])
        if out is None:
            out = {k: np.empty((n,) + v.shape[1:], v.dtype) for k, v in batch.items()}
        for k, v in batch.items():
            out[k][count : count + size] = v
        count += size
    if out is None:
        raise ValueError("no readable record")
    return {k: v[:count] for k, v in out.items()}


def preprocess_eval(data_config, raw, value_range=None) -> dict:
    """Eval preprocessing of raw user inputs; ``value_range`` states the scale of float pixels (images, video)."""
    module = module_for(data_config)
    if value_range is None:
        return module.preprocess_eval(data_config, raw)
    if modality_of(data_config.name) == "audio":
        raise ValueError(
            f"value_range={value_range!r}: applies to image and video pixels; audio float waveforms are always "
            "[-1, 1] (divide int16-scale samples by 32768, or pass int16 arrays)"
        )
    return module.preprocess_eval(data_config, raw, value_range=value_range)


def skipped_count(data_config) -> int:
    return module_for(data_config).skipped_count()


# ----------------------------------------------------------------------------------------------- unreadable records
# One counter class for the three modalities (each module keeps its own counter, `SKIPPED`, and its own wording).


class SkippedRecords:
    """Unreadable files seen by this process (each distinct file counted once, so the ceiling stays meaningful over
    many epochs), with the ``max_skipped`` ceiling. Thread-safe. ``one`` / ``many`` name the records in the warning
    and the error (e.g. "image" / "images"); ``verb`` follows ``many`` in the error ("were skipped"; video's error
    has always read "... video records skipped")."""

    def __init__(self, one: str, many: str, logger: logging.Logger, *, verb: str = "were skipped"):
        self._one, self._many, self._verb, self._log = one, many, verb, logger
        self._lock = threading.Lock()
        self._reasons: collections.OrderedDict[str, str] = collections.OrderedDict()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._reasons)

    def known(self, path: str) -> bool:
        """Whether ``path`` was found unreadable already (a reader skips it without decoding it again)."""
        with self._lock:
            return path in self._reasons

    def last(self, n: int = 5) -> list[str]:
        with self._lock:
            return list(self._reasons)[-n:]

    def reset(self) -> None:
        with self._lock:
            self._reasons.clear()

    def record(self, path: str, reason: str, max_skipped: int) -> None:
        """Logs and counts ``path``; raises ``RuntimeError`` once more than ``max_skipped`` were skipped."""
        with self._lock:
            new = path not in self._reasons
            self._reasons[path] = reason
            count = len(self._reasons)
            last = list(self._reasons)[-5:]
        if new:
            self._log.warning(
                "skipping unreadable %s %s: %s (%d skipped in this process)", self._one, path, reason, count
            )
        if count > max_skipped:
            raise RuntimeError(
                f"{count} unreadable {self._many} {self._verb}, more than config.data.max_skipped={max_skipped}; "
                f"the last ones: {last}. Fix or remove them, or raise config.data.max_skipped."
            )


class ReadableSource:
    """Random access over a decoding source where an unreadable record never stops the stream on its own.

    ``replace=True`` (train): index ``i`` yields the first readable record at ``i, i+1, ...`` (cyclically, in
    stored order). That depends only on the files, never on threads, processes or the resume point, so the train
    stream stays deterministic and resumable and its process shards stay the one-process batch. ``replace=False``
    (eval): an unreadable record yields ``None``, which Grain drops. Known-bad indices are remembered so they are not
    decoded again every epoch. Subclasses name the ``ERRORS`` that mean "unreadable", the counter (``skipped``) and
    the records (``WHAT``).
    """

    ERRORS: tuple[type[BaseException], ...] = (OSError,)
    WHAT = "files"

    def __init__(self, source, max_skipped: int, *, replace: bool = True):
        self._source = source
        self._max_skipped = int(max_skipped)
        self._replace = replace
        self._bad: set[int] = set()

    def skipped(self) -> SkippedRecords:
        raise NotImplementedError

    @property
    def source(self):
        return self._source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict | None:
        n = len(self._source)
        for k in range(n):
            j = (int(index) + k) % n
            if j in self._bad:
                if not self._replace:
                    return None
                continue
            try:
                return self._source[j]
            except self.ERRORS as e:
                self._bad.add(j)
                self.skipped().record(self._source.path(j), str(e), self._max_skipped)
                if not self._replace:
                    return None
        raise RuntimeError(f"no readable record in {self._source!r}: all {n} {self.WHAT} failed to decode")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source!r})"
