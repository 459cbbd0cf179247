"""One fine-tune run through the run layer (bridle_jax/run.py), and the cross-validation over folds.

`run_single` is the fine-tuning user of `run.Run`, as `train.py` is pretraining's: it supplies the state
(`model.FinetuneState`), the jitted step, the batches (the pipeline's fine-tune stream with targets) and one hook,
the eval every `eval_every_steps`; the run layer owns the workdir (lock, config record), restore-or-create, the
metric lines, the checkpoints, the stop after repeated non-finite steps, the preemption watch and the DONE marker.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from bridle_jax import paths, reporting, resolve, sharding
from bridle_jax import run as run_lib
from bridle_jax.data import pipeline
from bridle_jax.evaluators import scoring
from bridle_jax.finetune import model as model_lib
from bridle_jax.finetune import results as results_lib
from bridle_jax.finetune.config import validate

NONFINITE_HINT = "lower config.optim.lr or use config.model.dtype=float32, and re-run."


def train_iterator(c, *, local_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """The checkpointable train iterator of this process: the pipeline's fine-tune stream (`augment=config.augment`:
    see `pipeline` for the record contract and what each modality applies)."""
    return pipeline.train_iterator(
        c.data,
        local_batch_size=local_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        augment=c.augment,
    )


def eval_logits(s: model_lib.Setup, params: dict, split: str, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels) of the whole eval `split`, streamed batch by batch from `pipeline.eval_batches` (one
    batch decoded at a time: Kinetics-400's ~20k validation clips would be ~190 GB as arrays) and sharded over the
    mesh; the last batch is padded (one compiled shape). Each batch's labels are checked against
    `config.num_classes`, so splits whose labels only decoding tells (TFDS, ImageNet) are checked too."""
    c = s.config
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(shards, batch_size // shards * shards)
    fn = _jit_predict(s, mesh)
    where = f"config.data.name={c.data.name!r} split {split!r}"
    logits, labels = [], []
    for chunk in pipeline.eval_batches(c.data, split, None, batch_size):
        results_lib.targets_from_labels(chunk["label"], c.num_classes, c.multi_label, where)
        n = len(chunk["input"])
        x = {"input": np.asarray(chunk["input"], np.float32), "length": np.asarray(chunk["length"], np.int32)}
        if n < batch_size:
            x = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in x.items()}
        logits.append(np.asarray(fn(params, jax.device_put(x, sharding.batch_sharding(mesh))))[:n])
        labels.append(np.asarray(chunk["label"]))
    return np.concatenate(logits), np.concatenate(labels)


def _jit_predict(s: model_lib.Setup, mesh):
    return jax.jit(
        functools.partial(model_lib.predict, s),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def schedule_record(c: ml_collections.ConfigDict) -> dict:
    """The resolved step counts and lr a checkpoint records: a resume under other ones would not continue the run."""
    return {k: c[k] for k in ("num_steps", "warmup_steps", "eval_every_steps", "batch_size")} | {"lr": c.optim.lr}


def _check_same_schedule(recorded: dict | None, current: dict, workdir: str) -> None:
    if recorded is None:  # a checkpoint from before the record
        return
    differences = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items() if recorded.get(k) != v]
    if differences:
        raise ValueError(
            f"{workdir}: its checkpoint was made with another schedule ({'; '.join(differences)}), e.g. epochs "
            "resolved at another batch size or train split size; resuming would not continue that run, so nothing "
            "was changed. Resume with the same settings or use a new workdir."
        )


def _check_labels(c, eval_split: str) -> None:
    """The label sets checked against config.num_classes before anything compiles (where the source lists them)."""
    eval_labels = pipeline.eval_labels(c.data, eval_split)  # None: checked batch by batch at each evaluation
    if eval_labels is not None:
        where = f"config.data.name={c.data.name!r} split {eval_split!r}"
        results_lib.targets_from_labels(eval_labels, c.num_classes, c.multi_label, where)
    declared = pipeline.num_classes(c.data)
    if declared is not None and declared != c.num_classes:
        raise ValueError(
            f"config.num_classes={c.num_classes} does not match the data: config.data.name={c.data.name!r} has "
            f"{declared} classes"
        )


def run_single(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes (or probes) once on `c.data`'s train split and scores its eval split; resumable; returns the
    result written to `<workdir>/finetune.json`."""
    c, notes = resolve.finetuning(c, lambda: len(pipeline.train_source(c.data)))
    for line in notes:
        reporting.log_line(line)
    s = model_lib.setup(c)
    workdir = paths.resolve_workdir(workdir)
    if workdir == paths.resolve_workdir(c.init_from):
        raise ValueError(f"workdir {workdir}: expected a new folder for the fine-tune run, not config.init_from")
    done = results_lib.read_result(workdir)
    if done is not None and done.get("done"):
        reporting.log_line(f"{workdir}: already finished ({results_lib.RESULT_FILE}); reporting it")
        return done
    eval_split = pipeline.eval_split(c.data)
    _check_labels(c, eval_split)
    limit = c.optim.max_consecutive_nonfinite
    with run_lib.Run(workdir, max_consecutive_nonfinite=limit, nonfinite_hint=NONFINITE_HINT) as run:
        return _run(c, s, run, eval_split)


def _run(c, s: model_lib.Setup, run: run_lib.Run, eval_split: str) -> dict:
    mesh = sharding.make_mesh(c.mesh)
    metric = results_lib.primary_metric(c)
    tx_holder = {}

    def tx_for(trained):
        tx_holder["tx"] = model_lib.make_optimizer(c, trained, s.classifier.encoder.depth)
        return tx_holder["tx"]

    state = model_lib.init_state(s, tx_for)
    replicated = sharding.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    state = jax.device_put(state, state_sharding)
    data_iter = train_iterator(
        c,
        local_batch_size=sharding.local_batch_size(c.batch_size, mesh),
        seed=c.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    run.start(c, {}, total_steps=int(c.num_steps), checkpoint=c.checkpoint)
    history: list[dict] = []
    base = {
        "mode": c.mode,
        "init_from": paths.resolve_workdir(c.init_from),
        "init_iteration": s.iteration,
        "dataset": c.data.name,
        "eval_split": eval_split,
        "num_eval_examples": pipeline.eval_size(c.data, eval_split).examples,
        "metric": metric,
        "num_steps": int(c.num_steps),
        "batch_size": int(c.batch_size),
    }
    if c.data.get("test_folds") is not None and c.data.name in ("esc50", "sounds"):
        base["test_folds"] = list(c.data.test_folds)
    plan = schedule_record(c)
    meta = lambda step: {"step": step, "history": history, "schedule": plan}

    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, state_sharding)
    restored = run.restore(lambda step: abstract, data_iter)
    if restored is not None:
        state, restored_meta = restored
        history = list(restored_meta.get("history", []))
        _check_same_schedule(restored_meta.get("schedule"), plan, run.workdir)
        reporting.log_line(f"Resumed fine-tuning at step {int(state.step)} from {run.ckpt.directory}")

    step_fn = jax.jit(
        functools.partial(model_lib.train_step, s=s, tx=tx_holder["tx"], schedule=model_lib.lr_schedule(c)),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )

    def next_batch(step):
        local = next(data_iter)
        where = f"config.data.name={c.data.name!r} train batch"
        target = results_lib.targets_from_labels(local["label"], c.num_classes, c.multi_label, where)
        return sharding.global_batch(mesh, {"input": local["input"], "length": local["length"], "target": target})

    def evaluate(step, state, last):
        if step % c.eval_every_steps and not last:
            return
        logits, labels = eval_logits(s, {**state.frozen, **state.params}, eval_split, mesh, c.eval_batch_size)
        base["num_eval_examples"] = len(labels)  # those scored (unreadable images or clips dropped)
        result = {"step": step, **results_lib.score(logits, labels, c.multi_label)}
        history.append(result)
        run.writer.write(step, {f"eval/{k}": v for k, v in result.items() if k != "step"}, phase=c.mode)
        reporting.log_line(
            f"Eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")
        )
        summary = {**base, **results_lib.summarize(history, metric), "history": history, "done": False}
        results_lib.write_json(run.workdir, summary)

    state, step, stopped = run.train(
        state,
        end=int(c.num_steps),
        next_batch=next_batch,
        train_step=lambda state, batch, step: step_fn(state, batch),
        data_iter=data_iter,
        meta=meta,
        phase=c.mode,
        log_every=c.log_every_steps,
        checkpoint_every=c.checkpoint.every_steps,
        data_config=c.data,
        hooks=run_lib.Hooks(after_step=evaluate),
    )
    done = stopped is None
    if done:
        run.finish(step)
    result = {**base, **results_lib.summarize(history, metric), "history": history, "done": done}
    results_lib.write_json(run.workdir, result)
    return {**result, "preempted": stopped == "preempted", "final_state": state}


def fold_config(c: ml_collections.ConfigDict, test_fold: int) -> ml_collections.ConfigDict:
    """`c` with the data split of one fold: train on every other fold of `c.cv_folds`, test on `test_fold`."""
    pairs = {test: train for train, test in scoring.esc50_folds(tuple(c.cv_folds))}
    if test_fold not in pairs:
        raise ValueError(f"test fold {test_fold} is not in config.cv_folds={tuple(c.cv_folds)}")
    out = ml_collections.ConfigDict(c.to_dict())
    out.data.train_folds = tuple(pairs[test_fold])
    out.data.test_folds = (int(test_fold),)
    out.cv_folds = ()
    return out


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole recipe: one run, or one per fold of `config.cv_folds` (then the mean +- std over folds)."""
    validate(c)
    workdir = paths.resolve_workdir(workdir)
    if not tuple(c.cv_folds):
        out = run_single(c, workdir)
        out.pop("final_state", None)
        return out
    metric = results_lib.primary_metric(c)
    folds = {}
    for k in c.cv_folds:
        fold_dir = str(paths.workdir_path(workdir) / f"fold_{k}")
        reporting.log_line(f"Cross-validation: test fold {k} of {tuple(c.cv_folds)} -> {fold_dir}")
        r = run_single(fold_config(c, k), fold_dir)
        r.pop("final_state", None)
        folds[str(k)] = r
        results_lib.write_json(workdir, results_lib.cv_summary(c, folds, metric, done=False))
        if r.get("preempted"):
            return {**results_lib.cv_summary(c, folds, metric, done=False), "preempted": True}
    result = results_lib.cv_summary(c, folds, metric, done=True)
    results_lib.write_json(workdir, result)
    return result
