"""Models against NumPy references (float64) on fresh random inputs: stem, blocks, encoder with masking, decoder
unshuffle, tokenizer, cold start, estimator; plus dtypes, inits, variants and remat."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from bridle_jax.masking import random_mask
from bridle_jax.models.decoder import LabelPredictor, unshuffle
from bridle_jax.models.patch_embed import STEMS, ImagePatchEmbed
from bridle_jax.models.tokenizer import ColdStartTokenizer, Estimator, Tokenizer
from bridle_jax.models.vit import VARIANTS, Block, Transformer, ViTEncoder, decode_variant, sincos_2d

ENC = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)
DEC = dict(width=16, depth=2, num_heads=2, mlp_dim=32, num_levels=3, codebook_size=8)
REMAT = re.compile(r"\b(remat2?|checkpoint)\[")  # jax.checkpoint's name in a printed jaxpr
ENC1, DEC1 = dict(ENC, depth=1), dict(DEC, depth=1)  # where compile time, not depth, is what a test pays for


def rand_params(mod, *args, seed=0, **static):
    """Fresh random float32 params shaped by `init` (traced only, never compiled: jitted RNG inits dominate compile
    time on CPU). Unlike the real init, LayerNorm affines and biases are non-trivial, so references check them too."""
    shapes = jax.eval_shape(functools.partial(mod.init, **static), jax.random.PRNGKey(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        x = rng.standard_normal(leaf.shape)
        if name == "kernel":
            x /= math.sqrt(math.prod(leaf.shape[:-1]))
        else:
            x = 0.2 * x + (1.0 if name == "scale" else 0.0)
        return x.astype(leaf.dtype)  # NumPy leaves: jit takes them, and a device_put would compile per shape

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0, static_argnames="patch_grid")
def _apply(mod, params, *args, patch_grid=None):
    static = {} if patch_grid is None else {"patch_grid": patch_grid}
    return mod.apply({"params": params}, *args, **static)


def japply(mod, params, *args, **static):
    """Jitted apply, cached on (module, shapes): eager flax dispatches op by op, which is slow for tests."""
    return _apply(mod, params, *args, **static)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def images(seed, shape=(2, 16, 16, 3)):
    """Fresh normal inputs from NumPy (jax.random would compile a program per shape)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_mask(seed, batch, n, ratio):
    return _jit_mask(jax.random.PRNGKey(seed), batch, n, ratio)


_jit_mask = jax.jit(random_mask, static_argnums=(1, 2, 3))


# ---------------------------------------------------------------- NumPy references


def mae_sincos_2d(embed_dim, grid_h, grid_w):
    """MAE's get_2d_sincos_pos_embed (flexible h x w version), transcribed."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def np_patchify(x, p):
    b, hh, ww, c = x.shape
    x = np.asarray(x, np.float64).reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def np_stem(params, x, p):
    k = params["conv"]["kernel"]
    return np_patchify(x, p) @ k.reshape(-1, k.shape[-1]) + params["conv"]["bias"]


def np_dense(params, x):
    return x @ params["kernel"] + params.get("bias", 0.0)


def np_ln(params, x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * params["scale"] + params["bias"]


def np_block(params, x, heads):
    b, n, w = x.shape
    d = w // heads
    qkv = np_dense(params["attn"]["qkv"], np_ln(params["norm1"], x)).reshape(b, n, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, w)
    x = x + np_dense(params["attn"]["proj"], att)
    y = np_dense(params["fc1"], np_ln(params["norm2"], x))
    y = 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))
    return x + np_dense(params["fc2"], y)


def np_transformer(params, x, depth, heads):
    for i in range(depth):
        x = np_block(params[f"block_{i}"], x, heads)
    return x


def np_encoder(params, x, keep, cfg):
    emb = np_stem(params["patch_embed"], x, cfg["patch_size"])
    b, n, w = emb.shape
    grid = (x.shape[1] // cfg["patch_size"], x.shape[2] // cfg["patch_size"])
    emb = emb + mae_sincos_2d(w, *grid)
    if keep is not None:
        emb = np.stack([emb[i, np.asarray(keep[i])] for i in range(b)])
    tokens = np.concatenate([np.broadcast_to(params["cls"], (b, 1, w)), emb], axis=1)
    tokens = np_transformer(params["transformer"], tokens, cfg["depth"], cfg["num_heads"])
    return np_ln(params["norm"], tokens), emb


def np_unshuffle(visible, mask_token, keep, n):
    """Scatter by keep_idx (not restore_idx): an independent route to the same layout."""
    b, _, w = visible.shape
    out = np.broadcast_to(np.asarray(mask_token, np.float64).reshape(1, 1, w), (b, n, w)).copy()
    for i in range(b):
        out[i, np.asarray(keep[i])] = visible[i]
    return out


def np_decoder(params, encoded, keep, grid, cfg):
    x = np_dense(params["embed"], np.asarray(encoded, np.float64))
    n = grid[0] * grid[1]
    patches = np_unshuffle(x[:, 1:], params["mask_token"], keep, n) + mae_sincos_2d(cfg["width"], *grid)
    x = np.concatenate([x[:, :1], patches], axis=1)
    x = np_ln(params["norm"], np_transformer(params["transformer"], x, cfg["depth"], cfg["num_heads"]))
    logits = np_dense(params["head"], x[:, 1:])
    return logits.reshape(x.shape[0], n, cfg["num_levels"], cfg["codebook_size"])


# ---------------------------------------------------------------- variants and position embeddings


def test_decode_variant_table():
    assert decode_variant("B/16") == {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072, "patch_size": 16}
    assert decode_variant("S/16")["width"] == 384 and decode_variant("L/14")["depth"] == 24
    assert decode_variant("Ti/8")["num_heads"] == 3 and decode_variant("mu/4")["patch_size"] == 4
    for name, (w, d, h, m) in VARIANTS.items():
        v = decode_variant(f"{name}/16")
        assert (v["width"], v["depth"], v["num_heads"], v["mlp_dim"]) == (w, d, h, m)
        assert w % h == 0 and (w // 2) % 2 == 0


@pytest.mark.parametrize("bad", ["X/16", "B", "B/0", "B/16x2", "b/16", "", "B/-4", "/16"])
def test_decode_variant_errors_name_the_string(bad):
    with pytest.raises(ValueError, match="variant"):
        decode_variant(bad)
    try:
        decode_variant(bad)
    except ValueError as e:
        assert repr(bad) in str(e)


@pytest.mark.parametrize("grid, width", [((4, 4), 32), ((3, 5), 16), ((14, 14), 768), ((64, 8), 64)])
def test_sincos_matches_mae(grid, width):
    table = sincos_2d(grid, width)
    assert table.shape == (grid[0] * grid[1], width) and table.dtype == np.float32
    np.testing.assert_allclose(table, mae_sincos_2d(width, *grid), atol=1e-6)


def test_sincos_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d((4, 4), 30)


# ---------------------------------------------------------------- stem and block


def test_image_patch_embed_matches_reference_and_rejects_bad_sizes():
    x = images(1, (2, 8, 12, 3))
    stem = ImagePatchEmbed(width=16, patch_size=4)
    params = rand_params(stem, x, seed=0)
    y, grid = japply(stem, params, x)
    assert grid == (2, 3) and y.shape == (2, 6, 16)
    np.testing.assert_allclose(y, np_stem(f64(params), x, 4), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        stem.init(jax.random.PRNGKey(0), images(1, (1, 10, 12, 3)))
    assert set(STEMS) >= {"image"}
    with pytest.raises(ValueError, match="unknown stem"):
        ViTEncoder(**ENC, stem="nope").init(jax.random.PRNGKey(0), x)


def test_block_matches_reference():
    x = images(2, (2, 7, 32))
    block = Block(width=32, num_heads=4, mlp_dim=48)
    params = rand_params(block, x, seed=3)
    np.testing.assert_allclose(
        japply(block, params, x), np_block(f64(params), np.asarray(x, np.float64), 4), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------- encoder E


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (3, 8, 16, 1)])
def test_encoder_matches_reference_with_and_without_mask(shape):
    x = images(4, shape)
    n = (shape[1] // 4) * (shape[2] // 4)
    enc = ViTEncoder(**ENC)
    params = rand_params(enc, x, seed=5)
    mask = make_mask(6, shape[0], n, 0.75)

    tokens, inter = japply(enc, params, x, mask.keep_idx)
    ref_tokens, ref_emb = np_encoder(f64(params), x, mask.keep_idx, ENC)
    seen = []  # patch_grid must be static Python ints inside a trace (the decoder's sin-cos needs them)
    jax.eval_shape(lambda p: seen.append(enc.apply({"params": p}, x)[1]["patch_grid"]) or 0, params)
    assert seen == [(shape[1] // 4, shape[2] // 4)] and all(type(v) is int for v in seen[0])
    assert tokens.shape == (shape[0], 1 + mask.keep_idx.shape[1], 32)
    np.testing.assert_allclose(inter["embedded"], ref_emb, rtol=1e-4, atol=1e-4)  # the visible tokens, gathered
    np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(inter["patches"], tokens[:, 1:])

    # The gathered tokens are exactly the full embedding at the kept positions.
    _, full = japply(enc, params, x)
    gathered = np.take_along_axis(np.asarray(full["embedded"]), np.asarray(mask.keep_idx)[:, :, None], axis=1)
    np.testing.assert_array_equal(inter["embedded"], gathered)
    full_ref, _ = np_encoder(f64(params), x, None, ENC)
    np.testing.assert_allclose(full["patches"], full_ref[:, 1:], rtol=1e-4, atol=1e-4)


def test_encoder_is_equivariant_to_the_order_of_keep_idx():
    """Pos is added before the gather, so reordering keep_idx only reorders the outputs."""
    x = images(7)
    enc = ViTEncoder(**ENC)
    params = rand_params(enc, x, seed=8)
    keep = make_mask(9, 2, 16, 0.5).keep_idx
    perm = np.random.default_rng(0).permutation(keep.shape[1])
    a, _ = japply(enc, params, x, keep)
    b, _ = japply(enc, params, x, keep[:, perm])
    np.testing.assert_allclose(b[:, 1:], a[:, 1:][:, perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[:, 0], a[:, 0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- decoder D


def test_unshuffle_matches_scatter_by_keep_idx():
    mask = make_mask(10, 3, 12, 0.6)
    visible = images(11, (3, mask.keep_idx.shape[1], 5))
    token = images(12, (1, 1, 5))
    out = unshuffle(visible, token, mask.restore_idx)
    np.testing.assert_allclose(out, np_unshuffle(np.asarray(visible, np.float64), token, mask.keep_idx, 12), atol=0)


def test_decoder_matches_reference_identity_and_permuted_restore():
    grid, n, b = (4, 4), 16, 2
    dec = LabelPredictor(**DEC)
    encoded = images(13, (b, 1 + 4, 24))
    mask = make_mask(14, b, n, 0.75)
    params = rand_params(dec, encoded, mask.restore_idx, patch_grid=grid, seed=15)

    logits = japply(dec, params, encoded, mask.restore_idx, patch_grid=grid)
    assert logits.shape == (b, n, 3, 8) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, np_decoder(f64(params), encoded, mask.keep_idx, grid, DEC), rtol=1e-4, atol=1e-4)

    identity = jnp.tile(jnp.arange(n, dtype=jnp.int32), (b, 1))  # visible tokens are patches 0..3
    keep = np.tile(np.arange(4), (b, 1))
    np.testing.assert_allclose(
        japply(dec, params, encoded, identity, patch_grid=grid),
        np_decoder(f64(params), encoded, keep, grid, DEC),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="patch_grid"):
        japply(dec, params, encoded, mask.restore_idx, patch_grid=(4, 5))


def test_encoder_decoder_ignore_the_shuffle_order_of_visible_tokens():
    """Same visible set in another order (and its matching restore_idx) must give the same logits: the decoder's
    unshuffle puts each encoder token back at its original position."""
    x, b, n = images(16), 2, 16
    enc, dec = ViTEncoder(**ENC), LabelPredictor(**DEC)
    mask = make_mask(17, b, n, 0.75)
    pe = rand_params(enc, x, seed=18)
    encoded, inter = japply(enc, pe, x, mask.keep_idx)
    pd = rand_params(dec, encoded, mask.restore_idx, patch_grid=(4, 4), seed=19)

    shuffle = np.argsort(np.asarray(mask.restore_idx), axis=1)  # the noise permutation
    k = mask.keep_idx.shape[1]
    perm = np.random.default_rng(1).permutation(k)
    shuffle2 = np.concatenate([shuffle[:, :k][:, perm], shuffle[:, k:][:, ::-1]], axis=1)
    keep2, restore2 = jnp.asarray(shuffle2[:, :k], jnp.int32), jnp.asarray(np.argsort(shuffle2, 1), jnp.int32)
    encoded2, _ = japply(enc, pe, x, keep2)
    a = japply(dec, pd, encoded, mask.restore_idx, patch_grid=(4, 4))
    c = japply(dec, pd, encoded2, restore2, patch_grid=(4, 4))
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tokenizer, cold start, estimator


def test_tokenizer_matches_reference():
    x = images(20)
    tok = Tokenizer(**ENC, code_dim=12)
    params = rand_params(tok, x, seed=21)
    z = japply(tok, params, x)
    assert z.shape == (2, 16, 12) and z.dtype == jnp.float32
    p = f64(params)
    feats, _ = np_encoder(p["vit"], x, None, ENC)
    ref = np_dense(p["head_out"], np.tanh(np_dense(p["head_in"], feats[:, 1:])))
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-4)


def test_cold_start_matches_reference():
    x = images(22, (3, 8, 12, 3))
    cold = ColdStartTokenizer(width=16, patch_size=4, code_dim=8)
    params = rand_params(cold, x, seed=23)
    assert set(params) == {"patch_embed", "proj"} and set(params["proj"]) == {"kernel"}  # no bias, no transformer
    z = japply(cold, params, x)
    assert z.shape == (3, 6, 8) and z.dtype == jnp.float32
    p = f64(params)
    ref = (np_stem(p["patch_embed"], x, 4) + mae_sincos_2d(16, 2, 3)) @ p["proj"]["kernel"]
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-4)


def test_estimator_matches_reference():
    z = images(24, (2, 6, 12))
    est = Estimator(width=16, depth=2, num_heads=2, mlp_dim=32, out_dim=24)
    params = rand_params(est, z, patch_grid=(2, 3), seed=25)
    out = japply(est, params, z, patch_grid=(2, 3))
    assert out.shape == (2, 6, 24) and out.dtype == jnp.float32
    p = f64(params)
    x = np_dense(p["embed"], np.asarray(z, np.float64)) + mae_sincos_2d(16, 2, 3)
    ref = np_dense(p["head"], np_ln(p["norm"], np_transformer(p["transformer"], x, 2, 2)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="patch_grid"):
        japply(est, params, z, patch_grid=(3, 3))


# ---------------------------------------------------------------- dtypes, inits, remat


def test_bf16_compute_keeps_f32_params_and_outputs():
    x, b, n = images(26), 2, 16
    mask = make_mask(27, b, n, 0.75)

    def build(dt):
        return (
            ViTEncoder(**ENC1, dtype=dt),
            LabelPredictor(**DEC1, dtype=dt),
            Tokenizer(**ENC1, code_dim=12, dtype=dt),
            Estimator(width=16, depth=1, num_heads=2, mlp_dim=32, out_dim=32, dtype=dt),
        )

    enc, dec, tok, est = build(jnp.float32)
    encoded = jax.ShapeDtypeStruct((b, 1 + mask.keep_idx.shape[1], 32), jnp.float32)
    z = jax.ShapeDtypeStruct((b, n, 12), jnp.float32)
    params = (
        rand_params(enc, x, mask.keep_idx, seed=1),
        rand_params(dec, encoded, mask.restore_idx, patch_grid=(4, 4)),
        rand_params(tok, x, seed=2),
        rand_params(est, z, patch_grid=(4, 4), seed=3),
    )

    @functools.partial(jax.jit, static_argnums=0)
    def forward(dt, params):
        enc, dec, tok, est = build(dt)
        pe, pd, pt, ps = ({"params": p} for p in params)
        encoded, _ = enc.apply(pe, x, mask.keep_idx)
        z = tok.apply(pt, x)
        return encoded, dec.apply(pd, encoded, mask.restore_idx, (4, 4)), z, est.apply(ps, z, (4, 4))

    ref = forward(jnp.float32, params)
    low = forward(jnp.bfloat16, params)
    assert low[0].dtype == jnp.bfloat16 and all(o.dtype == jnp.float32 for o in low[1:])
    for lo, hi in zip(low, ref):  # same params: bf16 compute is a rounding of the f32 result
        assert lo.shape == hi.shape
        np.testing.assert_allclose(np.asarray(lo, np.float32), hi, atol=0.15, rtol=0.05)
    for m, args, static in zip(
        build(jnp.bfloat16),
        [(x,), (encoded, mask.restore_idx), (x,), (z,)],
        [{}, {"patch_grid": (4, 4)}, {}, {"patch_grid": (4, 4)}],
    ):
        shapes = jax.eval_shape(functools.partial(m.init, **static), jax.random.PRNGKey(0), *args)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes)), type(m).__name__


def test_inits_follow_spec():
    x = images(29, (1, 8, 8, 3))
    enc = ViTEncoder(width=128, depth=1, num_heads=4, mlp_dim=256, patch_size=4)
    dec = LabelPredictor(width=128, depth=1, num_heads=4, mlp_dim=256)
    encoded, restore = images(31, (1, 3, 128)), jnp.arange(4, dtype=jnp.int32)[None]
    p, pd = jax.jit(lambda k: (enc.init(k, x)["params"], dec.init(k, encoded, restore, (2, 2))["params"]))(
        jax.random.PRNGKey(30)
    )
    conv = p["patch_embed"]["conv"]
    bound = math.sqrt(6 / (48 + 128))  # xavier on the flattened (out, in*p*p) view
    assert 0.95 * bound < np.abs(conv["kernel"]).max() <= bound
    assert 0 < np.abs(conv["bias"]).max() <= 1 / math.sqrt(48)
    blk = p["transformer"]["block_0"]
    for name, sub, (fi, fo) in [
        ("qkv", blk["attn"]["qkv"], (128, 384)),
        ("proj", blk["attn"]["proj"], (128, 128)),
        ("fc1", blk["fc1"], (128, 256)),
        ("fc2", blk["fc2"], (256, 128)),
    ]:
        bound = math.sqrt(6 / (fi + fo))
        assert 0.95 * bound < np.abs(sub["kernel"]).max() <= bound, name
        np.testing.assert_array_equal(sub["bias"], 0)
    for ln in (blk["norm1"], blk["norm2"], p["norm"]):
        np.testing.assert_array_equal(ln["scale"], 1)
        np.testing.assert_array_equal(ln["bias"], 0)
    assert 0.015 < float(np.std(p["cls"])) < 0.025
    assert 0.015 < float(np.std(pd["mask_token"])) < 0.025
    assert pd["head"]["kernel"].shape == (128, 4 * 256)


def test_remat_gives_same_outputs_and_grads():
    x = images(33, (2, 9, 32))
    cot = images(34, (2, 9, 32))
    plain = Transformer(depth=2, width=32, num_heads=4, mlp_dim=64)
    params = rand_params(plain, x, seed=35)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(mod, params, x):
        return jax.value_and_grad(lambda p, x: jnp.sum(mod.apply({"params": p}, x) * cot), argnums=(0, 1))(params, x)

    (l0, g0), (l1, g1) = value_and_grads(plain, params, x), value_and_grads(plain.clone(remat=True), params, x)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5), g1, g0)

    # Every module passes `remat` down: same parameter tree, and a checkpoint in its traced forward.
    restore = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
    cases = [
        (ViTEncoder(**ENC1), (images(36),), {}),
        (LabelPredictor(**DEC1), (images(37, (2, 5, 24)), restore), {"patch_grid": (4, 4)}),
        (Tokenizer(**ENC1), (images(36),), {}),
        (Estimator(width=16, depth=1, num_heads=2, mlp_dim=32), (images(38, (2, 16, 8)),), {"patch_grid": (4, 4)}),
    ]
    for mod, args, static in cases:

        def trace(m):
            init = functools.partial(m.init, **static)
            shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)
            return shapes, str(jax.make_jaxpr(lambda v: m.apply(v, *args, **static))(shapes))

        (s0, j0), (s1, j1) = trace(mod), trace(mod.clone(remat=True))
        assert jax.tree.structure(s0) == jax.tree.structure(s1), type(mod).__name__
        assert not REMAT.search(j0) and REMAT.search(j1), type(mod).__name__
