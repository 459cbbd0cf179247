"""Input rules that do not depend on the batch (issue 11, "What to build" 4), one per reader:

- float pixels are 0..1, or the range the caller states (``value_range``), never inferred from the batch maximum:
  one image's (or clip's) preprocessing, hence its features, is the same whatever else is in the batch; a small
  overshoot is clipped with a warning, a wrong scale is refused with the argument and the fix named;
- float waveforms beyond [-1, 1] by more than ``audio.MAX_FLOAT_PEAK`` (int16 scale) are refused with the fix named,
  as arrays and as float WAV files; a small overshoot is kept;
- one CSV reader for audio and video: a UTF-8 BOM, CRLF line ends, quoted commas and class-name labels are read
  identically by both FolderCsvSources;
- ``load_encoder(iteration=1.0 / True)`` is refused with the saved iterations named (not silently loaded).
"""

import os
import re
import warnings

import numpy as np
import pytest
import soundfile as sf

from bridle_jax import features
from bridle_jax.data import (
    audio,
    audio_pipeline,
    audio_sources,
    image_pipeline,
    pipeline,
    video_pipeline,
    video_sources,
)
from tests.tiny import tiny_config

SR = 16000


def image_config(image_size=16):
    c = image_pipeline.default_data_config()
    c.image_size = image_size
    return c


def random_images(seed, shape=(3, 12, 10, 3)):
    """Floats in 0..1 that are exact uint8 levels / 255 (so every reading of them rounds one way)."""
    return (np.random.default_rng(seed).integers(0, 256, shape) / 255.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------- float images


def test_float_image_scale_does_not_depend_on_the_batch():
    # Before: a batch max > 1 switched every image of the batch to the 0..255 reading (image 0 became ~black).
    images = random_images(0)
    alone = image_pipeline.to_uint8_images(images[:1])
    overshoot = images.copy()
    overshoot[1, 0, 0, 0] = 1.02  # e.g. a bicubic resize's ringing in another image
    with pytest.warns(UserWarning, match="1 float pixel value"):
        together = image_pipeline.to_uint8_images(overshoot)
    np.testing.assert_array_equal(together[:1], alone)
    np.testing.assert_array_equal(together[2:], image_pipeline.to_uint8_images(images[2:]))
    assert together[1, 0, 0, 0] == 255  # clipped to the top of the range
    cfg = image_config()
    with pytest.warns(UserWarning):
        batch = pipeline.preprocess_eval(cfg, overshoot)["input"]
    np.testing.assert_array_equal(batch[0], pipeline.preprocess_eval(cfg, images[:1])["input"][0])


def test_float_images_outside_the_range_are_refused_with_the_fix():
    images = random_images(1) * 255.0  # 0..255 floats, not stated
    with pytest.raises(ValueError, match=r"value_range=None: 0\.\.1.*pass value_range=\(0, 255\)"):
        image_pipeline.to_uint8_images(images)
    # Stated, the same floats give exactly the uint8 image; 0..1 floats are read the same.
    expected = np.rint(images).astype(np.uint8)
    assert np.abs(images - expected).max() < 1e-3
    np.testing.assert_array_equal(image_pipeline.to_uint8_images(images, value_range=(0, 255)), expected)
    np.testing.assert_array_equal(image_pipeline.to_uint8_images(images / 255.0), expected)
    signed = images / 127.5 - 1.0
    np.testing.assert_array_equal(image_pipeline.to_uint8_images(signed, value_range=(-1, 1)), expected)
    with pytest.raises(ValueError, match=r"state the images' range with value_range"):
        image_pipeline.to_uint8_images(signed)
    # Within the tolerance, values are clipped; values that still round into range are not even reported.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_pipeline.to_uint8_images(np.full((1, 2, 2, 3), 1.0015, np.float32)).max() == 255
    for bad in ((0, 0), (255, 0), "0..255", (0, np.inf), (0, 1, 2)):
        with pytest.raises(ValueError, match="value_range: expected None"):
            image_pipeline.to_uint8_images(images, value_range=bad)
    with pytest.raises(ValueError, match="uint8 images are always 0..255"):
        image_pipeline.to_uint8_images(expected, value_range=(0, 1))
    np.testing.assert_array_equal(image_pipeline.to_uint8_images(expected, value_range=(0, 255)), expected)
    cfg = image_config()
    stated = pipeline.preprocess_eval(cfg, images, value_range=(0, 255))["input"]
    np.testing.assert_array_equal(stated, pipeline.preprocess_eval(cfg, expected)["input"])


def test_float_video_frames_follow_the_same_rule():
    # Before: each clip was scaled by its own max, so a clip whose frames overshoot 1 read as 0..255.
    cfg = video_pipeline.default_data_config()
    cfg.name, cfg.num_frames, cfg.sampling_rate, cfg.image_size = "moving_digits", 2, 1, 16
    clips = np.random.default_rng(2).uniform(0, 1, (2, 4, 20, 20, 3)).astype(np.float32)
    alone = video_pipeline.preprocess_eval(cfg, clips[:1])["input"]
    clips[1, 0, 0, 0, 0] = 1.02
    with pytest.warns(UserWarning):
        together = video_pipeline.preprocess_eval(cfg, clips)["input"]
    np.testing.assert_array_equal(together[:1], alone)
    with pytest.raises(ValueError, match=r"clip 0: float frames .*pass value_range=\(0, 255\)"):
        video_pipeline.preprocess_eval(cfg, clips * 255.0)
    np.testing.assert_allclose(
        video_pipeline.preprocess_eval(cfg, clips[:1] * 255.0, value_range=(0, 255))["input"], alone, atol=1e-6
    )
    with pytest.raises(ValueError, match="value_range: expected None"):
        pipeline.preprocess_eval(cfg, clips, value_range=(1, 0))


@pytest.fixture(scope="module")
def tiny_encoder():
    """An as-initialised tiny image encoder (no training: features only need to be a fixed function of the input)."""
    import jax
    import jax.numpy as jnp

    from bridle_jax.models import bridle

    config = tiny_config()
    module = bridle.encoder_from_config(config)
    shape = (1,) + bridle.input_shape(config)
    params = jax.jit(lambda k: module.init(k, jnp.zeros(shape))["params"])(jax.random.PRNGKey(0))
    return features.Encoder(config, params, 0)


def test_embed_features_of_an_image_do_not_depend_on_the_batch(tiny_encoder):
    # Before: one 1.02 pixel in image 1 changed image 0's features (to those of a ~black image).
    images = random_images(3, (2, 8, 8, 1))
    alone = tiny_encoder.embed(images[:1])
    images[1, 0, 0, 0] = 1.02
    with pytest.warns(UserWarning):
        together = tiny_encoder.embed(images)
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"pass value_range=\(0, 255\)"):
        tiny_encoder.embed(images * 255.0)
    np.testing.assert_allclose(
        tiny_encoder.embed(np.clip(images, 0, 1) * 255.0, value_range=(0, 255)), together, rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------- audio scale


def test_int16_scale_float_waveforms_are_refused_with_the_fix(tmp_path):
    # Before: accepted silently (features of a waveform 32768x too loud).
    cfg = audio_pipeline.default_data_config()
    cfg.name = "sounds"  # the demo: preprocess_eval reads no file of it
    wave = 0.5 * np.sin(np.linspace(0, 200, 4000)).astype(np.float32)
    with pytest.raises(ValueError, match=r"raw\[1\]: float samples peak at 16384.*divided by 32768"):
        audio_pipeline.preprocess_eval(cfg, [wave, wave * 32768.0])
    with pytest.raises(ValueError, match="divided by 32768"):
        pipeline.preprocess_eval(cfg, np.stack([wave * 32768.0]))
    # A small overshoot (resampling ringing, a float master above 0 dBFS) is kept unchanged, as from a file.
    loud = wave * 2.4  # peak 1.2
    np.testing.assert_array_equal(audio_pipeline.preprocess_eval(cfg, [loud])["input"][0, :4000], loud)
    as_int16 = (wave * 32768).astype(np.int16)
    from_int16 = audio_pipeline.preprocess_eval(cfg, [as_int16])["input"][0, :4000]
    np.testing.assert_allclose(from_int16, wave, atol=1 / 32768)
    with pytest.raises(ValueError, match="value_range=.*audio float waveforms are always"):
        pipeline.preprocess_eval(cfg, [wave], value_range=(0, 255))


def test_float_wav_files_at_int16_scale_are_refused(tmp_path):
    wave = 0.5 * np.sin(np.linspace(0, 200, 4000)).astype(np.float32)
    sf.write(tmp_path / "ok.wav", wave * 1.5, SR, subtype="FLOAT")  # above 0 dBFS, below the limit: kept
    np.testing.assert_allclose(audio.load_audio(tmp_path / "ok.wav"), wave * 1.5, rtol=1e-6)
    sf.write(tmp_path / "int_scale.wav", wave * 32768.0, SR, subtype="FLOAT")
    with pytest.raises(audio.AudioDecodeError, match=r"int_scale\.wav.*peak at 16384.*divided by 32768"):
        audio.load_audio(tmp_path / "int_scale.wav")
    sf.write(tmp_path / "pcm.wav", wave, SR, subtype="PCM_16")  # integer PCM: soundfile's [-1, 1]
    np.testing.assert_allclose(audio.load_audio(tmp_path / "pcm.wav"), wave, atol=1 / 32768)


# ------------------------------------------------------------------------------------------ one CSV reader


def spreadsheet_csv(path, rows):
    """A CSV as spreadsheet exports write it: UTF-8 BOM, CRLF line ends, a quoted path with a comma."""
    text = "path,label\r\n" + "".join(f'"{p}",{label}\r\n' for p, label in rows)
    path.write_bytes(text.encode("utf-8-sig"))
    return path


def test_audio_and_video_csv_sources_read_the_same_file_identically(tmp_path):
    # Before: the video reader rejected the BOM ("lacks column(s) ['path']") and class-name labels.
    names = ["dog, barking.wav", "cat.wav", "bird, small.wav"]
    for name in names:
        (tmp_path / name).write_bytes(b"")  # the sources read metadata only; content is decoded later
    rows = list(zip(names, ["dog", "cat", "bird"]))
    csv_path = spreadsheet_csv(tmp_path / "train.csv", rows)
    audio_source = audio_sources.FolderCsvSource(tmp_path, csv_path)
    video_source = video_sources.FolderCsvSource(tmp_path, csv_path)
    assert audio_source.classes == video_source.classes == ["bird", "cat", "dog"]  # sorted class names (README)
    assert audio_source.num_classes == video_source.num_classes == 3
    np.testing.assert_array_equal(audio_source.labels, [2, 1, 0])
    np.testing.assert_array_equal(video_source.labels, [2, 1, 0])
    assert [audio_source.path(i) for i in range(3)] == video_source.paths == [str(tmp_path / n) for n in names]
    # The other split shares the train mapping, and an unknown name is refused by both, naming file and row.
    test_csv = spreadsheet_csv(tmp_path / "test.csv", [(names[1], "cat"), (names[0], "wolf")])
    for make in (audio_sources.FolderCsvSource, video_sources.FolderCsvSource):
        with pytest.raises(ValueError, match=r"test\.csv' row 3: unknown label 'wolf'"):
            make(tmp_path, test_csv, classes=audio_source.classes)
    # Integer labels, a negative label and a path leaving the root: the same rule and message in both.
    ints = spreadsheet_csv(tmp_path / "ints.csv", [(names[0], 2), (names[1], 0)])
    assert audio_sources.FolderCsvSource(tmp_path, ints).num_classes == 3
    assert video_sources.FolderCsvSource(tmp_path, ints).num_classes == 3
    for rows_, message in (([(names[0], -1)], r"row 2: label '-1' is negative"), ([("../x.wav", 0)], "escapes")):
        bad = spreadsheet_csv(tmp_path / "bad.csv", rows_)
        for make in (audio_sources.FolderCsvSource, video_sources.FolderCsvSource):
            with pytest.raises(ValueError, match=message):
                make(tmp_path, bad)


def test_video_folder_pipeline_maps_class_names_from_the_train_split(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / name).write_bytes(b"")  # sources list clips; decoding happens in the pipeline's map
    rows = "path,label,split\r\na.mp4,walking,train\r\nb.mp4,running,train\r\nc.mp4,walking,test\r\n"
    (tmp_path / "clips.csv").write_bytes(rows.encode("utf-8-sig"))
    cfg = video_pipeline.default_data_config()
    cfg.name, cfg.data_dir, cfg.train_csv, cfg.eval_csv = "video_folder", str(tmp_path), "clips.csv", "clips.csv"
    spec = video_pipeline.data_spec(cfg)
    train, test = video_pipeline.make_source(spec, "train"), video_pipeline.make_source(spec, "test")
    assert train.classes == test.classes == ["running", "walking"]
    assert [train[i]["label"] for i in range(2)] == [1, 0] and test[0]["label"] == 1


# ------------------------------------------------------------------------------------------ iteration argument


@pytest.mark.parametrize("iteration", [1.0, True, "1", np.float32(1)])
def test_load_encoder_iteration_must_be_an_int(tmp_path, iteration):
    # Before: 1.0 and True silently loaded iteration 1 (1.0 == True == 1); "1" got "no encoder for iteration 1".
    for i in (0, 1):
        os.makedirs(tmp_path / "encoders" / f"iteration_{i}")
    saved = r"iteration: expected an int \(an encoder iteration saved in .*: \[0, 1\]\)"
    expected = saved + ".*got " + re.escape(repr(iteration))
    with pytest.raises(ValueError, match=expected):
        features.load_encoder(str(tmp_path), iteration=iteration)


def test_finetune_init_iteration_must_be_an_int():
    from bridle_jax import finetune

    c = finetune.base_config("image")
    c.init_from, c.num_classes = "/nonexistent", 10
    c.init_iteration = True
    with pytest.raises(ValueError, match=r"config.init_iteration: expected None .* got True"):
        finetune.validate(c)
    with pytest.raises(TypeError, match="init_iteration"):
        c.init_iteration = 1.0
