"""What a recipe states in terms of its data, turned into numbers once the data is known (at the start of a run).

A recipe states what its authors state: phase lengths in epochs and learning rates tuned at one global batch. A
user's batch (or dataset) then differs from the recipe's, and nothing about the schedule may change silently:

- Epochs become steps from the train split's size and this run's global batch (`schedule.resolve_epochs`), so a
  smaller batch keeps the epochs and runs more steps. The run logs what the steps became.
- A learning rate tuned at `optim.tuned_batch_size` stays as it is at another batch (the authors give absolute
  learning rates), and the run says so; `optim.lr_scaling="linear"` scales it by batch_size / tuned_batch_size
  instead. Once applied, `tuned_batch_size` is set to the run's batch, so resolving again changes nothing.

The resolved config is the one a run records in its workdir (config.json), so a resume whose epochs resolve to
other steps (a train split of another size, another batch) differs from it in `schedule.phases` and is refused with
the fields named (bridle_jax/workdir.py), and every reader of config.json sees plain steps.
"""

import copy
from typing import Callable

import ml_collections

from bridle_jax import schedule


def _lr_notes(c: ml_collections.ConfigDict, where: str, lrs: dict) -> list[str]:
    """Applies optim.lr_scaling to the learning rates named by `lrs` ({label: (parent ConfigDict, field)}) when
    the batch differs from optim.tuned_batch_size; returns the lines that say which lrs the run uses."""
    tuned, batch = c.optim.get("tuned_batch_size", None), int(c.batch_size)
    if tuned is None or tuned == batch:
        return []
    linear = c.optim.get("lr_scaling", "none") == "linear"
    if linear:
        for parent, field in lrs.values():
            parent[field] = parent[field] * batch / tuned
        c.optim.tuned_batch_size = batch  # applied: a second resolution leaves the lrs alone
    used = ", ".join(f"{label} {parent[field]:.4g}" for label, (parent, field) in lrs.items())
    if linear:
        return [
            f"{where}: the learning rates were tuned at batch {tuned:,}; this run's batch is {batch:,}, so "
            f"optim.lr_scaling=linear scales them by {batch / tuned:.4g}: {used}"
        ]
    return [
        f"{where}: the learning rates were tuned at batch {tuned:,}; this run's batch is {batch:,} and it uses them "
        f"unchanged ({used}), as the authors give absolute rates. --config.optim.lr_scaling=linear scales them by "
        f"{batch / tuned:.4g} instead."
    ]


def pretraining(
    config: ml_collections.ConfigDict, train_examples: Callable[[], int]
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the config with its plan in steps and the lrs this run uses, the lines to log). `train_examples()` counts
    the train split, called only for a plan in epochs. `config` is not changed."""
    c = copy.deepcopy(config)
    notes = []
    phases = tuple(c.schedule.phases)
    if schedule.in_epochs(phases):
        train_examples = train_examples()
        per_epoch = schedule.steps_per_epoch(train_examples, int(c.batch_size))
        resolved = schedule.resolve_epochs(phases, per_epoch)
        c.schedule.given_phases, c.schedule.steps_per_epoch, c.schedule.phases = phases, per_epoch, resolved
        each = ", ".join(
            f"{g.partition(':')[0]} {g.partition(':')[2]} = {int(r.partition(':')[2]):,} steps"
            for g, r in zip(phases, resolved)
        )
        notes.append(
            f"Plan in epochs: {train_examples:,} train examples // batch {int(c.batch_size):,} = {per_epoch:,} steps "
            f"per epoch: {each}"
        )
    sides = ("encoder", "tokenizer") + (("joint",) if schedule.has_kind(c.schedule.phases, "joint") else ())
    lrs = {f"{side} lr": (c.optim[side], "lr") for side in sides}
    return c, notes + _lr_notes(c, "Pretraining", lrs)


def finetuning(
    config: ml_collections.ConfigDict, train_examples: Callable[[], int]
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(the fine-tune config with num_steps / warmup_steps / eval_every_steps from its epochs where it states them
    and the lr this run uses, the lines to log). An epoch is `augment.epoch_len` examples where the recipe sets it
    (AudioSet-2M's weighted sampler: 200k), else the train split, whose size `train_examples()` counts (called only
    then). `config` is not changed."""
    c = copy.deepcopy(config)
    notes = []
    if c.get("epochs") is not None:
        examples = int(c.augment.get("epoch_len", 0) or train_examples())
        per_epoch = schedule.steps_per_epoch(examples, int(c.batch_size))
        to_steps = lambda epochs: max(1, round(epochs * per_epoch))
        c.num_steps = to_steps(c.epochs)
        c.warmup_steps = round((c.get("warmup_epochs") or 0) * per_epoch)
        if c.get("eval_every_epochs") is not None:
            c.eval_every_steps = to_steps(c.eval_every_epochs)
        c.steps_per_epoch = per_epoch
        notes.append(
            f"Fine-tuning in epochs: {examples:,} examples per epoch // batch {int(c.batch_size):,} = {per_epoch:,} "
            f"steps per epoch: {c.epochs:g} epochs = {c.num_steps:,} steps (warm-up {c.warmup_steps:,}, eval every "
            f"{c.eval_every_steps:,})"
        )
    return c, notes + _lr_notes(c, "Fine-tuning", {"lr": (c.optim, "lr")})
