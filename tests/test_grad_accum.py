"""Gradient accumulation (steps.py, `config.optim.accumulation_steps`): a step over 4 micro-batches equals the step
over the whole batch, on a 2 data x 2 fsdp mesh (each micro-batch still one example per device).

The steps run with plain SGD at lr 1, so the parameter change *is* the gradient, compared leaf by leaf (Adam's first
update is ~lr * sign(g) and would hide a wrongly scaled gradient). Video clips with padded frames make the number
of loss terms differ between micro-batches (asserted), so each micro-batch's loss must be weighted by its share of
the batch's targets; the same clips without lengths (no padding, as images) take the equal-share path of the
tokenizer step. The codebook EMA must use the statistics of the whole batch: the codebooks after the step are
compared too.
"""

import jax
import numpy as np
import optax
import pytest

from bridle_jax import config_checks, quantizer, schedule, sharding, steps
from bridle_jax import state as state_lib
from bridle_jax.models.bridle import build_models
from tests import tiny

ACC = 4
LR = 1.0
SEED = 9
BATCH = 16


def make_config():
    c = tiny.load_config("moving_digits")
    c.data.num_frames, c.data.image_size = 8, 16
    c.model.variant = "mu/8"  # tubelets 2x8x8: a 4 x 2 x 2 grid, 16 patches, 4 visible under tube mask 0.75
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
    c.model.estimator_width, c.model.estimator_depth, c.model.estimator_heads = 32, 1, 2
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 2, 16, 8
    c.batch_size = BATCH
    c.schedule.phases = ("encoder_cold_start:10", "tokenizer:10")
    c.mesh.data, c.mesh.fsdp = 2, 2
    config_checks.validate(c)
    return c


def make_batch(padded: bool):
    rng = np.random.default_rng(30)
    clips = rng.normal(size=(BATCH, 8, 16, 16, 3)).astype(np.float32)
    lengths = rng.integers(1, 9, size=BATCH).astype(np.int32)  # frames 1..8 real, the rest padding
    return {"input": clips, "length": lengths} if padded else {"input": clips}


def valid_patches(lengths):
    """Per clip: 4 patches in each time slot (2 frames) whose first frame is real."""
    return np.minimum((np.asarray(lengths) + 1) // 2, 4) * 4


def fixed_codebooks(q):
    rng = np.random.default_rng(4)
    codes = rng.normal(size=(q.num_levels, q.codebook_size, q.dim)).astype(np.float32)
    codes[0] /= np.linalg.norm(codes[0], axis=-1, keepdims=True)
    codes[1:] *= 0.3 / np.sqrt(q.dim)
    return quantizer.CodebookState(
        codes=codes, cluster_size=np.ones(codes.shape[:2], np.float32), initialized=np.asarray(True)
    )


def host(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


@pytest.fixture(scope="module")
def runs():
    """{(phase index, accumulation steps, padded): (state before, state after, metrics, step function, device batch,
    state shardings)} for the encoder and tokenizer steps on padded clips, the tokenizer step on unpadded ones."""
    config = make_config()
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:4])
    models = build_models(config)
    plan = schedule.parse_plan(config.schedule.phases)
    tx = optax.sgd(lambda count: LR)  # a schedule, so the state has the `count` the lr metric reads
    # SGD keeps no per-parameter state: one initial state serves both phases
    start = state_lib.create_sharded(models, config, tx, plan[1], SEED, mesh)
    start = host(start.replace(codebooks=jax.device_put(fixed_codebooks(config.quantizer), sharding.replicated(mesh))))
    out = {}
    for index, padded in ((0, True), (1, True), (1, False)):
        batch = sharding.global_batch(mesh, make_batch(padded))
        for acc in (1, ACC):
            c = config.copy_and_resolve_references()
            c.optim.accumulation_steps = acc
            shardings = state_lib.shardings_for(models, c, tx, plan[1], mesh)
            step_fn = steps.jit_step(
                plan[index],
                models=models,
                config=c,
                tx=tx,
                lr_schedule=lambda count: LR,
                state_shardings=shardings,
                batch_sharding=sharding.batch_sharding(mesh),
            )
            new, metrics = step_fn(jax.device_put(start, shardings, may_alias=False), batch)
            out[index, acc, padded] = (start, host(new), host(metrics), step_fn, batch, shardings)
    return out


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x, np.float64)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def assert_same_gradients(before, full, accumulated, side):
    """The parameter change (= -gradient at lr 1) of every leaf of the trained side, micro-batched vs whole."""
    start = _leaves(before.params[side])
    for (p, x0), (_, x1), (_, x2) in zip(start, _leaves(full.params[side]), _leaves(accumulated.params[side])):
        g_full, g_acc = x0 - x1, x0 - x2
        scale = np.abs(g_full).max()
        np.testing.assert_allclose(g_acc, g_full, rtol=1e-4, atol=1e-4 * scale + 1e-7, err_msg=f"{side}{p}")
    moved = [p for (p, x0), (_, x1) in zip(start, _leaves(full.params[side])) if np.abs(x0 - x1).max() > 1e-6]
    assert len(moved) > len(start) // 2, moved  # a real step: most leaves got a gradient


def assert_same_metrics(full, accumulated):
    assert full.keys() == accumulated.keys()
    for k in full:
        np.testing.assert_allclose(accumulated[k], full[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_micro_batches_have_different_numbers_of_targets(runs):
    """The weighting matters here: padded frames give the micro-batches different valid-patch counts."""
    batch = runs[0, 1, True][4]
    per_micro = [int(valid_patches(batch["length"])[i::ACC].sum()) for i in range(ACC)]
    assert len(set(per_micro)) > 1, per_micro


def test_encoder_step_accumulated_equals_full_batch(runs):
    before, full, m_full, _, _, _ = runs[0, 1, True]
    _, acc, m_acc, _, _, _ = runs[0, ACC, True]
    assert_same_gradients(before, full, acc, "encoder")
    assert_same_metrics(m_full, m_acc)
    np.testing.assert_allclose(m_acc["train/grad_norm"], m_full["train/grad_norm"], rtol=1e-5)
    assert 1.0 < m_full["train/loss"] < 5.0
    for side in ("tokenizer", "cold_start"):
        for (p, x), (_, y) in zip(_leaves(full.params[side]), _leaves(acc.params[side])):
            np.testing.assert_array_equal(x, y, err_msg=p)


@pytest.mark.parametrize("padded", [True, False])
def test_tokenizer_step_accumulated_equals_full_batch_and_ema_uses_the_whole_batch(runs, padded):
    before, full, m_full, _, batch, _ = runs[1, 1, padded]
    _, acc, m_acc, _, _, _ = runs[1, ACC, padded]
    assert_same_gradients(before, full, acc, "tokenizer")
    assert_same_metrics(m_full, m_acc)
    # one EMA step on all micro-batches' statistics: the same codebooks, and they did move
    np.testing.assert_allclose(acc.codebooks.codes, full.codebooks.codes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.codebooks.cluster_size, full.codebooks.cluster_size, rtol=1e-5, atol=1e-6)
    assert not np.allclose(full.codebooks.codes, before.codebooks.codes)
    # the EMA's counts are those of the whole batch: (1 - decay) * (the batch's valid patches), every level
    decay = make_config().quantizer.decay
    counts = (acc.codebooks.cluster_size - decay * before.codebooks.cluster_size) / (1 - decay)
    n_valid = valid_patches(batch["length"]).sum() if padded else BATCH * 16
    np.testing.assert_allclose(counts.sum(axis=1), n_valid, rtol=1e-4)


def test_accumulated_step_scans_over_micro_batches(runs):
    """The micro-batches really run one after another (a scan of length 4), not as one batch."""
    for index in (0, 1):
        start, _, _, step_acc, batch, shardings = runs[index, ACC, True]
        step_1 = runs[index, 1, True][3]
        state = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shardings, start)
        with_acc, without = (str(jax.make_jaxpr(f)(state, batch)) for f in (step_acc, step_1))
        assert with_acc.count(f"length={ACC}") > without.count(f"length={ACC}"), index
