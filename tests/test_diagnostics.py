"""Encoder-phase diagnostics: the position-only baseline of the masked-prediction accuracy
(losses.position_only_accuracy, logged by encoder_step as train/encoder/position_only_accuracy_level{m}).

- the jitted function equals a NumPy reference (a loop over positions, np.bincount, argmax) on fresh random codes
  and targets, with invalid (never-target) patches and a position without any target;
- codes that are a function of the position give 1.0; uniform random codes give about 1/K;
- a batch sharded over a data x fsdp mesh gives the same numbers as an unsharded one;
- encoder_step logs it for every level, equal to the NumPy reference on the step's own codes and targets, and the
  same with gradient accumulation (2 micro-batches) as without.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bridle_jax import losses, masking, optim, quantizer, schedule, sharding, steps
from bridle_jax import state as state_lib
from bridle_jax.config_checks import validate
from bridle_jax.models.bridle import build_models
from tests import tiny

SEED = 5


@functools.cache
def jitted(codebook_size):
    return jax.jit(functools.partial(losses.position_only_accuracy, codebook_size=codebook_size))


def np_position_only_accuracy(codes, targets, k):
    """For each level and position: the most frequent code over the examples where the position is a target (lowest
    code on ties), scored on those targets."""
    codes, targets = np.asarray(codes), np.asarray(targets, bool)
    _, n, m = codes.shape
    hits = np.zeros(m, np.int64)
    for level in range(m):
        for pos in range(n):
            seen = codes[targets[:, pos], pos, level]
            if seen.size:
                mode = np.argmax(np.bincount(seen, minlength=k))
                hits[level] += np.sum(seen == mode)
    return hits / max(targets.sum(), 1)


def random_case(seed, b, n, m, k, ratio=0.75, invalid=True):
    rng = np.random.default_rng(seed)
    # codes skewed per position (a random Dirichlet distribution per (position, level)) and not all in use
    probs = rng.dirichlet(np.full(k, 0.3), size=(n, m))  # [N, M, K]
    u = rng.random((b, n, m, 1))
    codes = np.minimum((u > np.cumsum(probs, -1)[None]).sum(-1), k - 1).astype(np.int32)
    targets = rng.random((b, n)) < ratio
    if invalid:  # padded patches (audio/video): the last positions of some examples are never targets
        lengths = rng.integers(n // 2, n + 1, size=b)
        targets &= np.arange(n)[None] < lengths[:, None]
        targets[:, n - 1] = False  # one position without any target
    return codes, targets


@pytest.mark.parametrize("seed, b, n, m, k", [(0, 16, 12, 3, 8), (1, 32, 16, 2, 16), (2, 8, 5, 4, 4)])
def test_matches_numpy_reference(seed, b, n, m, k):
    codes, targets = random_case(seed, b, n, m, k)
    assert len(np.unique(codes)) > 2 and 0 < targets.mean() < 1
    got = np.asarray(jitted(k)(codes, targets))
    assert got.shape == (m,) and got.dtype == np.float32
    want = np_position_only_accuracy(codes, targets, k)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all((want > 0) & (want < 1))
    # the answer depends on the targets: the non-targets are not counted
    changed = codes.copy()
    changed[~targets] = (changed[~targets] + 1) % k
    np.testing.assert_array_equal(np.asarray(jitted(k)(changed, targets)), got)


def test_ties_and_empty_batches():
    # position 0: codes 3, 1, 1, 3 -> a tie (the lowest code 1 is the prediction: 2 hits either way); position 1:
    # codes 2, 2, 0 (the 4th example is not a target) -> 2 hits. 4 / 7 targets.
    codes = np.array([[3, 2], [1, 2], [1, 0], [3, 5]], np.int32)[..., None]  # [B=4, N=2, M=1]
    targets = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], bool)
    np.testing.assert_allclose(np.asarray(jitted(6)(codes, targets)), [4 / 7], rtol=1e-6)
    np.testing.assert_allclose(np_position_only_accuracy(codes, targets, 6), [4 / 7])
    np.testing.assert_array_equal(np.asarray(jitted(6)(codes, np.zeros_like(targets))), [0.0])


def test_position_dependent_codes_give_one():
    rng = np.random.default_rng(7)
    b, n, m, k = 24, 16, 3, 8
    pattern = rng.integers(0, k, size=(n, m)).astype(np.int32)  # a code per (position, level), several per level
    assert all(len(np.unique(pattern[:, level])) > 3 for level in range(m))
    codes = np.broadcast_to(pattern, (b, n, m)).copy()
    targets = rng.random((b, n)) < 0.75
    codes[~targets] = rng.integers(0, k, size=(int((~targets).sum()), m))  # noise where nothing is predicted
    np.testing.assert_allclose(np.asarray(jitted(k)(codes, targets)), np.ones(m), rtol=1e-6)


def test_uniform_random_codes_give_about_one_over_k():
    rng = np.random.default_rng(8)
    b, n, m, k = 512, 4, 2, 8  # ~384 targets per position: the mode of a uniform sample is little above 1/K
    codes = rng.integers(0, k, size=(b, n, m)).astype(np.int32)
    targets = rng.random((b, n)) < 0.75
    got = np.asarray(jitted(k)(codes, targets))
    np.testing.assert_allclose(got, np_position_only_accuracy(codes, targets, k), rtol=1e-6)
    assert np.all((got > 1 / k) & (got < 1.4 / k)), got


def test_sharded_batch_equals_unsharded():
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    codes, targets = random_case(3, 16, 12, 2, 16)
    spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
    codes_d, targets_d = jax.device_put(codes, spec), jax.device_put(targets, spec)
    assert len(codes_d.addressable_shards) == 8 and codes_d.addressable_shards[0].data.shape[0] == 2
    got = np.asarray(jitted(16)(codes_d, targets_d))
    np.testing.assert_array_equal(got, np.asarray(jitted(16)(codes, targets)))
    np.testing.assert_allclose(got, np_position_only_accuracy(codes, targets, 16), rtol=1e-6)


# ---------------------------------------------------------------- encoder_step


@pytest.fixture(scope="module")
def encoder_runs():
    """One cold-start encoder step on a 4 data x 2 fsdp mesh, without and with accumulation (2 micro-batches), from
    the same k-means'd state and batch; returns (start state, images, {acc: metrics}, config, models)."""
    config = tiny.tiny_config()
    config.schedule.phases = ("encoder_cold_start:4",)
    config.mesh.data, config.mesh.fsdp = 4, 2
    validate(config)
    mesh = sharding.make_mesh(config.mesh)
    models = build_models(config)
    phase = schedule.parse_plan(config.schedule.phases)[0]
    tx, lr = optim.make_optimizer(config.optim, "encoder", phase.steps)
    images = np.random.default_rng(11).normal(size=(config.batch_size, 16, 16, 3)).astype(np.float32)
    batch = sharding.global_batch(mesh, {"input": images})
    state = state_lib.create_sharded(models, config, tx, phase, SEED, mesh)
    kw = {
        "models": models,
        "state_shardings": jax.tree.map(lambda x: x.sharding, state),
        "batch_sharding": sharding.batch_sharding(mesh),
    }
    state = steps.jit_prepare_codebooks(phase, config=config, **kw)(state, batch)
    start = jax.tree.map(np.array, jax.device_get(state))
    metrics = {}
    for acc in (1, 2):
        c = config.copy_and_resolve_references()
        c.optim.accumulation_steps = acc
        step_fn = steps.jit_step(phase, config=c, tx=tx, lr_schedule=lr, **kw)
        _, m = step_fn(jax.device_put(start, kw["state_shardings"], may_alias=False), batch)
        metrics[acc] = jax.tree.map(np.asarray, jax.device_get(m))
    return start, images, metrics, config, models


def test_encoder_step_logs_position_only_accuracy_per_level(encoder_runs):
    start, images, metrics, config, models = encoder_runs
    q = config.quantizer
    # the step's targets and codes, recomputed outside it (same mask key, the frozen cold-start tokenizer)
    key = jax.random.fold_in(start.rng, start.step)
    mask = masking.make_mask(config.masking.kind, key, images.shape[0], models.patch_grid, config.masking.ratio)
    z = models.cold_start.apply({"params": start.params["cold_start"]}, images)
    codes = quantizer.quantize(
        start.codebooks, z, normalize_stage_inputs=q.normalize_stage_inputs, commitment_weight=q.commitment_weight
    ).codes
    codes, targets = np.asarray(codes), np.asarray(mask.masked)
    assert len(np.unique(codes[..., 0])) > 3 and 0 < targets.mean() < 1
    want = np_position_only_accuracy(codes, targets, q.codebook_size)
    for acc, m in metrics.items():
        keys = sorted(k for k in m if k.startswith("train/encoder/position_only_accuracy_level"))
        assert keys == [f"train/encoder/position_only_accuracy_level{lvl}" for lvl in range(q.num_levels)], acc
        for lvl in range(q.num_levels):
            np.testing.assert_allclose(
                m[f"train/encoder/position_only_accuracy_level{lvl}"],
                want[lvl],
                rtol=1e-6,
                err_msg=f"accumulation_steps={acc} level {lvl}",
            )
            assert 0.0 <= m[f"train/encoder/accuracy_level{lvl}"] <= 1.0
    # the encoder's own accuracy per level agrees with and without accumulation too
    for lvl in range(q.num_levels):
        np.testing.assert_allclose(
            metrics[2][f"train/encoder/accuracy_level{lvl}"],
            metrics[1][f"train/encoder/accuracy_level{lvl}"],
            rtol=1e-6,
            atol=1e-7,
        )
