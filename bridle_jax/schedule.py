"""The interleaved BRIDLE plan as data (SPEC 3.1): which phase runs, for how many steps, in which iteration.

A plan is a sequence of "kind:steps" strings, e.g. ("encoder_cold_start:1000", "tokenizer:250", "encoder:1000"):
iteration 1 trains the encoder E (and label predictor D) against the frozen cold-start tokenizer; every later
iteration first trains the tokenizer T (and its estimator TE) against the frozen E, then E against the new T.
Steps are counted globally over the plan so checkpoints have one monotonic step number.
"""

import dataclasses
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


def parse_plan(phases: Sequence[str]) -> list[Phase]:
    """Parses and checks a plan; raises ValueError saying which entry is wrong and why."""
    if isinstance(phases, str) or not phases:
        raise ValueError("expected a non-empty sequence of 'kind:steps' strings")
    plan, start, iteration = [], 0, 0
    for i, entry in enumerate(phases):
        kind, sep, steps = str(entry).partition(":")
        if not sep or kind not in KINDS or not steps.strip().isdigit() or int(steps) < 1:
            raise ValueError(f"entry {i} {entry!r}: expected 'kind:steps' with kind in {KINDS} and steps >= 1")
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
