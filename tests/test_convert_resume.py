"""An official-like checkpoint converted into a workdir that `train.train_and_evaluate` resumes (README "Parity
with the authors' code", "Weights in").

The state_dict is this project's tiny models mapped to PyTorch names by `convert.to_official` (parameters from
another seed than the config's, so they are told apart from a fresh start) plus unit-norm codebooks with the
official padding row. It is converted as the end of the tiny plan's tokenizer phase (phase 1); the run must restore
that checkpoint, hand over to the encoder phase and continue: no step at or before the import is trained again,
the codebooks and the frozen tokenizer are the converted ones, and E warm-starts from the converted encoder."""

import json
import time

import jax
import numpy as np
import pytest

from bridle_jax import convert, encoder_store, schedule, train
from bridle_jax.data import pipeline
from bridle_jax.models.bridle import build_models
from tests.tiny import tiny_config


def official_like_state_dict(models, config) -> dict:
    sd = convert.to_official(jax.tree.map(np.asarray, models.init_params(jax.random.key(123))), models)
    rng = np.random.default_rng(0)
    q = config.quantizer
    for m in range(q.num_levels):
        w = rng.normal(size=(q.codebook_size, q.dim)).astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        name = f"{convert.quantizer_prefix(models)}.codebooks.{m}"
        sd[f"{name}.weight"] = np.concatenate([w, np.zeros((1, q.dim), np.float32)])  # row K: the padding row
        sd[f"{name}.cluster_size_ema"] = rng.uniform(1, 10, q.codebook_size).astype(np.float32)
    return sd


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_import_phase_from_iteration_or_phase_end():
    plan = schedule.parse_plan(("encoder_cold_start:6", "tokenizer:4", "encoder:6", "tokenizer:2", "encoder:3"))
    assert [(p.index, k) for p, k in [convert.import_phase(plan)]] == [(0, 1)]  # default: the cold start's end
    assert convert.import_phase(plan, iteration=3)[0].index == 4
    assert convert.import_phase(plan, phase_end=3) == (plan[3], 2)  # a tokenizer phase holds the previous E
    assert convert.import_phase(plan, phase_end=2, iteration=2) == (plan[2], 2)
    with pytest.raises(ValueError, match="no encoder phase"):
        convert.import_phase(plan, iteration=4)
    with pytest.raises(ValueError, match="disagree"):
        convert.import_phase(plan, phase_end=1, iteration=2)
    with pytest.raises(ValueError, match="0..4"):
        convert.import_phase(plan, phase_end=5)


def test_converted_workdir_resumes_training(tmp_path):
    start = time.time()
    config = tiny_config()  # ("encoder_cold_start:6", "tokenizer:4", "encoder:6")
    config.evals.linear_probe.enabled = False
    plan = schedule.parse_plan(config.schedule.phases)
    models = build_models(config)
    workdir = str(tmp_path / "wd")
    sd = official_like_state_dict(models, config)
    out = convert.convert_checkpoint(config, sd, workdir, phase_end=1, num_processes=2)
    end = plan[1].end_step
    assert out["step"] == end and out["iteration"] == 1
    data = tmp_path / "wd" / "checkpoints" / str(end) / "data"  # the stream's start, for 1 and for 2 processes
    states = {f.name: json.loads(f.read_text()) for f in data.glob("process_*.json")}
    assert sorted(states) == ["process_0-of-1.json", "process_0-of-2.json", "process_1-of-2.json"]
    second = pipeline.train_iterator(
        config.data, local_batch_size=8, seed=config.seed, process_index=1, process_count=2
    )
    assert all(v == second.get_state() for v in states.values())  # what process 1 of 2 starts from
    assert encoder_store.saved_iterations(workdir) == [0, 1]  # 0: the seed's initial encoder; 1: the checkpoint's
    assert (tmp_path / "wd" / "config_history" / "0001.json").is_file()
    with pytest.raises(ValueError, match="already holds training checkpoints"):
        convert.convert_checkpoint(config, sd, workdir, phase_end=1)

    result = train.train_and_evaluate(config, workdir, stop_at_step=end + 2)
    state = result["final_state"]
    assert int(state.step) == end + 2 and not result["done"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    assert logged and min(logged) > end  # resumed: nothing before the import was trained
    np.testing.assert_array_equal(state.codebooks.codes, out["codebooks"].codes)  # the encoder phase keeps them
    np.testing.assert_array_equal(state.codebooks.cluster_size, out["codebooks"].cluster_size)
    assert bool(state.codebooks.initialized)
    for got, want in zip(_leaves(state.params["tokenizer"]), _leaves(out["params"]["tokenizer"])):
        np.testing.assert_array_equal(got, want)  # frozen in the encoder phase
    # E and D warm-start from the converted weights: two small steps away from them, far from the seed's init
    conv, init = _leaves(out["params"]["encoder"]["encoder"]), _leaves(encoder_store.load_encoder_params(workdir, 0))
    moved = max(np.abs(g - c).max() for g, c in zip(_leaves(state.params["encoder"]["encoder"]), conv))
    apart = max(np.abs(i - c).max() for i, c in zip(init, conv))
    assert 0 < moved < 0.05 * apart, (moved, apart)
    assert time.time() - start < 60
