"""MAE random and VideoMAE tube masking: exact keep counts, consistent indices, per-sample and per-key randomness,
static shapes."""

import jax
import numpy as np
import pytest

from bridle_jax.masking import Mask, num_kept, random_mask


@pytest.mark.parametrize(
    "n, ratio, expected",
    [(196, 0.8, 39), (512, 0.8, 102), (196, 0.75, 49), (16, 0.0, 16), (10, 0.99, 1), (1568, 0.9, 156)],
)
def test_num_kept_matches_mae_formula(n, ratio, expected):
    assert num_kept(n, ratio) == expected


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_num_kept_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        num_kept(196, ratio)


@pytest.mark.parametrize("n, ratio", [(196, 0.8), (16, 0.75), (7, 0.5)])
def test_mask_is_consistent(n, ratio):
    b = 6
    mask = random_mask(jax.random.PRNGKey(3), b, n, ratio)
    assert isinstance(mask, Mask)
    k = num_kept(n, ratio)
    keep, restore, masked = (np.asarray(a) for a in mask)
    assert keep.shape == (b, k) and keep.dtype == np.int32
    assert restore.shape == (b, n) and restore.dtype == np.int32
    assert masked.shape == (b, n) and masked.dtype == np.bool_
    np.testing.assert_array_equal(masked.sum(1), n - k)
    for i in range(b):
        assert len(set(keep[i])) == k  # no patch kept twice
        assert not masked[i, keep[i]].any()  # kept == visible
        np.testing.assert_array_equal(np.sort(restore[i]), np.arange(n))  # a permutation
        np.testing.assert_array_equal(restore[i, keep[i]], np.arange(k))  # inverse of the shuffle on the kept part
        np.testing.assert_array_equal(masked[i], restore[i] >= k)


def test_samples_differ_and_keys_are_deterministic():
    a = random_mask(jax.random.PRNGKey(0), 8, 64, 0.8)
    b = random_mask(jax.random.PRNGKey(0), 8, 64, 0.8)
    c = random_mask(jax.random.PRNGKey(1), 8, 64, 0.8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.masked, c.masked)
    rows = {tuple(r) for r in np.asarray(a.masked)}
    assert len(rows) == 8  # every sample has its own mask


def test_mask_is_uniform_over_patches():
    mask = random_mask(jax.random.PRNGKey(7), 4000, 16, 0.75)
    freq = np.asarray(mask.masked).mean(0)
    np.testing.assert_allclose(freq, 0.75, atol=0.03)


def test_jit_with_static_shapes():
    fn = jax.jit(random_mask, static_argnums=(1, 2, 3))
    eager = random_mask(jax.random.PRNGKey(5), 4, 49, 0.8)
    jitted = fn(jax.random.PRNGKey(5), 4, 49, 0.8)
    for x, y in zip(eager, jitted):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------ tube masking


@pytest.mark.parametrize("grid, ratio", [((8, 14, 14), 0.9), ((4, 4, 4), 0.75), ((2, 3, 5), 0.5)])
def test_tube_mask_repeats_one_spatial_mask_in_every_time_slot(grid, ratio):
    from bridle_jax.masking import tube_mask, tube_num_kept

    t, h, w = grid
    hw, b = h * w, 5
    mask = tube_mask(jax.random.PRNGKey(11), b, grid, ratio)
    keep, restore, masked = (np.asarray(a) for a in mask)
    k = tube_num_kept(hw, ratio)
    n = t * hw
    assert keep.shape == (b, t * k) and restore.shape == (b, n) and masked.shape == (b, n)
    np.testing.assert_array_equal(masked.sum(1), t * (hw - k))  # exact keep count, every sample
    per_slot = masked.reshape(b, t, hw)
    for s in range(1, t):
        np.testing.assert_array_equal(per_slot[:, s], per_slot[:, 0])  # the same spatial mask in every slot
    for i in range(b):
        np.testing.assert_array_equal(np.sort(restore[i]), np.arange(n))
        np.testing.assert_array_equal(restore[i, keep[i]], np.arange(t * k))  # keep_idx = first t*k of the shuffle
        assert not masked[i, keep[i]].any()
    assert len({tuple(r) for r in per_slot[:, 0]}) == b  # samples differ


def test_make_mask_dispatches_and_rejects_unknown_kinds():
    from bridle_jax.masking import make_mask, tube_mask

    a = make_mask("tube", jax.random.PRNGKey(2), 3, (2, 4, 4), 0.75)
    b = tube_mask(jax.random.PRNGKey(2), 3, (2, 4, 4), 0.75)
    np.testing.assert_array_equal(a.keep_idx, b.keep_idx)
    r = make_mask("random", jax.random.PRNGKey(2), 3, (4, 8), 0.8)
    np.testing.assert_array_equal(r.keep_idx, random_mask(jax.random.PRNGKey(2), 3, 32, 0.8).keep_idx)
    with pytest.raises(ValueError, match="masking.kind"):
        make_mask("block", jax.random.PRNGKey(2), 3, (4, 8), 0.8)
    with pytest.raises(ValueError, match="time, height, width"):
        make_mask("tube", jax.random.PRNGKey(2), 3, (4, 8), 0.8)


# ------------------------------------------------------------------------- kept counts: tube vs random (fidelity)


def test_kinetics_recipe_tube_mask_keeps_160_tokens_per_clip():
    """configs/kinetics400.py: 224 px, 16x16 patches (14x14 = 196 per slot), 16 frames in tubelets of 2 (8 slots),
    ratio 0.9. VideoMAE masks int(0.9 * 196) = 176 per slot and keeps 20: 160 per clip (not 8 * 19 = 152)."""
    from bridle_jax.masking import make_mask, tube_num_kept
    from tests import tiny

    c = tiny.load_config("kinetics400")
    assert c.model.variant.endswith("/16")
    side = c.data.image_size // 16
    grid = (c.data.num_frames // c.model.tubelet_size, side, side)
    assert grid == (8, 14, 14) and c.masking.kind == "tube" and c.masking.ratio == 0.9
    assert tube_num_kept(196, 0.9) == 20
    mask = make_mask(c.masking.kind, jax.random.PRNGKey(0), 2, grid, c.masking.ratio)
    assert mask.keep_idx.shape == (2, 160)
    np.testing.assert_array_equal(np.asarray(mask.masked).sum(1), [1568 - 160] * 2)
    np.testing.assert_array_equal(np.asarray(mask.masked).reshape(2, 8, 196).sum(2), 176)  # 176 masked per slot


@pytest.mark.parametrize(
    "hw, ratio",
    [(196, 0.9), (196, 0.75), (196, 0.8), (16, 0.75), (16, 0.9), (64, 0.9), (9, 0.9), (49, 0.6), (100, 0.7), (3, 0.5)],
)
def test_tube_kept_count_is_hw_minus_int_of_masked(hw, ratio):
    """The VideoMAE rule, with the masked count computed the way its generator does (int of ratio * hw)."""
    from bridle_jax.masking import tube_mask, tube_num_kept

    masked_ref = int(np.float64(ratio) * np.int64(hw))  # VideoMAE's TubeMaskingGenerator: int(ratio * patches)
    assert tube_num_kept(hw, ratio) == hw - masked_ref
    side = int(np.sqrt(hw))
    grid = (2, side, hw // side) if side * (hw // side) == hw else (2, 1, hw)
    mask = tube_mask(jax.random.PRNGKey(hw), 3, grid, ratio)
    assert mask.keep_idx.shape == (3, 2 * (hw - masked_ref))
    np.testing.assert_array_equal(np.asarray(mask.masked).sum(1), 2 * masked_ref)


@pytest.mark.parametrize("n, ratio", [(196, 0.8), (512, 0.8), (196, 0.9), (1568, 0.9), (64, 0.75), (49, 0.6)])
def test_random_mask_count_is_unchanged_by_the_tube_rule(n, ratio):
    """MAE's random_masking keeps int(N * (1 - ratio)) (196 at 0.8: 39; 512 at 0.8: 102), not N - int(ratio * N)."""
    from bridle_jax.masking import make_mask

    expected = max(1, int(np.int64(n) * (1.0 - np.float64(ratio))))
    assert num_kept(n, ratio) == expected
    mask = make_mask("random", jax.random.PRNGKey(n), 2, (n,), ratio)
    assert mask.keep_idx.shape == (2, expected)
    np.testing.assert_array_equal(np.asarray(mask.masked).sum(1), n - expected)
    assert (num_kept(196, 0.8), num_kept(512, 0.8)) == (39, 102)
