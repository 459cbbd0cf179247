"""End to end on audio and video: the whole plan of the embedded demos' tiny versions on 8 fake devices, through
the real decode paths (generated wav / mp4 files), the on-device log-mel front-end, padding masks, the local-window
decoder, tubelets and tube masking, the probe and `load_encoder(...).embed` on raw inputs."""

import json
import os

import jax
import numpy as np
import pytest

import bridle_jax
from bridle_jax import train
from bridle_jax.data import pipeline
from tests.tiny import load_config


def _tiny(c):
    c.model.variant = "mu/8"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 2, 2
    c.model.estimator_depth = 1
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 2, 16, 8
    c.batch_size = 16
    c.schedule.phases = ("encoder_cold_start:3", "tokenizer:2", "encoder:3")
    c.log_every_steps = 1
    c.checkpoint.every_steps = 4
    c.evals.linear_probe.steps = 30
    c.evals.linear_probe.max_examples = 64
    c.evals.linear_probe.batch_size = 32
    return c


def audio_config():
    c = _tiny(load_config("sounds"))
    c.data.target_frames = 160  # the 1.28 s clips have 126 frames: the last rows of patches are padding
    return c


def video_config():
    c = _tiny(load_config("moving_digits"))
    c.model.estimator_width, c.model.estimator_heads = 32, 2
    return c


@pytest.fixture(scope="module", params=["audio", "video"])
def run(request, tmp_path_factory):
    config = audio_config() if request.param == "audio" else video_config()
    workdir = str(tmp_path_factory.mktemp(request.param))
    return request.param, config, workdir, train.train_and_evaluate(config, workdir)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_phase_runs_and_learns_codes(run):
    _, _, workdir, summary = run
    state = summary["final_state"]
    assert int(state.step) == 8 and bool(state.codebooks.initialized)
    rows = _metrics(workdir)
    phases = {r["phase"] for r in rows}
    assert phases == {"iter1_encoder", "iter2_tokenizer", "iter2_encoder"}
    skipped = {r["data/skipped_records"] for r in rows if "data/skipped_records" in r}
    assert len(skipped) == 1  # the process-wide count of unreadable files did not grow: nothing skipped here
    for r in rows:
        if "train/loss" in r:
            assert np.isfinite(r["train/loss"]) and r["train/nonfinite"] == 0
    tokenizer_usage = [r["codebook/level0/usage"] for r in rows if r["phase"] == "iter2_tokenizer"]
    assert min(tokenizer_usage) > 0.2  # k-means-initialised codes are in use
    codes = np.asarray(state.codebooks.codes)
    assert np.isfinite(codes).all() and len(jax.devices()) == 8
    assert set(summary["linear_probe"]) == {"iteration_0", "iteration_1", "iteration_2"}
    for result in summary["linear_probe"].values():
        assert 0.0 <= result["top1_test"] <= 1.0


def test_padded_patches_are_marked_invalid(run):
    modality, config, _, _ = run
    from bridle_jax.models import bridle

    models = bridle.build_models(config)
    arrays = pipeline.eval_arrays(config.data, "test", max_examples=4)
    _, valid = models.model_input({k: jax.numpy.asarray(arrays[k]) for k in ("input", "length")})
    rows = np.asarray(valid).reshape(4, *models.patch_grid)
    if modality == "audio":  # 126 real frames of 160: patch rows 16..19 are padding
        assert rows[:, :16].all() and not rows[:, 16:].any()
    else:  # short clips are looped (config.data.short_clip="loop"): every tubelet is real
        np.testing.assert_array_equal(arrays["length"], config.data.num_frames)
        assert rows.all()


def test_load_encoder_embeds_raw_files(run):
    modality, config, workdir, _ = run
    encoder = bridle_jax.load_encoder(workdir)
    assert encoder.iteration == 2
    arrays = pipeline.eval_arrays(config.data, "test", max_examples=6)
    from bridle_jax.evaluators import linear_probe

    expected = linear_probe.pooled_features(encoder.models, encoder.params, arrays, mesh=encoder._mesh)
    module = pipeline.module_for(config.data)
    source = module.make_source(module.data_spec(config.data), "test")
    raw = [source.path(i) if modality == "audio" else source[i]["path"] for i in range(6)]  # the files themselves
    np.testing.assert_allclose(encoder.embed(raw), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected[0], expected[1])
