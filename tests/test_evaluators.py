"""The pretraining loop's evaluators run from `config.evals` through one interface (bridle_jax/evaluators/base.py):
the codebook evaluator at the end of every phase that fits codebooks, equal to the standalone evaluator on that
phase's checkpoint; a registered evaluator called at start-up and after each phase, in order; an unknown name
refused before the workdir is touched."""

import json
import os

import ml_collections
import numpy as np
import pytest
import tiny

from bridle_jax import schedule, train
from bridle_jax.evaluators import base, codebook


class Recorder(base.Evaluator):
    """A plug-in that only records when the loop calls it."""

    name = "recorder"
    calls = []

    def at_start(self, state, step):
        Recorder.calls.append(("start", step, int(state.step)))
        return [(step, "start", {"eval/recorder/started": float(step)})]

    def at_phase_end(self, phase, state):
        Recorder.calls.append(("end", phase.name, int(state.step)))
        return []

    def results(self):
        return {"calls": len(Recorder.calls)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("evaluators") / "run")
    c = tiny.tiny_config()
    c.evals.linear_probe.enabled = False
    c.evals.codebook.enabled = True
    c.evals.codebook.max_examples = 48
    c.evals.codebook.batch_size = 16
    c.evals.recorder = ml_collections.ConfigDict({"enabled": True})
    c.checkpoint.max_to_keep = 10
    registry = dict(base.REGISTRY)
    base.REGISTRY["recorder"] = f"{__name__}:Recorder"
    try:
        result = train.train_and_evaluate(c, workdir)
    finally:
        base.REGISTRY.clear()
        base.REGISTRY.update(registry)
    return c, workdir, result


def test_codebook_evaluator_reports_each_phase_that_fits_codebooks(finished):
    c, workdir, result = finished
    plan = schedule.parse_plan(c.schedule.phases)
    fitted = [p for p in plan if p.fresh_codebooks]
    assert [p.name for p in fitted] == ["iter1_encoder", "iter2_tokenizer"]  # the cold start and the tokenizer phase
    assert sorted(result["codebook"]) == sorted(p.name for p in fitted)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    for phase in fitted:
        path = os.path.join(workdir, "codebook_health", phase.name, codebook.HEALTH_FILE)
        report = json.loads(open(path, encoding="utf-8").read())
        assert report["step"] == phase.end_step and report["phase"] == phase.name
        assert report["tokenizer"] == ("cold_start" if phase.cold_start else "tokenizer")
        assert report["num_examples"] == 48 and len(report["levels"]) == c.quantizer.num_levels
        # the in-loop report equals the standalone evaluator on the phase-end checkpoint
        again = codebook.codebook_health(
            workdir,
            step=phase.end_step,
            max_examples=48,
            batch_size=16,
            out_dir=os.path.join(workdir, "again"),
            plots=False,
        )
        for ours, theirs in zip(report["levels"], again["levels"]):
            assert ours["counts"] == theirs["counts"]
            np.testing.assert_allclose(ours["perplexity"], theirs["perplexity"], rtol=1e-12)
        logged = [x for x in lines if x["step"] == phase.end_step and "eval/codebook/perplexity_level0" in x]
        assert len(logged) == 1 and logged[0]["phase"] == phase.name
        assert logged[0]["eval/codebook/perplexity_level1"] == pytest.approx(report["levels"][1]["perplexity"])


def test_registered_evaluator_is_called_at_start_and_after_every_phase(finished):
    c, workdir, result = finished
    plan = schedule.parse_plan(c.schedule.phases)
    assert Recorder.calls == [("start", 0, 0)] + [("end", p.name, p.end_step) for p in plan]
    assert result["recorder"] == {"calls": 1 + len(plan)}
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    assert any(x.get("eval/recorder/started") == 0.0 for x in lines)


def test_unknown_evaluator_is_refused_before_the_workdir_is_touched(tmp_path):
    c = tiny.tiny_config()
    c.evals.no_such_eval = ml_collections.ConfigDict({"enabled": True})
    with pytest.raises(ValueError, match=r"config.evals.no_such_eval: expected one of \['codebook', 'linear_probe'\]"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
