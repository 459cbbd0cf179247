"""Your own images: image_folder (the ImageFolder layout and path,label CSVs) and tfds:<name> (a prepared TFDS dataset),
on real files written here — PNG/JPEG/BMP/WEBP in RGB, L, RGBA, palette and 16-bit grey, of different sizes, one
corrupt — and on a TFDS dataset prepared as ArrayRecord by TFDS itself in another process (no TensorFlow)."""

import io
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from bridle_jax import config as config_lib
from bridle_jax import config_checks
from bridle_jax.data import image_folder, image_pipeline, pipeline, sources

SIZE = 16


def data_config(**overrides) -> ml_collections.ConfigDict:
    c = config_lib.base_config()
    c.data.update({"image_size": SIZE, "num_threads": 2, "prefetch_buffer_size": 2})
    c.data.update(overrides)
    return c.data


def rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def fresh_counter(monkeypatch):
    counter = pipeline.SkippedRecords("image", "images", sources.log)
    monkeypatch.setattr(sources, "SKIPPED", counter)
    return counter


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/{train,test}/<class>/...: 3 train classes, the test split lacks 'bird'. Returns (root, expected pixels)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    pixels = {}

    def save(rel, array, fmt=None, mode=None, **kw):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(path, fmt, **kw)
        pixels[str(path)] = array

    # train: RGB PNG, grey PNG, RGBA PNG, BMP, lossless WEBP, JPEG, upper-case extensions, a nested folder, odd sizes.
    save("train/bird/b0.png", rgb(rng, 9, 14))
    save("train/bird/b1.BMP", rgb(rng, 20, 7), "BMP")
    save("train/cat/c0.PNG", rng.integers(0, 256, (11, 11), dtype=np.uint8))  # L
    rgba = rng.integers(0, 256, (12, 30, 4), dtype=np.uint8)
    save("train/cat/c1.webp", rgba, "WEBP", lossless=True, exact=True)  # RGBA, colours kept under alpha 0
    save("train/cat/sub/c2.png", rng.integers(0, 256, (1, 1, 4), dtype=np.uint8))  # 1x1 RGBA, in a sub-folder
    smooth = np.stack([*np.meshgrid(np.linspace(20, 230, 60), np.linspace(40, 90, 5)), np.full((5, 60), 128.0)], -1)
    save("train/dog/d0.JpEg", smooth.astype(np.uint8), "JPEG", quality=95)  # a thin strip; JPEG is lossy
    save("train/dog/d1.png", rgb(rng, 33, 17))
    good = io.BytesIO()
    Image.fromarray(rgb(rng, 40, 40)).save(good, "PNG")
    (root / "train/dog/d2_truncated.png").write_bytes(good.getvalue()[:200])  # corrupt: a truncated PNG
    (root / "train/dog/notes.txt").write_text("not an image, ignored")
    (root / "train/.ipynb_checkpoints").mkdir()  # hidden: not a class
    # test: no 'bird'; a palette image with transparency and a 16-bit grey PNG.
    save("test/cat/t0.png", rgb(rng, 8, 8))
    (root / "test/dog").mkdir(parents=True)
    palette = Image.new("P", (6, 4))
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    palette.save(root / "test/dog/t1.png")
    grey16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(grey16).save(root / "test/dog/t2.png")
    (root / "empty_split").mkdir()
    return root, pixels


# --------------------------------------------------------------------------------------------- folder layout


def test_folder_layout_class_mapping_and_order(folder):
    root, _ = folder
    train = image_folder.ImageFolderSource(root, "train")
    assert train.classes == ["bird", "cat", "dog"] and train.num_classes == 3
    names = [os.path.relpath(p, root) for p in train.paths]
    assert names == [  # torchvision's order: classes sorted, files sorted per folder, sub-folders walked
        "train/bird/b0.png",
        "train/bird/b1.BMP",
        "train/cat/c0.PNG",
        "train/cat/c1.webp",
        "train/cat/sub/c2.png",
        "train/dog/d0.JpEg",
        "train/dog/d1.png",
        "train/dog/d2_truncated.png",
    ]
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 1, 2, 2, 2])
    test = image_folder.ImageFolderSource(root, "test", classes=train.classes)
    np.testing.assert_array_equal(test.labels, [1, 2, 2])  # the train split's indices, not re-numbered from 0
    assert test.classes == train.classes


def test_decode_gives_rgb_for_grey_rgba_palette_and_16_bit(folder):
    root, pixels = folder
    for path, expected in pixels.items():
        image = image_folder.decode_image(path)
        assert image.dtype == np.uint8 and image.shape == expected.shape[:2] + (3,), path
        if path.endswith(".JpEg"):
            assert np.abs(image.astype(int) - expected).mean() < 4  # lossy
        elif expected.ndim == 2:  # L: the grey value in all three channels
            np.testing.assert_array_equal(image, np.repeat(expected[:, :, None], 3, -1))
        else:  # RGB as stored; RGBA (PNG, lossless WEBP): the alpha channel dropped, colours kept
            np.testing.assert_array_equal(image, expected[:, :, :3])
    palette = image_folder.decode_image(str(root / "test/dog/t1.png"))
    assert palette.shape == (4, 6, 3) and tuple(palette[1, 1]) == (200, 10, 30) and tuple(palette[0, 0]) == (0, 0, 0)
    grey16 = image_folder.decode_image(str(root / "test/dog/t2.png"))
    expected16 = ((np.arange(12).reshape(3, 4) * 5000) >> 8).astype(np.uint8)  # the high byte, not clipped to 255
    np.testing.assert_array_equal(grey16, np.repeat(expected16[:, :, None], 3, -1))
    with pytest.raises(image_folder.ImageDecodeError, match=r"d2_truncated.png"):
        image_folder.decode_image(str(root / "train/dog/d2_truncated.png"))
    with pytest.raises(image_folder.ImageDecodeError, match=r"notes.txt.*UnidentifiedImageError"):
        image_folder.decode_image(str(root / "train/dog/notes.txt"))


def test_train_stream_and_eval_arrays(folder, fresh_counter):
    root, _ = folder
    cfg = data_config(name="image_folder", data_dir=str(root))
    assert pipeline.eval_split(cfg) == "test" and pipeline.modality_of("image_folder") == "image"
    one = pipeline.train_iterator(cfg, local_batch_size=4, seed=3)
    batches = [next(one) for _ in range(6)]  # 3 epochs of 8 records
    for b in batches:
        assert b["input"].shape == (4, SIZE, SIZE, 3) and b["input"].dtype == np.float32
        assert b["length"].tolist() == [SIZE] * 4 and b["label"].dtype == np.int32
    labels = np.concatenate([b["label"] for b in batches[:2]])
    # one epoch: the corrupt dog image is replaced by the next readable record in stored order (bird/b0.png)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert fresh_counter.count == 1 and image_pipeline.skipped_count() == 1 and pipeline.skipped_count(cfg) == 1
    # Deterministic whatever the thread count, and two process shards are the one-process batch.
    cfg0 = data_config(name="image_folder", data_dir=str(root), num_threads=0)
    again = pipeline.train_iterator(cfg0, local_batch_size=4, seed=3)
    for b in batches:
        np.testing.assert_array_equal(next(again)["input"], b["input"])
    shards = [
        image_pipeline.train_dataset(cfg, local_batch_size=2, seed=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    for i in range(3):
        joined = np.concatenate([shards[0][i]["input"], shards[1][i]["input"]])
        np.testing.assert_array_equal(joined, batches[i]["input"])
    assert fresh_counter.count == 1  # the same file, counted once per process

    arrays = pipeline.eval_arrays(cfg, pipeline.eval_split(cfg))
    assert arrays["input"].shape == (3, SIZE, SIZE, 3) and arrays["label"].tolist() == [1, 2, 2]
    train_eval = pipeline.eval_arrays(cfg, "train")  # the corrupt file is dropped (not duplicated) in eval arrays
    assert train_eval["label"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert pipeline.eval_arrays(cfg, "train", max_examples=2)["label"].tolist() == [0, 0]
    assert fresh_counter.count == 1


def test_skip_ceiling_stops_the_run(folder, fresh_counter):
    root, _ = folder
    cfg = data_config(name="image_folder", data_dir=str(root), max_skipped=0)
    with pytest.raises(RuntimeError, match=r"1 unreadable images were skipped, more than config\.data\.max_skipped=0"):
        pipeline.eval_arrays(cfg, "train")
    with pytest.raises(ValueError, match=r"config\.data\.max_skipped: expected an int >= 0"):
        image_pipeline.data_spec(data_config(name="image_folder", data_dir=str(root), max_skipped=-1))


def test_folder_errors_name_what_is_wrong(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ValueError, match=r"config\.data\.data_dir: expected the image folder's root"):
        image_pipeline.data_spec(data_config(name="image_folder"))
    with pytest.raises(FileNotFoundError, match=r"image folder root \(config\.data\.data_dir\) .*nowhere.* not a dir"):
        pipeline.eval_arrays(data_config(name="image_folder", data_dir=str(tmp_path / "nowhere")), "test")
    cfg = data_config(name="image_folder", data_dir=str(root), eval_split="val")
    with pytest.raises(
        FileNotFoundError,
        match=r"split 'val': .* is not a directory .*\['empty_split', 'test', "
        r"'train'\]; choose them with config\.data\.train_split / config\.data\.eval_split",
    ):
        pipeline.eval_arrays(cfg, pipeline.eval_split(cfg))
    with pytest.raises(FileNotFoundError, match=r"'empty_split'.* has no class folders"):
        pipeline.eval_arrays(data_config(name="image_folder", data_dir=str(root)), "empty_split")
    # An eval class that the train split lacks, and an empty class folder.
    bad = tmp_path / "bad"
    for rel in ("train/cat/a.png", "test/cat/b.png", "test/zebra/c.png", "val/cat/d.png"):
        (bad / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(bad / rel)
    (bad / "train/dog").mkdir()
    (bad / "val/dog").mkdir()
    (bad / "val/dog/readme.md").write_text("no images")
    cfg = data_config(name="image_folder", data_dir=str(bad))
    with pytest.raises(FileNotFoundError, match=r"class folder '.*train/dog' holds no image file \(extensions .jpg"):
        pipeline.train_iterator(cfg, local_batch_size=1, seed=0)
    (bad / "train/dog/e.png").write_bytes((bad / "train/cat/a.png").read_bytes())
    with pytest.raises(ValueError, match=r"split 'test': class folder\(s\) \['zebra'\] are not classes of the train"):
        pipeline.eval_arrays(cfg, "test")
    with pytest.raises(FileNotFoundError, match=r"'.*val/dog' holds no image file"):
        pipeline.eval_arrays(cfg, "val")
    with pytest.raises(ValueError, match=r"config\.data\.eval_split: expected a folder name .*got '\.\./x'"):
        image_pipeline.data_spec(data_config(name="image_folder", data_dir=str(bad), eval_split="../x"))


# ------------------------------------------------------------------------------------------------ CSV variant


def test_csv_variant_with_class_names(folder, tmp_path, fresh_counter):
    root = tmp_path / "csvdata"
    meta = root / "meta"
    rng = np.random.default_rng(1)
    for rel, shape in (
        ("imgs/a, b.png", (6, 9, 3)),
        ("imgs/c.png", (7, 7)),
        ("imgs/d.bmp", (5, 8, 3)),
        ("imgs/e.png", (9, 4, 4)),
    ):
        (meta / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(meta / rel)
    (meta / "imgs/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    # A BOM, CRLF line ends, a quoted comma, an extra column; paths relative to data_dir, as for audio and video.
    (meta / "train.csv").write_bytes(
        "\ufeffpath,label,note\r\n\"meta/imgs/a, b.png\",zebra,x\r\nmeta/imgs/c.png,ant,\r\n"
        "meta/imgs/broken.png,ant,\r\n"
        "meta/imgs/missing.png,zebra,\r\nmeta/imgs/d.bmp,ant,\r\n".encode("utf-8")
    )
    (meta / "test.csv").write_text("path,label\nmeta/imgs/e.png,zebra\nmeta/imgs/c.png,ant\n")
    cfg = data_config(name="image_folder", data_dir=str(root), train_csv="meta/train.csv", eval_csv="meta/test.csv")
    train = sources.raw_source(cfg, "train")
    assert train.classes == ["ant", "zebra"]
    np.testing.assert_array_equal(train.labels, [1, 0, 0, 1, 0])
    assert train.paths[0] == str(meta / "imgs/a, b.png")
    batch = next(pipeline.train_iterator(cfg, local_batch_size=5, seed=0))
    assert batch["input"].shape == (5, SIZE, SIZE, 3)
    assert fresh_counter.count == 2  # the corrupt file and the missing one, each counted once
    arrays = pipeline.eval_arrays(cfg, "test")
    assert arrays["label"].tolist() == [1, 0] and arrays["input"].shape == (2, SIZE, SIZE, 3)
    assert sources.num_classes(cfg) == 2

    (meta / "test.csv").write_text("path,label\nmeta/imgs/e.png,zebra\nmeta/imgs/c.png,bee\n")
    with pytest.raises(ValueError, match=r"test\.csv' row 3: unknown label 'bee' \(not one of the 2 classes"):
        pipeline.eval_arrays(cfg, "test")
    (meta / "test.csv").write_text("path,label\n../outside.png,ant\n")
    with pytest.raises(ValueError, match=r"row 2: path '\.\./outside\.png' escapes the dataset root"):
        pipeline.eval_arrays(cfg, "test")
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\] .* got split 'val'"):
        pipeline.eval_arrays(cfg, "val")
    with pytest.raises(ValueError, match=r"config\.data\.eval_csv: expected a 'path,label' CSV too"):
        image_pipeline.data_spec(data_config(name="image_folder", data_dir=str(root), train_csv="meta/train.csv"))
    # Integer labels are used as given; the eval CSV must stay inside the train CSV's range.
    (meta / "train.csv").write_text("path,label\nmeta/imgs/c.png,0\nmeta/imgs/d.bmp,3\n")
    (meta / "test.csv").write_text("path,label\nmeta/imgs/e.png,2\n")
    assert sources.num_classes(cfg) == 4 and pipeline.eval_arrays(cfg, "test")["label"].tolist() == [2]


# ----------------------------------------------------------------------------------------------------- TFDS

BUILD_TFDS = textwrap.dedent('''
    import io, sys
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "kind": tfds.features.ClassLabel(names=["a", "b", "c"]),
                "idx": tfds.features.Scalar(dtype=np.int64),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 7), "validation": self._generate_examples(100, 3)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                rng = np.random.default_rng(i)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8 + i % 5, 6 + i % 3, 3), dtype=np.uint8)).save(buf, "PNG")
                data = buf.getvalue()[:30] if i == 4 else buf.getvalue()  # record 4: corrupt image bytes
                yield i, {"picture": data, "kind": i % 3, "idx": i}

    TinyShapes(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
''')


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """tiny_shapes prepared by TFDS as ArrayRecord in another process, so this process reads it from its files
    (dataset_info.json, features.json, *.array_record-*) like any dataset prepared elsewhere."""
    folder = tmp_path_factory.mktemp("tfds")
    script = folder / "build_tiny_shapes.py"
    script.write_text(BUILD_TFDS)
    subprocess.run([sys.executable, str(script), str(folder)], check=True, capture_output=True, timeout=120)
    files = sorted(os.listdir(folder / "tiny_shapes" / "1.0.0"))
    assert "dataset_info.json" in files and "features.json" in files
    assert "tiny_shapes-train.array_record-00000-of-00001" in files
    return folder


def test_tfds_dataset_by_name_end_to_end(tfds_dir, fresh_counter):
    cfg = data_config(
        name="tfds:tiny_shapes", data_dir=str(tfds_dir), image_key="picture", label_key="kind", eval_split="validation"
    )
    assert "tfds:tiny_shapes" in pipeline.DATASETS and pipeline.modality_of("tfds:tiny_shapes") == "image"
    assert pipeline.eval_split(cfg) == "validation"
    batches = [next(it) for it in [pipeline.train_iterator(cfg, local_batch_size=3, seed=0)] for _ in range(4)]
    assert all(b["input"].shape == (3, SIZE, SIZE, 3) and b["label"].dtype == np.int32 for b in batches)
    assert set(np.concatenate([b["label"] for b in batches]).tolist()) <= {0, 1, 2}
    assert fresh_counter.count == 1  # the record with corrupt bytes: skipped and counted like a corrupt file
    arrays = pipeline.eval_arrays(cfg, "validation")
    raw = sources.raw_source(cfg, "validation")
    expected = [int(raw._source._source[i]["idx"]) % 3 for i in range(3)]  # pylint: disable=protected-access
    assert arrays["input"].shape == (3, SIZE, SIZE, 3) and arrays["label"].tolist() == expected
    assert sources.num_classes(cfg) == 3
    train = pipeline.eval_arrays(cfg, "train")
    assert len(train["label"]) == 6  # 7 records, the corrupt one dropped
    # A version, and TFDS split slicing, in the config.
    cfg_v = data_config(
        name="tfds:tiny_shapes:1.0.0",
        data_dir=str(tfds_dir),
        image_key="picture",
        label_key="kind",
        train_split="train[:2]",
        eval_split="validation[1:]",
    )
    assert len(sources.raw_source(cfg_v, "train")) == 2
    assert len(pipeline.eval_arrays(cfg_v, "validation[1:]")["label"]) == 2

    with pytest.raises(
        ValueError,
        match=r"config\.data\.image_key: expected a feature of 'tfds:tiny_shapes', one of "
        r"\['idx', 'kind', 'picture'\], got 'image'",
    ):
        sources.raw_source(data_config(name="tfds:tiny_shapes", data_dir=str(tfds_dir)), "train")
    with pytest.raises(ValueError, match=r"(?s)no split 'test' .*set config\.data\.train_split / .*eval_split"):
        pipeline.eval_arrays(
            data_config(name="tfds:tiny_shapes", data_dir=str(tfds_dir), image_key="picture", label_key="kind"), "test"
        )


def test_missing_tfds_preparation_says_how_to_prepare(tmp_path):
    cfg = data_config(name="tfds:oxford_flowers102:2.1.0", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError) as err:
        pipeline.train_iterator(cfg, local_batch_size=2, seed=0)
    message = str(err.value)
    assert "tfds:oxford_flowers102:2.1.0 is not prepared as TFDS ArrayRecord under data_dir=" in message
    assert str(tmp_path / "tfds") in message and "never downloads" in message
    assert "tfds build oxford_flowers102:2.1.0 --file_format=array_record --data_dir=TFDS_DIR" in message
    assert not (tmp_path / "tfds").exists()  # nothing downloaded or created
    (tmp_path / "tfds").mkdir()  # the folder exists but holds other datasets
    with pytest.raises(FileNotFoundError, match="tfds build oxford_flowers102"):
        pipeline.eval_arrays(cfg, "test")
    assert os.listdir(tmp_path / "tfds") == []
    (tmp_path / "tfds" / "oxford_flowers102").mkdir()  # a folder without an ArrayRecord preparation: TFDS says so
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)tfds build oxford_flowers102 --file_format=array_record.*"
        r"TFDS said: .*TFRECORD",
    ):
        pipeline.eval_arrays(data_config(name="tfds:oxford_flowers102", data_dir=str(tmp_path / "tfds")), "test")
    for bad in ("tfds:", "tfds:Bad Name", "tfds:cifar10:1.0"):
        with pytest.raises(ValueError, match=r"config\.data\.name: expected 'tfds:<name>\[:<version>\]'"):
            image_pipeline.data_spec(data_config(name=bad))


def test_registry_and_config_validation_accept_both_forms(folder):
    images = {n for n, m in pipeline.DATASETS.items() if m == "image"}
    assert images == set(image_pipeline.DATASETS) >= {"image_folder", pipeline.TFDS_NAME}
    c = config_lib.base_config()
    c.data.name, c.data.image_size = "tfds:cifar10", 32
    config_checks.validate(c)
    c.data.name, c.data.data_dir = "image_folder", str(folder[0])
    config_checks.validate(c)
    assert pipeline.num_classes(c.data) == 3  # fine-tuning checks config.num_classes against the data's count
    c.data.name = "flowers"
    with pytest.raises(ValueError, match=r"expected one of .*'image_folder'.*'tfds:<name>\[:<version>\]'"):
        config_checks.validate(c)
