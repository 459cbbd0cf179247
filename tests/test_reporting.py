"""What a run prints (bridle_jax/reporting.py): the ETA in days/hours/minutes, steps/s measured after compilation
(a fake clock), every line printed once, library logs at WARNING, and the start-up summary."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from bridle_jax import reporting, resolve, schedule, sharding, train
from bridle_jax.data import pipeline
from bridle_jax.models.bridle import build_models
from tests.tiny import load_config, tiny_config


@pytest.mark.parametrize(
    "seconds, text",
    [
        (90_000, "1d 01h 00m"),
        (2 * 86400 + 3 * 3600 + 5 * 60 + 20, "2d 03h 05m"),
        (86_399.6, "1d 00h 00m"),
        (3 * 3600 + 5 * 60, "3h 05m"),
        (249, "4m 09s"),
        (0, "0m 00s"),
        (None, "?"),
        (float("inf"), "?"),
    ],
)
def test_eta_is_days_hours_minutes(seconds, text):
    assert reporting.format_duration(seconds) == text


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_steps_per_sec_excludes_the_compiling_first_step():
    clock = FakeClock()
    progress = reporting.Progress(total_steps=100, clock=clock)
    progress.start(0)
    clock.now += 60.0  # the first step of the phase: compilation (and k-means)
    progress.after_step(1)
    for step in range(2, 11):  # then 0.5 s per step
        clock.now += 0.5
        progress.after_step(step)
    rate, line = progress.update(10, phase_end=50, phase_name="iter1_encoder")
    assert rate == pytest.approx(2.0)  # 9 steps in 4.5 s; with the compile it would be 10 / 64.5
    assert "[iter1_encoder] step 10/100  2.00 steps/s  phase ETA 0m 20s  plan ETA 0m 45s" == line

    for step in range(11, 21):  # the next window: 10 steps at 0.25 s
        clock.now += 0.25
        progress.after_step(step)
    assert progress.update(20, 50, "x")[0] == pytest.approx(4.0)

    progress.start(20)  # a new phase (or a resume) compiles again: excluded again
    clock.now += 100.0
    progress.after_step(21)
    clock.now += 1.0
    progress.after_step(22)
    assert progress.update(22, 50, "x")[0] == pytest.approx(1.0)


def test_steps_per_sec_is_unknown_until_measured_after_compilation():
    clock = FakeClock()
    progress = reporting.Progress(total_steps=90_010, clock=clock)
    progress.start(0)
    clock.now += 30.0
    progress.after_step(1)
    rate, line = progress.update(1, 10, "p")  # logged at the compiling step itself: nothing measured yet
    assert rate is None and "-" in line and "phase ETA ?" in line and "plan ETA ?" in line
    clock.now += 9.0
    rate, line = progress.update(10, 10, "p")
    assert rate == pytest.approx(1.0) and "plan ETA 1d 01h 00m" in line  # 90,000 steps left at 1 step/s

    progress.start(10)  # no after_step calls (an older caller): the window holding the compile reports nothing
    clock.now += 50.0
    assert progress.update(12, 20, "p")[0] is None
    clock.now += 4.0
    assert progress.update(14, 20, "p")[0] == pytest.approx(0.5)


def test_a_line_is_printed_once_on_stdout_and_not_logged(capsys, caplog):
    line = "[iter1_encoder] step 2/16  1.00 steps/s  phase ETA 0m 04s  plan ETA 0m 14s  loss 3.0000"
    with caplog.at_level(logging.DEBUG):
        reporting.log_line(line)
    captured = capsys.readouterr()
    assert captured.out.count(line) == 1
    assert line not in captured.err and line not in caplog.text


def test_library_logs_are_quiet_unless_a_verbosity_is_given():
    from absl import logging as absl_logging

    before = absl_logging.get_verbosity()
    try:
        absl_logging.set_verbosity(absl_logging.INFO)
        reporting.quiet_library_logs(verbosity_given=True)  # --verbosity=0 on the command line: kept
        assert absl_logging.get_absl_logger().isEnabledFor(logging.INFO)
        reporting.quiet_library_logs(verbosity_given=False)
        assert absl_logging.get_verbosity() == absl_logging.WARNING
        assert not absl_logging.get_absl_logger().isEnabledFor(logging.INFO)  # Orbax logs through absl
        assert absl_logging.get_absl_logger().isEnabledFor(logging.WARNING)
    finally:
        absl_logging.set_verbosity(before)


def test_the_train_split_size_comes_from_the_source_and_feeds_the_iterator():
    c = tiny_config()
    source = pipeline.train_source(c.data)
    assert len(source) == 1438  # scikit-learn's digits, train split (README): one epoch
    given = next(pipeline.train_iterator(c.data, local_batch_size=16, seed=0, source=source))
    listed = next(pipeline.train_iterator(c.data, local_batch_size=16, seed=0))
    np.testing.assert_array_equal(given["input"], listed["input"])


def _summary(config, **kw):
    models = build_models(config)
    params = jax.eval_shape(models.init_params, jax.random.key(0))
    mesh = sharding.make_mesh(config.mesh)
    args = dict(
        config=config,
        plan=schedule.parse_plan(config.schedule.phases),
        mesh=mesh,
        params=params,
        workdir="/runs/w",
        start_step=0,
        train_examples=1438,
        eval_split="test",
        eval_examples=359,
    )
    return "\n".join(reporting.run_summary(**{**args, **kw}))


def test_the_start_up_summary_names_everything_that_will_run():
    c = tiny_config()
    text = _summary(c)
    for item in (
        "8 x cpu, 1 process; mesh data=8 x fsdp=1",  # devices and mesh (conftest: 8 fake CPU devices)
        "global 16 = 2 per device",
        "encoder E 70,272",  # parameters per model part (clu.parameter_overview)
        "label predictor D 15,936",
        "tokenizer T 74,952",
        "estimator TE 38,336",
        "cold-start tokenizer (random, frozen) 3,648",
        "codebooks 2 x 16 x 8 = 256 values",
        "digits: train split 1,438 examples; eval split 'test' 359 examples",
        "3 phases, 16 steps = 0.18 epochs",  # 16 x 16 / 1438
        "iter1_encoder    cold start  steps 0..6    (6 steps, 0.07 epochs)  <- here",
        "iter2_tokenizer              steps 6..10   (4 steps, 0.04 epochs)",
        "iter2_encoder                steps 10..16  (6 steps, 0.07 epochs)",
        "workdir     /runs/w",
        "tensorboard --logdir /runs/w/tensorboard",  # where MetricWriter puts the event files
    ):
        assert item in text, (item, text)

    resumed = _summary(c, start_step=8, train_examples=None, eval_examples=128, eval_capped=True)
    assert "resuming at step 8" in resumed and "(6 steps, ? epochs)  done" in resumed
    assert "steps 6..10   (4 steps, ? epochs)  <- here" in resumed
    assert "train split unknown size (a stream)" in resumed and "'test' >= 128 examples" in resumed
    assert "eval split none read" in _summary(c, eval_split=None, eval_examples=None)

    c.optim.accumulation_steps = 2
    assert "global 16 = 2 per device (2 micro-batches of 1 per device)" in _summary(c)


def test_epochs_of_a_recipe_plan():
    """The ImageNet recipe's plan, 200 + 50 + 200 epochs of 1,281,167 images at batch 1024, reads back in epochs."""
    c, _ = resolve.pretraining(load_config("imagenet"), lambda: 1_281_167)
    plan = schedule.parse_plan(c.schedule.phases)
    assert reporting._epochs(plan[0].steps, c.batch_size, 1_281_167) == "200.0 epochs"
    assert reporting._epochs(plan[1].steps, c.batch_size, 1_281_167) == "50.0 epochs"


def test_a_run_prints_the_summary_first_and_each_progress_line_once(tmp_path, capsys, caplog):
    c = tiny_config()
    c.schedule.phases = ("encoder_cold_start:3",)
    c.evals.linear_probe.enabled = False
    c.log_every_steps = 1
    c.checkpoint.async_save = False
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(c, str(tmp_path))
    captured = capsys.readouterr()
    out = captured.out
    assert out.index("What will run:") < out.index("Phase 0 iter1_encoder") < out.index("step 1/3")
    progress = [line for line in out.splitlines() if line.startswith("[iter1_encoder] step ")]
    assert len(progress) == 3 and len(set(progress)) == 3
    for line in progress:
        assert out.count(line) == 1 and line not in captured.err and line not in caplog.text
    assert "step 1/3  - steps/s  phase ETA ?  plan ETA ?" in progress[0]  # step 1 compiled: no rate yet
    assert "- steps/s" not in progress[1] and "phase ETA 0m 0" in progress[1]
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8")]
    rates = [r.get("perf/steps_per_sec") for r in rows if "train/loss" in r]
    assert rates[0] is None and all(r > 0 for r in rates[1:])
