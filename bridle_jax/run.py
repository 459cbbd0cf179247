"""The run layer: one workdir's lifecycle, shared by pretraining (`train.py`) and fine-tuning (`finetune/`).

A `Run` owns everything about a workdir that is not the model or the data:
  - the workdir itself: resolved (URLs kept), created and checked writable, locked for the run's lifetime
    (`workdir.WorkdirLock`: one run per workdir), its config recorded (`workdir.record_start`);
  - the one `Checkpointer`: restore-or-create, and saves that are refused after non-finite steps, from non-finite
    weights or once another run has taken the lock (the newest checkpoint stays the last good one);
  - the SIGTERM/SIGINT watch: a preempted run checkpoints the step under way and returns;
  - the metric writer, the progress line, and the stop after `max_consecutive_nonfinite` refused steps in a row;
  - the `DONE` marker.
`Run.train` is the step loop both users run: each supplies its state (with `.step`, `.params` and the refusal
counters `.nonfinite`), its jitted step, its batches and its hooks (the encoder kept and probed at a phase end; the
fine-tune eval), and the loop logs, checkpoints and stops on preemption the same way for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import paths, preemption, reporting
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import pipeline


class NonFiniteError(RuntimeError):
    """Too many consecutive refused steps (non-finite loss, gradient or update, or an exploding update)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission...); the message says which one is the last
    good checkpoint."""


# The errors that stop a run for a reason the user can fix; the entry points report them in one line (the traceback
# kept in a file).
RUN_ERRORS = (
    NonFiniteError,
    CheckpointWriteError,
    workdir_lib.WorkdirLocked,
    workdir_lib.ResumeRefused,
    ckpt_lib.CheckpointMismatch,
)


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skipped_records(data_config) -> int:
    """Unreadable records skipped so far by all processes (each counts only the shard it reads). A collective:
    every process calls it at the same (logging) steps."""
    count = pipeline.skipped_count(data_config)
    if jax.process_count() > 1:
        count = int(np.sum(multihost_utils.process_allgather(np.int32(count))))
    return count


@dataclasses.dataclass
class Hooks:
    """What a user adds to the step loop, each called as `hook(step, state, last)` after the step `step` is done
    (`last`: the loop's final step): `after_step` after the metric line, before the checkpoint (fine-tuning's eval,
    pretraining keeping the encoder at a phase end), `after_checkpoint` once the step's checkpoint is written (in
    the background) (pretraining's end-of-phase probe: a run stopped during it resumes at the phase end).
    `log_values(step, values) -> values` edits the metric line's values."""

    after_step: Callable[[int, Any, bool], None] | None = None
    after_checkpoint: Callable[[int, Any, bool], None] | None = None
    log_values: Callable[[int, dict], dict] | None = None


class Run:
    """One workdir's lifecycle; a context manager (`with Run(...) as run:`): leaving it finishes the pending
    (async) checkpoint, closes the metric files, restores the signal handlers and releases the lock, also on an
    error.

    `nonfinite_hint` ends the message of a run stopped by refused steps (which lr to lower). Readers of a workdir
    take no lock and open its checkpoints read-only (`checkpoint.Checkpointer(..., read_only=True)`)."""

    def __init__(self, workdir, *, max_consecutive_nonfinite: int = 5, nonfinite_hint: str = ""):
        self.workdir = paths.resolve_workdir(workdir)  # URLs are kept as they are
        workdir_lib.workdir_exists_or_make(self.workdir)  # writable, or an error naming it
        self.max_consecutive_nonfinite = int(max_consecutive_nonfinite)
        self.nonfinite_hint = nonfinite_hint
        self.lock = workdir_lib.lock_for_run(self.workdir)  # before anything in it is touched (None off process 0)
        self.ckpt = self.writer = self.watch = self.progress = None
        self.preempted = False
        self.resumed_at = None  # the step restored from (None: a new run)
        self.data_iter = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.ckpt is not None:
                with self.explained_write_errors(None):
                    self.ckpt.close()
            if self.writer is not None:
                self.writer.close()
            if hasattr(self.data_iter, "close"):
                self.data_iter.close()
        finally:
            try:
                if self.watch is not None:
                    self.watch.close()
            finally:
                if self.lock is not None:
                    self.lock.release()

    def start(self, config, changes: dict, *, total_steps: int, checkpoint) -> None:
        """Records the config this start runs under, then opens the checkpointer (`checkpoint`: the config's
        {max_to_keep, async_save}), the metric writer, the progress line and the preemption watch."""
        workdir_lib.record_start(self.workdir, config, changes)
        for field, (old, new) in changes.items():
            reporting.log_line(
                f"Resuming with an allowed change (config.resume.allow_changes): {field}: {old!r} -> {new!r}"
            )
        self.ckpt = ckpt_lib.Checkpointer(
            self.workdir, max_to_keep=checkpoint.max_to_keep, async_save=checkpoint.async_save
        )
        self.writer = reporting.MetricWriter(self.workdir)
        self.progress = reporting.Progress(total_steps)
        self.watch = preemption.PreemptionWatch(self.ckpt)  # SIGTERM/SIGINT handlers until __exit__

    def restore(self, abstract_for_step, data_iter):
        """(state, meta) of the newest readable checkpoint, restored onto `abstract_for_step(step)`'s shardings with
        the data iterator's position, or None for a new run."""
        self.data_iter = data_iter  # closed with the run (Grain's worker processes, when config.data.worker_count)
        restored = self.ckpt.restore_latest(abstract_for_step, data_iter)
        self.resumed_at = None if restored is None else int(restored[0].step)
        return restored

    # ------------------------------------------------------------------------------------------ refusals and saves

    def last_good(self) -> str:
        step = self.ckpt.latest_step()
        if step is None:
            return "There is no checkpoint yet"
        return f"The newest checkpoint, step {step} ({self.ckpt.directory / str(step)}), is the last good one"

    def check_nonfinite(self, state, step: int, phase: str | None = None) -> dict:
        """Stops the run after too many refused steps in a row (after logging the counters, when given the phase),
        before anything is saved; returns the counters for the log. The counters live in the state and run over
        the whole run: a phase hand-over does not reset them."""
        total, in_a_row = (int(v) for v in np.asarray(state.nonfinite))
        counters = {"train/nonfinite_skipped_total": total, "train/nonfinite_skipped_in_a_row": in_a_row}
        if in_a_row >= self.max_consecutive_nonfinite:
            if phase is not None:
                self.writer.write(step, counters, phase=phase)
            self.ckpt.wait()
            raise NonFiniteError(
                f"step {step}: {in_a_row} consecutive steps were refused: a non-finite loss, gradient or update, or "
                f"an exploding update ({total} refused in this run); stopping without saving. {self.last_good()}: "
                f"{self.nonfinite_hint}"
            )
        return counters

    def checkpoint(self, step: int, state, data_iter, meta: dict) -> None:
        """Saves `state` and the data iterator's position at `step`, only from a state whose last step was applied
        and whose weights are all finite, and only while this run holds the workdir; an OSError (disk full,
        permissions) becomes one clear message naming the last good checkpoint.

        After refused steps the save is left out (logged): the newest checkpoint stays the last one made by a good
        step, so a run stopped by an exploding or non-finite lr never rotates its good checkpoints out
        (`max_to_keep`); a resume from the older checkpoint re-runs the steps in between exactly."""
        in_a_row = self.check_nonfinite(state, step)["train/nonfinite_skipped_in_a_row"]
        if in_a_row:
            reporting.log_line(f"Step {step}: not saving a checkpoint: the last {in_a_row} step(s) were refused")
            return
        if not bool(_all_finite((state.params, getattr(state, "codebooks", {})))):
            self.ckpt.wait()
            raise NonFiniteError(f"step {step}: the parameters are not finite; not saving them. {self.last_good()}.")
        if self.lock is not None and self.lock.lost:
            raise CheckpointWriteError(f"step {step}: another run took over this workdir's lock; not saving")
        with self.explained_write_errors(step):
            self.ckpt.save(step, state, data_iter, meta)

    def wait(self, step: int | None = None) -> None:
        """Waits for the pending (async) checkpoint, with its write errors explained."""
        with self.explained_write_errors(step):
            self.ckpt.wait()

    @contextlib.contextmanager
    def explained_write_errors(self, step: int | None):
        try:
            yield
        except OSError as e:
            if isinstance(e, CheckpointWriteError):
                raise
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            line = (
                f"cannot write {what} in {self.ckpt.directory}: {type(e).__name__}: {e}. The checkpoints already "
                "written are intact. "
            )
            try:
                line += f"{self.last_good()}. Free space or fix permissions, then re-run the same command to resume."
            except Exception:  # pylint: disable=broad-except
                line += "The newest one listed in the folder is the last good one."
            reporting.log_line(line)
            raise CheckpointWriteError(line) from e

    def stop_for_preemption(self, step: int, state, data_iter, meta: Callable[[int], dict]) -> bool:
        """A safe point: when any process was signalled (a collective), checkpoint `step` (unless saved already: e.g.
        a phase start, whose checkpoint holds the state before the hand-over), wait for it and report."""
        if not self.watch.should_stop(step):
            return False
        if step not in self.ckpt.all_steps():
            self.checkpoint(step, state, data_iter, meta(step))
        self.wait(step)
        reporting.log_line(f"Preempted at step {step}: checkpoint saved; re-run the same command to resume")
        self.preempted = True
        return True

    # ------------------------------------------------------------------------------------------------ the step loop

    def train(
        self,
        state,
        *,
        end: int,
        next_batch: Callable[[int], Any],
        train_step: Callable[[Any, Any, int], tuple[Any, dict]],
        data_iter,
        meta: Callable[[int], dict],
        phase: str,
        log_every: int,
        checkpoint_every: int,
        data_config,
        stop_at: int | None = None,
        hooks: Hooks = Hooks(),
    ):
        """Runs the steps from `state.step` to `end`: returns (state, step, stopped) with `stopped` "preempted",
        "asked" (`stop_at` reached: checkpointed) or None.

        `next_batch(step)` gives the global batch of the step that trains step+1; `train_step(state, batch, step)`
        returns (state, metrics) with metrics still on device; `meta(step)` is the checkpoint's metadata."""
        step = int(state.step)
        self.progress.start(step)  # the rate starts after this loop's first (compiling) step
        while step < end:
            if self.stop_for_preemption(step, state, data_iter, meta):
                return state, step, "preempted"
            state, metrics = train_step(state, next_batch(step), step)
            step += 1
            self.progress.after_step(step, state)
            last = step == end
            if step % log_every == 0 or last:
                self._log(step, state, metrics, end, phase, data_config, hooks.log_values)
            if hooks.after_step is not None:
                hooks.after_step(step, state, last)
            stopping = step == stop_at
            if step % checkpoint_every == 0 or last or stopping:
                self.checkpoint(step, state, data_iter, meta(step))
            if hooks.after_checkpoint is not None:
                hooks.after_checkpoint(step, state, last)
            if stopping:
                return state, step, "asked"
        return state, step, None

    def _log(self, step: int, state, metrics: dict, end: int, phase: str, data_config, edit) -> None:
        counters = self.check_nonfinite(state, step, phase)
        rate, line = self.progress.update(step, end, phase)
        values = {**jax.device_get(metrics), **counters}
        if edit is not None:
            values = edit(step, values)
        if rate is not None:  # not yet measured after compilation
            values["perf/steps_per_sec"] = rate
        values["data/skipped_records"] = skipped_records(data_config)
        self.writer.write(step, values, phase=phase)
        reporting.log_line(f"{line}  loss {float(values['train/loss']):.4f}")

    # ------------------------------------------------------------------------------------------------------ the end

    def finish(self, step: int) -> None:
        """The whole plan is done: the final checkpoint is complete before the `DONE` marker says so."""
        self.wait(step)
        was_done = workdir_lib.read_done(self.workdir)
        marker = workdir_lib.write_done(self.workdir, step)
        if was_done is not None and self.resumed_at == step:
            reporting.log_line(f"The plan had already finished (DONE at step {step}, {marker['time']}).")
        else:
            reporting.log_line(f"Plan finished at step {step}; wrote {workdir_lib.DONE_FILE}.")
