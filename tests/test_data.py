"""Image input pipeline: sources, transforms against NumPy expectations, determinism, resume, sharding, TFDS mock."""

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bridle_jax.data import image_pipeline, pipeline, sources, transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def data_config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(
        name="digits",
        data_dir=None,
        image_size=32,
        crop_scale=(0.2, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip=True,
        mean=MEAN,
        std=STD,
        eval_crop_fraction=0.875,
        num_threads=2,
        prefetch_buffer_size=2,
        max_eval_examples=None,
    )
    return ml_collections.ConfigDict({**fields, **overrides})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["input"], y["input"])
        np.testing.assert_array_equal(x["label"], y["label"])


class IndexSource:
    """Synthetic source whose label is the record's index, so shards and epochs can be checked by label alone."""

    def __init__(self, n, seed=0):
        self.images = np.random.default_rng(seed).integers(0, 256, (n, 12, 10, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": np.int32(i)}


# ----------------------------------------------------------------------------------------------------- sources


def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train = sources.digits_split_indices(labels, "train")
    test = sources.digits_split_indices(labels, "test")
    assert len(train) + len(test) == len(labels) == 1797
    assert len(set(train) & set(test)) == 0
    assert len(test) == 359 and len(train) == 1438
    for c in range(10):  # every class is ~20% test
        members = np.sum(labels == c)
        assert abs(np.sum(labels[test] == c) - 0.2 * members) <= 0.5
    np.testing.assert_array_equal(test, sources.digits_split_indices(labels, "test"))  # fixed

    src_train, src_test = sources.DigitsSource("train"), sources.DigitsSource("test")
    assert (len(src_train), len(src_test)) == (1438, 359)
    rec = src_test[5]
    assert rec["image"].shape == (8, 8, 3) and rec["image"].dtype == np.uint8
    assert rec["label"].dtype == np.int32 and rec["label"] == labels[test[5]]
    np.testing.assert_array_equal(rec["image"][..., 0], rec["image"][..., 2])  # grey replicated to RGB
    expected = np.round(load_digits().images[test[5]] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(rec["image"][..., 1], expected)
    assert max(src_train[i]["image"].max() for i in range(50)) == 255
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        sources.DigitsSource("validation")


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"config\.data\.name: expected one of \(.*'digits'.*'imagenet2012'.*\), got 'mnist'"
    ):
        sources.make_source(data_config(name="mnist"), "train")
    with pytest.raises(ValueError, match=r"config\.data\.name: expected one of .*'digits'.*got 'mnist'"):
        pipeline.train_iterator(data_config(name="mnist"), local_batch_size=4, seed=0)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("crop_scale", (0.5, 1.5), "pair"),
        ("crop_ratio", (2.0, 1.0), "pair"),
        ("image_size", 0, "positive int"),
        ("std", (0.2, 0.0, 0.2), "positive"),
        ("mean", (0.5, 0.5), "3 finite"),
        ("eval_crop_fraction", 1.2, r"\(0, 1\]"),
        ("num_threads", -1, ">= 0"),
        ("flip", "yes", "bool"),
        ("max_eval_examples", 0, "positive int"),
    ],
)
def test_bad_config_fields_are_named(field, value, expected):
    with pytest.raises(ValueError, match=rf"config\.data\.{field}: expected .*{expected}"):
        image_pipeline.data_spec(data_config(**{field: value}))


def test_bad_records_are_named():
    with pytest.raises(ValueError, match="rec record 3: 'image' must be uint8"):
        sources.check_record({"image": np.zeros((4, 4, 3), np.float32), "label": 1}, 3, "rec")
    with pytest.raises(ValueError, match=r"rec record 4: 'image' must be \[H, W, 3\]"):
        sources.check_record({"image": np.zeros((4, 4, 2), np.uint8), "label": 1}, 4, "rec")
    with pytest.raises(ValueError, match="'label' must be a non-negative integer"):
        sources.check_record({"image": np.zeros((4, 4, 3), np.uint8), "label": -1}, 5, "rec")
    grey = np.random.default_rng(0).integers(0, 256, (5, 6, 1), dtype=np.uint8)
    rec = sources.check_record({"image": grey, "label": np.int64(7)}, 0, "rec")
    assert rec["image"].shape == (5, 6, 3) and rec["label"].dtype == np.int32


# -------------------------------------------------------------------------------------------------- transforms


def test_random_resized_crop_area_ratio_and_content():
    rng = np.random.default_rng(0)
    crop = transforms.RandomResizedCrop(16, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    for _ in range(200):
        height, width = rng.integers(20, 100, 2)
        top, left, h, w = crop.get_params(height, width, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding h and w to integers moves area and aspect slightly beyond the sampled bounds.
        assert 0.2 * height * width - (h + w + 1) <= h * w <= height * width
        assert 3 / 4 - 1.5 / h <= w / h <= 4 / 3 + 1.5 / h

    # A linear-ramp image (R = rows, G = columns): bicubic reproduces linear functions, so the output ramps must span
    # exactly the crop the same rng draws.
    height, width = 60, 80
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([2 * rows + 20, 2 * cols + 40, np.full_like(rows, 7)], -1).astype(np.uint8)
    for seed in range(20):
        top, left, h, w = crop.get_params(height, width, np.random.default_rng(seed))
        out = crop.random_map({"image": image, "label": 3}, np.random.default_rng(seed))
        assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.uint8 and out["label"] == 3
        r, g = out["image"][..., 0].astype(float), out["image"][..., 1].astype(float)
        np.testing.assert_allclose(r.mean(), 2 * (top + (h - 1) / 2) + 20, atol=1.5)
        np.testing.assert_allclose(g.mean(), 2 * (left + (w - 1) / 2) + 40, atol=1.5)
        assert r.min() >= 2 * top + 20 - 1 and r.max() <= 2 * (top + h - 1) + 20 + 1
        assert np.all(out["image"][..., 2] == 7)


def test_random_resized_crop_is_torchvisions_crop_then_resize():
    """torchvision's resized_crop on a PIL image is crop, then bicubic resize: the same pixels, bit for bit (PIL's
    resize with a box reads beyond the box's edges and differs)."""
    crop = transforms.RandomResizedCrop(24, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    box_differs = 0
    for seed in range(8):
        image = np.random.default_rng(seed).integers(0, 256, (45, 61, 3), dtype=np.uint8)
        top, left, h, w = crop.get_params(45, 61, np.random.default_rng(seed))
        out = crop.random_map({"image": image, "label": 0}, np.random.default_rng(seed))["image"]
        box = (left, top, left + w, top + h)
        pil = Image.fromarray(image)
        np.testing.assert_array_equal(out, np.asarray(pil.crop(box).resize((24, 24), Image.Resampling.BICUBIC)))
        box_differs += not np.array_equal(out, np.asarray(pil.resize((24, 24), Image.Resampling.BICUBIC, box=box)))
    assert box_differs > 0


def test_random_resized_crop_fallback_is_clamped_centre_crop():
    # No crop of >= 90% of a 10x100 strip can have aspect 1, so all 10 tries fail: centre square of side 10.
    crop = transforms.RandomResizedCrop(8, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert crop.get_params(10, 100, np.random.default_rng(1)) == (0, 45, 10, 10)
    assert crop.get_params(100, 10, np.random.default_rng(1)) == (45, 0, 10, 10)
    with pytest.raises(ValueError, match="scale must satisfy"):
        transforms.RandomResizedCrop(8, scale=(0.0, 1.0))


def test_flip_mirrors_and_normalize_matches_numpy():
    image = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    flipped = transforms.RandomFlip(p=1.0).random_map({"image": image, "label": 1}, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped["image"], image[:, ::-1])
    np.testing.assert_array_equal(flipped["image"][:, 0], image[:, -1])
    same = transforms.RandomFlip(p=0.0).random_map({"image": image, "label": 1}, np.random.default_rng(0))
    np.testing.assert_array_equal(same["image"], image)
    half = transforms.RandomFlip(0.5)
    n_flipped = sum(
        not np.array_equal(half.random_map({"image": image}, np.random.default_rng(s))["image"], image)
        for s in range(400)
    )
    assert 150 < n_flipped < 250

    out = transforms.Normalize(MEAN, STD).map({"image": image, "label": 2})
    assert out["image"].dtype == np.float32 and out["label"] == 2
    np.testing.assert_allclose(out["image"], (image / 255.0 - np.array(MEAN)) / np.array(STD), rtol=1e-5, atol=1e-5)


def test_resize_center_crop_geometry():
    rng = np.random.default_rng(2)
    # Short side already at size / crop_fraction (256 for 224 at 0.875): resizing is the identity, the crop is exact.
    image = rng.integers(0, 256, (300, 256, 3), dtype=np.uint8)
    out = transforms.ResizeCenterCrop(224, 0.875).map({"image": image, "label": 0})["image"]
    np.testing.assert_array_equal(out, image[38:262, 16:240])
    small = rng.integers(0, 256, (8, 11, 3), dtype=np.uint8)
    out = transforms.ResizeCenterCrop(32, 0.875).map({"image": small})["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


# --------------------------------------------------------------------------------------------- eval preprocessing


def test_preprocess_eval_accepts_natural_forms():
    cfg = data_config(image_size=16, eval_crop_fraction=0.875)
    u8 = np.random.default_rng(3).integers(0, 256, (4, 20, 24, 3), dtype=np.uint8)
    prep = lambda raw: pipeline.preprocess_eval(cfg, raw)["input"]
    ref = prep(u8)
    assert ref.shape == (4, 16, 16, 3) and ref.dtype == np.float32
    np.testing.assert_array_equal(prep(u8.astype(np.float32) / 255.0), ref)
    as_255 = pipeline.preprocess_eval(cfg, u8.astype(np.float64), value_range=(0, 255))["input"]  # floats: stated
    np.testing.assert_array_equal(as_255, ref)
    np.testing.assert_array_equal(prep(u8.astype(np.int64)), ref)
    grey = u8[..., :1]
    np.testing.assert_array_equal(prep(grey), prep(np.repeat(grey, 3, -1)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        pipeline.preprocess_eval(cfg, u8[0])
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        pipeline.preprocess_eval(cfg, u8[..., :2])
    with pytest.raises(ValueError, match="float images must be finite"):
        pipeline.preprocess_eval(cfg, u8 * -1.0 - 1)


def test_eval_arrays_digits_matches_preprocess_eval():
    cfg = data_config(max_eval_examples=50)
    arrays = pipeline.eval_arrays(cfg, "test")
    images, labels = arrays["input"], arrays["label"]
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(arrays["length"], np.full(50, 32))
    src = sources.DigitsSource("test")
    raw = np.stack([src[i]["image"] for i in range(50)])
    np.testing.assert_array_equal(images, pipeline.preprocess_eval(cfg, raw)["input"])
    np.testing.assert_array_equal(labels, [src[i]["label"] for i in range(50)])
    arrays = pipeline.eval_arrays(cfg, pipeline.eval_split(cfg), max_examples=7)
    assert arrays["input"].shape[0] == arrays["label"].shape[0] == 7


# ------------------------------------------------------------------------------------------------ train stream


def test_train_batches_shape_range_and_thread_independence():
    batches = {}
    for threads in (0, 1, 4):
        it = pipeline.train_iterator(data_config(num_threads=threads), local_batch_size=16, seed=7)
        batches[threads] = take(it, 3)
    b = batches[0][0]
    assert b["input"].shape == (16, 32, 32, 3) and b["input"].dtype == np.float32
    np.testing.assert_array_equal(b["length"], np.full(16, 32))
    assert b["label"].shape == (16,) and b["label"].dtype == np.int32
    lo, hi = (0 - np.max(MEAN)) / np.min(STD), (1 - np.min(MEAN)) / np.min(STD)
    assert lo - 0.05 <= b["input"].min() and b["input"].max() <= hi + 0.05 and b["input"].std() > 0.3
    assert_batches_equal(batches[0], batches[1])
    assert_batches_equal(batches[0], batches[4])
    other_seed = next(pipeline.train_iterator(data_config(), local_batch_size=16, seed=8))
    assert not np.array_equal(other_seed["label"], b["label"])


def test_epochs_reshuffle_and_process_shards_are_disjoint_and_complete(monkeypatch):
    n, local, procs = 60, 5, 2
    monkeypatch.setattr(sources, "make_source", lambda cfg, split: IndexSource(n))
    cfg = data_config(image_size=8)
    shards = [
        take(
            pipeline.train_iterator(cfg, local_batch_size=local, seed=1, process_index=p, process_count=procs),
            2 * n // (local * procs),
        )
        for p in range(procs)
    ]
    per_epoch = n // (local * procs)
    for epoch in range(2):
        labels = [np.concatenate([b["label"] for b in s[epoch * per_epoch : (epoch + 1) * per_epoch]]) for s in shards]
        assert len(set(labels[0]) & set(labels[1])) == 0
        assert sorted(np.concatenate(labels)) == list(range(n))
    first = np.concatenate([b["label"] for b in shards[0][:per_epoch]])
    second = np.concatenate([b["label"] for b in shards[0][per_epoch:]])
    assert not np.array_equal(first, second)  # reshuffled per epoch

    # The process blocks are exactly the single-process global batch, rows in order, augmentations included.
    whole = take(pipeline.train_iterator(cfg, local_batch_size=local * procs, seed=1), 3)
    for i, g in enumerate(whole):
        for p in range(procs):
            np.testing.assert_array_equal(g["label"][p * local : (p + 1) * local], shards[p][i]["label"])
            np.testing.assert_array_equal(g["input"][p * local : (p + 1) * local], shards[p][i]["input"])
    with pytest.raises(ValueError, match="process_index must be"):
        pipeline.train_iterator(cfg, local_batch_size=4, seed=0, process_index=2, process_count=2)


def test_iterator_state_restore_continues_identically():
    cfg = data_config(num_threads=2)
    it = pipeline.train_iterator(cfg, local_batch_size=8, seed=3)
    take(it, 4)
    state = it.get_state()
    expected = take(it, 3)
    restored = pipeline.train_iterator(cfg, local_batch_size=8, seed=3)
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), expected)


def test_iterator_restore_through_orbax_composite(tmp_path):
    import orbax.checkpoint as ocp

    cfg = data_config(num_threads=2)
    it = pipeline.train_iterator(cfg, local_batch_size=8, seed=5)
    take(it, 2)
    state = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(
            2,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(it)),
        )
        mgr.wait_until_finished()
    expected = take(it, 3)

    fresh = pipeline.train_iterator(cfg, local_batch_size=8, seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.latest_step() == 2
        out = mgr.restore(
            2,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state), data_iter=grain.checkpoint.CheckpointRestore(fresh)
            ),
        )
    np.testing.assert_array_equal(np.asarray(out["state"]["w"]), state["w"])
    assert_batches_equal(take(fresh, 3), expected)


# ---------------------------------------------------------------------------------------------------- ImageNet


def test_imagenet2012_through_tfds_mock(tmp_path):
    import tensorflow_datasets as tfds

    cfg = data_config(name="imagenet2012", data_dir=str(tmp_path), image_size=24)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        batch = next(pipeline.train_iterator(cfg, local_batch_size=4, seed=0))
        arrays = pipeline.eval_arrays(cfg, "validation")
    images, labels = arrays["input"], arrays["label"]
    assert batch["input"].shape == (4, 24, 24, 3) and batch["input"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert images.shape == (12, 24, 24, 3) and labels.shape == (12,) and labels.dtype == np.int32
    assert np.all((labels >= 0) & (labels < 1000))


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
    cfg = data_config(name="imagenet2012", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError) as err:
        pipeline.train_iterator(cfg, local_batch_size=4, seed=0)
    message = str(err.value)
    assert "tfds build imagenet2012 --file_format=array_record --manual_dir=" in message
    assert "--config.data.data_dir" in message and str(tmp_path / "tfds") in message
    assert "never downloads" in message
    assert not (tmp_path / "tfds").exists()  # nothing was downloaded or created


def test_num_classes_and_eval_labels():
    """The contract's `num_classes` (fine-tuning checks config.num_classes against it) and `eval_labels` (the label
    check before compiling): declared by the fixed datasets, the labels read from the source's index."""
    assert pipeline.num_classes(data_config()) == 10
    assert pipeline.num_classes(data_config(name="imagenet2012", data_dir="/nowhere")) == 1000  # nothing read
    labels = pipeline.eval_labels(data_config(), "test")
    np.testing.assert_array_equal(labels, pipeline.eval_arrays(data_config(), "test")["label"])
    assert len(pipeline.eval_labels(data_config(max_eval_examples=7), "test")) == 7


def test_fine_tune_stream_adds_randaugment_and_erasing_and_keeps_the_first_seeds():
    """`augment=` (fine-tuning's config.augment) switches the crop to its fields and adds RandAugment and erasing;
    the shuffle seed is pretraining's (the same SeedSequence prefix), so the same records arrive in the same order."""
    augment = ml_collections.ConfigDict(
        dict(
            crop_scale=(0.08, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip=True,
            randaugment_ops=2,
            randaugment_magnitude=9.0,
            randaugment_magnitude_std=0.5,
            random_erasing=0.25,
        )
    )
    plain = take(pipeline.train_iterator(data_config(), local_batch_size=8, seed=4), 2)
    tuned = take(pipeline.train_iterator(data_config(), local_batch_size=8, seed=4, augment=augment), 2)
    again = take(pipeline.train_iterator(data_config(num_threads=0), local_batch_size=8, seed=4, augment=augment), 2)
    assert_batches_equal(tuned, again)
    for p, t in zip(plain, tuned):
        np.testing.assert_array_equal(p["label"], t["label"])
        assert t["input"].shape == p["input"].shape and not np.array_equal(p["input"], t["input"])


def test_worker_processes_give_the_same_batches_and_resume_alike():
    """config.data.worker_count > 0 decodes in Grain worker processes: the same batches in the same order as the
    threads-only stream, and a stream restored from its state continues exactly."""

    def stream(workers):
        d = data_config(image_size=16, worker_count=workers)
        return pipeline.train_iterator(d, local_batch_size=8, seed=3)

    threads = stream(0)
    expected = [next(threads)["input"] for _ in range(6)]
    workers = stream(2)
    got = [np.array(next(workers)["input"]) for _ in range(3)]
    state = workers.get_state()
    got += [np.array(next(workers)["input"]) for _ in range(3)]
    resumed = stream(2)
    resumed.set_state(state)
    again = [np.array(next(resumed)["input"]) for _ in range(3)]
    for it in (workers, resumed):
        it.close()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got[3:], again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"data.worker_count: expected an int >= 0 \(0: threads only\), got -1"):
        pipeline.validate_data_config(data_config(worker_count=-1))
