"""`train_and_evaluate(config, workdir)`: the whole interleaved plan, resumable at any step.

Reads top to bottom: validate the config → mesh, models, data → restore or create the state → for every phase of
the plan: hand over, run its jitted steps (logging, checkpointing), keep the encoder and probe it at the end → mark
the workdir DONE.

Preemption: SIGTERM (or Ctrl-C) is only noted; before every step, and before each phase's hand-over, the loop asks
whether any process was signalled and, if so, checkpoints the current step, waits for the save and returns with
"preempted": True (re-running the same command resumes exactly). The workdir may be a gs:// URL: every file
access goes through etils.epath.
"""

import jax
import ml_collections

from bridle_jax import (
    config_checks,
    data_log,
    encoder_store,
    host_memory,
    optim,
    reporting,
    resolve,
    schedule,
    sharding,
    steps,
)
from bridle_jax import run as run_lib
from bridle_jax import state as state_lib
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import pipeline
from bridle_jax.evaluators import base as evaluators_lib
from bridle_jax.evaluators import loop_probe
from bridle_jax.models.bridle import build_models

PROBE_FILE = "linear_probe.json"


NONFINITE_HINT = (
    "lower the learning rate (config.optim.*.lr, with --config.resume.allow_changes=optim; an update larger than "
    "config.optim.max_update_ratio x the weights is refused too) or use model.dtype=float32, and re-run."
)


def _print_summary(config, plan, mesh, state, workdir: str, train_examples: int, evaluators) -> None:
    if jax.process_index() != 0:
        return
    evals = {"eval_split": None, "eval_examples": None}
    for evaluator in evaluators:
        evals.update(evaluator.summary())
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> dict:
    """Runs (or resumes) the whole plan in `workdir` (a local path or a gs:// URL).

    `stop_at_step` checkpoints and returns once that many steps are done (a planned interruption; running the same
    call again without it resumes). SIGTERM/SIGINT do the same at the step under way (a preemption). Once the whole
    plan is done `<workdir>/DONE` is written, and a re-run of a finished workdir only reports. Returns {"workdir",
    "linear_probe": {iteration: result}, "final_state", "preempted": bool, "done": bool}.
    """
    config_checks.validate(config)
    evaluators_lib.check(config)
    limit = config.optim.max_consecutive_nonfinite
    with run_lib.Run(workdir, max_consecutive_nonfinite=limit, nonfinite_hint=NONFINITE_HINT) as run:
        return _run(config, run, stop_at_step)


def _run(config, run: run_lib.Run, stop_at_step: int | None) -> dict:
    workdir = run.workdir
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
    run.start(config, changes, total_steps=schedule.total_steps(plan), checkpoint=config.checkpoint)
    evaluators = evaluators_lib.from_config(config, models=models, mesh=mesh, workdir=workdir, plan=plan)
    phase_tx = lambda phase: optim.make_optimizer(config.optim, phase.kind, phase.steps)
    batch_log = data_log.DataLog(workdir)  # off unless BRIDLE_JAX_DATA_LOG=1

    def meta(step):
        producer = schedule.phase_of_checkpoint(plan, step)
        return {"step": step, "phase": producer.name, "phase_index": producer.index}

    def write(lines):
        for step, phase_name, values in lines:
            run.writer.write(step, values, phase=phase_name)

    # ---------------------------------------------------------------- restore or create
    def abstract_for_step(step):
        phase = schedule.phase_of_checkpoint(plan, step)
        return state_lib.abstract_for(models, config, phase_tx(phase)[0], phase, config.seed, mesh)

    restored = run.restore(abstract_for_step, data_iter)
    if restored is not None:
        state, restored_meta = restored
        where = f"{restored_meta['step']} ({restored_meta['phase']}) in {run.ckpt.directory}"
        reporting.log_line(f"Resumed from step {where}")
    else:
        state = state_lib.create_sharded(models, config, phase_tx(plan[0])[0], plan[0], config.seed, mesh)
    step = int(state.step)
    _print_summary(config, plan, mesh, state, workdir, len(train_source), evaluators)
    batch_log.started(step)
    if step < schedule.total_steps(plan):
        workdir_lib.clear_done(workdir)  # a longer plan than the one that finished: not done any more
    encoder_store.save_encoder(workdir, 0, state.params["encoder"]["encoder"])
    for evaluator in evaluators:
        write(evaluator.at_start(state, step))

    # ---------------------------------------------------------------- the plan
    stopped = None
    try:
        for phase in plan:
            if step >= phase.end_step:
                continue
            if run.stop_for_preemption(step, state, data_iter, meta):
                stopped = "preempted"
                break
            at_end = lambda state, phase=phase: [write(e.at_phase_end(phase, state)) for e in evaluators]
            state, stopped = _run_phase(
                config, run, phase, state, models, mesh, data_iter, batch_log, meta, at_end, phase_tx, stop_at_step
            )
            step = int(state.step)
            if stopped == "asked":
                reporting.log_line(f"Stopped at step {step} as asked; the same command without the stop resumes.")
            if stopped:
                break
        # ---------------------------------------------------------------- done
        done = stopped is None and step == schedule.total_steps(plan)
        if done:
            run.finish(step)
    finally:
        batch_log.close()
    return {
        "workdir": workdir,
        "linear_probe": loop_probe.read_probes(workdir),  # the recorded probes (also of earlier starts)
        **{evaluator.name: evaluator.results() for evaluator in evaluators},
        "final_state": state,
        "preempted": run.preempted,
        "done": done,
    }


def _run_phase(config, run, phase, state, models, mesh, data_iter, batch_log, meta, at_end, phase_tx, stop_at_step):
    """One phase from the state's step to its end: hand over at its start, k-means on its first batch when it
    starts fresh codebooks, then `run.train`'s step loop; the encoder is kept at the end (before the phase-end
    checkpoint) and the evaluators run after it (`at_end(state)`). Returns (state, stopped)."""
    tx, lr_schedule = phase_tx(phase)
    if int(state.step) == phase.start_step and phase.index > 0:
        state = state_lib.hand_over_sharded(state, models, config, tx, phase, mesh)
    kw = dict(
        models=models,
        config=config,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        batch_sharding=sharding.batch_sharding(mesh),
    )
    jitted_step = steps.jit_step(phase, tx=tx, lr_schedule=lr_schedule, **kw)
    prepare = steps.jit_prepare_codebooks(phase, **kw)
    reporting.log_line(f"Phase {phase.index} {phase.name}: steps {phase.start_step}..{phase.end_step}")
    tokenizer_metrics = {}  # a joint phase: none yet since this start (a resume logs them once computed)
    first_step = int(state.step)  # of this phase in this process

    def next_batch(step):
        local = next(data_iter)
        batch_log.batch(step + 1, local)
        return sharding.global_batch(mesh, {"input": local["input"], "length": local["length"]})

    def train_step(state, batch, step):
        nonlocal tokenizer_metrics
        if step == first_step:  # what the state's creation, restore or hand-over freed goes back to the OS
            host_memory.release_freed()
        if step == phase.start_step and phase.fresh_codebooks:
            state = prepare(state, batch)  # k-means (+ restart) on the phase's first batch
        state, metrics = jitted_step(state, batch)
        if step == first_step:  # compiled by now: so does what its compilation freed
            host_memory.release_freed()
        if phase.kind == "joint" and steps.joint_trains_tokenizer(phase, step, config):
            tokenizer_metrics = {k: metrics[k] for k in steps.JOINT_TOKENIZER_METRICS}  # still on device
        return state, metrics

    def log_values(step, values):
        if phase.kind == "joint":  # the tokenizer's losses of the last step that computed them (NaN here)
            values = {k: v for k, v in values.items() if k not in steps.JOINT_TOKENIZER_METRICS}
            values.update(jax.device_get(tokenizer_metrics))
        return values

    def keep_encoder(step, state, last):
        if last and phase.trains_encoder:  # this iteration's encoder, before its phase-end checkpoint
            encoder_store.save_encoder(run.workdir, phase.iteration, state.params["encoder"]["encoder"])

    def evaluate(step, state, last):
        # After the phase-end checkpoint (written in the background meanwhile): a run stopped during an evaluation
        # resumes at the phase end, and the evaluators' at_start does what it still owes (e.g. the probe).
        if last:
            at_end(state)

    state, _, stopped = run.train(
        state,
        end=phase.end_step,
        next_batch=next_batch,
        train_step=train_step,
        data_iter=data_iter,
        meta=meta,
        phase=phase.name,
        log_every=config.log_every_steps,
        checkpoint_every=config.checkpoint.every_steps,
        data_config=config.data,
        stop_at=stop_at_step,
        hooks=run_lib.Hooks(after_step=keep_encoder, after_checkpoint=evaluate, log_values=log_values),
    )
    return state, stopped
