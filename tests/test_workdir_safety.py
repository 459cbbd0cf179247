"""Nothing lost, whatever the user does on purpose: the held-out battery of issue 11, one test per failure, each
asserting the expected error text and the kept state (checkpoints, encoders, metric lines, config.json).

1. an exploding or non-finite lr never reaches a checkpoint; the refused-step counter survives hand-overs;
2. a resume under a changed plan, data, model... is refused before anything is touched, unless the change is an
   explicitly allowed safe one; config.json is kept and every start is recorded in config_history/;
3. one run per workdir (OS lock locally, a lease with a heartbeat on URLs); stale locks are taken over;
4. (input rules: tests/test_input_rules.py);
5. settings that train nothing are refused;
6. a damaged DONE marker is read as "not done"; a failed checkpoint write is one clear line.
The kill -9 variants (during a lock take-over and a refused resume) live in tests/test_preemption.py.
"""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import config_checks, encoder_store, train
from bridle_jax import run as run_lib
from bridle_jax import workdir as workdir_lib
from tests import tiny
from tests.tiny import ROOT, tiny_config


def _config():
    c = tiny_config()
    c.evals.linear_probe.enabled = False
    return c


def _tree_hash(path, ignore=(workdir_lib.LOCK_FILE,)) -> str:
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(path).rglob("*")):
        if p.is_file() and p.name not in ignore:
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _metric_lines(workdir) -> list[str]:
    return (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A workdir of the tiny plan (6 / 4 / 6 steps) stopped at step 6, the end of phase 0: checkpoints 4 and 6,
    encoders 0 and 1."""
    workdir = tmp_path_factory.mktemp("stopped")
    train.train_and_evaluate(_config(), str(workdir), stop_at_step=6)
    assert _steps(workdir) == [4, 6] and encoder_store.saved_iterations(workdir) == [0, 1]
    return workdir


@pytest.fixture()
def copy(stopped, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(stopped, target)
    return target


# ------------------------------------------------------------------------------------------------ 1. exploding lr


@pytest.mark.parametrize("lr", [1e30, 1e3])
def test_an_exploding_lr_on_resume_never_replaces_the_good_checkpoints(copy, lr):
    """Resumed with an absurd lr (explicitly allowed): every update is refused (update norm > max_update_ratio x
    the weights), nothing is saved after a refused step, the counter carries over the phase hand-over at step 10,
    and the run stops naming step 6 as the last good checkpoint; checkpoints, encoders and metric lines are kept."""
    before = {s: _tree_hash(copy / "checkpoints" / str(s)) for s in _steps(copy)}
    encoders = _tree_hash(copy / "encoders")
    lines = _metric_lines(copy)
    c = _config()
    c.optim.encoder.lr = c.optim.tokenizer.lr = lr
    c.resume.allow_changes = "optim"
    with pytest.raises(run_lib.NonFiniteError, match=r"step 12: 6 consecutive steps were refused.*step 6 .*last good"):
        train.train_and_evaluate(c, str(copy))
    assert {s: _tree_hash(copy / "checkpoints" / str(s)) for s in _steps(copy)} == before
    assert _tree_hash(copy / "encoders") == encoders
    after = _metric_lines(copy)
    assert after[: len(lines)] == lines
    refused = [r for r in map(json.loads, after[len(lines) :]) if "train/loss" in r]
    assert refused and all(r["train/nonfinite"] == 1 for r in refused)
    assert json.loads(after[-1])["train/nonfinite_skipped_in_a_row"] == 6  # 4 tokenizer + 2 encoder steps
    # and the good run continues from step 6 as if nothing happened
    result = train.train_and_evaluate(_config(), str(copy), stop_at_step=8)
    assert int(result["final_state"].step) == 8 and int(result["final_state"].nonfinite[1]) == 0


def test_updates_beyond_the_ratio_are_refused_in_the_step():
    """The guard is in the jitted step: a finite loss and gradient, but an update at lr 1e30, leaves params and Adam
    moments untouched and counts the step as refused; at a sane lr the same step is applied."""
    import jax
    import optax

    from bridle_jax import schedule, sharding, steps
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models

    c = _config()
    plan = schedule.parse_plan(c.schedule.phases)
    models = build_models(c)
    images = np.random.default_rng(3).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)
    batch = {"input": images, "length": np.full((16,), 16, np.int32)}
    host = lambda t: jax.tree.map(np.asarray, t)
    for lr, refused in ((1e30, True), (1e-3, False)):
        tx = optax.adamw(lr)
        state = host(state_lib.create(models, c, tx, plan[0], 0))
        step = jax.jit(
            lambda s, b: steps.encoder_step(
                s, b, models=models, config=c, tx=tx, lr_schedule=lambda count: lr, cold_start=True
            )
        )
        after, metrics = host(step(jax.tree.map(np.copy, state), batch))
        assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"])
        assert int(metrics["train/nonfinite"]) == int(refused)
        same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params))]
        assert all(same) if refused else not all(same)
        np.testing.assert_array_equal(after.nonfinite, [int(refused), int(refused)])
    del sharding


@pytest.mark.parametrize(
    "field, value",
    [
        ("optim.encoder.lr", float("nan")),
        ("optim.tokenizer.lr", float("inf")),
        ("optim.encoder.weight_decay", float("nan")),
        ("optim.tokenizer.warmup_fraction", float("nan")),
        ("quantizer.decay", float("nan")),
        ("quantizer.commitment_weight", float("inf")),
        ("optim.max_update_ratio", float("nan")),
        ("data.crop_scale", (float("nan"), 1.0)),
    ],
)
def test_non_finite_float_fields_are_refused_by_name(field, value):
    c = _config()
    *path, leaf = field.split(".")
    node = c
    for part in path:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=rf"config.{field}: expected a finite number"):
        config_checks.validate(c)


# ------------------------------------------------------------------------------------------------ 2. resume


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("schedule.phases", ("encoder_cold_start:3", "tokenizer:4", "encoder:6"), r"schedule.phases: \["),
        ("data.image_size", 32, r"data.image_size: 16 -> 32"),
        ("data.mean", (0.5, 0.5, 0.5), r"data.mean"),
        ("data.crop_scale", (0.5, 1.0), r"data.crop_scale"),
        ("model.decoder_depth", 2, r"model.decoder_depth: 1 -> 2"),
        ("masking.ratio", 0.5, r"masking.ratio"),
        ("seed", 3, r"seed: 0 -> 3"),
        ("optim.encoder.lr", 2e-3, r"optim.encoder.lr: 0.001 -> 0.002.*allow_changes=optim"),
    ],
)
def test_a_changed_config_is_refused_before_anything_is_touched(copy, field, value, message):
    before = _tree_hash(copy)
    c = _config()
    *path, leaf = field.split(".")
    node = c
    for part in path:
        node = node[part]
    node[leaf] = value
    with pytest.raises(workdir_lib.ResumeRefused, match=message):
        train.train_and_evaluate(c, str(copy))
    assert _tree_hash(copy) == before  # nothing moved aside, config.json not overwritten, no history entry


def test_a_plan_change_inside_the_phases_that_ran_is_refused_even_when_allowed(copy):
    before = _tree_hash(copy)
    c = _config()
    c.resume.allow_changes = "schedule.phases"
    for phases in [("encoder_cold_start:3", "tokenizer:4", "encoder:6"), ("encoder_cold_start:8",)]:
        c.schedule.phases = phases
        with pytest.raises(workdir_lib.ResumeRefused, match=r"newest checkpoint \(step 6\).*phases 0..0 unchanged"):
            train.train_and_evaluate(c, str(copy))
    assert _tree_hash(copy) == before


def test_an_allowed_plan_change_after_the_newest_checkpoint_runs_and_is_recorded(copy):
    config_json = (copy / "config.json").read_text()
    c = _config()
    c.resume.allow_changes = "schedule.phases"
    c.schedule.phases = ("encoder_cold_start:6", "tokenizer:2", "encoder:2", "tokenizer:2", "encoder:2")
    result = train.train_and_evaluate(c, str(copy), stop_at_step=7)
    assert int(result["final_state"].step) == 7
    assert (copy / "config.json").read_text() == config_json  # the config the run started with, kept
    history = sorted((copy / workdir_lib.HISTORY_DIR).iterdir())
    entries = [json.loads(p.read_text()) for p in history]
    assert len(entries) == 2 and entries[0]["changes"] == {}
    assert entries[1]["changes"] == {"schedule.phases": [list(_config().schedule.phases), list(c.schedule.phases)]}
    assert entries[1]["config"]["schedule"]["phases"] == list(c.schedule.phases)
    assert {"host", "pid", "started"} <= set(entries[1])


def test_a_readable_checkpoint_of_another_shape_is_never_set_aside(copy):
    """Defence in depth behind the config check: a checkpoint that reads but does not fit is refused and kept."""
    c = _config()
    c.quantizer.codebook_size = 32
    (copy / "config.json").unlink()  # as if the config check had been bypassed
    before = _tree_hash(copy / "checkpoints")
    with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"checkpoint 6 .*readable but does not fit"):
        train.train_and_evaluate(c, str(copy))
    assert _tree_hash(copy / "checkpoints") == before
    assert not any("unreadable" in p.name for p in (copy / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------ 3. one run


def test_a_second_run_on_a_locked_workdir_is_refused_with_the_holder(copy):
    holder = workdir_lib.WorkdirLock(str(copy))
    holder.acquire()
    try:
        before = _tree_hash(copy)
        with pytest.raises(workdir_lib.WorkdirLocked, match=rf"in use by another run \(host .*pid {os.getpid()}"):
            train.train_and_evaluate(_config(), str(copy))
        assert _tree_hash(copy) == before
    finally:
        holder.release()
    assert (copy / workdir_lib.LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over


def test_a_stale_file_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / workdir_lib.LOCK_FILE).write_text(
        json.dumps({"host": "gone-host", "pid": 99999, "started": "2026-01-01T00:00:00+00:00", "token": "x"})
    )
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert "took over the lock of a run that ended without releasing it (host gone-host, pid 99999" in caplog.text
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lease_lock_refuses_a_live_holder_takes_over_an_expired_one_and_heartbeats(tmp_path, caplog):
    """The gs:// variant (an object with a lease), exercised on a local folder."""
    first = workdir_lib.WorkdirLock(str(tmp_path), lease_s=2.0, use_lease=True)
    first.acquire()
    written = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.8)  # > lease / 4: the heartbeat renewed it
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())["heartbeat"] > written
    second = workdir_lib.WorkdirLock(str(tmp_path), lease_s=2.0, use_lease=True)
    with pytest.raises(workdir_lib.WorkdirLocked, match=rf"pid {os.getpid()}"):
        second.acquire()
    first._stop.set()  # the holder dies without releasing: its heartbeat stops
    first._thread.join()
    time.sleep(2.1)
    with caplog.at_level("WARNING"):
        second.acquire()
    assert "took over a stale lock" in caplog.text
    time.sleep(0.01)
    second.release()
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_main_reports_a_locked_workdir_in_one_line(tmp_path):
    """Through the real entry point: exit 1, one line naming the holder, the traceback kept in a file."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = workdir_lib.WorkdirLock(str(workdir))
    holder.acquire()
    try:
        cmd = [sys.executable, "-m", "bridle_jax.main", "--config=configs/digits.py", f"--workdir={workdir}"]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    finally:
        holder.release()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bridle_jax: WorkdirLocked: workdir") and f"pid {os.getpid()}" in last, proc.stderr
    kept = last.split("traceback in ")[1].rstrip(")")
    assert "Traceback" in pathlib.Path(kept).read_text()


# ------------------------------------------------------------------------------------------------ 5. trains nothing


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.masking, "ratio", 0.0), r"config.masking.ratio: expected a ratio that masks at least one"),
        (lambda c: setattr(c.data, "image_size", 4), r"config.masking.ratio: .*of the 1 patches \(it keeps 1"),
        (lambda c: setattr(c.optim, "max_update_ratio", 0.0), r"config.optim.max_update_ratio: expected > 0"),
        (lambda c: setattr(c.optim.encoder, "lr", 0.0), r"config.optim.encoder.lr: expected > 0"),
    ],
)
def test_settings_that_train_nothing_are_refused(edit, message):
    c = _config()
    edit(c)
    with pytest.raises(ValueError, match=message):
        config_checks.validate(c)


def test_a_tube_mask_that_masks_nothing_per_frame_slot_is_refused():
    """Tube masks keep hw - int(ratio * hw) per slot: 0.1 of a 3x3 slot masks int(0.9) = 0 patches."""
    c = tiny.load_config("moving_digits")
    c.data.image_size = 24  # 3x3 patches of 8 per frame slot
    c.masking.ratio = 0.1
    with pytest.raises(ValueError, match=r"config.masking.ratio: .*of the 9 patches per frame slot \(it keeps 9"):
        config_checks.validate(c)
    c.masking.ratio = 0.12  # int(1.08) = 1 masked
    config_checks.validate(c)


# ------------------------------------------------------------------------------------------------ 6. markers, errors


@pytest.mark.parametrize("content", ["", "garbage{", '"just a string"', '{"time": "no step"}'])
def test_a_damaged_done_marker_is_read_as_not_done(copy, content, caplog):
    (copy / workdir_lib.DONE_FILE).write_text(content)
    with caplog.at_level("WARNING"):
        assert workdir_lib.read_done(copy) is None
    assert f"{copy / workdir_lib.DONE_FILE} is damaged" in caplog.text


def test_a_damaged_done_marker_does_not_block_the_run(copy, caplog):
    (copy / workdir_lib.DONE_FILE).write_text("garbage{")
    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(_config(), str(copy), stop_at_step=7)
    assert int(result["final_state"].step) == 7
    assert "is damaged" in caplog.text


def test_a_failed_checkpoint_write_is_one_clear_line_naming_the_last_good_one(copy, monkeypatch, capsys):
    real = ckpt_lib.Checkpointer.save

    def save(self, step, *args, **kwargs):
        if step >= 8:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step)))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    with pytest.raises(run_lib.CheckpointWriteError) as error:
        train.train_and_evaluate(_config(), str(copy))
    message = str(error.value)
    assert "cannot write checkpoint step 8" in message and "No space left on device" in message
    assert "step 6" in message and "is the last good one" in message and "re-run the same command" in message
    assert message in capsys.readouterr().out  # printed when it happened, before any traceback
    assert _steps(copy) == [4, 6]
    manager = ocp.CheckpointManager(copy / "checkpoints")
    assert manager.latest_step() == 6
    manager.close()
