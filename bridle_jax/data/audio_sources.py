"""Random-access audio sources for Grain, read from each dataset's native layout, and the synthesised demo set.

Every source has ``__len__``/``__getitem__`` and yields ``{"waveform": float32 [n] at 16 kHz, "label", "path"}``
(``label``: int32 for single-label sets, float32 multi-hot ``[num_classes]`` for AudioSet), plus ``path(i)`` so a
failed read can be reported without decoding. Decoding happens in ``__getitem__`` (lazily, in Grain's threads); a
file that cannot be decoded raises :class:`~bridle_jax.data.audio.AudioDecodeError`, which the pipeline counts and
skips. The metadata, by contrast, is read and checked in full at construction, by the CSV reader every modality
shares (``csv_files``: BOM, any line ending, quoted commas, integer or class-name labels, paths that may not leave
the root; errors name the file and row). Nothing is unpickled or executed: audio is decoded with libsndfile.

Layouts:
  ESC50Source       root/audio/*.wav + root/meta/esc50.csv (filename,fold,target,category,esc10,src_file,take)
  AudioSetSource    official segments CSV ("# ..." comment lines, then ``YTID, start, end, "mid1,mid2"``) and
                    class-index CSV (``index,mid,display_name``); clips in root/ as ``{YTID}_{start:.3f}.wav`` or
                    ``{YTID}.wav`` (``.flac`` also); the missing ones are counted and reported, never fatal
  FolderCsvSource   any folder + a ``path,label`` CSV (header required)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf

from bridle_jax.data import audio, csv_files

log = logging.getLogger(__name__)

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
_YTID = re.compile(r"^[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------------------------------------ paths


def _require_dir(path: str, what: str) -> str:
    path = os.fspath(path)
    if not csv_files.is_dir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a directory")
    return path


class _DecodingSource:
    """Shared random access: decode ``self._paths[i]`` at ``self.sample_rate``; labels come from the subclass."""

    _paths: list[str]
    sample_rate: int

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return self._paths[index]

    def label(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        path = self._paths[index]
        return {"waveform": audio.load_audio(path, self.sample_rate), "label": self.label(index), "path": path}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, len={len(self)})"


# ------------------------------------------------------------------------------------------------------ ESC-50


class ESC50Source(_DecodingSource):
    """ESC-50 in its native layout; ``folds`` selects rows (5-fold CV: train on 4 folds, test on the 5th).

    Rows keep the CSV's order. ``num_classes`` is ``max(target) + 1`` over *all* rows, so every fold split agrees
    (50 for ESC-50). A missing audio file is not an error here: it fails when read and is counted as skipped.
    """

    def __init__(self, root, folds: Sequence[int], *, sample_rate: int = audio.SAMPLE_RATE):
        root = _require_dir(root, "ESC-50 root")
        self.sample_rate = int(sample_rate)
        csv_path = csv_files.join(root, "meta", "esc50.csv")
        try:
            folds = tuple(int(f) for f in folds)
        except (TypeError, ValueError):
            raise ValueError(f"ESC50Source: folds must be a sequence of ints, got {folds!r}") from None
        if not folds:
            raise ValueError("ESC50Source: folds must name at least one fold")
        paths, labels, all_folds, max_target = [], [], set(), -1
        for number, row in csv_files.read_csv(csv_path, ("filename", "fold", "target")):
            where = csv_files.where(csv_path, number)
            if "/" in row["filename"] or "\\" in row["filename"]:
                raise ValueError(f"{where}: filename {row['filename']!r} must be a plain file name inside audio/")
            path = csv_files.resolve_inside(csv_files.join(root, "audio"), row["filename"], where)
            fold = csv_files.parse_int(row["fold"], where, "fold", minimum=1)
            target = csv_files.parse_int(row["target"], where, "target")
            all_folds.add(fold)
            max_target = max(max_target, target)
            if fold in folds:
                paths.append(path)
                labels.append(target)
        unknown = sorted(set(folds) - all_folds)
        if unknown:
            raise ValueError(f"ESC50Source: folds {unknown} are not in {csv_path!r} (it has folds {sorted(all_folds)})")
        self._paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.num_classes = max_target + 1
        self.folds = folds
        self.description = f"{root!r}, folds={folds}"

    def label(self, index: int) -> np.int32:
        return self.labels[index]


# ---------------------------------------------------------------------------------------------------- AudioSet


def read_class_index(path: str) -> tuple[dict[str, int], list[str]]:
    """AudioSet ``class_labels_indices.csv`` → ``({mid: index}, display names in index order)``."""
    mids, names = {}, {}
    for number, row in csv_files.read_csv(path, ("index", "mid")):
        where = csv_files.where(path, number)
        index = csv_files.parse_int(row["index"], where, "index")
        if row["mid"] in mids:
            raise ValueError(f"{where}: duplicate mid {row['mid']!r}")
        if index in names:
            raise ValueError(f"{where}: duplicate index {index}")
        mids[row["mid"]] = index
        names[index] = row.get("display_name", row["mid"])
    if not mids:
        raise ValueError(f"CSV file {path!r}: no classes")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"CSV file {path!r}: indices must be 0..{len(names) - 1} without gaps")
    return mids, [names[i] for i in range(len(names))]


def audioset_clip_names(ytid: str, start_seconds: float) -> tuple[str, ...]:
    """File names accepted for one segment, in lookup order: ``{YTID}_{start:.3f}`` first, then ``{YTID}``."""
    stems = (f"{ytid}_{start_seconds:.3f}", ytid)
    return tuple(stem + ext for stem in stems for ext in (".wav", ".flac"))


class AudioSetSource(_DecodingSource):
    """AudioSet from the official segments + class-index CSVs and a folder of downloaded clips.

    AudioSet is always partial (videos disappear): rows whose clip is not in ``root`` are dropped, counted and
    reported in one log line ``"AudioSet <csv>: N of M clips present, K missing"`` (``num_present``/``num_missing``).
    Labels are float32 multi-hot ``[num_classes]`` (527). An unknown MID or a malformed row raises ``ValueError``
    naming the file and line; no clip at all raises ``FileNotFoundError``.
    """

    def __init__(self, root, segments_csv, class_index_csv, *, sample_rate: int = audio.SAMPLE_RATE):
        root = _require_dir(root, "AudioSet audio folder")
        self.sample_rate = int(sample_rate)
        segments_csv, class_index_csv = os.fspath(segments_csv), os.fspath(class_index_csv)
        self.mids, self.class_names = read_class_index(class_index_csv)
        self.num_classes = len(self.class_names)
        present = set(csv_files.list_dir(root)[1])  # one listing (a bucket prefix too), not a stat per row
        paths, label_indices, listed = [], [], 0
        # The official files start with 3 "# ..." lines; the third names the columns, so the header is given here.
        for number, fields in _read_segments(segments_csv):
            where = f"CSV file {segments_csv!r} line {number}"
            if len(fields) != 4:
                raise ValueError(
                    f"{where}: expected 4 fields (YTID, start_seconds, end_seconds, \"positive_labels\"), "
                    f"got {len(fields)}: {fields}"
                )
            ytid, start, end, positive = (x.strip() for x in fields)
            if not _YTID.match(ytid):
                raise ValueError(f"{where}: YTID {ytid!r} must contain only letters, digits, '-' and '_'")
            try:
                start_s, end_s = float(start), float(end)
            except ValueError:
                raise ValueError(f"{where}: start/end seconds must be numbers, got {start!r}, {end!r}") from None
            if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s < end_s):
                raise ValueError(f"{where}: expected 0 <= start_seconds < end_seconds, got {start!r}, {end!r}")
            indices = []
            for mid in (m.strip() for m in positive.split(",")):
                if not mid:
                    continue
                if mid not in self.mids:
                    raise ValueError(f"{where}: unknown label MID {mid!r} (not in {class_index_csv!r})")
                indices.append(self.mids[mid])
            listed += 1
            name = next((n for n in audioset_clip_names(ytid, start_s) if n in present), None)
            if name is not None:
                paths.append(csv_files.join(root, name))
                label_indices.append(indices)
        self._paths = paths
        self._label_indices = label_indices
        self.num_listed, self.num_present = listed, len(paths)
        self.num_missing = listed - len(paths)
        self.description = f"{segments_csv!r}, root={root!r}"
        message = f"AudioSet {segments_csv}: {self.num_present} of {listed} clips present, {self.num_missing} missing"
        (log.warning if self.num_missing else log.info)(message)
        if not paths:
            raise FileNotFoundError(
                f"AudioSet {segments_csv}: none of its {listed} clips is in {root!r} "
                f"(expected files named {{YTID}}_{{start:.3f}}.wav, {{YTID}}.wav or the .flac equivalents)"
            )

    def label(self, index: int) -> np.ndarray:
        multi_hot = np.zeros((self.num_classes,), np.float32)
        multi_hot[self._label_indices[index]] = 1.0
        return multi_hot


def _read_segments(path: str) -> Iterator[tuple[int, list[str]]]:
    """Rows of an AudioSet segments CSV with their line numbers, skipping ``#`` comment and blank lines."""
    if not csv_files.is_file(path):
        raise FileNotFoundError(f"AudioSet segments CSV {path!r} not found")
    with csv_files.open_text(path) as f:  # as csv_files.read_csv: a BOM is dropped, local paths or URLs
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                fields = next(csv.reader([line], skipinitialspace=True, strict=True))
            except csv.Error as e:
                raise ValueError(f"CSV file {path!r} line {number}: malformed ({e}): {line.strip()!r}") from None
            yield number, fields


# ------------------------------------------------------------------------------------------------- folder + CSV


class FolderCsvSource(_DecodingSource):
    """Any folder of audio files listed in a ``path,label`` CSV (header required; extra columns are ignored), read by
    ``csv_files.read_path_labels`` as the video and image folder CSVs are.

    Paths are relative to ``root``; labels follow ``csv_files.labels_from_rows`` (integers as given, else the sorted
    class names). Pass ``classes`` (string labels) or ``num_classes`` (integer labels) from the train split when
    building the other splits, so every split shares one mapping; a label outside it raises ``ValueError`` naming
    the file and row.
    """

    def __init__(
        self,
        root,
        csv_path,
        *,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        sample_rate: int = audio.SAMPLE_RATE,
    ):
        root = _require_dir(root, "audio folder root")
        csv_path = os.fspath(csv_path)
        if not csv_files.is_absolute(csv_path):
            csv_path = csv_files.join(root, csv_path)
        self.sample_rate = int(sample_rate)
        table = csv_files.read_path_labels(csv_path, root, classes=classes, num_classes=num_classes)
        self._paths, self.labels, self.classes, self.num_classes = table
        self.description = f"{csv_path!r}"

    def label(self, index: int) -> np.int32:
        return self.labels[index]


# ----------------------------------------------------------------------------------------- synthesised sounds


def _envelope_times(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """An event that starts in the first 30% of the clip and lasts 50-100% of what remains, with 10 ms fades."""
    start = int(rng.uniform(0.0, 0.3) * n)
    length = max(int(rng.uniform(0.5, 1.0) * (n - start)), 1)
    env = np.zeros(n)
    env[start : start + length] = 1.0
    fade = min(int(0.01 * sample_rate), length // 2)
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        env[start : start + fade] *= ramp
        env[start + length - fade : start + length] *= ramp[::-1]
    return env


def _coloured_noise(rng: np.random.Generator, n: int, sample_rate: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum ∝ 1/f^exponent (0 white, 1 pink, 2 brown), flat below 20 Hz."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), 20.0)
    out = np.fft.irfft(spectrum * freqs ** (-exponent / 2.0), n)
    return out / (np.std(out) + 1e-12)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _tone(rng, t, sr):
    return np.sin(2 * np.pi * _log_uniform(rng, 200, 2000) * t + rng.uniform(0, 2 * np.pi))


def _chirp(rng, t, sr, up: bool):
    f0 = _log_uniform(rng, 150, 600)
    f1 = f0 * rng.uniform(2.5, 6.0)
    if not up:
        f0, f1 = f1, f0
    duration = t[-1] + 1.0 / sr
    k = np.log(f1 / f0)
    return np.sin(2 * np.pi * f0 * duration / k * (np.exp(k * t / duration) - 1.0))


def _am_tone(rng, t, sr):
    carrier, rate, depth = _log_uniform(rng, 300, 2000), rng.uniform(4, 16), rng.uniform(0.6, 1.0)
    return (1 + depth * np.sin(2 * np.pi * rate * t)) * np.sin(2 * np.pi * carrier * t)


def _fm_tone(rng, t, sr):
    carrier, rate = _log_uniform(rng, 300, 2000), rng.uniform(3, 10)
    deviation = carrier * rng.uniform(0.05, 0.2)
    return np.sin(2 * np.pi * carrier * t + deviation / rate * np.sin(2 * np.pi * rate * t))


def _click_train(rng, t, sr):
    n, out = t.size, np.zeros(t.size)
    rate = rng.uniform(4, 30)
    click = np.exp(-np.arange(int(rng.uniform(0.001, 0.003) * sr)) / (0.0005 * sr))
    click = click * rng.standard_normal(click.size)
    for onset in np.arange(rng.uniform(0, 1 / rate), t[-1], 1 / rate):
        i = int((onset + rng.normal(0, 0.002)) * sr)
        if 0 <= i < n - click.size:
            out[i : i + click.size] += click
    return out


def _harmonic(rng, t, sr):
    f0, tilt = _log_uniform(rng, 100, 400), rng.uniform(0.5, 2.0)
    harmonics = [k for k in range(1, int(rng.integers(3, 11)) + 1) if k * f0 < 0.45 * sr]
    return sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k**tilt for k in harmonics)


def _band_noise(rng, t, sr):
    centre = _log_uniform(rng, 500, 4000)
    spectrum = np.fft.rfft(rng.standard_normal(t.size))
    freqs = np.fft.rfftfreq(t.size, 1.0 / sr)
    width = centre * rng.uniform(0.1, 0.3)
    return np.fft.irfft(spectrum * np.exp(-0.5 * ((freqs - centre) / width) ** 2), t.size)


def _crackle(rng, t, sr):
    out = np.zeros(t.size)
    count = int(rng.uniform(40, 200) * t[-1])
    out[rng.integers(0, t.size, count)] = rng.standard_normal(count) * rng.uniform(0.2, 1.0, count)
    return out


SOUND_CLASSES: tuple[tuple[str, Callable], ...] = (
    ("pure_tone", _tone),
    ("chirp_up", lambda rng, t, sr: _chirp(rng, t, sr, up=True)),
    ("chirp_down", lambda rng, t, sr: _chirp(rng, t, sr, up=False)),
    ("am_tone", _am_tone),
    ("fm_tone", _fm_tone),
    ("white_noise", lambda rng, t, sr: rng.standard_normal(t.size)),
    ("pink_noise", lambda rng, t, sr: _coloured_noise(rng, t.size, sr, 1.0)),
    ("brown_noise", lambda rng, t, sr: _coloured_noise(rng, t.size, sr, 2.0)),
    ("click_train", _click_train),
    ("harmonic_stack", _harmonic),
    ("band_noise", _band_noise),
    ("crackle", _crackle),
)
"""(name, generator(rng, t, sample_rate) → signal) per class; class index = position in this table."""


def synthesize_clip(target: int, rng: np.random.Generator, num_samples: int, sample_rate: int) -> np.ndarray:
    """One clip of class ``target``: the event (random parameters, onset, length) over coloured background noise.

    The background's spectral tilt is random (white to brown) and the SNR uniform in [3, 20] dB, and the clip's
    peak is set to a random level in [0.1, 0.9], so loudness and noise colour alone do not give the class away.
    """
    t = np.arange(num_samples) / sample_rate
    event = SOUND_CLASSES[target][1](rng, t, sample_rate) * _envelope_times(rng, num_samples, sample_rate)
    active = event[np.abs(event) > 0]
    if active.size:  # RMS over the event's active part, so short events are as loud as long ones
        event = event / (np.sqrt(np.mean(active**2)) + 1e-12)
    snr_db = rng.uniform(3.0, 20.0)
    background = _coloured_noise(rng, num_samples, sample_rate, rng.uniform(0.0, 2.0)) * 10 ** (-snr_db / 20)
    clip = event + background
    return clip * (rng.uniform(0.1, 0.9) / np.max(np.abs(clip)))


_SYNTHETIC_META = "synthetic.json"


def _synthetic_complete(root: str, params: dict) -> bool:
    """True when ``root`` holds a finished synthetic set with these parameters (its manifest is written last)."""
    manifest = csv_files.join(root, "meta", _SYNTHETIC_META)
    if not csv_files.is_file(manifest):
        return False
    with csv_files.open_text(manifest) as f:
        stored = json.load(f)
    if stored != params:
        raise ValueError(
            f"synthetic sounds in {root!r} were generated with {stored}, not {params}; "
            "use another folder (or delete this one to regenerate it)"
        )
    return True


def write_synthetic_sounds(
    root,
    *,
    num_classes: int = 10,
    clips_per_class: int = 40,
    duration: float = 1.28,
    sample_rate: int = audio.SAMPLE_RATE,
    seed: int,
) -> str:
    """Writes the demo sound set as real PCM_16 WAV files in the ESC-50 layout and returns ``root``.

    ``root/audio/{fold}-{target:02d}{clip:04d}-A-{target}.wav`` and ``root/meta/esc50.csv`` with 5 folds balanced per
    class (a seeded per-class permutation dealt round-robin), rows sorted by file name as in ESC-50. Clip ``i`` of
    class ``c`` depends only on ``(seed, c, i)``, so the set is deterministic. Written atomically: generated into a
    temporary sibling and renamed into place; if ``root`` is already complete (same parameters) it is reused, and if
    two processes race, the loser discards its copy and reuses the winner's.

    The set is written to local disk only; a URL ``root`` (a copy of a generated set in a bucket) is read if it holds
    a complete set with these parameters, else refused.
    """
    root = csv_files.absolute(root)
    if not 2 <= num_classes <= len(SOUND_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(SOUND_CLASSES)}] (the sound classes), got {num_classes!r}")
    if clips_per_class < 5:
        raise ValueError(f"clips_per_class must be >= 5 (one per fold), got {clips_per_class!r}")
    num_samples = round(duration * sample_rate)
    if num_samples < 1:
        raise ValueError(f"duration * sample_rate must give at least one sample, got {duration!r} * {sample_rate!r}")
    params = {
        "version": 1,
        "num_classes": int(num_classes),
        "clips_per_class": int(clips_per_class),
        "duration": float(duration),
        "sample_rate": int(sample_rate),
        "seed": int(seed),
    }
    if _synthetic_complete(root, params):
        return root
    if csv_files.is_url(root):
        raise ValueError(
            f"{root!r} holds no complete synthetic sound set with {params}: the demo set is generated on local disk "
            "only (leave config.data.data_dir unset, or copy a generated set there)"
        )
    if os.path.exists(root) and os.listdir(root):
        if _synthetic_complete(root, params):  # another process renamed its copy into place meanwhile
            return root
        raise ValueError(f"{root!r} exists and is not a complete synthetic sound set; refusing to overwrite it")

    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.join(tmp, "audio"))
        os.makedirs(os.path.join(tmp, "meta"))
        rows = []
        for target in range(num_classes):
            folds = np.random.default_rng([seed, target, 1 << 20]).permutation(clips_per_class) % 5 + 1
            for clip in range(clips_per_class):
                rng = np.random.default_rng([seed, target, clip])
                wav = synthesize_clip(target, rng, num_samples, sample_rate)
                name = f"{folds[clip]}-{target:02d}{clip:04d}-A-{target}.wav"
                sf.write(os.path.join(tmp, "audio", name), wav.astype(np.float32), sample_rate, subtype="PCM_16")
                rows.append(
                    (name, int(folds[clip]), target, SOUND_CLASSES[target][0], "False", f"{target:02d}{clip:04d}", "A")
                )
        rows.sort()
        with open(os.path.join(tmp, "meta", "esc50.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(ESC50_COLUMNS)
            writer.writerows(rows)
        with open(os.path.join(tmp, "meta", _SYNTHETIC_META), "w", encoding="utf-8") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)  # atomic; fails if another process renamed its copy into place first
        except OSError:
            if not _synthetic_complete(root, params):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root
