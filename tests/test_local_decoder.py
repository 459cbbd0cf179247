"""The audio local-window label predictor against float64 NumPy references (Swin window partition, region mask,
scaled-cosine attention, continuous position bias, post-norm blocks, whole model), plus locality of windows and
shifts, the cls drop, mask tokens, grid checks, remat and bfloat16."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from bridle_jax.models import local_decoder
from bridle_jax.models.decoder import unshuffle
from bridle_jax.models.local_decoder import LocalLabelPredictor, WindowAttention, shifted_window_mask
from bridle_jax.models.vit import sincos_2d

TINY = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "num_levels": 2, "codebook_size": 8, "cpb_hidden": 16}
GRID = (8, 4)


def rand_params(mod, *args, seed=0, **static):
    """Fresh random float32 params shaped by `init` (traced, never compiled), with non-trivial biases and LayerNorm
    affines; `tau` straddles its 0.01 floor and `logit_scale` its log(100) ceiling so the clamps are exercised."""
    shapes = jax.eval_shape(functools.partial(mod.init, **static), jax.random.PRNGKey(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "tau":
            x = rng.uniform(0.003, 0.4, leaf.shape)
        elif name == "logit_scale":
            x = rng.uniform(2.0, 6.0, leaf.shape)
        else:
            x = rng.standard_normal(leaf.shape)
            if name == "kernel":
                x /= math.sqrt(math.prod(leaf.shape[:-1]))
            else:
                x = 0.2 * x + (1.0 if name == "scale" else 0.0)
        return x.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0, static_argnames="patch_grid")
def _apply(mod, params, *args, patch_grid=None):
    static = {} if patch_grid is None else {"patch_grid": patch_grid}
    return mod.apply({"params": params}, *args, **static)


def japply(mod, params, *args, **static):
    return _apply(mod, params, *args, **static)


def inputs(seed, b=2, grid=GRID, n_keep=9, enc_width=24):
    """encoded `[B, 1+n_keep, W]` (cls first) and MAE-style restore_idx `[B, N]` from a random permutation."""
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    encoded = rng.standard_normal((b, 1 + n_keep, enc_width)).astype(np.float32)
    shuffle = np.argsort(rng.random((b, n)), axis=1)
    return encoded, np.argsort(shuffle, axis=1).astype(np.int32)


# ---------------------------------------------------------------- NumPy references (float64, loops where it helps)
def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def np_layernorm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_swin_mask(grid, window, shift):
    """The authors' `_make_attention_mask`, literally: slice-labelled img_mask, window_partition, -100 where labels
    differ. Returns `[nW, L, L]` or None."""
    if not any(shift):
        return None
    (h, w), (wh, ww) = grid, window
    img = np.zeros((h, w))
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -ww), slice(-ww, -shift[1]), slice(-shift[1], None)):
            img[hs, ws] = cnt
            cnt += 1
    windows = [img[i : i + wh, j : j + ww].reshape(-1) for i in range(0, h, wh) for j in range(0, w, ww)]
    mw = np.stack(windows)
    diff = mw[:, None, :] - mw[:, :, None]
    return np.where(diff != 0, -100.0, 0.0)


def np_rel_bias(p, window, variant):
    """CPB `[H, L, L]` from an explicit loop over (query, key) pairs of one window."""
    wh, ww = window
    pos = [(r, c) for r in range(wh) for c in range(ww)]
    rel = np.array([[pi[0] - pj[0], pi[1] - pj[1]] for pi in pos for pj in pos], np.float64)
    if variant == "audiomae":
        rel = np.sign(rel) * np.log(1.0 + np.abs(rel))
    else:
        rel = rel / np.array([max(wh - 1, 1), max(ww - 1, 1)]) * 8.0
        rel = np.sign(rel) * np.log2(np.abs(rel) + 1.0) / 3.0
    bias = np_dense(np.maximum(np_dense(rel, p["cpb_fc1"]), 0.0), p["cpb_fc2"])  # [L*L, H]
    bias = bias.T.reshape(-1, wh * ww, wh * ww)
    return 16.0 / (1.0 + np.exp(-bias)) if variant == "swinv2" else bias


def np_window_attention(tok, p, window, heads, variant, mask=None):
    """One window: tok `[B, L, C]` -> `[B, L, C]`; mask `[L, L]` or None."""
    b, length, c = tok.shape
    qkv = tok @ p["qkv"]["kernel"]
    if variant == "audiomae":
        qkv = qkv + p["qkv"]["bias"]
    else:
        qkv = qkv + np.concatenate([p["q_bias"], np.zeros(c), p["v_bias"]])
    qkv = qkv.reshape(b, length, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    dots = q @ k.transpose(0, 1, 3, 2)
    nq, nk = np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1)
    if variant == "audiomae":
        logits = dots / np.maximum(nq[..., :, None] * nk[..., None, :], 1e-6)
        logits = logits / np.maximum(p["tau"], 0.01)[:, None, None]
    else:
        logits = dots / (nq[..., :, None] * nk[..., None, :])
        logits = logits * np.exp(np.minimum(p["logit_scale"], np.log(100.0)))[:, None, None]
    logits = logits + np_rel_bias(p, window, variant)
    if mask is not None:
        logits = logits + mask
    out = (np_softmax(logits) @ v).transpose(0, 2, 1, 3).reshape(b, length, c)
    return np_dense(out, p["proj"])


def np_block(x, p, window, shift, heads, variant):
    """Post-norm Swin block on `[B, h, w, C]` with the authors' window/shift clamp, roll, partition and mask."""
    _, h, w, _ = x.shape
    window = tuple(min(g, v) for g, v in zip((h, w), window))
    shift = tuple(0 if g <= v else s for g, v, s in zip((h, w), window, shift))
    (wh, ww), (sh, sw) = window, shift
    mask = np_swin_mask((h, w), window, shift)
    y = np.roll(x, (-sh, -sw), axis=(1, 2))
    out = np.zeros_like(y)
    for wi, i in enumerate(range(0, h, wh)):
        for wj, j in enumerate(range(0, w, ww)):
            tok = y[:, i : i + wh, j : j + ww].reshape(x.shape[0], wh * ww, -1)
            m = None if mask is None else mask[wi * (w // ww) + wj]
            o = np_window_attention(tok, p["attn"], window, heads, variant, m)
            out[:, i : i + wh, j : j + ww] = o.reshape(x.shape[0], wh, ww, -1)
    y = np.roll(out, (sh, sw), axis=(1, 2))
    x = x + np_layernorm(y, p["norm1"])
    hdn = np_dense(x, p["fc1"])
    hdn = 0.5 * hdn * (1.0 + erf(hdn / np.sqrt(2.0)))
    return x + np_layernorm(np_dense(hdn, p["fc2"]), p["norm2"])


def np_model(params, encoded, restore, grid, cfg):
    p = f64(params)
    enc = np.asarray(encoded, np.float64)
    vis = np_dense(enc[:, 1:], p["embed"])
    b, n_keep, width = vis.shape
    h, w = grid
    x = np.empty((b, h * w, width))
    for bi in range(b):
        for pos in range(h * w):
            r = restore[bi, pos]
            x[bi, pos] = vis[bi, r] if r < n_keep else p["mask_token"].reshape(-1)
    x = (x + sincos_2d(grid, width)).reshape(b, h, w, width)
    for i in range(cfg["depth"]):
        shift = cfg.get("shift", (2, 0)) if i % 2 else (0, 0)
        x = np_block(
            x, p[f"block_{i}"], cfg.get("window", (4, 4)), shift, cfg["num_heads"], cfg.get("variant", "audiomae")
        )
    x = np_layernorm(x, p["norm"]).reshape(b, h * w, width)
    return np_dense(x, p["head"]).reshape(b, h * w, cfg["num_levels"], cfg["codebook_size"])


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "variant, window, shift",
    [("audiomae", (4, 4), (2, 0)), ("audiomae", (4, 2), (2, 1)), ("swinv2", (4, 2), (2, 1))],
)
def test_matches_numpy_reference(variant, window, shift):
    cfg = dict(TINY, window=window, shift=shift, variant=variant)
    mod = LocalLabelPredictor(**cfg)
    encoded, restore = inputs(1)
    params = rand_params(mod, encoded, restore, seed=2, patch_grid=GRID)
    got = japply(mod, params, encoded, restore, patch_grid=GRID)
    assert got.shape == (2, 32, 2, 8) and got.dtype == jnp.float32
    want = np_model(params, encoded, restore, GRID, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_params_and_init():
    """Names the optimizer and checkpoints see, init values of the temperature, and the full-size shape (traced)."""
    mod = LocalLabelPredictor(**TINY)
    encoded, restore = inputs(3)
    params = jax.jit(functools.partial(mod.init, patch_grid=GRID))(jax.random.PRNGKey(0), encoded, restore)["params"]
    assert set(params) == {"embed", "mask_token", "block_0", "block_1", "norm", "head"}
    attn = params["block_1"]["attn"]
    assert set(attn) == {"qkv", "proj", "tau", "cpb_fc1", "cpb_fc2"} and "bias" in attn["qkv"]
    np.testing.assert_array_equal(np.asarray(attn["tau"]), np.ones(2, np.float32))
    v2 = jax.eval_shape(
        functools.partial(LocalLabelPredictor(**TINY, variant="swinv2").init, patch_grid=GRID),
        jax.random.PRNGKey(0),
        encoded,
        restore,
    )["params"]["block_0"]["attn"]
    assert set(v2) == {"qkv", "proj", "logit_scale", "q_bias", "v_bias", "cpb_fc1", "cpb_fc2"}
    assert "bias" not in v2["qkv"] and "bias" not in v2["cpb_fc2"]

    full = LocalLabelPredictor()  # the paper's D: 16 blocks, 512 wide, on the 64x8 audio grid
    enc = jax.ShapeDtypeStruct((2, 1 + 102, 768), jnp.float32)
    idx = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    shapes = jax.eval_shape(functools.partial(full.init, patch_grid=(64, 8)), jax.random.PRNGKey(0), enc, idx)
    out = jax.eval_shape(functools.partial(full.apply, patch_grid=(64, 8)), shapes, enc, idx)
    assert out.shape == (2, 512, 4, 256) and out.dtype == jnp.float32
    assert len([k for k in shapes["params"] if k.startswith("block_")]) == 16


def test_cls_token_is_dropped():
    mod = LocalLabelPredictor(**TINY)
    encoded, restore = inputs(4)
    params = rand_params(mod, encoded, restore, seed=5, patch_grid=GRID)
    base = np.asarray(japply(mod, params, encoded, restore, patch_grid=GRID))
    changed = encoded.copy()
    changed[:, 0] = np.random.default_rng(6).standard_normal(changed[:, 0].shape) * 10
    np.testing.assert_array_equal(np.asarray(japply(mod, params, changed, restore, patch_grid=GRID)), base)
    no_cls = LocalLabelPredictor(**TINY, cls_token=False)
    np.testing.assert_array_equal(np.asarray(japply(no_cls, params, encoded[:, 1:], restore, patch_grid=GRID)), base)
    # a visible token does matter (the check above is not vacuous)
    changed = encoded.copy()
    changed[:, 1] += 1.0
    assert np.abs(np.asarray(japply(mod, params, changed, restore, patch_grid=GRID)) - base).max() > 1e-3


def test_mask_tokens_fill_the_masked_positions():
    """depth 0 makes the model per-position, so each output depends only on the token at its position: the mask
    token moves exactly the positions whose restore_idx >= n_keep, and the result equals decoder.unshuffle's path."""
    mod = LocalLabelPredictor(**dict(TINY, depth=0))
    encoded, restore = inputs(7, n_keep=9)
    n_keep = encoded.shape[1] - 1
    params = rand_params(mod, encoded, restore, seed=8, patch_grid=GRID)
    base = np.asarray(japply(mod, params, encoded, restore, patch_grid=GRID))

    p = jax.tree.map(jnp.asarray, params)
    x = encoded[:, 1:] @ p["embed"]["kernel"] + p["embed"]["bias"]
    x = unshuffle(x, p["mask_token"], jnp.asarray(restore)) + sincos_2d(GRID, TINY["width"])
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mu) / jnp.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    want = (x @ p["head"]["kernel"] + p["head"]["bias"]).reshape(base.shape)
    np.testing.assert_allclose(base, np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(base, np_model(params, encoded, restore, GRID, dict(TINY, depth=0)), atol=1e-4)

    bump = np.random.default_rng(9).standard_normal(params["mask_token"].shape).astype(np.float32)
    moved = dict(params, mask_token=params["mask_token"] + bump)  # not a constant shift, which LayerNorm would undo
    diff = np.abs(np.asarray(japply(mod, moved, encoded, restore, patch_grid=GRID)) - base).max(axis=(2, 3))
    masked = restore >= n_keep
    assert masked.sum() == 2 * (32 - n_keep)
    assert np.all(diff[masked] > 1e-4) and np.all(diff[~masked] == 0)


def perturbation(mod, params, grid, row, col, seed):
    """|change| of the logits `[h, w]` (max over batch, levels, codes) when one patch's token changes; all patches
    visible in patch order, so token j sits at patch j."""
    n = grid[0] * grid[1]
    rng = np.random.default_rng(seed)
    encoded = rng.standard_normal((2, 1 + n, 24)).astype(np.float32)
    restore = np.tile(np.arange(n, dtype=np.int32), (2, 1))
    if params is None:
        params = rand_params(mod, encoded, restore, seed=seed, patch_grid=grid)
    apply = jax.jit(functools.partial(mod.apply, patch_grid=grid))  # fresh trace: sees a monkeypatched mask
    base = apply({"params": params}, encoded, restore)
    moved = encoded.copy()
    moved[:, 1 + row * grid[1] + col] += 3.0 * rng.standard_normal(24)
    out = apply({"params": params}, moved, restore)
    return np.abs(np.asarray(out - base)).max(axis=(0, 2, 3)).reshape(grid), params


def test_unshifted_block_is_window_local():
    mod = LocalLabelPredictor(**dict(TINY, depth=1, window=(4, 2)))
    diff, _ = perturbation(mod, None, GRID, 5, 3, seed=9)
    inside = np.zeros(GRID, bool)
    inside[4:8, 2:4] = True
    assert np.all(diff[inside] > 1e-5)
    assert np.all(diff[~inside] == 0)


@pytest.mark.parametrize("window", [(4, 4), (4, 2)])
def test_shifted_block_crosses_time_borders_but_not_the_wrap(window):
    """Grid 8x4, shift (2, 0). Patch (1, c) reaches rows 0-3 in block 0, then block 1's rolled windows {2..5}, {6, 7}
    and {0, 1} carry it to rows 4-5 but, thanks to the mask, never to rows 6-7 (the rows it wrapped next to); with
    window width 2 it never leaves its pair of frequency columns."""
    mod = LocalLabelPredictor(**dict(TINY, window=window))
    diff, params = perturbation(mod, None, GRID, 1, 0, seed=10)
    cols = slice(0, window[1])
    reach = np.zeros(GRID, bool)
    reach[0:6, cols] = True
    assert np.all(diff[reach] > 1e-5)
    assert np.all(diff[~reach] <= 1e-6 * diff.max())  # -100 leaves exp(-100)-sized weights, below float32 rounding
    if window[1] < GRID[1]:
        assert np.all(diff[:, window[1] :] == 0)  # other frequency windows: exactly nothing

    # negative control: without the mask the wrapped rows 6-7 do see the change, so the check above can fail
    orig = local_decoder.shifted_window_mask
    try:
        local_decoder.shifted_window_mask = lambda *a: None
        unmasked, _ = perturbation(mod, params, GRID, 1, 0, seed=10)
    finally:
        local_decoder.shifted_window_mask = orig
    assert np.all(unmasked[6:8, cols] > 1e-5)


@pytest.mark.parametrize(
    "grid, window, shift",
    [((8, 4), (4, 4), (2, 0)), ((8, 8), (4, 4), (2, 2)), ((12, 6), (4, 3), (1, 2)), ((64, 8), (4, 4), (2, 0))],
)
def test_shifted_window_mask_matches_swin(grid, window, shift):
    got = shifted_window_mask(grid, window, shift)
    want = np_swin_mask(grid, window, shift)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert (got != 0).any() and (got == 0).any()
    assert shifted_window_mask(grid, window, (0, 0)) is None


def test_shifted_attention_weights_across_regions_vanish():
    """Brute force on the sown probabilities of the shifted block: pairs in different pre-roll regions get weight
    below 1e-30 (exp(-100)), pairs in the same region a real share."""
    mod = LocalLabelPredictor(**TINY)
    encoded, restore = inputs(11)
    params = rand_params(mod, encoded, restore, seed=12, patch_grid=GRID)
    _, state = jax.jit(functools.partial(mod.apply, patch_grid=GRID, mutable=["intermediates"]))(
        {"params": params}, encoded, restore
    )
    probs = np.asarray(state["intermediates"]["block_1"]["attn"]["attn_probs"][0])  # [B, nW, H, L, L]
    mask = np_swin_mask(GRID, (4, 4), (2, 0))[None, :, None]
    cross = np.broadcast_to(mask != 0, probs.shape)
    assert cross.any()
    assert probs[cross].max() < 1e-30
    assert probs[~cross].min() > 1e-8
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    unshifted = np.asarray(state["intermediates"]["block_0"]["attn"]["attn_probs"][0])
    assert unshifted.min() > 1e-8  # block 0 has no mask


@pytest.mark.parametrize("variant", ["audiomae", "swinv2"])
def test_scaled_cosine_attention_one_window(variant):
    """WindowAttention alone on one 4x2 window against NumPy; the temperature clamp is on for one head (tau below 0.01
    / logit_scale above log 100), and moving it further past the clamp changes nothing while the other head moves."""
    mod = WindowAttention(width=16, num_heads=2, window=(4, 2), cpb_hidden=12, variant=variant)
    x = np.random.default_rng(13).standard_normal((3, 1, 8, 16)).astype(np.float32)
    params = rand_params(mod, x, seed=14)
    name, clamped, free = ("tau", 0.004, 0.3) if variant == "audiomae" else ("logit_scale", 5.5, 2.5)
    params[name] = np.array([clamped, free], np.float32)
    got = np.asarray(japply(mod, params, x))
    want = np_window_attention(np.asarray(x[:, 0], np.float64), f64(params), (4, 2), 2, variant)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-4, atol=1e-4)

    past = dict(params, **{name: np.array([clamped * (0.5 if variant == "audiomae" else 1.5), free], np.float32)})
    np.testing.assert_array_equal(np.asarray(japply(mod, past, x)), got)
    moved = dict(params, **{name: np.array([clamped, free * 1.5], np.float32)})
    assert np.abs(np.asarray(japply(mod, moved, x)) - got).max() > 1e-4


@pytest.mark.parametrize("variant", ["audiomae", "swinv2"])
def test_all_zero_query_has_finite_gradients(variant):
    """A zero q (zero q weights and bias) gives cos = 0, not NaN, and finite gradients, as torch's clamped norms do."""
    mod = WindowAttention(width=8, num_heads=2, window=(2, 2), cpb_hidden=4, variant=variant)
    x = np.random.default_rng(22).standard_normal((1, 2, 4, 8)).astype(np.float32)
    params = rand_params(mod, x, seed=23)
    params["qkv"]["kernel"][:, :8] = 0.0
    if variant == "audiomae":
        params["qkv"]["bias"][:8] = 0.0
    else:
        params["q_bias"][:] = 0.0
    grads = jax.jit(jax.grad(lambda p: jnp.sum(mod.apply({"params": p}, x) ** 2)))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["qkv"]["kernel"][:, :8])).max() > 0


def trace_init(mod, encoded, restore, grid):
    return jax.eval_shape(functools.partial(mod.init, patch_grid=grid), jax.random.PRNGKey(0), encoded, restore)


def test_bad_grids_raise():
    encoded, restore = inputs(15, grid=(6, 4))
    with pytest.raises(ValueError, match=r"patch_grid \(6, 4\).*windows of \(4, 4\)"):
        trace_init(LocalLabelPredictor(**TINY), encoded, restore, (6, 4))
    encoded, restore = inputs(15)
    with pytest.raises(ValueError, match=r"patch_grid \(4, 4\) has 16 patches"):
        trace_init(LocalLabelPredictor(**TINY), encoded, restore, (4, 4))
    with pytest.raises(ValueError, match=r"shift \(4, 0\)"):
        trace_init(LocalLabelPredictor(**dict(TINY, shift=(4, 0))), encoded, restore, GRID)
    with pytest.raises(ValueError, match="variant"):
        trace_init(LocalLabelPredictor(**dict(TINY, variant="v3")), encoded, restore, GRID)


def test_window_wider_than_grid_shrinks_like_the_authors():
    """grid 8x2 with window (4, 4): the authors use window (4, 2), so the outputs equal an explicit (4, 2)."""
    encoded, restore = inputs(16, grid=(8, 2))
    mod = LocalLabelPredictor(**TINY)
    params = rand_params(mod, encoded, restore, seed=17, patch_grid=(8, 2))
    got = japply(mod, params, encoded, restore, patch_grid=(8, 2))
    explicit = japply(LocalLabelPredictor(**dict(TINY, window=(4, 2))), params, encoded, restore, patch_grid=(8, 2))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(explicit))


def test_remat_same_outputs_and_gradients():
    encoded, restore = inputs(18)
    plain, remat = LocalLabelPredictor(**TINY), LocalLabelPredictor(**TINY, remat=True)
    params = rand_params(plain, encoded, restore, seed=19, patch_grid=GRID)

    def loss(mod, p):
        return jnp.sum(jnp.sin(mod.apply({"params": p}, encoded, restore, patch_grid=GRID)))

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (plain, remat))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))  # float32 noise is relative to the largest
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale), g0, g1
    )
    assert "remat" in str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat)))(params))


def test_bfloat16_compute_close_to_float32():
    encoded, restore = inputs(20)
    f32 = LocalLabelPredictor(**TINY)
    params = rand_params(f32, encoded, restore, seed=21, patch_grid=GRID)
    ref = np.asarray(japply(f32, params, encoded, restore, patch_grid=GRID))
    got = japply(LocalLabelPredictor(**TINY, dtype=jnp.bfloat16), params, encoded, restore, patch_grid=GRID)
    assert got.dtype == jnp.float32
    rel = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
    assert np.isfinite(np.asarray(got)).all() and 0 < rel < 5e-2
