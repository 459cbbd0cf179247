"""Fashion-MNIST as a data source: the IDX reader against files written here in the official format (plain and
gzipped), its errors, the image pipeline on it, and the recipe end to end on a tiny copy (no real data needed)."""

import gzip
import json
import struct

import numpy as np
import pytest

from bridle_jax import config_checks, train
from bridle_jax.data import fashion_mnist, image_pipeline, pipeline
from bridle_jax.evaluators import loop_probe
from tests import tiny


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    array = np.ascontiguousarray(array, np.uint8)
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_split(folder, split: str, n: int, seed: int, gz: bool):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    image_stem, label_stem = fashion_mnist.FILES[split]
    suffix = ".gz" if gz else ""
    write_idx(folder / (image_stem + suffix), images, gz)
    write_idx(folder / (label_stem + suffix), labels, gz)
    return images, labels


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A Fashion-MNIST folder in the official layout: train gzipped (as Debian ships it), test plain."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    train_split = write_split(folder, "train", 96, seed=1, gz=True)
    test_split = write_split(folder, "test", 40, seed=2, gz=False)
    return folder, {"train": train_split, "test": test_split}


def test_splits_read_exactly_from_plain_and_gzipped_files(idx_dir):
    folder, expected = idx_dir
    for split in ("train", "test"):
        images, labels = fashion_mnist.load_split(split, str(folder))
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
        assert labels.dtype == np.int32
        source = fashion_mnist.FashionMnistSource(split, str(folder))
        record = source[5]
        assert record["image"].shape == (28, 28, 3) and record["image"].dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(record["image"][..., channel], expected[split][0][5])
        assert record["label"] == expected[split][1][5]


def test_missing_files_name_the_files_the_folder_and_the_package(tmp_path):
    write_split(tmp_path, "train", 8, seed=0, gz=True)  # the test files are missing
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist.load_split("train", str(tmp_path))
    message = str(e.value)
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert stem in message
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert fashion_mnist.DEFAULT_DIR in message


@pytest.mark.parametrize("damage", ["magic", "truncated", "too_long", "bad_gzip", "label_range", "count_mismatch"])
def test_a_damaged_idx_file_is_an_error_naming_it(tmp_path, damage):
    write_split(tmp_path, "train", 8, seed=0, gz=False)
    write_split(tmp_path, "test", 8, seed=1, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    data = images.read_bytes()
    if damage == "magic":
        images.write_bytes(b"\x00\x00\x0d\x03" + data[4:])  # float elements, not unsigned bytes
        target, pattern = images, "bad magic number"
    elif damage == "truncated":
        images.write_bytes(data[:-100])
        target, pattern = images, "truncated or corrupt"
    elif damage == "too_long":
        images.write_bytes(data + b"\x00" * 7)
        target, pattern = images, "truncated or corrupt"
    elif damage == "bad_gzip":
        images.unlink()
        target = tmp_path / "train-images-idx3-ubyte.gz"
        target.write_bytes(gzip.compress(data)[:-20])
        pattern = "cannot read"
    elif damage == "label_range":
        write_idx(labels, np.full((8,), 10, np.uint8), gz=False)
        target, pattern = labels, "label 10"
    else:
        write_idx(labels, np.zeros((7,), np.uint8) + 3, gz=False)
        target, pattern = labels, "8 images but 7 labels"
    with pytest.raises(fashion_mnist.IdxError, match=pattern) as e:
        fashion_mnist.load_split("train", str(tmp_path))
    assert str(target) in str(e.value)


def fashion_config(folder):
    c = tiny.load_config("fashion_mnist")
    c.data.data_dir = str(folder)
    c.model.variant, c.model.tokenizer_variant = "mu/7", ""
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 2, 2
    c.model.estimator_depth = 1
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 2, 8, 8
    c.batch_size = 16
    c.schedule.phases = ("encoder_cold_start:4", "tokenizer:3", "encoder:4")
    c.evals.linear_probe.steps = 20
    c.evals.linear_probe.batch_size = 32
    c.evals.linear_probe.max_examples = 64
    c.evals.linear_probe.max_test_examples = None
    c.checkpoint.every_steps = 4
    c.log_every_steps = 2
    return c


def test_the_image_pipeline_reads_fashion_mnist(idx_dir):
    folder, expected = idx_dir
    c = fashion_config(folder)
    config_checks.validate(c)
    assert pipeline.eval_split(c.data) == "test"
    batch = image_pipeline.train_dataset(c.data, local_batch_size=8, seed=0)[0]
    assert batch["input"].shape == (8, 28, 28, 3) and batch["input"].dtype == np.float32
    arrays = image_pipeline.eval_arrays(c.data, "test")
    assert arrays["input"].shape == (40, 28, 28, 3)
    np.testing.assert_array_equal(arrays["label"], expected["test"][1])
    # eval_crop_fraction 1: the eval image is the stored image, normalised
    grey = (expected["test"][0][3] / 255.0 - c.data.mean[0]) / c.data.std[0]
    np.testing.assert_allclose(arrays["input"][3, ..., 0], grey, atol=1e-5)


def test_the_recipe_runs_end_to_end_and_probes_the_whole_test_split(idx_dir, tmp_path):
    folder, _ = idx_dir
    c = fashion_config(folder)
    result = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert result["done"]
    probes = json.loads((tmp_path / "run" / loop_probe.PROBE_FILE).read_text())
    assert sorted(probes) == ["iteration_0", "iteration_1", "iteration_2"]
    # the probe trains on the first 64 train images and tests on all 40 test images: accuracies are multiples of 1/40
    for result in probes.values():
        assert abs(result["top1_test"] * 40 - round(result["top1_test"] * 40)) < 1e-6


def test_the_full_recipe_validates_and_follows_the_authors_shape():
    c = tiny.load_config("fashion_mnist")
    config_checks.validate(c)
    from bridle_jax import schedule
    from bridle_jax.models import vit

    encoder_depth = vit.decode_variant(c.model.variant)["depth"]
    assert c.model.decoder_depth > encoder_depth  # the label predictor is deeper than the encoder
    assert c.optim.tokenizer.lr / c.optim.encoder.lr == pytest.approx(2e-4 / 5e-4)  # the authors' ratio
    tokenizer_steps = [p.steps for p in schedule.parse_plan(c.schedule.phases) if p.kind == "tokenizer"]
    assert min(tokenizer_steps) >= 3 / (1 - c.quantizer.decay)  # several EMA time constants
