"""The interleaved BRIDLE plan as data (SPEC 3.1): which phase runs, for how many steps, in which iteration.

A plan is a sequence of "kind:steps" strings, e.g. ("encoder_cold_start:1000", "tokenizer:250", "encoder:1000"):
iteration 1 trains the encoder E (and label predictor D) against the frozen cold-start tokenizer; every later
iteration first trains the tokenizer T (and its estimator TE) against the frozen E, then E against the new T.
Steps are counted globally over the plan so checkpoints have one monotonic step number.

A phase's length may be given in epochs instead, "kind:<X>ep" (e.g. "encoder_cold_start:200ep"): a recipe then
states what its authors state, and a changed batch size keeps the epochs. Epochs become steps at run time, once the
train split's size is known (`resolve_epochs`: one step is one global batch, an epoch is
train_examples // batch_size steps, the partial batch dropped as the authors' loaders do); `parse_plan` takes the
resolved plan only.
"""

import dataclasses
import re
from typing import Sequence

KINDS = ("encoder_cold_start", "encoder", "tokenizer")


@dataclasses.dataclass(frozen=True)
class Phase:
    index: int  # position in the plan
    kind: str  # "encoder" | "tokenizer"
    cold_start: bool  # encoder phase whose targets come from the cold-start tokenizer
    steps: int
    iteration: int  # BRIDLE iteration (1 = cold start)
    start_step: int  # global step at which this phase begins

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def name(self) -> str:
        return f"iter{self.iteration}_{'encoder' if self.kind == 'encoder' else 'tokenizer'}"


_EPOCHS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*ep\s*$")  # "200ep", "0.5ep", "12.5 ep"


def _epochs(length: str) -> float | None:
    """The epochs of a "<X>ep" phase length, None when the length is not in epochs."""
    match = _EPOCHS.match(length)
    return float(match.group(1)) if match else None


def in_epochs(phases: Sequence[str]) -> bool:
    """Whether any phase of the plan is given in epochs (and the plan needs the train split's size to run)."""
    return not isinstance(phases, str) and any(_epochs(str(e).partition(":")[2]) is not None for e in phases)


def steps_per_epoch(train_examples: int, batch_size: int) -> int:
    """Global steps in one pass over the train split: the partial last batch is dropped (drop_last)."""
    if train_examples < batch_size:
        raise ValueError(
            f"the train split has {train_examples:,} examples, fewer than one global batch ({batch_size:,}): a plan in "
            "epochs cannot be resolved; lower config.batch_size or give the phases in steps"
        )
    return train_examples // batch_size


def resolve_epochs(phases: Sequence[str], steps_per_epoch: int) -> tuple[str, ...]:
    """The plan with every "kind:<X>ep" entry turned into "kind:<steps>" (round(X * steps_per_epoch), at least 1);
    entries in steps are kept. Raises ValueError naming an entry whose epochs are not a positive number."""
    if isinstance(phases, str) or not phases:
        raise ValueError("expected a non-empty sequence of 'kind:steps' or 'kind:<epochs>ep' strings")
    resolved = []
    for i, entry in enumerate(phases):
        kind, sep, length = str(entry).partition(":")
        epochs = _epochs(length) if sep else None
        if epochs is None:
            resolved.append(str(entry))
            continue
        if not epochs > 0:
            raise ValueError(f"entry {i} {entry!r}: expected a positive number of epochs")
        resolved.append(f"{kind}:{max(1, round(epochs * steps_per_epoch))}")
    return tuple(resolved)


def parse_plan(phases: Sequence[str]) -> list[Phase]:
    """Parses and checks a plan in steps; raises ValueError saying which entry is wrong and why."""
    return _parse(phases, epochs_allowed=False)


def check_plan(phases: Sequence[str]) -> None:
    """Checks a plan as given, in steps or epochs (its kinds, their order, positive lengths) before the train
    split's size is known; raises ValueError naming the entry as the user wrote it."""
    _parse(phases, epochs_allowed=True)


def _parse(phases: Sequence[str], epochs_allowed: bool) -> list[Phase]:
    if isinstance(phases, str) or not phases:
        raise ValueError("expected a non-empty sequence of 'kind:steps' strings")
    plan, start, iteration = [], 0, 0
    for i, entry in enumerate(phases):
        kind, sep, steps = str(entry).partition(":")
        epochs = _epochs(steps) if sep else None
        if epochs is not None:
            if not epochs_allowed:
                raise ValueError(
                    f"entry {i} {entry!r}: a phase in epochs becomes steps once the train split's size is known "
                    "(schedule.resolve_epochs, done by the training run)"
                )
            if not epochs > 0:
                raise ValueError(f"entry {i} {entry!r}: expected a positive number of epochs")
            steps = "1"  # its length in steps is not known yet; only the checks below need one
        if not sep or kind not in KINDS or not steps.strip().isdigit() or int(steps) < 1:
            raise ValueError(
                f"entry {i} {entry!r}: expected 'kind:steps' or 'kind:<epochs>ep' with kind in {KINDS} and a "
                "positive length"
            )
        previous = plan[-1].kind if plan else None
        if (i == 0) != (kind == "encoder_cold_start"):
            raise ValueError(f"entry {i} {entry!r}: the plan starts with encoder_cold_start, and only there")
        if kind == "tokenizer" and previous != "encoder":
            raise ValueError(f"entry {i} {entry!r}: a tokenizer phase needs an encoder phase before it (its teacher)")
        if kind == "encoder" and previous != "tokenizer":
            raise ValueError(f"entry {i} {entry!r}: an encoder phase follows a tokenizer phase (its targets)")
        if kind != "encoder":
            iteration += 1
        plan.append(
            Phase(
                index=i,
                kind="tokenizer" if kind == "tokenizer" else "encoder",
                cold_start=kind == "encoder_cold_start",
                steps=int(steps),
                iteration=iteration,
                start_step=start,
            )
        )
        start += int(steps)
    return plan


def total_steps(plan: Sequence[Phase]) -> int:
    return plan[-1].end_step


def phase_of_step(plan: Sequence[Phase], global_step: int) -> Phase:
    """The phase that runs the step after `global_step` completed steps (the last phase once all are done)."""
    for phase in plan:
        if global_step < phase.end_step:
            return phase
    return plan[-1]
