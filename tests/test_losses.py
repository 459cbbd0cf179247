"""The two objectives (losses.py, SPEC 2.1, 2.2) against float64 NumPy references on fresh random inputs.

masked_code_cross_entropy: per-level mean CE over the masked patches (PyTorch CrossEntropyLoss() on the flattened
masked targets, no label smoothing), per-level accuracy, only masked positions count, bf16 logits computed in f32.
cosine_distance: mean over tokens of 1 - cos, any leading shape, bf16 inputs in f32, zero vectors guarded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import losses


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_masked_ce(logits, codes, masked):
    """Reference: gather the masked (patch, level) rows and average the per-row NLL, per level (as a PyTorch
    CrossEntropyLoss per level on logits[masked][:, m], codes[masked][:, m])."""
    logits = np.asarray(logits, np.float64)
    sel_logits = logits[masked]  # [T, M, K]
    sel_codes = codes[masked]  # [T, M]
    m = logits.shape[2]
    per_level, acc = np.zeros(m), np.zeros(m)
    for level in range(m):
        lp = np_log_softmax(sel_logits[:, level])
        per_level[level] = -np.mean(lp[np.arange(len(lp)), sel_codes[:, level]])
        acc[level] = np.mean(np.argmax(sel_logits[:, level], axis=-1) == sel_codes[:, level])
    # the headline loss: one CE over all masked (patch, level) pairs
    flat = np_log_softmax(sel_logits.reshape(-1, logits.shape[-1]))
    loss = -np.mean(flat[np.arange(len(flat)), sel_codes.reshape(-1)])
    return loss, per_level, acc


def random_ce_inputs(seed, b=4, n=13, m=3, k=11, ratio=0.6, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, m, k)).astype(np.float32) * scale
    codes = rng.integers(0, k, size=(b, n, m)).astype(np.int32)
    # make some predictions right so the accuracy is not ~1/K by chance only
    right = rng.random((b, n, m)) < 0.4
    codes = np.where(right, np.argmax(logits, axis=-1), codes).astype(np.int32)
    masked = rng.random((b, n)) < ratio
    masked[0, 0], masked[0, 1] = True, False  # at least one of each
    return logits, codes, masked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_ce_matches_numpy(seed):
    logits, codes, masked = random_ce_inputs(seed)
    loss, per_level, acc = jax.jit(losses.masked_code_cross_entropy)(logits, codes, masked)
    ref_loss, ref_per_level, ref_acc = np_masked_ce(logits, codes, masked)
    assert per_level.shape == (3,) and acc.shape == (3,)
    np.testing.assert_allclose(np.asarray(per_level), ref_per_level, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(acc), ref_acc, rtol=1e-6)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert loss.dtype == jnp.float32
    assert 0.1 < float(np.mean(acc)) < 0.9  # the accuracy reference is not trivially 0 or 1


def test_masked_ce_only_masked_positions_count():
    logits, codes, masked = random_ce_inputs(5)
    rng = np.random.default_rng(6)
    base = losses.masked_code_cross_entropy(logits, codes, masked)
    # anything at visible positions is ignored
    logits2 = np.where(masked[..., None, None], logits, rng.normal(size=logits.shape).astype(np.float32) * 10)
    codes2 = np.where(masked[..., None], codes, rng.integers(0, logits.shape[-1], size=codes.shape)).astype(np.int32)
    other = losses.masked_code_cross_entropy(logits2, codes2, masked)
    for a, b in zip(base, other):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... while a change at one masked position changes the loss
    b_, n_ = np.argwhere(masked)[0]
    logits3 = logits.copy()
    logits3[b_, n_] += rng.normal(size=logits3[b_, n_].shape).astype(np.float32) * 5
    assert not np.isclose(float(losses.masked_code_cross_entropy(logits3, codes, masked)[0]), float(base[0]))
    # the unmasked set gives a different loss than the masked set
    assert not np.isclose(float(losses.masked_code_cross_entropy(logits, codes, ~masked)[0]), float(base[0]))


def test_masked_ce_is_a_mean_over_masked_pairs_not_over_samples():
    """Samples with more masked patches weigh more (PyTorch's flat mean), not a mean of per-sample means."""
    logits, codes, masked = random_ce_inputs(7, b=3, n=10)
    masked[:] = False
    masked[0, :9] = True
    masked[1, :1] = True
    masked[2, :3] = True
    loss = float(losses.masked_code_cross_entropy(logits, codes, masked)[0])
    ref = np_masked_ce(logits, codes, masked)[0]
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    per_sample = np.mean([np_masked_ce(logits[i : i + 1], codes[i : i + 1], masked[i : i + 1])[0] for i in range(3)])
    assert abs(per_sample - ref) > 1e-3


def test_masked_ce_bf16_logits_computed_in_f32():
    logits, codes, masked = random_ce_inputs(8, k=257, scale=8.0)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss, per_level, acc = losses.masked_code_cross_entropy(bf16, codes, masked)
    assert loss.dtype == jnp.float32 and per_level.dtype == jnp.float32
    ref_loss, ref_per_level, ref_acc = np_masked_ce(np.asarray(bf16.astype(jnp.float32)), codes, masked)
    np.testing.assert_allclose(np.asarray(per_level), ref_per_level, rtol=2e-6)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(acc), ref_acc)
    # a bf16 log-softmax would be off by ~1e-2 here; the reference above is tighter than that
    lp_bf16 = jax.nn.log_softmax(bf16, axis=-1)
    nll_bf16 = -np.asarray(jnp.take_along_axis(lp_bf16, codes[..., None], -1)[..., 0], np.float64)
    assert abs(nll_bf16[masked].mean() - ref_loss) > 10 * abs(float(loss) - ref_loss)


def test_masked_ce_gradient_matches_softmax_minus_onehot():
    logits, codes, masked = random_ce_inputs(9, b=2, n=5, m=2, k=6)
    grad = jax.grad(lambda x: losses.masked_code_cross_entropy(x, codes, masked)[0])(jnp.asarray(logits))
    count = masked.sum() * logits.shape[2]
    p = np.exp(np_log_softmax(logits))
    onehot = np.eye(logits.shape[-1])[codes]
    ref = (p - onehot) * masked[..., None, None] / count
    np.testing.assert_allclose(np.asarray(grad), ref, atol=1e-6)


def test_masked_ce_no_masked_position_is_finite():
    logits, codes, masked = random_ce_inputs(10)
    loss, per_level, acc = losses.masked_code_cross_entropy(logits, codes, np.zeros_like(masked))
    assert np.isfinite(float(loss)) and float(loss) == 0.0
    assert np.all(np.asarray(acc) == 0.0)


# ---------------------------------------------------------------- cosine distance


def np_cosine_distance(pred, target):
    p = np.asarray(pred, np.float64)
    t = np.asarray(target, np.float64)
    cos = (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
    return np.mean(1.0 - cos)


@pytest.mark.parametrize("shape", [(3, 7, 16), (5, 32), (2, 3, 4, 8)])
def test_cosine_distance_matches_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    pred = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 10, size=shape[:-1] + (1,)).astype(np.float32)
    target = (0.5 * pred + rng.normal(size=shape)).astype(np.float32)
    got = float(jax.jit(losses.cosine_distance)(pred, target))
    ref = np_cosine_distance(pred, target)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert 0.05 < ref < 1.5


def test_cosine_distance_scale_invariant_and_extremes():
    rng = np.random.default_rng(21)
    pred = rng.normal(size=(4, 6, 8)).astype(np.float32)
    target = rng.normal(size=(4, 6, 8)).astype(np.float32)
    d = float(losses.cosine_distance(pred, target))
    np.testing.assert_allclose(float(losses.cosine_distance(pred * 37.0, target * 0.01)), d, rtol=1e-5)
    np.testing.assert_allclose(float(losses.cosine_distance(pred, pred * 3.0)), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(losses.cosine_distance(pred, -pred)), 2.0, rtol=1e-6)


def test_cosine_distance_bf16_inputs_in_f32():
    rng = np.random.default_rng(22)
    pred = jnp.asarray(rng.normal(size=(4, 9, 64)), jnp.bfloat16)
    target = jnp.asarray(rng.normal(size=(4, 9, 64)) + 0.3 * np.asarray(pred, np.float32), jnp.bfloat16)
    got = losses.cosine_distance(pred, target)
    assert got.dtype == jnp.float32
    ref = np_cosine_distance(np.asarray(pred.astype(jnp.float32)), np.asarray(target.astype(jnp.float32)))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_cosine_distance_zero_vector_is_finite():
    rng = np.random.default_rng(23)
    pred = rng.normal(size=(2, 5, 8)).astype(np.float32)
    target = rng.normal(size=(2, 5, 8)).astype(np.float32)
    pred[0, 0] = 0.0
    got = float(losses.cosine_distance(pred, target))
    assert np.isfinite(got)
    p64, t64 = pred.astype(np.float64), target.astype(np.float64)
    cos = (p64 * t64).sum(-1) / np.maximum(np.linalg.norm(p64, axis=-1) * np.linalg.norm(t64, axis=-1), 1e-8)
    np.testing.assert_allclose(got, np.mean(1 - cos), rtol=1e-5)


def test_cosine_distance_gradient_at_zero_vector_is_finite():
    rng = np.random.default_rng(24)
    pred = rng.normal(size=(2, 5, 8)).astype(np.float32)
    target = rng.normal(size=(2, 5, 8)).astype(np.float32)
    pred[0, 0] = 0.0
    grad = jax.grad(lambda p: losses.cosine_distance(p, target))(jnp.asarray(pred))
    assert np.all(np.isfinite(np.asarray(grad)))
