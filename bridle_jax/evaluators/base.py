"""The one interface through which the pretraining loop runs its evaluators, configured by `config.evals`.

As big_vision's evaluators: each entry `config.evals.<name>` (a ConfigDict with `enabled`) names a class in
`REGISTRY`; the loop builds the enabled ones once per start and calls them at two points, never knowing what they
compute:
  at_start(state, step)        after restore-or-create (e.g. the probes a stopped run still owes)
  at_phase_end(phase, state)   after a phase's last step and its checkpoint
Both return the metric lines to write, `[(step, phase name, {metric: value})]`. `results()` is what
`train_and_evaluate` returns under the evaluator's name; `summary()` adds fields to the start-up summary.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "linear_probe": "bridle_jax.evaluators.loop_probe:LinearProbeEvaluator",
    "codebook": "bridle_jax.evaluators.codebook:CodebookEvaluator",
}

Lines = list[tuple[int, str, dict]]


class Evaluator:
    """Base class: `self.config` is the run's config, `self.settings` its `config.evals.<name>`."""

    name = ""

    def __init__(self, config, *, models, mesh, workdir: str, plan):
        self.config, self.models, self.mesh, self.workdir, self.plan = config, models, mesh, workdir, plan
        self.settings = config.evals[self.name]

    def summary(self) -> dict:
        return {}

    def at_start(self, state, step: int) -> Lines:
        return []

    def at_phase_end(self, phase, state) -> Lines:
        return []

    def results(self) -> dict:
        return {}


def evaluator_class(name: str) -> type[Evaluator]:
    if name not in REGISTRY:
        raise ValueError(f"config.evals.{name}: expected one of {sorted(REGISTRY)} (an evaluator), got {name!r}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check(config) -> None:
    """Every entry of `config.evals` names a known evaluator and says whether it is enabled; errors name the field."""
    for name, settings in config.evals.items():
        evaluator_class(name)
        if not isinstance(settings.get("enabled", None), bool):
            raise ValueError(f"config.evals.{name}.enabled: expected True or False, got {settings.get('enabled')!r}")


def from_config(config, *, models, mesh, workdir: str, plan) -> list[Evaluator]:
    """The enabled evaluators of `config.evals`, in its order."""
    return [
        evaluator_class(name)(config, models=models, mesh=mesh, workdir=workdir, plan=plan)
        for name, settings in config.evals.items()
        if settings.get("enabled", False)
    ]
