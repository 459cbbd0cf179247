"""`train_and_evaluate(config, workdir)`: the whole interleaved plan, resumable at any step.

Reads top to bottom: validate the config → mesh, models, data → restore or create the state → for every phase of
the plan: hand over, run its jitted steps (logging, checkpointing), keep the encoder and probe it at the end → mark
the workdir DONE.

Preemption: SIGTERM (or Ctrl-C) is only noted; before every step, and before each phase's hand-over, the loop asks
whether any process was signalled and, if so, checkpoints the current step, waits for the save and returns with
"preempted": True (re-running the same command resumes exactly). The workdir may be a gs:// URL: every file
access goes through etils.epath.
"""

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import data_log
from bridle_jax import encoder_store
from bridle_jax import paths
from bridle_jax import preemption
from bridle_jax import workdir as workdir_lib
from bridle_jax import config_checks
from bridle_jax import reporting
from bridle_jax import optim
from bridle_jax import resolve
from bridle_jax import schedule
from bridle_jax import sharding
from bridle_jax import state as state_lib
from bridle_jax import steps
from bridle_jax.data import pipeline
from bridle_jax.evaluators import linear_probe
from bridle_jax.models.bridle import build_models

PROBE_FILE = "linear_probe.json"


class NonFiniteError(RuntimeError):
    """Too many consecutive refused steps (non-finite loss, gradient or update, or an exploding update)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission...); the message says which one is the last
    good checkpoint."""


# The errors that stop a run for a reason the user can fix; `main` reports them in one line (traceback kept in a file).
RUN_ERRORS = (
    NonFiniteError,
    CheckpointWriteError,
    workdir_lib.WorkdirLocked,
    workdir_lib.ResumeRefused,
    ckpt_lib.CheckpointMismatch,
)


def _last_good(ckpt) -> str:
    step = ckpt.latest_step()
    if step is None:
        return "There is no checkpoint yet"
    return f"The newest checkpoint, step {step} ({ckpt.directory / str(step)}), is the last good one"


def _check_nonfinite(state, config, step: int, ckpt, writer=None, phase_name: str = "") -> dict:
    """Stops the run after too many refused steps in a row (after logging the counters, when given a writer),
    before anything is saved; returns the counters for the log. The counters run over the whole run: a phase
    hand-over does not reset them."""
    total, in_a_row = (int(v) for v in np.asarray(state.nonfinite))
    counters = {"train/nonfinite_skipped_total": total, "train/nonfinite_skipped_in_a_row": in_a_row}
    if in_a_row >= config.optim.max_consecutive_nonfinite:
        if writer is not None:
            writer.write(step, counters, phase=phase_name)
        ckpt.wait()
        raise NonFiniteError(
            f"step {step}: {in_a_row} consecutive steps were refused: a non-finite loss, gradient or update, or an "
            f"update larger than config.optim.max_update_ratio x the weights ({total} refused in this run); "
            f"stopping without saving. {_last_good(ckpt)}: lower the learning rate "
            "(config.optim.*.lr, with --config.resume.allow_changes=optim) or use model.dtype=float32, and re-run."
        )
    return counters


@jax.jit
def _all_finite(params, codebooks) -> jax.Array:
    leaves = [x for x in jax.tree.leaves((params, codebooks)) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _save(ckpt, lock, step: int, state, data_iter, meta: dict) -> None:
    """Saves a checkpoint only from a state whose last step was applied and whose parameters and codebooks are all
    finite, and only while this run holds the workdir; an OSError (disk full, permissions) becomes one clear message
    naming the last good checkpoint.

    After refused steps the save is left out (logged): the newest checkpoint stays the last one made by a good step,
    so a run stopped by an exploding or non-finite lr never rotates its good checkpoints out (`max_to_keep`); a
    resume from the older checkpoint re-runs the steps in between exactly."""
    in_a_row = int(np.asarray(state.nonfinite)[1])
    if in_a_row:
        reporting.log_line(f"Step {step}: not saving a checkpoint: the last {in_a_row} step(s) were refused")
        return
    if not bool(_all_finite(state.params, state.codebooks)):
        ckpt.wait()
        raise NonFiniteError(
            f"step {step}: the parameters or codebooks are not finite; not saving them. {_last_good(ckpt)}."
        )
    if lock is not None and lock.lost:
        raise CheckpointWriteError(f"step {step}: another run took over this workdir's lock; not saving")
    with _explained_write_errors(ckpt, step):
        ckpt.save(step, state, data_iter, meta)


@contextlib.contextmanager
def _explained_write_errors(ckpt, step: int | None):
    try:
        yield
    except OSError as e:
        if isinstance(e, CheckpointWriteError):
            raise
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        line = (
            f"cannot write {what} in {ckpt.directory}: {type(e).__name__}: {e}. The checkpoints already written are "
            "intact. "
        )
        try:
            line += f"{_last_good(ckpt)}. Free space or fix permissions, then re-run the same command to resume."
        except Exception:  # pylint: disable=broad-except
            line += "The newest one listed in the folder is the last good one."
        reporting.log_line(line)
        raise CheckpointWriteError(line) from e


def _skipped_records(data_config) -> int:
    """Unreadable records skipped so far by all processes (each counts only the shard it reads). A collective:
    every process calls it at the same (logging) steps."""
    count = pipeline.skipped_count(data_config)
    if jax.process_count() > 1:
        count = int(np.sum(multihost_utils.process_allgather(np.int32(count))))
    return count


class _ProbeData:
    """The labelled splits the linear probe reads and how much of each, known at start-up from the sources' lengths:
    nothing is decoded here. Each probe streams both splits through the encoder (`linear_probe.split_features`
    over `pipeline.eval_batches`), holding one batch of decoded inputs at a time and keeping only the pooled
    features (N x width float32) and labels. Listing the sources at start-up also checks the splits exist on every
    start and resume, so a wrong split fails before step 1, not at the end of the next encoder phase.

    `train` / `test` are the splits as whole arrays (`pipeline.eval_arrays`), decoded on first use and held: the
    training loop never touches them (benchmarks/study.py's raw-pixel baseline does, on a small dataset)."""

    def __init__(self, config):
        p = config.evals.linear_probe
        self.data_config = config.data
        self.train_split, self.test_split = p.train_split, p.test_split
        self.train_cap = p.max_examples
        self.test_cap = p.get("max_test_examples", None) or p.max_examples
        self.train_size = pipeline.eval_size(config.data, self.train_split, self.train_cap)
        self.test_size = pipeline.eval_size(config.data, self.test_split, self.test_cap)

        def describe(split, size):
            part = f"first {size.examples:,} of {size.total:,}" if size.capped else f"all {size.total:,}"
            return f"{split!r} ({part})"

        reporting.log_line(
            f"Linear probe splits: train {describe(self.train_split, self.train_size)}, test "
            f"{describe(self.test_split, self.test_size)}; read batch by batch at each probe"
        )

    @functools.cached_property
    def train(self) -> dict:
        return pipeline.eval_arrays(self.data_config, self.train_split, self.train_cap)

    @functools.cached_property
    def test(self) -> dict:
        return pipeline.eval_arrays(self.data_config, self.test_split, self.test_cap)


def _print_summary(config, plan, mesh, state, workdir: str, train_examples: int, probe_data) -> None:
    if jax.process_index() != 0:
        return
    evals = {"eval_split": None, "eval_examples": None}
    if probe_data is not None:  # the sizes from the source's length: nothing decoded for the summary
        evals = {
            "eval_split": probe_data.test_split,
            "eval_examples": probe_data.test_size.examples,
            "eval_capped": probe_data.test_size.capped,
        }
    lines = reporting.run_summary(
        config=config,
        plan=plan,
        mesh=mesh,
        params=state.params,
        workdir=workdir,
        start_step=int(state.step),
        train_examples=train_examples,
        **evals,
    )
    reporting.log_line("\n".join(lines))


def run_linear_probe(models, encoder_params, data: _ProbeData, config, mesh) -> dict:
    """Extracts the pooled features of both probe splits from the encoder, streamed batch by batch (one batch of
    decoded inputs held at a time), then fits the probe: {"top1_train", "top1_test", "final_loss"}."""
    p = config.evals.linear_probe
    feats = lambda split, cap: linear_probe.split_features(
        models, encoder_params, data.data_config, split, cap, mesh=mesh, batch_size=p.batch_size
    )
    train_x, train_y = feats(data.train_split, data.train_cap)
    test_x, test_y = feats(data.test_split, data.test_cap)
    return linear_probe.linear_probe(
        train_x, train_y, test_x, test_y, steps=p.steps, lr=p.lr, batch_size=p.batch_size, seed=config.seed
    )


def _probe_once(workdir: str, key: str, models, encoder_params, data: _ProbeData, config, mesh):
    """The probe of the encoder `key` ("iteration_k"), computed at most once per workdir: returns (result, reused).

    When linear_probe.json already holds `key` (a resume re-running the last steps of an encoder phase whose probe
    had finished before the run was stopped, or a restart at step 0), the recorded result is returned and neither
    the features nor the head are computed again; resumes are exact, so it is the same encoder. On several
    processes the features are a collective: process 0's file decides for all (`result` is None on a process that
    cannot read it). Settings of `evals.linear_probe` changed on a resume apply to the encoders probed after it.

    `encoder_params` may be a callable returning them (a kept encoder, restored only if the probe runs).

    No cache of the features is written. The phase-end checkpoint is written before the probe, so a run killed
    during a probe loses only that probe: the resume starts at the phase end and probes the kept encoder
    (`_pending_probes`), re-extracting its features (minutes) but training nothing again. A features file would only
    save that extraction, for a window (a hard kill during a probe; a SIGTERM lets the probe finish, as preemption is
    acted on between steps) that is short against a run, while it costs N x width x 4 bytes per split and encoder
    in the workdir (~150 MB per split for 50k ViT-B features, on gs:// for TPU runs) and needs its own staleness
    checks (which encoder, which splits and caps, which preprocessing).
    """
    recorded = _read_probe(workdir).get(key)
    reuse = recorded is not None
    if jax.process_count() > 1:
        reuse = bool(multihost_utils.broadcast_one_to_all(np.int32(reuse)))
    if reuse:
        return recorded, True
    if callable(encoder_params):  # a kept encoder, restored only now that its probe runs
        encoder_params = encoder_params()
    result = run_linear_probe(models, encoder_params, data, config, mesh)
    _record_probe(workdir, key, result)
    return result, False


def _pending_probes(workdir: str, plan, step: int, state):
    """(key, phase or None, params) of the encoders kept before this start: iteration 0 and every encoder phase that
    ended at or before `step`. `params` is the encoder itself (iteration 0 at step 0: the state's) or a callable that
    restores the kept one (`encoders/iteration_k`, on the state's shardings) only when its probe must run: the
    recorded probes are skipped by `_probe_once` without reading anything. A run stopped during an end-of-phase
    probe (after the phase-end checkpoint) gets that probe here; so does a run resumed with the probe turned on, and
    one resumed from a converted checkpoint (`bridle_jax.convert` keeps the imported encoders). An encoder that was
    not kept is left out (with a line saying so), never a reason to stop the run."""
    current = state.params["encoder"]["encoder"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    kept = lambda k: lambda: encoder_store.load_encoder_params(workdir, k, abstract)
    yield "iteration_0", None, current if step == 0 else kept(0)
    saved = set(encoder_store.saved_iterations(workdir))
    for phase in plan:
        if phase.trains_encoder and phase.end_step <= step:
            if phase.iteration in saved:
                yield f"iteration_{phase.iteration}", phase, kept(phase.iteration)
            elif f"iteration_{phase.iteration}" not in _read_probe(workdir):
                kept_dir = f"encoders/iteration_{phase.iteration}"
                reporting.log_line(f"No kept encoder for {phase.name} ({kept_dir}): its probe is left out")


def _read_probe(workdir: str) -> dict:
    path = paths.workdir_path(workdir) / PROBE_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _record_probe(workdir: str, key: str, result: dict) -> dict:
    """Process 0 writes; the others wait for that write, so any later read of the file on any process (the next
    `_probe_once`, the run's summary) sees `key`: without the barrier process 1 could read the file first."""
    results = _read_probe(workdir)
    results[key] = result
    if jax.process_index() == 0:
        path = paths.workdir_path(workdir) / PROBE_FILE
        paths.write_text_atomic(path, json.dumps(results, indent=2, sort_keys=True))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"linear_probe.json:{key}")
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> dict:
    """Runs (or resumes) the whole plan in `workdir` (a local path or a gs:// URL).

    `stop_at_step` checkpoints and returns once that many steps are done (a planned interruption; running the same
    call again without it resumes). SIGTERM/SIGINT do the same at the step under way (a preemption). Once the whole
    plan is done `<workdir>/DONE` is written, and a re-run of a finished workdir only reports. Returns {"workdir",
    "linear_probe": {iteration: result}, "final_state", "preempted": bool, "done": bool}.
    """
    # ---------------------------------------------------------------- set-up
    config_checks.validate(config)
    workdir = paths.resolve_workdir(workdir)  # URLs are kept as they are
    workdir_lib.workdir_exists_or_make(workdir)  # writable, or an error naming it
    lock = workdir_lib.lock_for_run(workdir)  # one run per workdir, before anything in it is touched
    try:
        return _run(config, workdir, lock, stop_at_step)
    finally:
        if lock is not None:
            lock.release()


def _run(config, workdir: str, lock, stop_at_step: int | None) -> dict:
    train_source = pipeline.train_source(config.data)  # listed once: its size turns epochs into steps
    config, notes = resolve.pretraining(config, lambda: len(train_source))
    changes = workdir_lib.check_resume(workdir, config)  # refused (nothing touched) or exact
    for line in notes:
        reporting.log_line(line)
    plan = schedule.parse_plan(config.schedule.phases)
    mesh = sharding.make_mesh(config.mesh)
    models = build_models(config)
    data_iter = pipeline.train_iterator(
        config.data,
        local_batch_size=sharding.local_batch_size(config.batch_size, mesh),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        source=train_source,
    )
    ckpt = ckpt_lib.Checkpointer(
        workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
    )
    workdir_lib.record_start(workdir, config, changes)
    for field, (old, new) in changes.items():
        reporting.log_line(
            f"Resuming with an allowed change (config.resume.allow_changes): {field}: {old!r} -> {new!r}"
        )
    writer = reporting.MetricWriter(workdir)
    progress = reporting.Progress(schedule.total_steps(plan))
    probe_data = _ProbeData(config) if config.evals.linear_probe.enabled else None
    phase_tx = lambda phase: optim.make_optimizer(config.optim, state_lib.trained_side(phase), phase.steps)
    batch_log = data_log.DataLog(workdir)  # off unless BRIDLE_JAX_DATA_LOG=1
    watch = preemption.PreemptionWatch(ckpt)  # SIGTERM/SIGINT handlers until `finally`
    preempted = False
    done = False
    state = None

    try:
        # ---------------------------------------------------------------- restore or create
        def abstract_for_step(step):
            phase = schedule.phase_of_checkpoint(plan, step)
            return state_lib.abstract_for(models, config, phase_tx(phase)[0], phase, config.seed, mesh)

        restored = ckpt.restore_latest(abstract_for_step, data_iter)
        if restored is not None:
            state, meta = restored
            reporting.log_line(f"Resumed from step {meta['step']} ({meta['phase']}) in {ckpt.directory}")
        else:
            state = state_lib.create_sharded(models, config, phase_tx(plan[0])[0], plan[0], config.seed, mesh)
        step = int(state.step)
        _print_summary(config, plan, mesh, state, workdir, len(train_source), probe_data)
        batch_log.started(step)
        if step < schedule.total_steps(plan):
            workdir_lib.clear_done(workdir)  # a longer plan than the one that finished: not done any more
        encoder_store.save_encoder(workdir, 0, state.params["encoder"]["encoder"])
        results = {}
        if probe_data is not None:  # the encoder as initialised, and any kept encoder whose probe never finished
            for key, where, params in _pending_probes(workdir, plan, step, state):
                result, reused = _probe_once(workdir, key, models, params, probe_data, config, mesh)
                if result is not None and not reused:
                    results[key] = result
                    if where is not None:  # a phase that ended before this start: its metric line, late
                        writer.write(where.end_step, {"eval/linear_probe/top1": result["top1_test"]}, phase=where.name)
                    name = "encoder as initialised" if where is None else f"kept encoder of {where.name}"
                    reporting.log_line(f"Linear probe, {name}: top-1 {result['top1_test']:.4f}")

        def preempted_here() -> bool:
            """A safe point: when any process was signalled, checkpoint `step` (unless saved already: e.g. a phase
            start, whose checkpoint holds the state before the hand-over), wait for it and report."""
            nonlocal preempted
            if not watch.should_stop(step):
                return False
            if step not in ckpt.all_steps():
                _check_nonfinite(state, config, step, ckpt)
                producer = schedule.phase_of_checkpoint(plan, step)
                meta = {"step": step, "phase": producer.name, "phase_index": producer.index}
                _save(ckpt, lock, step, state, data_iter, meta)
            with _explained_write_errors(ckpt, step):
                ckpt.wait()
            reporting.log_line(f"Preempted at step {step}: checkpoint saved; re-run the same command to resume")
            preempted = True
            return True

        # ---------------------------------------------------------------- the plan
        for phase in plan:
            if step >= phase.end_step:
                continue
            if preempted_here():
                break
            tx, lr_schedule = phase_tx(phase)
            if step == phase.start_step and phase.index > 0:
                state = state_lib.hand_over_sharded(state, models, config, tx, phase, mesh)
            state_shardings = jax.tree.map(lambda x: x.sharding, state)
            kw = dict(
                models=models,
                config=config,
                state_shardings=state_shardings,
                batch_sharding=sharding.batch_sharding(mesh),
            )
            train_step = steps.jit_step(phase, tx=tx, lr_schedule=lr_schedule, **kw)
            prepare = steps.jit_prepare_codebooks(phase, **kw)
            reporting.log_line(f"Phase {phase.index} {phase.name}: steps {phase.start_step}..{phase.end_step}")
            tokenizer_metrics = {}  # a joint phase: none yet since this start (a resume logs them once computed)
            progress.start(step)

            while step < phase.end_step:
                if preempted_here():
                    break
                local = next(data_iter)
                batch_log.batch(step + 1, local)
                batch = sharding.global_batch(mesh, {"input": local["input"], "length": local["length"]})
                if step == phase.start_step and phase.fresh_codebooks:
                    state = prepare(state, batch)  # k-means (+ restart) on the phase's first batch
                state, metrics = train_step(state, batch)
                if phase.kind == "joint" and steps.joint_trains_tokenizer(phase, step, config):
                    tokenizer_metrics = {k: metrics[k] for k in steps.JOINT_TOKENIZER_METRICS}  # still on device
                step += 1
                progress.after_step(step, state)  # the rate starts after the phase's first (compiling) step
                last = step == phase.end_step
                if step % config.log_every_steps == 0 or last:
                    skipped = _check_nonfinite(state, config, step, ckpt, writer, phase.name)
                    rate, line = progress.update(step, phase.end_step, phase.name)
                    values = {**jax.device_get(metrics), **skipped}
                    if phase.kind == "joint":  # the tokenizer's losses of the last step that computed them (NaN here)
                        values = {k: v for k, v in values.items() if k not in steps.JOINT_TOKENIZER_METRICS}
                        values.update(jax.device_get(tokenizer_metrics))
                    if rate is not None:  # not yet measured after compilation
                        values["perf/steps_per_sec"] = rate
                    values["data/skipped_records"] = _skipped_records(config.data)
                    writer.write(step, values, phase=phase.name)
                    reporting.log_line(f"{line}  loss {float(values['train/loss']):.4f}")
                if last and phase.trains_encoder:  # keep this iteration's encoder before its phase-end checkpoint
                    encoder_store.save_encoder(workdir, phase.iteration, state.params["encoder"]["encoder"])
                stopping = step == stop_at_step
                if step % config.checkpoint.every_steps == 0 or last or stopping:
                    _check_nonfinite(state, config, step, ckpt)
                    meta = {"step": step, "phase": phase.name, "phase_index": phase.index}
                    _save(ckpt, lock, step, state, data_iter, meta)
                # The probe runs after the phase-end checkpoint (written in the background meanwhile): a run stopped
                # during the probe resumes at the phase end and probes the kept encoder (`_pending_probes`) instead
                # of training the phase's last steps again.
                if last and phase.trains_encoder and probe_data is not None:
                    params, key = state.params["encoder"]["encoder"], f"iteration_{phase.iteration}"
                    result, reused = _probe_once(workdir, key, models, params, probe_data, config, mesh)
                    if result is not None:
                        results[key] = result
                        writer.write(step, {"eval/linear_probe/top1": result["top1_test"]}, phase=phase.name)
                        again = " (recorded before; not recomputed)" if reused else ""
                        reporting.log_line(f"Linear probe after {phase.name}: top-1 {result['top1_test']:.4f}{again}")
                if stopping:
                    break
            if preempted:
                break
            if step == stop_at_step:
                reporting.log_line(f"Stopped at step {step} as asked; the same command without the stop resumes.")
                break

        # ---------------------------------------------------------------- done
        done = not preempted and step == schedule.total_steps(plan)
        if done:
            with _explained_write_errors(ckpt, step):
                ckpt.wait()  # the final checkpoint is complete before the marker says so
            was_done = workdir_lib.read_done(workdir)
            marker = workdir_lib.write_done(workdir, step)
            if was_done is not None and restored is not None and int(restored[1]["step"]) == step:
                reporting.log_line(f"The plan had already finished (DONE at step {step}, {marker['time']}).")
            else:
                reporting.log_line(f"Plan finished at step {step}; wrote {workdir_lib.DONE_FILE}.")
    finally:  # an error still finishes the pending (async) checkpoint and the metric files
        try:
            with _explained_write_errors(ckpt, None):
                ckpt.close()
            writer.close()
            batch_log.close()
        finally:
            watch.close()
    return {
        "workdir": workdir,
        "linear_probe": _read_probe(workdir) or results,
        "final_state": state,
        "preempted": preempted,
        "done": done,
    }
