"""The linear probe streams its splits (issue 14, item 4): features are extracted batch by batch from
`pipeline.eval_batches` without ever holding the decoded splits, start-up decodes nothing, the probe's result is the
one of the old preload path, and a resume does not probe (nor extract the features of) an encoder probed before.
"""

import itertools
import json
import pathlib
import shutil
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import sharding, train
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import pipeline
from bridle_jax.evaluators import linear_probe, loop_probe
from bridle_jax.models import bridle
from tests.tiny import load_config, tiny_config

BATCH = 32  # 8 devices: 4 rows each
MAX = 200  # 6 full batches + one of 8: the padded, trimmed last batch is exercised


def _probe_config():
    c = tiny_config()
    p = c.evals.linear_probe
    p.max_examples, p.batch_size, p.steps = MAX, BATCH, 40
    return c


def _encoder(config):
    models = bridle.build_models(config)
    shape = (1,) + bridle.input_shape(config)
    params = bridle.encoder_from_config(config).init(jax.random.PRNGKey(3), jnp.zeros(shape))["params"]
    return models, params


def _mesh():
    import ml_collections

    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))


@pytest.mark.parametrize("name", ["digits", "sounds", "moving_digits"])
def test_eval_batches_are_eval_arrays_in_batches(name):
    """Same records, values, dtypes and order as eval_arrays, `batch_size` at a time, the last batch shorter; the
    size comes from the source's length."""
    data = (tiny_config() if name == "digits" else load_config(name)).data
    split = pipeline.eval_split(data)
    n, batch_size = (MAX, BATCH) if name == "digits" else (10, 4)
    batches = list(pipeline.eval_batches(data, split, n, batch_size))
    assert [len(b["input"]) for b in batches] == [batch_size] * (n // batch_size) + [n % batch_size]
    arrays = pipeline.eval_arrays(data, split, n)
    for key, value in arrays.items():
        joined = np.concatenate([b[key] for b in batches])
        assert joined.dtype == value.dtype, key
        np.testing.assert_array_equal(joined, value, err_msg=key)
    size = pipeline.eval_size(data, split, n)
    assert size.examples == n and size.capped and size.total >= n
    whole = pipeline.eval_size(data, split)
    assert whole.examples == whole.total and not whole.capped


def test_start_up_decodes_nothing(monkeypatch):
    """loop_probe.ProbeData and the summary's eval size come from the sources' lengths: no reader is called."""

    def refuse(*args, **kwargs):
        raise AssertionError("a split was decoded at start-up")

    module = pipeline.module_for(tiny_config().data)
    for fn in ("eval_arrays", "eval_batches"):
        monkeypatch.setattr(pipeline, fn, refuse)
        monkeypatch.setattr(module, fn, refuse)
    c = tiny_config()
    c.evals.linear_probe.max_examples = None  # the whole split: 359 test digits, not capped
    data = loop_probe.ProbeData(c)  # pylint: disable=protected-access
    assert (data.test_size.examples, data.test_size.total, data.test_size.capped) == (359, 359, False)
    assert (data.train_size.examples, data.train_size.capped) == (1438, False)
    capped = loop_probe.ProbeData(_probe_config())  # pylint: disable=protected-access
    assert (capped.test_size.examples, capped.test_size.total, capped.test_size.capped) == (MAX, 359, True)


def _old_preload_probe(models, params, config, mesh) -> dict:
    """The probe as it ran before streaming: both splits decoded into arrays first (eval_arrays), then pooled in
    padded chunks sharded over the mesh (the old `pooled_features`, verbatim), then the head."""
    p = config.evals.linear_probe
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(shards, p.batch_size // shards * shards)
    keys = ("input", "length")
    fn = jax.jit(
        lambda prm, b: linear_probe.pool(models, prm, b),
        in_shardings=(None, {k: sharding.batch_sharding(mesh) for k in keys}),
        out_shardings=sharding.replicated(mesh),
    )

    def feats(arrays):
        out = []
        for start in range(0, len(arrays["input"]), batch_size):
            chunk = {k: np.asarray(arrays[k][start : start + batch_size]) for k in keys}
            n = len(chunk["input"])
            if n < batch_size:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in chunk.items()}
            chunk["input"] = chunk["input"].astype(np.float32)
            chunk["length"] = chunk["length"].astype(np.int32)
            out.append(np.asarray(fn(params, jax.device_put(chunk, sharding.batch_sharding(mesh))))[:n])
        return np.concatenate(out)

    train_arrays = pipeline.eval_arrays(config.data, p.train_split, p.max_examples)
    test_arrays = pipeline.eval_arrays(config.data, p.test_split, p.max_examples)
    return linear_probe.linear_probe(
        feats(train_arrays),
        train_arrays["label"],
        feats(test_arrays),
        test_arrays["label"],
        steps=p.steps,
        lr=p.lr,
        batch_size=p.batch_size,
        seed=config.seed,
    )


def test_probe_streams_one_batch_and_matches_the_preload_path(monkeypatch):
    """The in-loop probe never materialises the decoded split: no eval_arrays, and when a batch is read at most
    the previous one (in flight) is still alive; its result equals the old preload path's exactly."""
    config = _probe_config()
    models, params = _encoder(config)
    mesh = _mesh()
    expected = _old_preload_probe(models, params, config, mesh)

    module = pipeline.module_for(config.data)
    real_batches = module.eval_batches
    stats = {"batches": 0, "max_rows": 0, "max_alive_before": 0}

    def instrumented(*args, **kwargs):
        alive = []
        for batch in real_batches(*args, **kwargs):
            stats["max_alive_before"] = max(stats["max_alive_before"], sum(r() is not None for r in alive))
            stats["batches"] += 1
            stats["max_rows"] = max(stats["max_rows"], len(batch["input"]))
            alive.append(weakref.ref(batch["input"]))
            yield batch
            del batch

    def refuse(*args, **kwargs):
        raise AssertionError("the probe decoded a whole split")

    monkeypatch.setattr(module, "eval_batches", instrumented)
    monkeypatch.setattr(module, "eval_arrays", refuse)
    data = loop_probe.ProbeData(config)  # pylint: disable=protected-access
    result = loop_probe.run_linear_probe(models, params, data, config, mesh)
    assert stats["batches"] == 2 * 7 and stats["max_rows"] == BATCH
    # when a batch is read, at most the two before it are still alive (features in flight on the devices, which on
    # CPU may alias the host arrays; how many have finished depends on timing): never the split (7 batches here)
    assert stats["max_alive_before"] <= 2
    assert result == expected


def test_streamed_features_of_any_batch_size_equal_the_arrays(monkeypatch):
    """pooled_features over an iterable of batches of uneven sizes (re-cut into the mesh's chunks) equals the
    features of the same examples as one dict of arrays; split_features returns the eval labels in order."""
    config = _probe_config()
    models, params = _encoder(config)
    mesh = _mesh()
    arrays = pipeline.eval_arrays(config.data, "test", 60)
    whole = linear_probe.pooled_features(models, params, arrays, mesh=mesh, batch_size=BATCH)
    sizes = [5, 27, 1, 20, 7]  # 60 rows in uneven batches, re-cut into the same chunks of 32 as the arrays
    starts = np.cumsum([0] + sizes)
    uneven = ({k: v[a:b] for k, v in arrays.items()} for a, b in itertools.pairwise(starts))
    np.testing.assert_array_equal(
        linear_probe.pooled_features(models, params, uneven, mesh=mesh, batch_size=BATCH), whole
    )
    features, labels = linear_probe.split_features(models, params, config.data, "test", 60, mesh=mesh, batch_size=BATCH)
    np.testing.assert_array_equal(features, whole)
    np.testing.assert_array_equal(labels, arrays["label"])


def test_fit_exposes_head_predictions_and_confusion_matrix():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    labels = rng.integers(0, 3, 90)
    x = (centres[labels] + rng.normal(size=(90, 8))).astype(np.float32)
    kw = {"steps": 60, "lr": 5e-2, "batch_size": 32, "seed": 1}
    probe = linear_probe.fit(x[:60], labels[:60], x[60:], labels[60:], **kw)
    assert probe.result() == linear_probe.linear_probe(x[:60], labels[:60], x[60:], labels[60:], **kw)
    np.testing.assert_array_equal(probe.test_predictions, linear_probe.predict(probe.head, x[60:]))
    cm = probe.confusion_matrix(labels[60:])
    assert cm.shape == (3, 3) and cm.sum() == 30
    assert np.trace(cm) / 30 == pytest.approx(probe.top1_test)
    assert probe.top1_test > 0.9 and len(probe.losses) == 60


def test_resume_does_not_probe_an_encoder_again(tmp_path, monkeypatch):
    """A run that reaches an encoder phase's end again on a resume (its phase-end checkpoint lost) reuses the
    recorded probe (no feature extraction, no head), and iteration 0's probe is never recomputed; a run stopped
    during a probe (after the phase-end checkpoint, which is written first) probes the kept encoder on resume."""
    c = _probe_config()
    c.schedule.phases = ("encoder_cold_start:2",)
    c.checkpoint.every_steps, c.checkpoint.max_to_keep, c.checkpoint.async_save = 1, 3, False
    c.evals.linear_probe.max_examples, c.evals.linear_probe.steps = 32, 10
    calls = []
    real = linear_probe.split_features

    def counted(*args, **kwargs):
        calls.append(args[3])  # the split
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_probe, "split_features", counted)
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(c, str(workdir))
    assert first["done"] and sorted(first["linear_probe"]) == ["iteration_0", "iteration_1"]
    assert calls == ["train", "test"] * 2  # each encoder's features extracted once
    recorded = json.loads((workdir / loop_probe.PROBE_FILE).read_text())

    # as if killed after the probe of iteration 1 and before its phase-end checkpoint: that checkpoint is gone
    shutil.rmtree(workdir / "checkpoints" / "2")
    (workdir / workdir_lib.DONE_FILE).unlink()
    calls.clear()
    second = train.train_and_evaluate(c, str(workdir))
    assert second["done"] and calls == []  # nothing extracted again
    assert json.loads((workdir / loop_probe.PROBE_FILE).read_text()) == recorded == second["linear_probe"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["eval/linear_probe/top1"] for x in lines if "eval/linear_probe/top1" in x] == [
        recorded["iteration_1"]["top1_test"]
    ] * 2  # the phase end is logged again, with the recorded value

    # as if killed during the probe of iteration 1, after its phase-end checkpoint: the resume starts at the end of
    # the plan, trains nothing and probes the kept encoder once, with the same result
    (workdir / loop_probe.PROBE_FILE).write_text(json.dumps({"iteration_0": recorded["iteration_0"]}))
    (workdir / workdir_lib.DONE_FILE).unlink()
    third = train.train_and_evaluate(c, str(workdir))
    assert third["done"] and calls == ["train", "test"]
    assert json.loads((workdir / loop_probe.PROBE_FILE).read_text()) == recorded


def test_a_probe_recorded_by_another_start_is_reused_at_step_zero(tmp_path, monkeypatch):
    """_probe_once: a recorded key is returned as it is (no extraction); a missing one is computed and recorded."""
    config = _probe_config()
    config.evals.linear_probe.max_examples, config.evals.linear_probe.steps = 32, 10
    models, params = _encoder(config)
    mesh = _mesh()
    workdir = str(tmp_path)
    (pathlib.Path(workdir) / loop_probe.PROBE_FILE).write_text(json.dumps({"iteration_0": {"top1_test": 0.5}}))
    calls = []
    monkeypatch.setattr(
        linear_probe,
        "split_features",
        lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("extracted")),
    )
    data = loop_probe.ProbeData(config)  # pylint: disable=protected-access
    result, reused = loop_probe.probe_once(workdir, "iteration_0", models, params, data, config, mesh)
    assert reused and result == {"top1_test": 0.5} and not calls
    monkeypatch.undo()
    result, reused = loop_probe.probe_once(workdir, "iteration_1", models, params, data, config, mesh)
    assert not reused and set(result) == {"top1_train", "top1_test", "final_loss"}
    assert json.loads((pathlib.Path(workdir) / loop_probe.PROBE_FILE).read_text())["iteration_1"] == result
