"""End to end: the whole plan of a tiny config on 8 fake devices, exact resume, kept encoders, load_encoder."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import bridle_jax
from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import encoder_store, train
from bridle_jax import run as run_lib
from bridle_jax.data import sources
from tests.tiny import PoisonedIterator, tiny_config

TOTAL_STEPS = 16  # 6 cold-start encoder + 4 tokenizer + 6 encoder


def epochs_config():
    """The tiny config with its plan in epochs, as the real recipes state theirs: the 1,438 train digits // batch 16
    = 89 steps per epoch, so 0.07 / 0.045 / 0.07 epochs resolve to the 6 / 4 / 6 steps above."""
    c = tiny_config()
    c.schedule.phases = ("encoder_cold_start:0.07ep", "tokenizer:0.045ep", "encoder:0.07ep")
    return c


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    summary = train.train_and_evaluate(epochs_config(), workdir)
    return workdir, summary


def _leaves_equal(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_runs_every_phase_on_eight_devices(full_run):
    workdir, summary = full_run
    assert len(jax.devices()) == 8
    state = summary["final_state"]
    assert int(state.step) == TOTAL_STEPS
    assert bool(state.codebooks.initialized)
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    train_lines = [l for l in lines if "train/loss" in l]
    assert [l["step"] for l in train_lines] == list(range(2, TOTAL_STEPS + 1, 2))
    probe_lines = [l for l in lines if "eval/linear_probe/top1" in l]
    assert [l["step"] for l in probe_lines] == [6, 16]  # the end of each encoder phase
    phases = {l["phase"] for l in lines}
    assert phases == {"iter1_encoder", "iter2_tokenizer", "iter2_encoder"}
    enc = next(l for l in lines if l["phase"] == "iter1_encoder" and "train/encoder/ce_level0" in l)
    tok = next(l for l in lines if l["phase"] == "iter2_tokenizer")
    for key in (
        "train/loss",
        "train/encoder/ce_level1",
        "codebook/level1/usage",
        "codebook/level1/perplexity",
        "train/lr",
        "perf/steps_per_sec",
        "train/nonfinite_skipped_total",
    ):
        assert np.isfinite(enc[key]), key
    assert "train/tokenizer/cos" in tok and 0.0 <= tok["train/tokenizer/cos"] <= 2.0
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert encoder_store.saved_iterations(workdir) == [0, 1, 2]
    assert ckpt_lib.Checkpointer(workdir, max_to_keep=2, async_save=False).latest_step() == TOTAL_STEPS
    probe = summary["linear_probe"]
    assert set(probe) == {"iteration_0", "iteration_1", "iteration_2"}
    for result in probe.values():
        assert 0.0 <= result["top1_test"] <= 1.0 and np.isfinite(result["final_loss"])


def test_a_plan_in_epochs_is_recorded_resolved_and_a_resume_at_another_batch_is_refused(full_run, tmp_path):
    workdir, _ = full_run
    recorded = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))["schedule"]
    assert recorded["phases"] == ["encoder_cold_start:6", "tokenizer:4", "encoder:6"]
    assert recorded["given_phases"] == list(epochs_config().schedule.phases) and recorded["steps_per_epoch"] == 89
    other = epochs_config()
    other.batch_size = 32  # 44 steps per epoch: the same epochs are other steps
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    before = sorted(os.listdir(os.path.join(copy, "checkpoints")))
    with pytest.raises(
        ValueError, match=r"schedule\.phases: \[.*'encoder_cold_start:6'.*\] -> \[.*'encoder_cold_start:3'"
    ):
        train.train_and_evaluate(other, copy)
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == before


def test_resume_is_bit_identical(full_run, tmp_path):
    """Stopped mid cold-start phase and again mid tokenizer phase, then resumed: the same final state."""
    workdir, summary = full_run
    resumed_dir = str(tmp_path / "resumed")
    train.train_and_evaluate(epochs_config(), resumed_dir, stop_at_step=5)
    assert ckpt_lib.Checkpointer(resumed_dir, max_to_keep=2, async_save=False).latest_step() == 5
    train.train_and_evaluate(epochs_config(), resumed_dir, stop_at_step=8)
    resumed = train.train_and_evaluate(epochs_config(), resumed_dir)
    _leaves_equal(summary["final_state"], resumed["final_state"])
    assert resumed["linear_probe"] == summary["linear_probe"]


def test_phase_boundary_resume_hands_over_again(full_run, tmp_path):
    """A run stopped exactly at a phase end resumes into the next phase's hand-over identically."""
    workdir, summary = full_run
    resumed_dir = str(tmp_path / "boundary")
    train.train_and_evaluate(epochs_config(), resumed_dir, stop_at_step=10)  # end of the tokenizer phase
    resumed = train.train_and_evaluate(epochs_config(), resumed_dir)
    _leaves_equal(summary["final_state"], resumed["final_state"])


def test_half_written_and_unreadable_checkpoints_are_not_resumed(full_run, tmp_path):
    workdir, summary = full_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    ckdir = os.path.join(copy, "checkpoints")
    os.makedirs(os.path.join(ckdir, "99.orbax-checkpoint-tmp", "state"))  # a save killed half-way
    manager = ckpt_lib.Checkpointer(copy, max_to_keep=2, async_save=False)
    assert manager.latest_step() == TOTAL_STEPS
    steps = manager.all_steps()
    # Damage the newest checkpoint: the resume falls back to the previous one, with a warning.
    shutil.rmtree(os.path.join(ckdir, str(TOTAL_STEPS), "state"))
    os.makedirs(os.path.join(ckdir, str(TOTAL_STEPS), "state"))
    resumed = train.train_and_evaluate(epochs_config(), copy)
    assert steps[-2] < TOTAL_STEPS
    _leaves_equal(summary["final_state"], resumed["final_state"])


def test_load_encoder_embeds_raw_images(full_run):
    workdir, summary = full_run
    raw = np.stack([sources.DigitsSource("test")[i]["image"] for i in range(5)])  # uint8 [5, 8, 8, 3]
    encoder = bridle_jax.load_encoder(workdir)
    assert encoder.iteration == 2
    features = encoder.embed(raw)
    assert features.shape == (5, 64) and features.dtype == np.float32
    np.testing.assert_allclose(encoder.embed(raw.astype(np.float32) / 255.0), features, rtol=1e-5, atol=1e-5)
    _leaves_equal(encoder.params, summary["final_state"].params["encoder"]["encoder"])
    initial = bridle_jax.load_encoder(workdir, iteration=0).embed(raw)
    assert initial.shape == features.shape and not np.allclose(initial, features)
    with pytest.raises(ValueError, match="iteration 7"):
        bridle_jax.load_encoder(workdir, iteration=7)


def test_load_encoder_on_a_non_workdir_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        bridle_jax.load_encoder(str(tmp_path))


def test_repeated_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = train.pipeline.train_iterator
    monkeypatch.setattr(train.pipeline, "train_iterator", lambda *a, **k: PoisonedIterator(real(*a, **k), 4))
    config = tiny_config()
    config.optim.max_consecutive_nonfinite = 2
    config.evals.linear_probe.enabled = False
    workdir = str(tmp_path / "nan")
    with pytest.raises(run_lib.NonFiniteError, match=r"consecutive steps were refused.*step 4 .*is the last good one"):
        train.train_and_evaluate(config, workdir)
    manager = ckpt_lib.Checkpointer(workdir, max_to_keep=2, async_save=False)
    assert manager.all_steps() == [4]  # saved before the poison; nothing after it
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    assert lines[-1]["train/nonfinite_skipped_in_a_row"] >= 2
    assert all(np.isfinite(line["train/loss"]) for line in lines if "train/loss" in line)
