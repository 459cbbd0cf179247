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

A "joint:N" phase is the authors' experimental joint variant (README "Joint training"): E, D, T and TE train
together with one optimizer, every step on the encoder loss and every `config.joint.tokenizer_every`-th step also on
`config.joint.tokenizer_loss_ratio` x the tokenizer loss. It may start a plan (the authors' joint run: no cold
start, fresh codebooks) or follow any phase, and it serves as the teacher or the targets of the phase after it.
"""

import dataclasses
import re
from typing import Sequence

KINDS = ("encoder_cold_start", "encoder", "tokenizer", "joint")


@dataclasses.dataclass(frozen=True)
class Phase:
    index: int  # position in the plan
    kind: str  # "encoder" | "tokenizer" | "joint"
    cold_start: bool  # encoder phase whose targets come from the cold-start tokenizer
    steps: int
    iteration: int  # BRIDLE iteration (1 = cold start)
    start_step: int  # global step at which this phase begins

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def name(self) -> str:
        return f"iter{self.iteration}_{self.kind}"

    @property
    def trains_encoder(self) -> bool:
        """Whether the phase ends with a new encoder (kept as `encoders/iteration_k` and probed)."""
        return self.kind in ("encoder", "joint")

    @property
    def fresh_codebooks(self) -> bool:
        """Whether the phase starts from fresh codebooks, k-means'd on its first batch (A3b): the cold start, a
        tokenizer phase, a joint phase (the authors' joint run k-means its codebooks on its first forward)."""
        return self.cold_start or self.kind in ("tokenizer", "joint")

    @property
    def restarts_codes(self) -> bool:
        """Whether the one-shot dead-code restart follows that k-means (A4): the phases that train the codebooks."""
        return self.kind in ("tokenizer", "joint")


def joint_tokenizer_step(phase: Phase, step, every: int, steps_per_epoch: int | None):
    """Whether the step after `step` completed steps (a Python int, or the traced `state.step`) of the joint phase
    `phase` also trains the tokenizer. The authors' loop tests `data_iter_step % tokenizer_train_step == 0` with the
    batch index *within the epoch*, so the count restarts every epoch: with `steps_per_epoch` (a plan in epochs) so
    does this one; a plan in steps counts from the phase's start."""
    i = step - phase.start_step
    if steps_per_epoch:
        i = i % steps_per_epoch
    return i % every == 0


_EPOCHS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*ep\s*$")  # "200ep", "0.5ep", "12.5 ep"


def _epochs(length: str) -> float | None:
    """The epochs of a "<X>ep" phase length, None when the length is not in epochs."""
    match = _EPOCHS.match(length)
    return float(match.group(1)) if match else None


def has_kind(phases: Sequence[str], kind: str) -> bool:
    """Whether the plan (as given, in steps or epochs) has a phase of `kind` ("joint": it needs config.joint)."""
    return not isinstance(phases, str) and any(str(e).partition(":")[0] == kind for e in phases)


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
        if i == 0 and kind not in ("encoder_cold_start", "joint"):
            raise ValueError(f"entry {i} {entry!r}: the plan starts with encoder_cold_start or joint")
        if i > 0 and kind == "encoder_cold_start":
            raise ValueError(f"entry {i} {entry!r}: encoder_cold_start comes first in a plan, and only there")
        if kind == "tokenizer" and previous not in ("encoder", "joint"):
            raise ValueError(
                f"entry {i} {entry!r}: a tokenizer phase needs an encoder or joint phase before it (its teacher)"
            )
        if kind == "encoder" and previous not in ("tokenizer", "joint"):
            raise ValueError(f"entry {i} {entry!r}: an encoder phase follows a tokenizer or joint phase (its targets)")
        if kind != "encoder":
            iteration += 1
        plan.append(
            Phase(
                index=i,
                kind="encoder" if kind == "encoder_cold_start" else kind,
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


def phase_of_checkpoint(plan: Sequence[Phase], step: int) -> Phase:
    """The phase whose step made the state after `step` completed steps (a checkpoint of step `step`): the phase
    that ran step `step` - 1, so a phase's last step belongs to it, not to the next phase (step 0: the first)."""
    return phase_of_step(plan, max(step - 1, 0))
