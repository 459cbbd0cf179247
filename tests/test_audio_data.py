"""Audio data: decoding, waveform transforms, sources in their native layouts, the demo set, the Grain pipeline."""

import csv
import json
import logging
import os
import threading
import types

import grain
import ml_collections
import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from bridle_jax import fbank
from bridle_jax.data import audio, audio_pipeline, audio_sources, pipeline

SR = 16000
FRAMES = 20  # tiny clips: S = 400 + 19 * 160 = 3440 samples
S = 400 + (FRAMES - 1) * 160


@pytest.fixture(autouse=True)
def _fresh_skip_counter():
    audio_pipeline.SKIPPED.reset()
    yield
    audio_pipeline.SKIPPED.reset()


def tone(rng, n, sr=SR, freq=None):
    freq = rng.uniform(200, 2000) if freq is None else freq
    t = np.arange(n) / sr
    return (rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28))).astype(np.float32)


def peak_frequency(x, sr):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)]


def best_roll(x, y):
    """(shift, gain) with y ≈ roll(x, shift) * gain, by circular cross-correlation (FFT)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    corr = np.fft.irfft(np.fft.rfft(y) * np.conj(np.fft.rfft(x)), len(x))
    shift = int(np.argmax(corr))
    return shift, float(corr[shift] / np.dot(x, x))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        w.writerows(rows)


def make_esc50(root, num_classes=3, folds=5, rng=None, n=2000):
    """ESC-50 layout, one clip per (class, fold); rows sorted by name like ESC-50.
    Returns [(filename, fold, target)]."""
    rng = rng or np.random.default_rng(0)
    os.makedirs(os.path.join(root, "audio"))
    os.makedirs(os.path.join(root, "meta"))
    rows = []
    for target in range(num_classes):
        for fold in range(1, folds + 1):
            name = f"{fold}-{target:03d}{fold}-A-{target}.wav"
            sf.write(os.path.join(root, "audio", name), tone(rng, n + 97 * fold + 13 * target), SR, subtype="FLOAT")
            rows.append((name, fold, target, f"class{target}", "False", f"{target}{fold}", "A"))
    rows.sort()
    write_csv(os.path.join(root, "meta", "esc50.csv"), audio_sources.ESC50_COLUMNS, rows)
    return [(r[0], r[1], r[2]) for r in rows]


def data_config(**overrides):
    cfg = audio_pipeline.default_data_config()
    cfg.update(
        {"name": "esc50", "target_frames": FRAMES, "num_threads": 2, "prefetch_buffer_size": 2, "max_skipped": 50}
    )
    cfg.update(overrides)
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y) == ["input", "label", "length"]
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    "ext, fmt, subtype, atol",
    [("wav", "WAV", "PCM_16", 1 / 32768), ("flac", "FLAC", "PCM_16", 1 / 32768), ("ogg", "OGG", "VORBIS", None)],
)
def test_load_audio_decodes_wav_flac_ogg(tmp_path, ext, fmt, subtype, atol):
    rng = np.random.default_rng(1)
    x = tone(rng, 8000, freq=rng.uniform(300, 1500))
    path = tmp_path / f"clip.{ext}"
    sf.write(path, x, SR, format=fmt, subtype=subtype)
    y = audio.load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    if atol is not None:
        assert y.shape == x.shape
        np.testing.assert_allclose(y, x, atol=atol)
    else:  # lossy: same length within a frame, same pitch
        assert abs(len(y) - len(x)) < 1024
        assert abs(peak_frequency(y, SR) - peak_frequency(x, SR)) < 5


def test_stereo_is_mixed_down_to_the_channel_mean(tmp_path):
    rng = np.random.default_rng(2)
    stereo = np.stack([tone(rng, 3000), tone(rng, 3000)], axis=1)
    sf.write(tmp_path / "st.wav", stereo, SR, subtype="FLOAT")
    y = audio.load_audio(tmp_path / "st.wav")
    np.testing.assert_allclose(y, stereo.astype(np.float64).mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("orig_sr, up, down", [(44100, 160, 441), (8000, 2, 1), (22050, 320, 441)])
def test_resampling_to_16k_matches_resample_poly(tmp_path, orig_sr, up, down):
    rng = np.random.default_rng(orig_sr)
    freq = rng.uniform(300, 3000)
    n = int(0.25 * orig_sr) + int(rng.integers(0, 50))
    x = tone(rng, n, sr=orig_sr, freq=freq)
    sf.write(tmp_path / "x.wav", x, orig_sr, subtype="FLOAT")
    y = audio.load_audio(tmp_path / "x.wav")
    expected = signal.resample_poly(x.astype(np.float64), up, down)
    assert len(y) == len(expected) == -(-n * up // down)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert abs(peak_frequency(y, SR) - freq) < 2 * SR / len(y)  # pitch preserved (within 2 FFT bins)


def test_silent_clip_is_valid(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(1234, np.float32), SR, subtype="PCM_16")
    y = audio.load_audio(tmp_path / "silent.wav")
    assert y.shape == (1234,) and not np.any(y)


def _truncate(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such file"),
        ("truncated_wav", "truncated"),
        ("truncated_flac", "cannot decode"),
        ("corrupt", "cannot decode"),
        ("empty_file", "cannot decode"),
        ("zero_samples", "no samples"),
        ("nan", "NaN/Inf"),
        ("inf", "NaN/Inf"),
    ],
)
def test_load_audio_bad_inputs_raise_audio_decode_error_naming_the_file(tmp_path, kind, message):
    rng = np.random.default_rng(3)
    x = tone(rng, 4000)
    path = tmp_path / f"{kind}.{'flac' if kind == 'truncated_flac' else 'wav'}"
    if kind == "truncated_wav":
        sf.write(path, x, SR, subtype="PCM_16")
        _truncate(path, 0.6)
    elif kind == "truncated_flac":
        sf.write(path, x, SR, format="FLAC")
        _truncate(path, 0.6)
    elif kind == "corrupt":
        path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "zero_samples":
        sf.write(path, np.zeros((0,), np.float32), SR, subtype="PCM_16")
    elif kind in ("nan", "inf"):
        x[rng.integers(0, len(x), 3)] = np.nan if kind == "nan" else np.inf
        sf.write(path, x, SR, subtype="FLOAT")
    with pytest.raises(audio.AudioDecodeError, match=message) as e:
        audio.load_audio(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
    if kind == "missing":
        assert isinstance(e.value, FileNotFoundError)


# --------------------------------------------------------------------------------------------- wave transforms


def test_roll_mag_aug_default_is_the_authors_gain_only_with_time_alignment_kept():
    """As the authors' code runs it (their shift is drawn from len() of a [1, N] tensor, so always 0): output = one
    scalar gain Beta(10, 10) + 0.5 in [0.5, 1.5] times the input, sample for sample; no roll."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(777).astype(np.float32)
    out = audio.roll_mag_aug(x, np.random.default_rng(99))
    gain = np.random.default_rng(99).beta(10.0, 10.0) + 0.5  # the only draw
    np.testing.assert_allclose(out, x.astype(np.float64) * gain, rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == x.shape

    gen = np.random.default_rng(5)
    gains = []
    for _ in range(300):
        x = gen.standard_normal(int(gen.integers(50, 2000))).astype(np.float32)  # a fresh waveform every time
        y = audio.roll_mag_aug(x, gen)
        g = float(np.dot(y, x) / np.dot(x, x))
        np.testing.assert_allclose(y, x * np.float32(g), rtol=1e-5, atol=1e-6)  # time alignment unchanged
        assert best_roll(x, y)[0] == 0
        gains.append(g)
    gains = np.asarray(gains)
    assert 0.5 < gains.min() and gains.max() < 1.5
    assert abs(gains.mean() - 1.0) < 0.02 and abs(gains.std() - np.sqrt(1 / 84)) < 0.03  # Beta(10,10): sd 0.109
    with pytest.raises(ValueError, match="non-empty 1-D"):
        audio.roll_mag_aug(np.zeros((0,), np.float32), gen)


def test_roll_mag_aug_roll_option_is_a_circular_shift_times_the_gain():
    """roll=True (config.data.roll_shift, a deviation): a uniform circular shift in [0, n), then the same gain."""
    x = np.random.default_rng(4).standard_normal(777).astype(np.float32)
    out = audio.roll_mag_aug(x, np.random.default_rng(99), roll=True)
    ref_rng = np.random.default_rng(99)
    shift, magnitude = ref_rng.integers(0, x.size), ref_rng.beta(10.0, 10.0) + 0.5
    np.testing.assert_allclose(out, np.roll(x.astype(np.float64), shift) * magnitude, rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == x.shape

    gen = np.random.default_rng(5)
    gains, shifts = [], []
    for _ in range(300):
        x = gen.standard_normal(777).astype(np.float32)  # a fresh waveform every time
        y = audio.roll_mag_aug(x, gen, roll=True)
        shift, gain = best_roll(x, y)
        np.testing.assert_allclose(y, np.roll(x, shift) * gain, atol=1e-5)
        shifts.append(shift)
        gains.append(gain)
    gains = np.asarray(gains)
    assert 0.5 < gains.min() and gains.max() < 1.5
    assert abs(gains.mean() - 1.0) < 0.02
    assert len(set(shifts)) > 200  # uniform shifts over 777 positions
    with pytest.raises(ValueError, match="non-empty 1-D"):
        audio.roll_mag_aug(np.zeros((0,), np.float32), gen, roll=True)


def test_crop_or_pad_lengths():
    rng = np.random.default_rng(6)
    short, exact, long = (rng.standard_normal(n).astype(np.float32) for n in (100, 256, 1000))
    out, length = audio.crop_or_pad(short, 256)
    assert out.shape == (256,) and out.dtype == np.float32 and length == 100
    np.testing.assert_array_equal(out[:100], short)
    assert not np.any(out[100:])
    out, length = audio.crop_or_pad(exact, 256)
    np.testing.assert_array_equal(out, exact)
    assert length == 256
    out, length = audio.crop_or_pad(long, 256)
    np.testing.assert_array_equal(out, long[:256])  # AudioMAE: the first frames
    assert length == 256
    out, length = audio.crop_or_pad(long, 256, rng=np.random.default_rng(7))
    start = int(np.flatnonzero(long == out[0])[0])
    np.testing.assert_array_equal(out, long[start : start + 256])
    assert length == 256 and start > 0
    with pytest.raises(ValueError, match="positive int"):
        audio.crop_or_pad(short, 0)
    with pytest.raises(ValueError, match="1-D"):
        audio.crop_or_pad(np.ones((2, 3), np.float32), 8)


# ------------------------------------------------------------------------------------------------------ sources


def test_esc50_source_folds_labels_and_records(tmp_path):
    rows = make_esc50(tmp_path / "esc", num_classes=3)
    train = audio_sources.ESC50Source(tmp_path / "esc", (1, 2, 3, 4))
    test = audio_sources.ESC50Source(tmp_path / "esc", [5])
    assert (len(train), len(test)) == (12, 3)
    assert train.num_classes == test.num_classes == 3
    expected_test = [(name, target) for name, fold, target in rows if fold == 5]
    assert [os.path.basename(test.path(i)) for i in range(3)] == [n for n, _ in expected_test]
    np.testing.assert_array_equal(test.labels, [t for _, t in expected_test])
    rec = test[1]
    assert (
        rec["waveform"].dtype == np.float32 and rec["label"].dtype == np.int32 and rec["label"] == expected_test[1][1]
    )
    np.testing.assert_array_equal(rec["waveform"], sf.read(test.path(1), dtype="float32")[0])
    assert rec["path"] == test.path(1)
    with pytest.raises(ValueError, match=r"folds \[6\] are not in"):
        audio_sources.ESC50Source(tmp_path / "esc", (6,))
    with pytest.raises(FileNotFoundError, match="ESC-50 root"):
        audio_sources.ESC50Source(tmp_path / "nope", (1,))


@pytest.mark.parametrize(
    "row, message",
    [
        (["1-x-A-0.wav", "one", "0"], "fold must be an integer"),
        (["1-x-A-0.wav", "1", "-2"], "target must be an integer"),
        (["1-x-A-0.wav", "1"], "expected 3 fields"),
        (["../secret.wav", "1", "0"], "plain file name"),
        (["/etc/passwd", "1", "0"], "plain file name"),
    ],
)
def test_esc50_malformed_rows_name_file_and_row(tmp_path, row, message):
    os.makedirs(tmp_path / "meta")
    os.makedirs(tmp_path / "audio")
    write_csv(tmp_path / "meta" / "esc50.csv", ["filename", "fold", "target"], [["1-a-A-0.wav", "1", "0"], row])
    with pytest.raises(ValueError, match=message) as e:
        audio_sources.ESC50Source(tmp_path, (1,))
    assert "esc50.csv" in str(e.value) and "row 3" in str(e.value)


def test_csv_with_byte_order_mark_and_binary_garbage(tmp_path):
    rng = np.random.default_rng(17)
    sf.write(tmp_path / "a.wav", tone(rng, 500), SR)
    (tmp_path / "bom.csv").write_bytes("path,label\na.wav,dog\n".encode("utf-8-sig"))
    assert audio_sources.FolderCsvSource(tmp_path, "bom.csv").classes == ["dog"]
    (tmp_path / "bin.csv").write_bytes(b"path,label\na.wav,dog\n\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match=r"bin\.csv' row \d: malformed"):
        audio_sources.FolderCsvSource(tmp_path, "bin.csv")


def test_esc50_missing_header_column_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CSV file .*esc50\.csv' not found"):
        audio_sources.ESC50Source(tmp_path, (1,))
    os.makedirs(tmp_path / "meta")
    write_csv(tmp_path / "meta" / "esc50.csv", ["filename", "target"], [["a.wav", "0"]])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['fold'\]"):
        audio_sources.ESC50Source(tmp_path, (1,))


AUDIOSET_MIDS = ["/m/09x0r", "/m/05zppz", "/t/dd00088", "/m/0ytgt", "/m/01h8n0"]


def make_audioset(root, rng, segments, present):
    """Class index (5 classes), a segments CSV with the 3 official comment lines, and the ``present`` clip files."""
    os.makedirs(root / "clips", exist_ok=True)
    write_csv(
        root / "class_labels_indices.csv",
        ["index", "mid", "display_name"],
        [[i, m, f"Name {i}, with comma"] for i, m in enumerate(AUDIOSET_MIDS)],
    )
    with open(root / "segs.csv", "w") as f:
        f.write("# Segments csv created Sun Mar  5 10:54:31 2017\n")
        f.write("# num_ytids=5, num_segs=5, num_unique_labels=5, num_positive_labels=7\n")
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        f.writelines(
            f'{ytid}, {start:.3f}, {start + 10:.3f}, "{",".join(labels)}"\n' for ytid, start, labels in segments
        )
    for name in present:
        sf.write(root / "clips" / name, tone(rng, 1600), SR, format="FLAC" if name.endswith(".flac") else "WAV")


def test_audioset_source_multi_hot_labels_both_namings_and_missing_report(tmp_path, caplog):
    rng = np.random.default_rng(8)
    segments = [
        ("--PJHxphWEs", 30.0, ["/m/09x0r", "/t/dd00088"]),
        ("-0SdAVK79lg", 0.0, ["/m/0ytgt"]),
        ("0BcD_eF-123", 12.5, ["/m/01h8n0", "/m/05zppz", "/m/09x0r"]),
        ("zzMissing01", 4.0, ["/m/05zppz"]),
    ]
    make_audioset(tmp_path, rng, segments, ["--PJHxphWEs_30.000.wav", "-0SdAVK79lg.flac", "0BcD_eF-123_12.500.flac"])
    with caplog.at_level(logging.INFO):
        src = audio_sources.AudioSetSource(
            tmp_path / "clips", tmp_path / "segs.csv", tmp_path / "class_labels_indices.csv"
        )
    assert f"AudioSet {tmp_path / 'segs.csv'}: 3 of 4 clips present, 1 missing" in caplog.text
    assert (src.num_present, src.num_missing, src.num_classes, len(src)) == (3, 1, 5, 3)
    expected = np.zeros((3, 5), np.float32)
    expected[0, [0, 2]] = expected[1, 3] = expected[2, [4, 1, 0]] = 1
    for i in range(3):
        rec = src[i]
        assert rec["label"].dtype == np.float32
        np.testing.assert_array_equal(rec["label"], expected[i])
        assert rec["waveform"].shape == (1600,)
    assert src.class_names[1] == "Name 1, with comma"


@pytest.mark.parametrize(
    "line, message",
    [
        ('abcdefghijk, 0.000, 10.000, "/m/nope"', "unknown label MID '/m/nope'"),
        ("abcdefghijk, 0.000, 10.000", "expected 4 fields"),
        ('../../etc/x, 0.000, 10.000, "/m/09x0r"', "YTID"),
        ('abcdefghijk, ten, 10.000, "/m/09x0r"', "must be numbers"),
        ('abcdefghijk, 10.000, 5.000, "/m/09x0r"', "start_seconds < end_seconds"),
    ],
)
def test_audioset_malformed_rows_and_unknown_mids_name_file_and_line(tmp_path, line, message):
    make_audioset(tmp_path, np.random.default_rng(9), [("--PJHxphWEs", 30.0, ["/m/09x0r"])], ["--PJHxphWEs.wav"])
    with open(tmp_path / "segs.csv", "a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        audio_sources.AudioSetSource(tmp_path / "clips", tmp_path / "segs.csv", tmp_path / "class_labels_indices.csv")
    assert "segs.csv" in str(e.value) and "line 5" in str(e.value)


def test_audioset_with_no_clip_present_is_fatal(tmp_path):
    make_audioset(tmp_path, np.random.default_rng(10), [("--PJHxphWEs", 30.0, ["/m/09x0r"])], [])
    with pytest.raises(FileNotFoundError, match="none of its 1 clips"):
        audio_sources.AudioSetSource(tmp_path / "clips", tmp_path / "segs.csv", tmp_path / "class_labels_indices.csv")


def make_folder(root, rng, rows, csv_name="train.csv"):
    for path, _ in rows:
        full = root / path
        if not full.exists() and ".." not in path and not os.path.isabs(path):
            full.parent.mkdir(parents=True, exist_ok=True)
            sf.write(full, tone(rng, 1000 + int(rng.integers(0, 500))), SR)
    write_csv(root / csv_name, ["path", "label"], rows)


def test_folder_csv_source_string_and_integer_labels(tmp_path):
    rng = np.random.default_rng(11)
    make_folder(tmp_path, rng, [("dogs/a.wav", "dog"), ("cats/b.wav", "cat"), ("c.wav", "bird"), ("dogs/d.wav", "dog")])
    src = audio_sources.FolderCsvSource(tmp_path, "train.csv")
    assert src.classes == ["bird", "cat", "dog"] and src.num_classes == 3
    np.testing.assert_array_equal(src.labels, [2, 1, 0, 2])
    assert src[0]["path"] == str(tmp_path / "dogs" / "a.wav")
    make_folder(tmp_path, rng, [("c.wav", "cat"), ("dogs/a.wav", "dog")], "test.csv")
    test = audio_sources.FolderCsvSource(tmp_path, "test.csv", classes=src.classes)
    np.testing.assert_array_equal(test.labels, [1, 2])
    make_folder(tmp_path, rng, [("c.wav", "lion")], "bad.csv")
    with pytest.raises(ValueError, match=r"bad\.csv' row 2: unknown label 'lion'"):
        audio_sources.FolderCsvSource(tmp_path, "bad.csv", classes=src.classes)

    make_folder(tmp_path, rng, [("c.wav", "3"), ("dogs/a.wav", "0")], "ints.csv")
    ints = audio_sources.FolderCsvSource(tmp_path, "ints.csv")
    assert ints.classes is None and ints.num_classes == 4
    np.testing.assert_array_equal(ints.labels, [3, 0])
    with pytest.raises(ValueError, match=r"row 2: label 3 is out of range \(expected 0..1\)"):
        audio_sources.FolderCsvSource(tmp_path, "ints.csv", num_classes=2)


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ([("../outside.wav", "a")], ["path", "label"], "escapes the dataset root"),
        ([("sub/../../outside.wav", "a")], ["path", "label"], "escapes the dataset root"),
        ([("/etc/passwd", "a")], ["path", "label"], "is absolute"),
        ([("a.wav", "x", "extra")], ["path", "label"], "expected 2 fields"),
        ([("a.wav", "x")], ["file", "label"], r"lacks column\(s\) \['path'\]"),
        ([], ["path", "label"], "no rows"),
        ([("", "x")], ["path", "label"], "empty path"),
    ],
)
def test_folder_csv_source_rejects_escapes_and_malformed_rows(tmp_path, rows, header, message):
    write_csv(tmp_path / "t.csv", header, rows)
    with pytest.raises(ValueError, match=message) as e:
        audio_sources.FolderCsvSource(tmp_path, "t.csv")
    assert "t.csv" in str(e.value)


# ------------------------------------------------------------------------------------------ synthesised sounds


def test_synthetic_sounds_layout_balance_and_determinism(tmp_path):
    kwargs = {"num_classes": 8, "clips_per_class": 5, "duration": 0.1, "seed": 3}
    root = audio_sources.write_synthetic_sounds(tmp_path / "a", **kwargs)
    assert root == str(tmp_path / "a")
    with open(tmp_path / "a" / "meta" / "esc50.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(audio_sources.ESC50_COLUMNS)
    assert len(rows) == 40 and sorted(os.listdir(tmp_path / "a" / "audio")) == sorted(r["filename"] for r in rows)
    counts = np.zeros((8, 5), int)
    for r in rows:
        counts[int(r["target"]), int(r["fold"]) - 1] += 1
        assert r["category"] == audio_sources.SOUND_CLASSES[int(r["target"])][0]
    np.testing.assert_array_equal(counts, 1)  # every class once per fold
    info = sf.info(tmp_path / "a" / "audio" / rows[0]["filename"])
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (SR, 1600, 1, "PCM_16")
    clips = [audio.load_audio(tmp_path / "a" / "audio" / r["filename"]) for r in rows]
    peaks = np.array([np.abs(c).max() for c in clips])
    assert np.all(peaks > 0.09) and np.all(peaks < 0.91)

    audio_sources.write_synthetic_sounds(tmp_path / "b", **kwargs)
    for r in rows:  # same seed: identical bytes
        assert (tmp_path / "a" / "audio" / r["filename"]).read_bytes() == (
            tmp_path / "b" / "audio" / r["filename"]
        ).read_bytes()
    audio_sources.write_synthetic_sounds(tmp_path / "c", **{**kwargs, "seed": 4})
    with open(tmp_path / "c" / "meta" / "esc50.csv") as f:
        other = {r["src_file"]: r["filename"] for r in csv.DictReader(f)}
    for r in rows:  # another seed: every clip differs
        a = sf.read(tmp_path / "a" / "audio" / r["filename"])[0]
        c = sf.read(tmp_path / "c" / "audio" / other[r["src_file"]])[0]
        assert not np.array_equal(a, c)


def test_synthetic_sounds_atomic_reuse_and_race(tmp_path):
    kwargs = {"num_classes": 8, "clips_per_class": 5, "duration": 0.05, "seed": 1}
    results, errors = [], []

    def worker():
        try:
            results.append(audio_sources.write_synthetic_sounds(tmp_path / "s", **kwargs))
        except Exception as e:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [str(tmp_path / "s")] * 3
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary sibling left behind
    manifest = tmp_path / "s" / "meta" / "synthetic.json"
    mtime = manifest.stat().st_mtime_ns
    audio_sources.write_synthetic_sounds(tmp_path / "s", **kwargs)  # complete: reused, not rewritten
    assert manifest.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="were generated with"):
        audio_sources.write_synthetic_sounds(tmp_path / "s", **{**kwargs, "seed": 2})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        audio_sources.write_synthetic_sounds(tmp_path / "mine", **kwargs)


# ----------------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def esc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("esc") / "ESC-50"
    make_esc50(root, num_classes=4, rng=np.random.default_rng(12))
    return str(root)


def test_default_config_and_spec():
    cfg = audio_pipeline.default_data_config()
    assert (cfg.frontend, cfg.num_mel_bins, cfg.target_frames) == ("bridle", 128, 1024)
    assert (cfg.norm_mean, cfg.norm_std, cfg.sample_rate) == (-4.4446096, 3.3216383, 16000)
    for field in ("name", "data_dir", "num_threads", "prefetch_buffer_size", "max_eval_examples", "max_skipped"):
        assert field in cfg
    cfg.data_dir = "/data/audioset"
    audio_pipeline.validate_data_config(cfg)
    spec = fbank.frontend_spec(cfg)
    assert spec == fbank.FrontendSpec("bridle", 16000, 128, 1024, -4.4446096, 3.3216383)
    assert audio_pipeline.num_samples(cfg) == fbank.samples_for_frames(1024, spec) == 1023 * 160 + 400
    assert set(audio_pipeline.DATASETS) == {"sounds", "esc50", "audioset", "audio_folder"}


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("name", "speechcommands", "config.data.name: expected one of"),
        ("data_dir", None, "config.data.data_dir: expected the folder holding 'esc50'"),
        ("frontend", "mfcc", "config.data.frontend"),
        ("target_frames", 0, "config.data.target_frames: expected an int >= 1"),
        ("num_mel_bins", 1.5, "config.data.num_mel_bins"),
        ("norm_std", 0.0, "config.data.norm_std"),
        ("norm_mean", float("nan"), "config.data.norm_mean"),
        ("roll_mag_aug", "yes", "config.data.roll_mag_aug: expected a bool"),
        ("roll_shift", "yes", "config.data.roll_shift: expected None or a bool"),
        ("roll_shift", 1, "config.data.roll_shift: expected None or a bool"),
        ("train_folds", (), "config.data.train_folds"),
        ("test_folds", (0,), "config.data.test_folds"),
        ("max_skipped", -1, "config.data.max_skipped"),
        ("max_eval_examples", 0, "config.data.max_eval_examples"),
        ("num_threads", -1, "config.data.num_threads"),
        ("sample_rate", 0, "config.data.sample_rate"),
    ],
)
def test_validate_names_the_bad_field(esc_root, field, value, expected):
    cfg = types.SimpleNamespace(**data_config(data_dir=esc_root).to_dict())  # any attribute object (no type safety)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        audio_pipeline.validate_data_config(cfg)


def test_validate_dataset_specific_fields(tmp_path):
    cfg = data_config(name="audio_folder", data_dir=str(tmp_path))
    cfg.csv_files = ml_collections.ConfigDict({"train": "train.csv"})
    with pytest.raises(ValueError, match=r"config\.data\.csv_files: expected a mapping that has the split 'test'"):
        audio_pipeline.validate_data_config(cfg)
    cfg = data_config(name="audioset", data_dir=str(tmp_path), audioset_eval_csv="")
    with pytest.raises(ValueError, match=r"config\.data\.audioset_eval_csv"):
        audio_pipeline.validate_data_config(cfg)
    cfg = ml_collections.ConfigDict({"name": "esc50"})
    with pytest.raises(ValueError, match=r"config\.data\.data_dir is missing"):
        audio_pipeline.validate_data_config(cfg)


def test_train_batches_shapes_determinism_and_thread_independence(esc_root):
    cfg = data_config(data_dir=esc_root)
    ds = audio_pipeline.train_dataset(cfg, local_batch_size=4, seed=7)
    a = take(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))), 6)
    b = take(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))), 6)
    assert_batches_equal(a, b)
    batch = a[0]
    assert batch["input"].shape == (4, S) and batch["input"].dtype == np.float32
    assert batch["length"].shape == (4,) and batch["length"].dtype == np.int32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert np.all(batch["length"] <= S) and np.all(batch["length"] >= 2000)
    for x, n in zip(batch["input"], batch["length"]):
        assert not np.any(x[n:]) and np.any(x[:n])  # zero padding after the real samples
    again = take(iter(audio_pipeline.train_dataset(cfg, local_batch_size=4, seed=7).to_iter_dataset()), 6)
    assert_batches_equal(a, again)
    other = take(iter(audio_pipeline.train_dataset(cfg, local_batch_size=4, seed=8).to_iter_dataset()), 6)
    assert any(not np.array_equal(x["input"], y["input"]) for x, y in zip(a, other))
    # Train folds 1-4 hold 16 clips (4 per class): the first epoch (16 records) covers each clip once.
    labels = np.concatenate([x["label"] for x in a])
    np.testing.assert_array_equal(np.bincount(labels[:16], minlength=4), [4, 4, 4, 4])
    lengths = np.concatenate([x["length"] for x in a])
    assert len(set(lengths[:16].tolist())) == 16


@pytest.mark.parametrize("roll_shift", [None, False, True])
def test_train_records_are_roll_mag_augmented_eval_records_are_not(esc_root, roll_shift):
    """Default (None/False): each real record is its decoded samples times one gain in (0.5, 1.5), time alignment
    kept. roll_shift=True: a circular shift of the real samples, times the gain. Padding stays zero either way."""
    cfg = data_config(data_dir=esc_root, roll_shift=roll_shift)
    plain = audio_pipeline.train_dataset(
        data_config(data_dir=esc_root, roll_mag_aug=False), local_batch_size=20, seed=3
    )
    aug = audio_pipeline.train_dataset(cfg, local_batch_size=20, seed=3)
    p, q = plain[0], aug[0]
    np.testing.assert_array_equal(p["label"], q["label"])  # same shuffle
    source = audio_sources.ESC50Source(esc_root, (1, 2, 3, 4, 5))
    decoded = {tuple(audio.crop_or_pad(source[i]["waveform"], S)[0][:50]): i for i in range(len(source))}
    shifts = []
    for x, y, n in zip(p["input"], q["input"], p["length"]):
        assert tuple(x[:50]) in decoded  # the un-augmented stream is exactly crop_or_pad(decode(file))
        assert not np.any(y[n:])  # the augmentation stays inside the real samples
        shift, gain = best_roll(x[:n], y[:n])
        assert 0.5 < gain < 1.5
        np.testing.assert_allclose(y[:n], np.roll(x[:n].astype(np.float64), shift) * gain, atol=1e-5)
        shifts.append(shift)
    if roll_shift:
        assert sum(s != 0 for s in shifts) >= 18  # rolled (a zero shift has probability 1/n per record)
    else:
        assert shifts == [0] * len(shifts)
        for x, y in zip(p["input"], q["input"]):
            g = float(np.dot(y, x) / np.dot(x, x))
            np.testing.assert_allclose(y, x * np.float32(g), rtol=1e-5, atol=1e-6)  # one scalar gain, whole clip
    again = audio_pipeline.train_dataset(cfg, local_batch_size=20, seed=3)[0]  # seeded per record
    np.testing.assert_array_equal(again["input"], q["input"])


def test_roll_shift_needs_roll_mag_aug_and_old_configs_without_it_still_validate_and_resume(esc_root):
    from bridle_jax import workdir

    expected = r"config\.data\.roll_shift: expected None or False when config\.data\.roll_mag_aug is False"
    with pytest.raises(ValueError, match=expected):
        audio_pipeline.validate_data_config(data_config(data_dir=esc_root, roll_mag_aug=False, roll_shift=True))
    current = data_config(data_dir=esc_root)
    assert current.roll_shift is None and audio_pipeline.data_spec(current).roll_shift is False
    assert audio_pipeline.RollMagAug().roll_shift is False  # the transform's own default: the gain only
    older = types.SimpleNamespace(**{k: v for k, v in current.to_dict().items() if k != "roll_shift"})
    assert audio_pipeline.data_spec(older).roll_shift is False  # a config from before the field: no roll
    # A workdir's config.json written before the field existed compares equal (a missing field reads as None).
    as_json = lambda cfg: {"data": json.loads(cfg.to_json_best_effort())}
    old_json = {"data": {k: v for k, v in as_json(current)["data"].items() if k != "roll_shift"}}
    assert workdir.config_differences(old_json, as_json(current)) == {}
    current.roll_shift = True  # turning the roll on is a change of the data stream: refused on resume
    assert workdir.config_differences(old_json, as_json(current)) == {"data.roll_shift": (None, True)}


def test_process_shards_union_is_the_global_batch(esc_root):
    cfg = data_config(data_dir=esc_root)
    glob = take(iter(audio_pipeline.train_dataset(cfg, local_batch_size=6, seed=1).to_iter_dataset()), 3)
    shards = [
        take(
            iter(
                audio_pipeline.train_dataset(
                    cfg, local_batch_size=2, seed=1, process_index=p, process_count=3
                ).to_iter_dataset()
            ),
            3,
        )
        for p in range(3)
    ]
    for step in range(3):
        for p in range(3):
            for key in ("input", "length", "label"):
                np.testing.assert_array_equal(shards[p][step][key], glob[step][key][2 * p : 2 * p + 2])
    with pytest.raises(ValueError, match="process_index"):
        audio_pipeline.train_dataset(cfg, local_batch_size=2, seed=1, process_index=3, process_count=3)


def test_iterator_resume_is_bit_identical(esc_root):
    cfg = data_config(data_dir=esc_root)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
    it = iter(audio_pipeline.train_dataset(cfg, local_batch_size=3, seed=5).to_iter_dataset(read))
    take(it, 4)
    state = it.get_state()
    expected = take(it, 5)
    resumed = iter(audio_pipeline.train_dataset(cfg, local_batch_size=3, seed=5).to_iter_dataset(read))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected)


def test_eval_arrays_order_labels_and_caps(esc_root):
    cfg = data_config(data_dir=esc_root)
    test = audio_pipeline.eval_arrays(cfg, "test")
    source = audio_sources.ESC50Source(esc_root, (5,))
    assert test["input"].shape == (4, S) and test["input"].dtype == np.float32
    np.testing.assert_array_equal(test["label"], source.labels)
    for i in range(4):
        padded, length = audio.crop_or_pad(source[i]["waveform"], S)
        np.testing.assert_array_equal(test["input"][i], padded)
        assert test["length"][i] == length
    train = audio_pipeline.eval_arrays(cfg, "train", max_examples=5)
    assert train["input"].shape == (5, S)
    cfg.max_eval_examples = 3
    assert audio_pipeline.eval_arrays(cfg, "train")["label"].shape == (3,)
    with pytest.raises(ValueError, match="has splits \\('train', 'test'\\), got split 'validation'"):
        audio_pipeline.eval_arrays(cfg, "validation")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.data_dir='/nonexistent/esc'"):
        audio_pipeline.eval_arrays(data_config(data_dir="/nonexistent/esc"), "test")


def test_preprocess_eval_matches_eval_arrays(esc_root):
    cfg = data_config(data_dir=esc_root)
    source = audio_sources.ESC50Source(esc_root, (5,))
    ref = audio_pipeline.eval_arrays(cfg, "test")
    from_paths = audio_pipeline.preprocess_eval(cfg, [source.path(i) for i in range(4)])
    np.testing.assert_array_equal(from_paths["input"], ref["input"])
    np.testing.assert_array_equal(from_paths["length"], ref["length"])
    rng = np.random.default_rng(13)
    waves = [tone(rng, 1000), tone(rng, S + 300)]
    out = audio_pipeline.preprocess_eval(cfg, waves)
    np.testing.assert_array_equal(out["length"], [1000, S])
    np.testing.assert_array_equal(out["input"][0, :1000], waves[0])
    np.testing.assert_array_equal(out["input"][1], waves[1][:S])
    ints = (rng.uniform(-0.5, 0.5, 900) * 32768).astype(np.int16)
    np.testing.assert_allclose(audio_pipeline.preprocess_eval(cfg, [ints])["input"][0, :900], ints / 32768.0, rtol=1e-7)
    batch = np.stack([tone(rng, 2000), tone(rng, 2000)])
    assert audio_pipeline.preprocess_eval(cfg, batch)["input"].shape == (2, S)
    with pytest.raises(ValueError, match=r"raw\[0\]: waveform has NaN/Inf"):
        audio_pipeline.preprocess_eval(cfg, [np.array([0.1, np.nan], np.float32)])
    with pytest.raises(ValueError, match=r"raw\[1\]: expected a non-empty 1-D"):
        audio_pipeline.preprocess_eval(cfg, [waves[0], np.zeros((2, 3), np.float32)])
    with pytest.raises(ValueError, match="int16"):
        audio_pipeline.preprocess_eval(cfg, [np.arange(10, dtype=np.int32)])
    with pytest.raises(TypeError, match="not a single path"):
        audio_pipeline.preprocess_eval(cfg, source.path(0))


@pytest.fixture()
def messy_root(tmp_path):
    """ESC-50 layout holding one clip of every awkward kind, in fold 1 (good clips in folds 1-2)."""
    rng = np.random.default_rng(14)
    root = tmp_path / "messy"
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows, bad = [], []

    def add(name, target, fold=1):
        rows.append((name, fold, target, "c", "False", "0", "A"))

    for i in range(6):
        name = f"2-good{i}-A-{i % 2}.wav"
        sf.write(root / "audio" / name, tone(rng, 2500 + 100 * i), SR)
        add(name, i % 2, fold=2)
    sf.write(root / "audio" / "1-rate44k-A-0.wav", tone(rng, 44100 // 10, sr=44100, freq=1000.0), 44100)
    add("1-rate44k-A-0.wav", 0)
    sf.write(root / "audio" / "1-stereo-A-1.wav", np.stack([tone(rng, 3000), tone(rng, 3000)], 1), SR)
    add("1-stereo-A-1.wav", 1)
    sf.write(root / "audio" / "1-short-A-0.wav", tone(rng, 50), SR)
    add("1-short-A-0.wav", 0)
    sf.write(root / "audio" / "1-silent-A-1.wav", np.zeros(3000, np.float32), SR)
    add("1-silent-A-1.wav", 1)
    sf.write(root / "audio" / "1-trunc-A-0.wav", tone(rng, 4000), SR)
    _truncate(root / "audio" / "1-trunc-A-0.wav", 0.5)
    add("1-trunc-A-0.wav", 0)
    (root / "audio" / "1-corrupt-A-1.wav").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    add("1-corrupt-A-1.wav", 1)
    nan = tone(rng, 3000)
    nan[100] = np.nan
    sf.write(root / "audio" / "1-nan-A-0.wav", nan, SR, subtype="FLOAT")
    add("1-nan-A-0.wav", 0)
    add("1-missing-A-1.wav", 1)  # listed, never written
    bad = ["1-trunc-A-0.wav", "1-corrupt-A-1.wav", "1-nan-A-0.wav", "1-missing-A-1.wav"]
    write_csv(root / "meta" / "esc50.csv", audio_sources.ESC50_COLUMNS, sorted(rows))
    return str(root), bad


def test_unreadable_records_are_counted_replaced_and_logged(messy_root, caplog):
    root, bad = messy_root
    cfg = data_config(data_dir=root, train_folds=(1, 2), test_folds=(1,))
    with caplog.at_level(logging.WARNING):
        ev = audio_pipeline.eval_arrays(cfg, "test")
    with open(os.path.join(root, "meta", "esc50.csv")) as f:
        names = [r["filename"] for r in csv.DictReader(f) if r["fold"] == "1"]
    readable = [n for n in names if n not in bad]
    assert ev["input"].shape == (len(readable), S)  # eval drops unreadable records, keeps the stored order
    lengths = dict(zip(readable, ev["length"]))
    assert lengths["1-rate44k-A-0.wav"] == 1600  # 0.1 s at 44.1 kHz, resampled to 16 kHz
    assert lengths["1-short-A-0.wav"] == 50
    assert lengths["1-stereo-A-1.wav"] == 3000
    assert not np.any(ev["input"][readable.index("1-silent-A-1.wav")])
    i44 = readable.index("1-rate44k-A-0.wav")
    assert abs(peak_frequency(ev["input"][i44, :1600], SR) - 1000.0) < 20
    assert audio_pipeline.skipped_count() == 4
    for name in bad:
        assert name in caplog.text
    assert "truncated" in caplog.text and "NaN/Inf" in caplog.text and "no such file" in caplog.text

    # Train: each bad index is replaced by the next readable record in stored order, so shapes stay static.
    src = audio_sources.ESC50Source(root, (1, 2))
    readable_src = audio_pipeline.ReadableSource(src, max_skipped=50)
    stored = [os.path.basename(src.path(i)) for i in range(len(src))]
    j = stored.index("1-corrupt-A-1.wav")
    k = next(k for k in range(j + 1, len(stored)) if stored[k] not in bad)
    assert k > j + 1  # the records right after it are unreadable too
    np.testing.assert_array_equal(readable_src[j]["waveform"], src[k]["waveform"])
    ds = audio_pipeline.train_dataset(cfg, local_batch_size=5, seed=0)
    batches = take(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2))), 6)
    assert all(np.all(np.isfinite(b["input"])) and b["input"].shape == (5, S) for b in batches)
    assert audio_pipeline.skipped_count() == 4  # each file counted once per process


def test_max_skipped_ceiling_stops_the_stream(messy_root):
    root, _bad = messy_root
    cfg = data_config(data_dir=root, train_folds=(1, 2), test_folds=(1,), max_skipped=2)
    with pytest.raises(
        RuntimeError, match=r"[34] unreadable audio files were skipped, more than config\.data\.max_skipped=2"
    ):
        audio_pipeline.eval_arrays(cfg, "test")
    audio_pipeline.SKIPPED.reset()
    it = iter(audio_pipeline.train_dataset(cfg, local_batch_size=5, seed=0).to_iter_dataset())
    with pytest.raises(RuntimeError, match=r"config\.data\.max_skipped=2; the last ones: \["):
        take(it, 10)


def test_audioset_pipeline_multi_hot_batches(tmp_path):
    rng = np.random.default_rng(15)
    segments = [(f"clip{i:04d}abc", float(i), [AUDIOSET_MIDS[i % 5], AUDIOSET_MIDS[(i + 2) % 5]]) for i in range(6)]
    make_audioset(tmp_path, rng, segments, [f"clip{i:04d}abc_{float(i):.3f}.wav" for i in range(5)])
    cfg = data_config(
        name="audioset",
        data_dir=str(tmp_path),
        audioset_train_csv="segs.csv",
        audioset_eval_csv="segs.csv",
        audioset_train_audio_dir="clips",
        audioset_eval_audio_dir=str(tmp_path / "clips"),
    )
    batch = audio_pipeline.train_dataset(cfg, local_batch_size=4, seed=0)[0]
    assert batch["label"].shape == (4, 5) and batch["label"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"].sum(axis=1), 2)
    ev = audio_pipeline.eval_arrays(cfg, "eval")
    assert ev["label"].shape == (5, 5) and ev["input"].shape == (5, S)
    np.testing.assert_array_equal(np.argmax(ev["label"], axis=1), [0, 1, 2, 0, 1])  # first hot index: min(i, i+2) % 5
    assert audio_pipeline.DATASETS["audioset"] == "eval"


def test_audio_folder_pipeline_shares_the_train_mapping(tmp_path):
    rng = np.random.default_rng(16)
    make_folder(tmp_path, rng, [(f"x/{i}.wav", ["cat", "dog", "owl"][i % 3]) for i in range(6)], "train.csv")
    make_folder(tmp_path, rng, [("x/0.wav", "owl"), ("x/1.wav", "cat")], "test.csv")
    make_folder(tmp_path, rng, [("x/0.wav", "emu")], "val.csv")
    cfg = data_config(name="audio_folder", data_dir=str(tmp_path))
    cfg.csv_files = ml_collections.ConfigDict({"train": "train.csv", "test": "test.csv", "validation": "val.csv"})
    assert audio_pipeline.train_dataset(cfg, local_batch_size=3, seed=0)[0]["input"].shape == (3, S)
    np.testing.assert_array_equal(audio_pipeline.eval_arrays(cfg, "test")["label"], [2, 0])
    with pytest.raises(ValueError, match=r"val\.csv' row 2: unknown label 'emu'"):
        audio_pipeline.eval_arrays(cfg, "validation")


def test_sounds_demo_is_generated_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDLE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        audio_pipeline, "SOUNDS_PARAMS", {"num_classes": 8, "clips_per_class": 5, "duration": 0.2, "sample_rate": SR}
    )
    cfg = data_config(name="sounds", data_dir=None)
    batch = audio_pipeline.train_dataset(cfg, local_batch_size=8, seed=0)[0]
    assert batch["input"].shape == (8, S) and np.all(batch["length"] == 3200)
    ev = audio_pipeline.eval_arrays(cfg, "test")
    assert ev["input"].shape == (8, S) and sorted(ev["label"]) == list(range(8))  # fold 5: one clip per class
    assert os.listdir(tmp_path / "cache") == ["sounds-v1"]
    assert audio_pipeline.DATASETS["sounds"] == "test"


def test_num_classes_and_eval_labels_come_from_the_csv(tmp_path):
    """The contract's `num_classes` (fine-tuning checks config.num_classes against it) and `eval_labels` (the label
    check before compiling): from the metadata CSV, equal to what the eval stream yields."""
    make_esc50(tmp_path / "esc", num_classes=3)
    cfg = data_config(data_dir=str(tmp_path / "esc"))
    assert pipeline.num_classes(cfg) == 3
    labels = pipeline.eval_labels(cfg, "test")
    np.testing.assert_array_equal(labels, pipeline.eval_arrays(cfg, "test")["label"])
    np.testing.assert_array_equal(pipeline.eval_labels(cfg, "test", max_examples=1), labels[:1])
