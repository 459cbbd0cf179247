"""Data anywhere: every reader takes ``gs://`` and any fsspec URL for ``config.data.data_dir``, with no local copy.

The same tiny datasets (audio CSV folder, video CSV, image folder and its CSV variant, Fashion-MNIST IDX files,
AudioSet and Kinetics layouts) are written to local disk and to fsspec's in-process ``memory://`` file system, read
through the entry points ``train.py`` uses (``pipeline.train_iterator`` / ``pipeline.eval_arrays``), and the decoded
arrays must be identical. ``gs://`` is read through ``etils.epath`` against an in-memory stand-in for gcsfs, so the
epath branch (the one a Cloud TPU VM takes) is exercised too. No network, no model: a few seconds.
"""

import gzip
import importlib
import importlib.util
import io
import os
import struct
import uuid

import fsspec
import numpy as np
import pytest
import soundfile as sf
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from bridle_jax.data import (
    audio,
    audio_pipeline,
    audio_sources,
    csv_files,
    fashion_mnist,
    image_folder,
    image_pipeline,
    pipeline,
    video,
    video_pipeline,
    video_sources,
)

SR = 16000


# ------------------------------------------------------------------------------------------------------ helpers


def upload(local_root, url: str, fs=None) -> None:
    """Copies every file under ``local_root`` to ``url`` (same relative paths), byte for byte."""
    fs = fs or fsspec.filesystem("memory")
    for folder, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, local_root).replace(os.sep, "/")
            with open(path, "rb") as f:
                fs.pipe(f"{url}/{relative}", f.read())


@pytest.fixture
def mem():
    """A fresh ``memory://`` folder, removed afterwards (the memory file system is process-wide)."""
    name = f"bridle-{uuid.uuid4().hex[:10]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture(autouse=True)
def _fresh_skip_counters():
    for module in (audio_pipeline, video_pipeline):
        module.SKIPPED.reset()
    yield
    for module in (audio_pipeline, video_pipeline):
        module.SKIPPED.reset()


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(b[key]), err_msg=key)


def same_through_pipeline(local_cfg, url_cfg, eval_split: str, batch: int) -> dict:
    """eval_arrays and the first train batch (train.py's entry points) agree for the local and the URL config."""
    local = pipeline.eval_arrays(local_cfg, eval_split)
    assert_same(local, pipeline.eval_arrays(url_cfg, eval_split))
    first = [next(pipeline.train_iterator(c, local_batch_size=batch, seed=3)) for c in (local_cfg, url_cfg)]
    assert_same(*first)
    return local


# ----------------------------------------------------------------------------------------------------- helpers


def test_url_paths_are_joined_with_slashes_and_never_made_local():
    assert csv_files.join("gs://bucket", "a", "b.wav") == "gs://bucket/a/b.wav"
    assert csv_files.join("gs://bucket/", "a") == "gs://bucket/a"
    assert csv_files.join("gs://bucket/x", "memory://y/z") == "memory://y/z"
    assert csv_files.absolute("gs://bucket/data") == "gs://bucket/data"  # os.path.abspath: '/cwd/gs:/bucket/data'
    assert csv_files.is_absolute("memory://x") and csv_files.is_absolute("/x") and not csv_files.is_absolute("x")
    assert csv_files.resolve_inside("gs://b/root", "./a//b.wav", "w") == "gs://b/root/a/b.wav"
    for bad, why in (("../x.wav", "escapes"), ("a/../../x.wav", "escapes"), ("gs://other/x.wav", "absolute"),
                     ("/x.wav", "absolute")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"w: path .* {why}.*'gs://b/root'"):
            csv_files.resolve_inside("gs://b/root", bad, "w")


# -------------------------------------------------------------------------------------------------------- audio


def test_audio_folder_reads_the_same_from_memory(tmp_path, mem):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        n = int(rng.integers(2000, 6000))
        if i == 4:  # stereo FLAC at 22.05 kHz: averaged and resampled as from disk
            data = wav_bytes(rng.uniform(-0.5, 0.5, (n, 2)).astype(np.float32), 22050, "FLAC")
            name = f"clips/{i}.flac"
        else:
            data = wav_bytes(rng.uniform(-0.5, 0.5, n).astype(np.float32), SR)
            name = f"clips/{'sub/' if i % 2 else ''}{i}.wav"
        write(tmp_path / name, data)
        rows.append((name, ["owl", "cat", "dog"][i % 3]))
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    (tmp_path / "test.csv").write_text("\ufeffpath,label\r\n" + "".join(f"{p},{lab}\r\n" for p, lab in rows[:3]))
    upload(tmp_path, mem)

    def cfg(data_dir):
        c = audio_pipeline.default_data_config()
        c.update({"name": "audio_folder", "data_dir": data_dir, "target_frames": 32, "num_threads": 2,
                  "prefetch_buffer_size": 2})  # fmt: skip
        return c

    local = same_through_pipeline(cfg(str(tmp_path)), cfg(mem), "test", batch=4)
    np.testing.assert_array_equal(local["label"], [2, 0, 1])  # classes: sorted names of the train CSV
    np.testing.assert_array_equal(audio.load_audio(f"{mem}/clips/4.flac"), audio.load_audio(tmp_path / "clips/4.flac"))


def test_audioset_and_kinetics_list_their_clip_folders_remotely(tmp_path, mem):
    rng = np.random.default_rng(1)
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    (tmp_path / "segments.csv").write_text(
        "# Segments csv\n# num_ytids=3\n# YTID, start_seconds, end_seconds, positive_labels\n"
        'aaa, 0.000, 10.000, "/m/a"\nbbb, 30.000, 40.000, "/m/a,/m/b"\nccc, 0.000, 10.000, "/m/b"\n'
    )
    write(tmp_path / "clips/aaa_0.000.wav", wav_bytes(rng.uniform(-0.5, 0.5, 800).astype(np.float32), SR))
    write(tmp_path / "clips/bbb.wav", wav_bytes(rng.uniform(-0.5, 0.5, 900).astype(np.float32), SR))
    (tmp_path / "k400").mkdir()
    (tmp_path / "k400/train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nrun,v1,0,10,train\nswim,v2,5,15,train\nrun,v3,0,10,train\n"
    )
    for stem in ("v1_000000_000010", "v2_000005_000015"):
        (tmp_path / "k400/clips").mkdir(exist_ok=True)
        video.write_video(tmp_path / f"k400/clips/{stem}.mp4", np.zeros((2, 8, 8, 3), np.uint8))
    upload(tmp_path, mem)

    sources = {}
    for root in (str(tmp_path), mem):
        j = lambda *p, root=root: csv_files.join(root, *p)
        sources[root] = (
            audio_sources.AudioSetSource(j("clips"), j("segments.csv"), j("class_labels_indices.csv")),
            video_sources.Kinetics400Source(j("k400/clips"), j("k400/train.csv")),
        )
    (audioset, kinetics), (remote_audioset, remote_kinetics) = sources[str(tmp_path)], sources[mem]
    assert remote_audioset.num_present == 2 and remote_audioset.num_missing == 1
    assert [remote_audioset.path(i) for i in range(2)] == [f"{mem}/clips/aaa_0.000.wav", f"{mem}/clips/bbb.wav"]
    for i in range(2):
        assert_same(
            {k: v for k, v in audioset[i].items() if k != "path"},
            {k: v for k, v in remote_audioset[i].items() if k != "path"},
        )
    assert remote_kinetics.num_missing == 1 and remote_kinetics.paths[1] == f"{mem}/k400/clips/v2_000005_000015.mp4"
    np.testing.assert_array_equal(remote_kinetics.labels, kinetics.labels)
    np.testing.assert_array_equal(video.read_frames(remote_kinetics.paths[0]), video.read_frames(kinetics.paths[0]))


# -------------------------------------------------------------------------------------------------------- video


def test_video_folder_reads_the_same_from_memory(tmp_path, mem):
    rng = np.random.default_rng(2)
    rows = []
    for i, frames in enumerate((5, 7, 3)):
        clip = rng.integers(0, 256, (frames, 24, 32, 3), dtype=np.uint8)
        video.write_video(tmp_path / f"c{i}.mp4", clip)  # the project's own writer; bytes uploaded below
        rows.append((f"c{i}.mp4", ["walk", "jump", "walk"][i], "test" if i == 2 else "train"))
    (tmp_path / "clips.csv").write_text("path,label,split\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    upload(tmp_path, mem)

    def cfg(data_dir):
        c = video_pipeline.default_data_config()
        c.update({"name": "video_folder", "data_dir": data_dir, "train_csv": "clips.csv", "eval_csv": "clips.csv",
                  "num_frames": 3, "sampling_rate": 1, "image_size": 16, "num_threads": 2,
                  "prefetch_buffer_size": 2})  # fmt: skip
        return c

    local = same_through_pipeline(cfg(str(tmp_path)), cfg(mem), "test", batch=2)
    assert local["input"].shape == (1, 3, 16, 16, 3) and local["label"].tolist() == [1]
    assert video.probe(f"{mem}/c1.mp4") == video.probe(tmp_path / "c1.mp4")


# ------------------------------------------------------------------------------------------------------- images


def write_image_folder(root) -> None:
    rng = np.random.default_rng(3)
    files = {
        "train/cat/a.png": "PNG", "train/cat/deep/b.JPG": "JPEG", "train/dog/c.png": "PNG",
        "train/dog/d.webp": "WEBP", "test/cat/e.png": "PNG", "test/dog/f.bmp": "BMP",
    }  # fmt: skip
    for i, (name, fmt) in enumerate(files.items()):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(buffer, format=fmt)
        write(os.path.join(root, name), buffer.getvalue())
    write(os.path.join(root, "train/.ipynb_checkpoints/x.png"), b"not a class")  # hidden: ignored
    write(os.path.join(root, "train/cat/.hidden/y.png"), b"hidden sub-folder: pruned")
    write(os.path.join(root, "lists/train.csv"), b"path,label\ntrain/cat/a.png,cat\ntrain/dog/c.png,dog\n")
    write(os.path.join(root, "lists/test.csv"), b"path,label\ntest/dog/f.bmp,dog\n")


def image_cfg(data_dir, **overrides):
    c = image_pipeline.default_data_config()
    c.update({"name": "image_folder", "data_dir": data_dir, "image_size": 8, "num_threads": 2,
              "prefetch_buffer_size": 2, **overrides})  # fmt: skip
    return c


def test_image_folder_and_its_csv_variant_read_the_same_from_memory(tmp_path, mem):
    write_image_folder(tmp_path)
    upload(tmp_path, mem)
    local = same_through_pipeline(image_cfg(str(tmp_path)), image_cfg(mem), "test", batch=2)
    assert local["label"].tolist() == [0, 1]
    remote = image_folder.ImageFolderSource(mem, "train")
    assert remote.paths == [f"{mem}/train/cat/a.png", f"{mem}/train/cat/deep/b.JPG", f"{mem}/train/dog/c.png",
                            f"{mem}/train/dog/d.webp"]  # fmt: skip
    assert [p.replace(str(tmp_path), mem) for p in image_folder.ImageFolderSource(str(tmp_path), "train").paths] == (
        remote.paths
    )
    csvs = {"train_csv": "lists/train.csv", "eval_csv": "lists/test.csv"}
    local = same_through_pipeline(image_cfg(str(tmp_path), **csvs), image_cfg(mem, **csvs), "test", batch=2)
    assert local["label"].tolist() == [1]


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_fashion_mnist_idx_files_read_the_same_from_memory(tmp_path, mem):
    rng = np.random.default_rng(4)
    for split, n, gz in (("train", 12, True), ("test", 5, False)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        for stem, array in zip(fashion_mnist.FILES[split], (images, labels)):
            data = idx_bytes(array)
            write(tmp_path / (stem + (".gz" if gz else "")), gzip.compress(data) if gz else data)
    upload(tmp_path, mem)
    for split in ("train", "test"):
        for a, b in zip(fashion_mnist.load_split(split, mem), fashion_mnist.load_split(split, str(tmp_path))):
            np.testing.assert_array_equal(a, b)
    cfg = lambda d: image_cfg(d, name="fashion_mnist", image_size=16)
    same_through_pipeline(cfg(str(tmp_path)), cfg(mem), "test", batch=4)


# --------------------------------------------------------------------------------------------------- bad inputs


def test_remote_errors_name_the_url(tmp_path, mem):
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{mem}/bad/junk.mp4", b"\x00\x00\x00\x18ftypmp42 this is no video")
    fs.pipe(f"{mem}/bad/junk.png", b"\x89PNG\r\n\x1a\n truncated")
    fs.pipe(f"{mem}/bad/junk.wav", b"RIFF\x00\x00\x00\x00WAVEjunk")
    fs.pipe(f"{mem}/bad/list.csv", b"path,label\nnothere.wav,cat\n../../escape.wav,cat\n")
    fs.pipe(f"{mem}/bad/t10k-images-idx3-ubyte", idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5])  # truncated

    with pytest.raises(audio.AudioFileNotFoundError, match=rf"audio file '{mem}/bad/missing\.wav': no such file"):
        audio.load_audio(f"{mem}/bad/missing.wav")
    with pytest.raises(audio.AudioDecodeError, match=rf"'{mem}/bad/junk\.wav': cannot decode"):
        audio.load_audio(f"{mem}/bad/junk.wav")
    with pytest.raises(video.VideoNotFoundError, match=rf"{mem}/bad/missing\.mp4: no such video file"):
        video.read_frames(f"{mem}/bad/missing.mp4")
    with pytest.raises(video.VideoDecodeError, match=rf"{mem}/bad/junk\.mp4: cannot open the container"):
        video.read_frames(f"{mem}/bad/junk.mp4")
    with pytest.raises(image_folder.ImageDecodeError, match=rf"cannot decode image '{mem}/bad/junk\.png'"):
        image_folder.decode_image(f"{mem}/bad/junk.png")
    with pytest.raises(image_folder.ImageDecodeError, match=rf"'{mem}/bad/gone\.png': FileNotFoundError"):
        image_folder.decode_image(f"{mem}/bad/gone.png")
    with pytest.raises(ValueError, match=rf"'{mem}/bad/list\.csv' row 3: path '\.\./\.\./escape\.wav' escapes"):
        audio_sources.FolderCsvSource(f"{mem}/bad", "list.csv")
    with pytest.raises(FileNotFoundError, match=rf"annotation CSV file '{mem}/bad/absent\.csv' not found"):
        audio_sources.FolderCsvSource(f"{mem}/bad", "absent.csv")
    with pytest.raises(FileNotFoundError, match=rf"config\.data\.data_dir='{mem}/nowhere' is not a directory"):
        pipeline.eval_arrays(image_cfg(f"{mem}/nowhere", train_csv="a.csv", eval_csv="b.csv"), "test")
    with pytest.raises(FileNotFoundError, match=rf"config\.data\.data_dir='{mem}/nowhere' is not a folder"):
        cfg = video_pipeline.default_data_config()
        cfg.update({"name": "video_folder", "data_dir": f"{mem}/nowhere", "train_csv": "c.csv", "eval_csv": "c.csv"})
        pipeline.eval_arrays(cfg, "test")
    with pytest.raises(fashion_mnist.IdxError, match=rf"'{mem}/bad/t10k-images-idx3-ubyte'.*truncated"):
        fashion_mnist.read_idx(f"{mem}/bad/t10k-images-idx3-ubyte", 3)
    with pytest.raises(FileNotFoundError, match=rf"not all in '{mem}/bad'"):
        fashion_mnist.load_split("test", f"{mem}/bad")
    with pytest.raises(ValueError, match=rf"'{mem}/sounds' holds no complete synthetic sound set"):
        audio_pipeline.sounds_root(f"{mem}/sounds")
    # A missing clip in a CSV is skipped and counted by the pipeline, named by its URL.
    fs.pipe(f"{mem}/ok/a.wav", wav_bytes(np.zeros(400, np.float32), SR))
    fs.pipe(f"{mem}/ok/train.csv", b"path,label\na.wav,0\nnothere.wav,1\n")
    fs.pipe(f"{mem}/ok/test.csv", b"path,label\nnothere.wav,1\na.wav,0\n")
    cfg = audio_pipeline.default_data_config()
    cfg.update({"name": "audio_folder", "data_dir": f"{mem}/ok", "target_frames": 8, "num_threads": 1})
    assert pipeline.eval_arrays(cfg, "test")["label"].tolist() == [0]
    assert audio_pipeline.SKIPPED.last() == [f"{mem}/ok/nothere.wav"]


# -------------------------------------------------------------------------------- gs:// through etils.epath


class FakeGCS(MemoryFileSystem):
    """An in-process stand-in for gcsfs (``gs://bucket/path`` kept in memory), what etils.epath's fsspec backend
    opens for ``gs://`` when TensorFlow is not installed."""

    protocol = ("gs", "gcs")
    store = {}  # noqa: RUF012 (fsspec's class-level store, separate from memory://)
    pseudo_dirs = [""]  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return io.BytesIO(f.getbuffer()) if "r" in mode else f  # gcsfs: one file object per open, not a shared one


@pytest.fixture
def fake_gcs(monkeypatch):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("etils.epath reads gs:// through tf.io.gfile when TensorFlow is installed")
    from etils.epath import backend

    cache = type(backend.fsspec_backend)._get_filesystem  # epath caches the filesystem per protocol
    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is a read-only view)
    for protocol in FakeGCS.protocol:
        monkeypatch.setitem(registry, protocol, FakeGCS)
    cache.cache_clear()
    FakeGCS.clear_instance_cache()
    yield FakeGCS()
    cache.cache_clear()
    FakeGCS.clear_instance_cache()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]


def test_gs_urls_are_read_through_etils_epath(tmp_path, fake_gcs):
    from etils import epath

    write_image_folder(tmp_path)
    write(tmp_path / "sound.wav", wav_bytes(np.linspace(-0.5, 0.5, 1200, dtype=np.float32), SR))
    url = "gs://bucket/data"
    upload(tmp_path, url, fake_gcs)
    assert csv_files._remote(url, lambda p: isinstance(p, epath.Path))  # the epath branch, not plain fsspec
    assert csv_files.is_dir(url) and csv_files.is_file(f"{url}/sound.wav") and not csv_files.is_file(url)
    same_through_pipeline(image_cfg(str(tmp_path)), image_cfg(url), "test", batch=2)
    np.testing.assert_array_equal(audio.load_audio(f"{url}/sound.wav"), audio.load_audio(tmp_path / "sound.wav"))
    with pytest.raises(audio.AudioFileNotFoundError, match=r"'gs://bucket/data/nope\.wav': no such file"):
        audio.load_audio(f"{url}/nope.wav")


def test_a_missing_filesystem_names_the_url_and_the_install():
    if importlib.util.find_spec("gcsfs") is not None or importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("a gs:// filesystem is installed")
    with pytest.raises(ImportError, match=r"'gs://bucket/x\.csv': no filesystem for gs:// .*pip install gcsfs"):
        csv_files.is_file("gs://bucket/x.csv")
