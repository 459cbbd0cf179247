"""Video data: PyAV decoding, temporal sampling, clip geometry vs NumPy/PIL references, sources, the moving-digits
writer and the Grain pipeline (shapes, determinism, shards, resume, unreadable records and their ceiling)."""

import csv
import os
import threading
import types
from pathlib import Path

import av
import grain
import numpy as np
import pytest
from PIL import Image

from bridle_jax.data import pipeline, video, video_pipeline, video_sources

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------- fixtures


def encode(path, frames, *, fmt=None, pix_fmt="yuv420p", codec="libx264", options=None):
    """Writes uint8 [T, H, W, 3] frames with PyAV (any container/pixel format, unlike video.write_video)."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = {"crf": "4", "threads": "1"}
        if frames.shape[0] == 0:
            container.start_encoding()  # a header and no frame: a zero-frame clip
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def painted(num_frames, height=32, width=48):
    """Frame i is the flat grey level 10 + 6 i, so decoded frames tell their index despite lossy coding."""
    return np.broadcast_to(
        10 + 6 * np.arange(num_frames, dtype=np.uint8)[:, None, None, None], (num_frames, height, width, 3)
    )


def frame_ids(frames):
    return np.rint((frames.reshape(len(frames), -1).mean(1) - 10) / 6).astype(int)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    out = {
        "c40": encode(d / "c40.mp4", painted(40)),
        "c12": encode(d / "c12.mp4", painted(12)),
        "c1": encode(d / "c1.mp4", painted(1)),
        "mkv": encode(d / "c15.mkv", painted(15), fmt="matroska"),
        "odd": encode(d / "odd.mp4", painted(5, 33, 47), pix_fmt="yuv444p"),
        "zero": encode(d / "zero.mp4", painted(0)),
        "missing": str(d / "missing.mp4"),
    }
    (d / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    out["junk"] = str(d / "junk.mp4")
    data = Path(out["c40"]).read_bytes()  # moov at the end: cut -> the container cannot be opened
    (d / "cut.mp4").write_bytes(data[: len(data) // 2])
    out["cut"] = str(d / "cut.mp4")
    fast = Path(encode(d / "fast.mp4", painted(40), options={"movflags": "faststart"})).read_bytes()
    (d / "cut_fast.mp4").write_bytes(fast[: int(len(fast) * 0.6)])  # index intact, frames missing
    out["cut_fast"] = str(d / "cut_fast.mp4")
    (d / "cut_index.mp4").write_bytes(fast[: fast.index(b"mdat") + 4])  # the index lists 40 frames, no frame data
    out["cut_index"] = str(d / "cut_index.mp4")
    with av.open(str(d / "fast.mp4")) as container:  # cut at a packet boundary: frames 0..~19 decode cleanly
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    (d / "cut_packets.mp4").write_bytes(fast[: packets[19][0] + packets[19][1]])
    out["cut_packets"] = str(d / "cut_packets.mp4")
    return out


@pytest.fixture(autouse=True)
def fresh_skip_counter():
    video_pipeline.SKIPPED.reset()
    yield
    video_pipeline.SKIPPED.reset()


# ---------------------------------------------------------------------------------------------------- decoding


def test_decode_frame_count_and_content(clips):
    info = video.probe(clips["c40"])
    assert (info.num_frames, info.height, info.width, info.fps, info.codec) == (40, 32, 48, 8.0, "h264")
    frames = video.read_frames(clips["c40"])
    assert frames.shape == (40, 32, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frame_ids(frames), np.arange(40))
    picked = video.read_frames(clips["c40"], [5, 0, 5, 39])  # any order, repeats allowed
    np.testing.assert_array_equal(frame_ids(picked), [5, 0, 5, 39])
    assert video.frame_count(clips["mkv"]) == 15  # Matroska has no frame count: counted from packets
    np.testing.assert_array_equal(frame_ids(video.read_frames(clips["mkv"], [14, 3])), [14, 3])
    assert video.read_frames(clips["odd"]).shape == (5, 33, 47, 3)
    one = video.read_frames(clips["c1"])  # a one-frame clip is valid
    assert one.shape == (1, 32, 48, 3) and frame_ids(one)[0] == 0
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\)"):
        video.read_frames(clips["c12"], [12])


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "no such video file"),
        ("junk", "cannot open the container"),
        ("cut", "cannot open the container"),
        ("cut_fast", "decoding failed after"),
        ("cut_index", "lists 40 frames but the stream ends after 0"),
        ("zero", "no video stream"),
    ],
)
def test_unreadable_videos_raise_a_named_decode_error(clips, kind, reason):
    with pytest.raises(video.VideoDecodeError, match=reason) as e:
        video.read_frames(clips[kind])
    assert os.path.basename(clips[kind]) in str(e.value)
    assert isinstance(e.value, ValueError)
    if kind == "missing":
        assert isinstance(e.value, FileNotFoundError)


def test_an_index_that_over_counts_is_resampled_from_the_decoded_frames(clips):
    assert video.frame_count(clips["cut_packets"]) == 40  # what the container's index says
    frames = video.read_frames(clips["cut_packets"])
    assert 10 < len(frames) < 40  # what decodes
    np.testing.assert_array_equal(frame_ids(frames), np.arange(len(frames)))
    counts = []
    centre = video.read_sampled(clips["cut_packets"], lambda n: counts.append(n) or video.sample_indices(n, 4, 4))
    assert counts == [40, len(frames)]  # asked again with the real count
    np.testing.assert_array_equal(frame_ids(centre), video.sample_indices(len(frames), 4, 4))


def test_write_video_is_deterministic_and_checks_its_input(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (4, 16, 24, 3), dtype=np.uint8)
    video.write_video(tmp_path / "a.mp4", frames)
    video.write_video(tmp_path / "b.mp4", frames)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    with pytest.raises(ValueError, match="even"):
        video.write_video(tmp_path / "c.mp4", frames[:, :15])


# --------------------------------------------------------------------------------------------------- sampling


def test_sample_indices_random_start_centre_and_stride():
    n, t, rate = 40, 8, 4  # span 29: starts 0..11
    starts = set()
    for seed in range(200):
        idx = video.sample_indices(n, t, rate, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.diff(idx), rate)
        assert 0 <= idx[0] and idx[-1] <= n - 1
        starts.add(int(idx[0]))
    assert starts == set(range(12))  # uniform over the whole slack, both ends reached
    np.testing.assert_array_equal(video.sample_indices(n, t, rate), 5 + 4 * np.arange(8))  # eval: slack 11 // 2
    np.testing.assert_array_equal(video.sample_indices(29, t, rate), 4 * np.arange(8))  # exact fit: no slack


def test_short_clips_loop_or_pad():
    # 10 frames, 4 x 4 wanted (span 13): 3 real frames 0, 4, 8 with slack 1.
    np.testing.assert_array_equal(video.sample_indices(10, 4, 4), [0, 4, 8, 2])  # loop: 12 wraps to 2
    np.testing.assert_array_equal(video.sample_indices(10, 4, 4, short_clip="pad"), [0, 4, 8])
    starts = {int(video.sample_indices(10, 4, 4, np.random.default_rng(s), "pad")[0]) for s in range(50)}
    assert starts == {0, 1}
    np.testing.assert_array_equal(video.sample_indices(1, 5, 4), np.zeros(5))  # one frame: looped
    np.testing.assert_array_equal(video.sample_indices(1, 5, 4, short_clip="pad"), [0])
    frames = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3) + 1
    padded, length = video.pad_clip(frames, 5)
    assert length == 3 and padded.shape == (5, 2, 2, 3)
    np.testing.assert_array_equal(padded[:3], frames)
    assert not padded[3:].any()
    with pytest.raises(ValueError, match="short_clip"):
        video.sample_indices(10, 4, 4, short_clip="wrap")
    with pytest.raises(ValueError, match="num_frames_in_clip"):
        video.sample_indices(0)


# --------------------------------------------------------------------------------------------------- geometry


def pil_resize(frame, w, h):
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR))


def test_resize_short_side_and_centre_crop_at_odd_resolutions():
    frames = np.random.default_rng(2).integers(0, 256, (3, 33, 47, 3), dtype=np.uint8)
    out = video.resize_short_side(frames, 20)
    assert out.shape == (3, 20, 28, 3)  # long side int(20 * 47 / 33) = 28
    for f, o in zip(frames, out):
        np.testing.assert_array_equal(o, pil_resize(f, 28, 20))
    tall = video.resize_short_side(frames.transpose(0, 2, 1, 3), 20, resample="bicubic")
    assert tall.shape == (3, 28, 20, 3)
    crop = video.center_crop(out, 16)
    np.testing.assert_array_equal(crop, out[:, 2:18, 6:22])  # round((20-16)/2)=2, round((28-16)/2)=6
    record = video.ResizeCenterCropClip(16, 20).map({"input": frames, "label": 3})
    np.testing.assert_array_equal(record["input"], crop)
    assert record["label"] == 3


def test_multi_scale_crop_sizes_offsets_and_one_crop_for_all_frames():
    # 96 x 128 frames, output 64: sides int(96 s) = 96, 84, 72, 63 -> 63 snaps to 64; pairs with |i - j| <= 1.
    sides = [96, 84, 72, 64]
    expected = {(sides[j], sides[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    pairs = video.multi_scale_crop_sizes(96, 128, 64)
    assert len(pairs) == 10 and set(pairs) == expected
    offsets = video.fix_crop_offsets(128, 96, 72, 64)  # steps (128-72)//4 = 14, (96-64)//4 = 8
    grid = {
        (14 * a, 8 * b)
        for a, b in [
            (0, 0),
            (4, 0),
            (0, 4),
            (4, 4),
            (2, 2),
            (0, 2),
            (4, 2),
            (2, 4),
            (2, 0),
            (1, 1),
            (3, 1),
            (1, 3),
            (3, 3),
        ]
    }
    assert len(offsets) == 13 and set(offsets) == grid

    base = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    clip = np.stack([base] * 4)
    transform = video.MultiScaleCrop(64)
    seen = set()
    for seed in range(60):
        top, left, h, w = video.multi_scale_crop_params(96, 128, 64, np.random.default_rng(seed))
        assert (w, h) in expected and (left, top) in set(video.fix_crop_offsets(128, 96, w, h))
        seen.add((w, h))
        out = transform.random_map({"input": clip}, np.random.default_rng(seed))["input"]
        assert out.shape == (4, 64, 64, 3)
        reference = pil_resize(np.ascontiguousarray(base[top : top + h, left : left + w]), 64, 64)
        for frame in out:  # the same crop on every frame, equal to PIL crop + bilinear resize
            np.testing.assert_array_equal(frame, reference)
    assert len(seen) >= 8


def test_flip_is_per_clip_and_normalize_matches_numpy():
    clip = np.random.default_rng(4).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    flipped = video.RandomClipFlip(1.0).random_map({"input": clip}, np.random.default_rng(0))["input"]
    np.testing.assert_array_equal(flipped, clip[:, :, ::-1])
    kept = video.RandomClipFlip(0.0).random_map({"input": clip}, np.random.default_rng(0))["input"]
    np.testing.assert_array_equal(kept, clip)
    outcomes = set()
    for seed in range(20):
        out = video.RandomClipFlip(0.5).random_map({"input": clip}, np.random.default_rng(seed))["input"]
        per_frame = [np.array_equal(o, c[:, ::-1]) for o, c in zip(out, clip)]
        assert len(set(per_frame)) == 1  # all frames or none
        outcomes.add(per_frame[0])
    assert outcomes == {True, False}
    normalized = video.NormalizeClip(MEAN, STD).map({"input": clip})["input"]
    reference = (clip / 255.0 - np.array(MEAN)) / np.array(STD)
    assert normalized.dtype == np.float32
    np.testing.assert_allclose(normalized, reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- sources


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def k400(tmp_path_factory):
    """A K400 layout: annotations/{train,val}.csv, train/ and val/ with clips named as the downloaders do."""
    root = tmp_path_factory.mktemp("k400")
    (root / "annotations").mkdir()
    header = ("label", "youtube_id", "time_start", "time_end", "split")
    classes = ["zumba", "abseiling", "juggling balls"]
    train_rows, val_rows = [], []
    for i in range(9):
        train_rows.append((classes[i % 3], f"-tr_{i:02d}abcde", 10 * i, 10 * i + 10, "train"))
    for i in range(4):
        val_rows.append((classes[(i + 1) % 3], f"va{i:02d}-xyzab", i, i + 10, "val"))
    write_csv(root / "annotations" / "train.csv", header, train_rows)
    write_csv(root / "annotations" / "val.csv", header, val_rows)
    for split, rows, skip in (("train", train_rows, {2, 7}), ("val", val_rows, {1})):
        (root / split).mkdir()
        for i, (_, yid, start, end, _) in enumerate(rows):
            if i in skip:
                continue  # missing clips
            ext = ".mkv" if i == 4 else ".mp4"
            encode(
                root / split / f"{video_sources.k400_clip_stem(yid, start, end)}{ext}",
                painted(3 + i, 16, 24),
                fmt="matroska" if ext == ".mkv" else None,
            )
    return root


def test_k400_source_counts_missing_clips_and_maps_sorted_classes(k400, caplog):
    csv_path = k400 / "annotations" / "train.csv"
    with caplog.at_level("WARNING"):
        source = video_sources.Kinetics400Source(k400 / "train", csv_path)
    assert source.report.endswith("train.csv: 7 of 9 clips present, 2 missing")
    assert "7 of 9 clips present, 2 missing" in caplog.text
    assert source.classes == ("abseiling", "juggling balls", "zumba") and source.num_classes == 3
    assert len(source) == 7 and source.num_missing == 2
    expected = [[2, 0, 1][i % 3] for i in range(9) if i not in (2, 7)]
    np.testing.assert_array_equal([source[i]["label"] for i in range(7)], expected)
    assert source[3]["path"].endswith("-tr_04abcde_000040_000050.mkv")
    assert video.frame_count(source[3]["path"]) == 7
    val = video_sources.Kinetics400Source(k400 / "val", k400 / "annotations" / "val.csv", classes=source.classes)
    assert len(val) == 3 and val.report.endswith("3 of 4 clips present, 1 missing")


@pytest.mark.parametrize(
    "row, message",
    [
        (("zumba", "abc", "1", "11"), "expected 5 fields"),
        (("zumba", "abc", "x1", "11", "train"), "time_start must be an integer"),
        (("zumba", "abc", "1", "-3", "train"), "time_end must be an integer >= 0"),
        (("zumba", "../../etc", "1", "11", "train"), "youtube_id must match"),
        (("", "abc", "1", "11", "train"), "empty label"),
        (("salsa", "abc", "1", "11", "train"), "label 'salsa' is not one of the 3 classes"),
    ],
)
def test_k400_malformed_rows_name_file_and_line(k400, tmp_path, row, message):
    good = ("zumba", "abcdefghijk", "1", "11", "train")
    csv_path = write_csv(tmp_path / "bad.csv", ("label", "youtube_id", "time_start", "time_end", "split"), [good, row])
    with pytest.raises(ValueError, match=message) as e:
        video_sources.Kinetics400Source(k400 / "train", csv_path, classes=("abseiling", "juggling balls", "zumba"))
    assert "bad.csv' row 3" in str(e.value)


def test_k400_whole_dataset_problems_are_immediate(k400, tmp_path):
    no_label = write_csv(tmp_path / "test.csv", ("youtube_id", "time_start", "time_end", "split"), [("a", 1, 2, "t")])
    with pytest.raises(ValueError, match="lacks column.*'label'"):
        video_sources.Kinetics400Source(k400 / "train", no_label)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video_sources.Kinetics400Source(k400 / "nope", k400 / "annotations" / "train.csv")
    with pytest.raises(FileNotFoundError, match="0 of 4 clips present"):  # val clips are not in train/
        video_sources.Kinetics400Source(k400 / "train", k400 / "annotations" / "val.csv")


def test_folder_csv_source_splits_labels_and_path_escapes(clips, tmp_path):
    root = os.path.dirname(clips["c40"])
    rows = [("c40.mp4", 1, "train"), ("./c12.mp4", 0, "test"), ("gone.mp4", 2, "train"), ("c1.mp4", 2, "train")]
    csv_path = write_csv(tmp_path / "clips.csv", ("path", "label", "split"), rows)
    train = video_sources.FolderCsvSource(root, csv_path, split="train")
    assert len(train) == 2 and train.report.endswith("2 of 3 clips present, 1 missing")
    assert [train[i]["label"] for i in range(2)] == [1, 2] and train[0]["path"] == clips["c40"]
    test = video_sources.FolderCsvSource(root, csv_path, split="test")
    assert len(test) == 1 and test[0]["path"] == clips["c12"]
    assert len(video_sources.FolderCsvSource(root, csv_path)) == 3  # no split asked: every row
    with pytest.raises(ValueError, match="no rows for split 'val'.*'test', 'train'"):
        video_sources.FolderCsvSource(root, csv_path, split="val")
    for bad, message in [
        ("../c40.mp4", "escapes the dataset root"),
        ("a/../../c40.mp4", "escapes the dataset root"),
        (clips["c40"], "must be relative"),
    ]:
        bad_csv = write_csv(tmp_path / "escape.csv", ("path", "label"), [("c40.mp4", 0), (bad, 0)])
        with pytest.raises(ValueError, match=message) as e:
            video_sources.FolderCsvSource(root, bad_csv)
        assert "escape.csv' row 3" in str(e.value)
    bad_csv = write_csv(tmp_path / "label.csv", ("path", "label"), [("c40.mp4", "-1")])
    with pytest.raises(ValueError, match="label.csv' row 2: label '-1' is negative"):
        video_sources.FolderCsvSource(root, bad_csv)
    named = write_csv(tmp_path / "named.csv", ("path", "label"), [("c40.mp4", "cat"), ("c12.mp4", "ant")])
    assert video_sources.FolderCsvSource(root, named).classes == ["ant", "cat"]  # class names, sorted (README)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        video_sources.FolderCsvSource(root, write_csv(tmp_path / "h.csv", ("path", "class"), [("c40.mp4", 0)]))
    with pytest.raises(FileNotFoundError, match=r"absent\.csv' not found"):
        video_sources.FolderCsvSource(root, tmp_path / "absent.csv")


# ----------------------------------------------------------------------------------------------- moving digits

SMALL_DIGITS = {"num_clips": 50, "num_frames": 6, "size": 24, "fps": 8}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("md") / "moving_digits"
    video_sources.write_moving_digits(root, seed=7, **SMALL_DIGITS)
    return root


def read_rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_moving_digits_files_labels_split_and_determinism(digits_root, tmp_path):
    rows = read_rows(digits_root / "clips.csv")
    assert len(rows) == 50 and set(rows[0]) == {"path", "label", "split"}
    labels = np.array([int(r["label"]) for r in rows])
    np.testing.assert_array_equal(np.bincount(labels), [5] * 10)  # balanced
    test = np.array([r["split"] == "test" for r in rows])
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=10), [1] * 10)  # stratified 20%
    frames = video.read_frames(digits_root / rows[0]["path"])
    assert frames.shape == (6, 24, 24, 3) and frames.max() > 100  # a visible digit
    centres = np.array([np.argwhere(f.max(-1) > 60).mean(0) for f in frames])
    assert np.linalg.norm(centres - centres[0], axis=1).max() > 2  # it moves
    # Same seed, another folder: identical CSV and rendered content; another seed: different clips. The decoded
    # pixels are compared with a small tolerance: on a loaded machine x264 was seen to encode one macroblock of the
    # same frames differently (<= 3 levels on ~1% of the pixels) even with every thread knob pinned.
    again = video_sources.write_moving_digits(tmp_path / "again", seed=7, **SMALL_DIGITS)
    assert read_rows(again) == rows
    decoded = video.read_frames(tmp_path / "again" / rows[0]["path"]).astype(int)
    assert np.abs(decoded - frames.astype(int)).max() <= 8 and np.mean(decoded != frames) < 0.05
    other = video_sources.write_moving_digits(tmp_path / "other", seed=8, **SMALL_DIGITS)
    assert [r["label"] for r in read_rows(other)] != [r["label"] for r in rows]


def test_moving_digits_distractor_is_a_small_moving_square():
    digit = np.random.default_rng(5).integers(0, 17, (8, 8)).astype(np.float64)
    plain = video_sources.render_moving_digit(digit, np.random.default_rng(6), 6, 24, distractor=False)
    busy = video_sources.render_moving_digit(digit, np.random.default_rng(6), 6, 24, distractor=True)
    boxes = []
    for a, b in zip(plain, busy):  # the digit is drawn identically; only the 3x3 square differs
        ys, xs = np.nonzero(np.any(a != b, axis=-1))
        if len(ys):
            assert ys.max() - ys.min() < 3 and xs.max() - xs.min() < 3
            boxes.append((ys.min(), xs.min()))
    assert len(boxes) >= 4 and len(set(boxes)) > 1


def test_moving_digits_atomic_reuse_and_races(digits_root, tmp_path):
    csv_path = digits_root / "clips.csv"
    stamp = os.stat(csv_path).st_mtime_ns
    assert video_sources.write_moving_digits(digits_root, seed=7, **SMALL_DIGITS) == str(csv_path)
    assert os.stat(csv_path).st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ValueError, match="not the requested"):
        video_sources.write_moving_digits(digits_root, seed=8, **SMALL_DIGITS)
    (tmp_path / "half").mkdir()
    with pytest.raises(FileExistsError, match="not a complete moving-digits folder"):
        video_sources.write_moving_digits(tmp_path / "half", seed=7, **SMALL_DIGITS)
    small = {**SMALL_DIGITS, "num_clips": 10, "num_frames": 2}
    errors = []

    def make():
        try:
            video_sources.write_moving_digits(tmp_path / "race", seed=1, **small)
        except Exception as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == ["half", "race"]  # no temporary folder left behind
    assert len(read_rows(tmp_path / "race" / "clips.csv")) == 10
    with pytest.raises(ValueError, match="size must be even"):
        video_sources.write_moving_digits(tmp_path / "odd", seed=1, **{**small, "size": 25})


# --------------------------------------------------------------------------------------------------- pipeline


def data_config(**overrides):
    config = video_pipeline.default_data_config()
    small = {"name": "moving_digits", "num_frames": 3, "sampling_rate": 2, "image_size": 16, "max_skipped": 5}
    config.update({**small, "num_threads": 2, "prefetch_buffer_size": 2})
    config.update(overrides)
    return config


def replace(config, **overrides):
    config = config.copy_and_resolve_references()
    config.update(overrides)
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"input", "length", "label"}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_batches_shapes_determinism_and_threads(digits_root):
    config = data_config(data_dir=str(digits_root))
    ds = video_pipeline.train_dataset(config, local_batch_size=4, seed=3)
    batches = take(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))), 3)
    batch = batches[0]
    assert batch["input"].shape == (4, 3, 16, 16, 3) and batch["input"].dtype == np.float32
    assert batch["length"].dtype == np.int32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["length"], [3] * 4)
    assert np.all(np.isfinite(batch["input"])) and batch["input"].max() > 1.0  # digits above the mean
    assert 0 <= batch["label"].min() and batch["label"].max() <= 9
    serial = take(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))), 3)
    assert_batches_equal(batches, serial)  # independent of the thread count
    other = take(iter(video_pipeline.train_dataset(config, local_batch_size=4, seed=4)), 1)
    assert not np.array_equal(other[0]["input"], batch["input"])


def test_process_shards_union_is_the_global_batch_and_resume_is_exact(digits_root):
    config = data_config(data_dir=str(digits_root), num_threads=0)
    global_batches = take(iter(video_pipeline.train_dataset(config, local_batch_size=4, seed=5)), 2)
    shards = [
        take(
            iter(video_pipeline.train_dataset(config, local_batch_size=2, seed=5, process_index=p, process_count=2)), 2
        )
        for p in range(2)
    ]
    for step in range(2):
        for key in ("input", "length", "label"):
            # The process blocks, in order, are the one-process global batch.
            blocks = np.concatenate([shards[p][step][key] for p in range(2)])
            np.testing.assert_array_equal(blocks, global_batches[step][key])

    ds = video_pipeline.train_dataset(config, local_batch_size=4, seed=5).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
    )
    iterator = iter(ds)
    take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 2)
    restored = iter(ds)
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), expected)


def test_eval_arrays_order_and_preprocess_eval(digits_root):
    config = data_config(data_dir=str(digits_root), eval_short_side=18)
    arrays = video_pipeline.eval_arrays(config, "test", max_examples=4)
    rows = [r for r in read_rows(digits_root / "clips.csv") if r["split"] == "test"][:4]
    assert arrays["input"].shape == (4, 3, 16, 16, 3)
    np.testing.assert_array_equal(arrays["label"], [int(r["label"]) for r in rows])
    np.testing.assert_array_equal(arrays["length"], [3] * 4)
    paths = [str(digits_root / r["path"]) for r in rows]
    direct = video_pipeline.preprocess_eval(config, paths)
    np.testing.assert_array_equal(direct["input"], arrays["input"])
    # NumPy reference of the eval geometry for clip 0: centre indices 0, 2, 4 of 6, short side 18, centre crop 16.
    frames = video.read_frames(paths[0])[[0, 2, 4]]
    reference = np.stack([pil_resize(f, 18, 18)[1:17, 1:17] for f in frames])
    np.testing.assert_allclose(arrays["input"][0], (reference / 255.0 - np.array(MEAN)) / np.array(STD), atol=1e-5)
    # Raw frame arrays in their natural forms give the same result as the files.
    raw = [video.read_frames(p) for p in paths[:2]]
    as_uint8 = video_pipeline.preprocess_eval(config, raw)
    as_float = video_pipeline.preprocess_eval(config, np.stack(raw).astype(np.float32) / 255.0)
    np.testing.assert_array_equal(as_uint8["input"], arrays["input"][:2])
    np.testing.assert_allclose(as_float["input"], as_uint8["input"], atol=1e-5)
    assert video_pipeline.eval_arrays(config, "test")["label"].shape == (10,)  # uncapped: the whole split
    with pytest.raises(ValueError, match=r"\[B, frames, H, W, C\]"):
        video_pipeline.preprocess_eval(config, np.stack(raw)[0])
    with pytest.raises(ValueError, match="float frames must be finite"):
        video_pipeline.preprocess_eval(config, [np.full((2, 8, 8, 3), np.nan, np.float32)])
    with pytest.raises(video.VideoDecodeError, match="no such video file"):
        video_pipeline.preprocess_eval(config, [str(digits_root / "nope.mp4")])


def test_pad_mode_reports_length(clips, tmp_path):
    root = os.path.dirname(clips["c40"])
    csv_path = write_csv(tmp_path / "v.csv", ("path", "label"), [("c12.mp4", 0), ("c1.mp4", 1), ("c40.mp4", 2)])
    config = data_config(
        name="video_folder",
        data_dir=root,
        train_csv=csv_path,
        eval_csv=csv_path,
        num_frames=4,
        sampling_rate=4,
        image_size=16,
        short_clip="pad",
    )
    arrays = video_pipeline.eval_arrays(config, "test")
    np.testing.assert_array_equal(arrays["length"], [3, 1, 4])  # 12 frames: 0, 4, 8 (+ slack 3) / 1 frame / full
    assert not arrays["input"][0, 3:].any() and not arrays["input"][1, 1:].any() and arrays["input"][0, 2].any()
    looped = video_pipeline.eval_arrays(replace(config, short_clip="loop"), "test")
    np.testing.assert_array_equal(looped["length"], [4, 4, 4])
    batch = next(iter(video_pipeline.train_dataset(config, local_batch_size=3, seed=0)))
    assert sorted(batch["length"].tolist()) == [1, 3, 4]


def test_unreadable_records_are_replaced_counted_and_capped(clips, tmp_path):
    root = os.path.dirname(clips["c40"])
    names = ["c40.mp4", "junk.mp4", "c12.mp4", "cut.mp4", "cut_fast.mp4", "zero.mp4", "c1.mp4", "c15.mkv"]
    csv_path = write_csv(tmp_path / "v.csv", ("path", "label"), [(n, i) for i, n in enumerate(names)])
    config = data_config(
        name="video_folder",
        data_dir=root,
        train_csv=csv_path,
        eval_csv=csv_path,
        num_frames=2,
        sampling_rate=1,
        image_size=16,
        max_skipped=4,
    )
    arrays = video_pipeline.eval_arrays(config, "test")
    # Each unreadable clip takes the next readable record: junk -> c12; cut, cut_fast, zero -> c1.
    np.testing.assert_array_equal(arrays["label"], [0, 2, 2, 6, 6, 6, 6, 7])
    np.testing.assert_array_equal(arrays["input"][3], arrays["input"][6])
    assert video_pipeline.skipped_count() == 4  # distinct files, each counted once
    batches = take(iter(video_pipeline.train_dataset(config, local_batch_size=4, seed=1)), 4)
    assert all(set(b["label"].tolist()) <= {0, 2, 6, 7} for b in batches)
    assert video_pipeline.skipped_count() == 4
    # A file that disappears after the source was built is one more unreadable record: over the ceiling of 4.
    gone = Path(root) / "gone.mp4"
    encode(gone, painted(3))
    rows = [(n, i) for i, n in enumerate(names)] + [("gone.mp4", 8)]
    csv_gone = write_csv(tmp_path / "w.csv", ("path", "label"), rows)
    config = replace(config, train_csv=csv_gone)
    ds = video_pipeline.train_dataset(config, local_batch_size=9, seed=1)
    gone.unlink()
    with pytest.raises(RuntimeError, match=r"5 unreadable video records skipped, more than config.data.max_skipped=4"):
        take(iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))), 1)


def test_kinetics400_through_the_pipeline(k400):
    config = data_config(name="kinetics400", data_dir=str(k400), image_size=12, num_frames=2, sampling_rate=1)
    arrays = video_pipeline.eval_arrays(config, "val")
    # val rows 0, 2, 3 are present; labels (i + 1) % 3 in train's class order (abseiling, juggling balls, zumba).
    np.testing.assert_array_equal(arrays["label"], [[2, 0, 1][(i + 1) % 3] for i in (0, 2, 3)])
    batch = next(iter(video_pipeline.train_dataset(config, local_batch_size=5, seed=0)))
    assert batch["input"].shape == (5, 2, 12, 12, 3)
    with pytest.raises(ValueError, match="has splits 'train' and 'val', got 'test'"):
        video_pipeline.eval_arrays(config, "test")


def test_embedded_demo_is_generated_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BRIDLE_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(video_pipeline, "MOVING_DIGITS", {**SMALL_DIGITS, "num_clips": 30, "seed": 0})
    arrays = video_pipeline.eval_arrays(data_config(), "test")
    folder = f"moving_digits-v{video_sources.MOVING_DIGITS_VERSION}"
    assert os.path.isfile(tmp_path / "cache" / folder / "complete.json")
    assert arrays["input"].shape[0] == len(arrays["label"]) > 0


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("name", "ucf101", "config.data.name: expected one of"),
        ("num_frames", 0, "config.data.num_frames: expected an int >= 1"),
        ("sampling_rate", 1.5, "config.data.sampling_rate: expected an int >= 1"),
        ("crop_scales", (1.0, 1.2), r"config.data.crop_scales: expected a non-empty sequence of numbers in \(0, 1\]"),
        ("short_clip", "repeat", "config.data.short_clip: expected one of"),
        ("eval_short_side", 8, "config.data.eval_short_side: expected None or an int >= config.data.image_size=16"),
        ("flip", "yes", "config.data.flip: expected a bool"),
        ("std", (1, 0, 1), "config.data.std: expected 3 finite numbers"),
        ("max_skipped", -1, "config.data.max_skipped: expected an int >= 0"),
        ("max_eval_examples", 0, "config.data.max_eval_examples: expected None or an int >= 1"),
    ],
)
def test_bad_config_fields_are_named(field, value, expected):
    config = types.SimpleNamespace(**{**data_config().to_dict(), field: value})  # ConfigDict would type-check first
    with pytest.raises(ValueError, match=expected):
        video_pipeline.validate_data_config(config)


def test_dataset_level_problems_raise_immediately(tmp_path):
    with pytest.raises(ValueError, match="config.data.data_dir: expected the dataset folder for name='kinetics400'"):
        video_pipeline.validate_data_config(data_config(name="kinetics400"))
    with pytest.raises(ValueError, match="config.data.train_csv: expected the path"):
        video_pipeline.validate_data_config(data_config(name="video_folder", data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        video_pipeline.eval_arrays(data_config(name="kinetics400", data_dir=str(tmp_path / "none")), "val")
    with pytest.raises(FileNotFoundError, match=r"annotation CSV file .*train\.csv' not found"):
        video_pipeline.eval_arrays(data_config(name="kinetics400", data_dir=str(tmp_path)), "val")
    assert video_pipeline.DATASETS == {"kinetics400": "val", "video_folder": "test", "moving_digits": "test"}


def test_num_classes_and_eval_labels_come_from_the_csv(digits_root):
    """The contract's `num_classes` (fine-tuning checks config.num_classes against it) and `eval_labels` (the label
    check before compiling): from the CSV, equal to what the eval stream yields."""
    config = data_config(data_dir=str(digits_root))
    assert pipeline.num_classes(config) == 10
    labels = pipeline.eval_labels(config, "test")
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, pipeline.eval_arrays(config, "test")["label"])
    np.testing.assert_array_equal(pipeline.eval_labels(config, "test", max_examples=4), labels[:4])
