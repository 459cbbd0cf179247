"""Tests for bridle_jax.quantizer: golden vectors from the authors' code, NumPy references, gradients, sharding,
k-means, bf16 and bad inputs.  Small shapes (except the golden file) so the module runs in seconds."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bridle_jax import quantizer as Q

# jitted once at module level so the tests share compilations (eager op-by-op dispatch is what makes tests slow)
quantize = jax.jit(Q.quantize, static_argnames=("normalize_stage_inputs", "commitment_weight"))
ema_update = jax.jit(Q.ema_update, static_argnames=("decay", "renormalize", "axis_name"))
kmeans_init = jax.jit(Q.kmeans_init, static_argnames=("iters", "axis_name", "normalize_stage_inputs"))
restart_unused = jax.jit(Q.restart_unused, static_argnames=("min_count", "axis_name"))
usage_stats = jax.jit(Q.usage_stats, static_argnums=(1, 2))

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "rq_official.npz"


# ------------------------------------------------------------------------------------------ NumPy reference


def np_l2(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_quantize(codebooks, z, normalize=True, beta=0.25):
    """Straight transcription of SPEC §2.3 (float64)."""
    cb = codebooks.astype(np.float64)
    r = z.reshape(-1, z.shape[-1]).astype(np.float64)
    codes, inputs, mses, zhat = [], [], [], np.zeros_like(r)
    for m in range(cb.shape[0]):
        u = np_l2(r) if normalize else r
        d = ((u[:, None, :] - cb[m][None]) ** 2).sum(-1)
        k = d.argmin(-1)
        q = cb[m][k]
        mses.append(((r - q) ** 2).mean())
        r = r - q
        zhat += q
        codes.append(k)
        inputs.append(u)
    lead = z.shape[:-1]
    return dict(
        codes=np.stack(codes, -1).reshape(*lead, -1),
        z_q=zhat.reshape(z.shape),
        stage_inputs=np.stack(inputs, -2).reshape(*lead, cb.shape[0], -1),
        level_mse=np.array(mses),
        commit_loss=beta * np.mean(mses),
        loss=(1 + beta) * np.mean(mses),
        residual=r.reshape(z.shape),
    )


def np_ema(codebooks, cluster_size, stage_inputs, codes, decay=0.99, renormalize=False):
    m_levels, k, d = codebooks.shape
    u = stage_inputs.reshape(-1, m_levels, d).astype(np.float64)
    c = codes.reshape(-1, m_levels)
    new_c, new_s = codebooks.astype(np.float64).copy(), cluster_size.astype(np.float64).copy()
    for m in range(m_levels):
        n = np.bincount(c[:, m], minlength=k).astype(np.float64)
        s = np.zeros((k, d))
        np.add.at(s, c[:, m], u[:, m])
        mean = np_l2(s / np.maximum(n, 1)[:, None])
        target = np.where(n[:, None] > 0, mean, new_c[m])
        new_c[m] = decay * new_c[m] + (1 - decay) * target
        if renormalize:
            new_c[m] = np_l2(new_c[m])
        new_s[m] = decay * new_s[m] + (1 - decay) * n
    return new_c, new_s


def make_state(key, m, k, d, unit=True):
    codes = jax.random.normal(key, (m, k, d))
    if unit:
        codes = codes / jnp.linalg.norm(codes, axis=-1, keepdims=True)
    return Q.CodebookState(codes=codes, cluster_size=jnp.zeros((m, k)), initialized=jnp.asarray(True))


M, K, D = 3, 16, 8


@pytest.fixture(scope="module")
def small():
    state = make_state(jax.random.key(0), M, K, D)
    z = jax.random.normal(jax.random.key(1), (8, 8, D))  # 64 rows: one batch row per fake device
    return state, z


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]), ("data",))


# ------------------------------------------------------------------------------------------ golden


def test_golden_authors_rq():
    if not GOLDEN.exists():
        pytest.fail(f"golden file missing: {GOLDEN} (shared/ must sit beside the repository checkout)")
    g = np.load(GOLDEN)
    state = Q.CodebookState(
        codes=jnp.asarray(g["codebooks"]),
        cluster_size=jnp.zeros(g["codebooks"].shape[:2]),
        initialized=jnp.asarray(True),
    )
    beta, decay = float(g["commitment_weight"]), float(g["decay"])
    out = partial(quantize, commitment_weight=beta)(state, jnp.asarray(g["z"]))
    np.testing.assert_array_equal(np.asarray(out.codes), g["codes"])
    np.testing.assert_allclose(np.asarray(out.z_q), g["z_q"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(out.stage_inputs).reshape(g["stage_inputs"].shape), g["stage_inputs"], atol=1e-5
    )
    np.testing.assert_allclose(float(out.loss), float(g["loss"]), atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(out.commit_loss), float(g["loss"]) * beta / (1 + beta), rtol=1e-6)
    new = partial(ema_update, decay=decay)(state, out.stage_inputs, out.codes)
    np.testing.assert_allclose(np.asarray(new.codes), g["codebooks_after_ema"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ NumPy references


@pytest.mark.parametrize("normalize", [True, False])
def test_quantize_matches_numpy(small, normalize):
    state, z = small
    out = partial(quantize, normalize_stage_inputs=normalize)(state, z)
    ref = np_quantize(np.asarray(state.codes), np.asarray(z), normalize)
    np.testing.assert_array_equal(np.asarray(out.codes), ref["codes"])
    assert out.codes.dtype == jnp.int32 and out.codes.shape == (8, 8, M)
    np.testing.assert_allclose(np.asarray(out.z_q), ref["z_q"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.stage_inputs), ref["stage_inputs"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.level_mse), ref["level_mse"], rtol=1e-5)
    np.testing.assert_allclose(float(out.commit_loss), ref["commit_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), ref["loss"], rtol=1e-5)
    # residual algebra: z − z_q is the last residual, and each code norm is that of its code vector
    np.testing.assert_allclose(np.asarray(z - out.z_q), ref["residual"], atol=1e-5)
    norms = np.linalg.norm(np.asarray(state.codes)[np.arange(M), np.asarray(out.codes)], axis=-1)
    np.testing.assert_allclose(np.asarray(out.code_norms), norms, rtol=1e-5)
    assert bool(out.valid.all()) and out.valid.shape == (8, 8)


@pytest.mark.parametrize("renormalize", [False, True])
def test_ema_matches_numpy_with_empty_codes(small, renormalize):
    state, z = small
    state = state.replace(cluster_size=jnp.full((M, K), 2.0))
    out = quantize(state, z[:1, :6])  # 6 rows, 16 codes: most codes are empty
    new = partial(ema_update, decay=0.9, renormalize=renormalize)(state, out.stage_inputs, out.codes)
    ref_c, ref_s = np_ema(
        np.asarray(state.codes),
        np.asarray(state.cluster_size),
        np.asarray(out.stage_inputs),
        np.asarray(out.codes),
        0.9,
        renormalize,
    )
    np.testing.assert_allclose(np.asarray(new.codes), ref_c, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.cluster_size), ref_s, atol=1e-6)
    used = np.zeros((M, K), bool)
    used[np.arange(M)[None], np.asarray(out.codes).reshape(-1, M)] = True
    assert (~used).sum() > 0
    if not renormalize:  # empty codes keep their value exactly
        np.testing.assert_array_equal(np.asarray(new.codes)[~used], np.asarray(state.codes)[~used])


def test_restart_replaces_only_dead_codes_with_batch_vectors(small):
    state, z = small
    state = state.replace(cluster_size=jnp.full((M, K), 5.0))
    out = quantize(state, z)
    new = partial(restart_unused, min_count=2.0)(state, out.stage_inputs, out.codes, jax.random.key(3))
    u = np.asarray(out.stage_inputs).reshape(-1, M, D)
    counts = np.stack([np.bincount(np.asarray(out.codes).reshape(-1, M)[:, m], minlength=K) for m in range(M)])
    dead = counts < 2
    assert dead.any() and (~dead).any()
    old, nc = np.asarray(state.codes), np.asarray(new.codes)
    np.testing.assert_array_equal(nc[~dead], old[~dead])
    np.testing.assert_array_equal(np.asarray(new.cluster_size), np.where(dead, 1.0, 5.0))
    for m in range(M):
        rows = nc[m][dead[m]]
        # every replacement is one of this level's stage inputs, drawn without replacement (64 rows ≥ K)
        match = np.abs(rows[:, None, :] - u[None, :, m, :]).max(-1) < 1e-7
        assert match.any(-1).all()
        assert len({int(i) for i in match.argmax(-1)}) == len(rows)


def test_usage_stats_matches_numpy(small):
    state, z = small
    codes = quantize(state, z).codes
    st = usage_stats(codes, K)
    c = np.asarray(codes).reshape(-1, M)
    for m in range(M):
        n = np.bincount(c[:, m], minlength=K)
        p = n[n > 0] / n.sum()
        ent = -(p * np.log2(p)).sum()
        np.testing.assert_allclose(float(st["usage"][m]), (n > 0).mean())
        np.testing.assert_allclose(float(st["entropy"][m]), ent, rtol=1e-5)
        np.testing.assert_allclose(float(st["perplexity"][m]), 2**ent, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(st["counts"][m]), n)


# ------------------------------------------------------------------------------------------ gradients


def test_gradients_straight_through_and_commitment(small):
    state, z = small
    w = jax.random.normal(jax.random.key(5), z.shape)
    g_st = jax.jit(jax.grad(lambda x: jnp.sum(Q.quantize(state, x).z_q * w)))(z)
    np.testing.assert_allclose(np.asarray(g_st), np.asarray(w), atol=1e-6)  # identity
    ref = np_quantize(np.asarray(state.codes), np.asarray(z))
    # d/dz β·mean_m mean((r_{m-1} − sg q_m)²) = β/M · Σ_m 2 r_m / numel, with r_m = z − Σ_{j≤m} q_j
    cb = np.asarray(state.codes, np.float64)
    c = ref["codes"].reshape(-1, M)
    r = np.asarray(z, np.float64).reshape(-1, D)
    expect = np.zeros_like(r)
    for m in range(M):
        r = r - cb[m][c[:, m]]
        expect += 2 * r / r.size
    expect *= 0.25 / M
    g_commit = jax.jit(jax.grad(lambda x: Q.quantize(state, x).commit_loss))(z)
    g_loss = jax.jit(jax.grad(lambda x: Q.quantize(state, x).loss))(z)
    np.testing.assert_allclose(np.asarray(g_commit).reshape(-1, D), expect, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_loss), np.asarray(g_commit), atol=0)
    g_codes = jax.jit(
        jax.grad(
            lambda c: Q.quantize(state.replace(codes=c), z).loss + jnp.sum(Q.quantize(state.replace(codes=c), z).z_q)
        )
    )(state.codes)
    assert float(jnp.abs(g_codes).max()) == 0.0  # codebooks are EMA-trained, never by gradients


# ------------------------------------------------------------------------------------------ sharding


def _pipeline(state, z, key, axis_name=None):
    """k-means → quantize → EMA → restart → stats: everything that reduces over the batch."""
    k1, k2 = jax.random.split(key)
    state = Q.kmeans_init(state, z, k1, iters=4, axis_name=axis_name)
    out = Q.quantize(state, z)
    state = Q.ema_update(state, out.stage_inputs, out.codes, axis_name=axis_name)
    state = Q.restart_unused(state, out.stage_inputs, out.codes, k2, min_count=3.0, axis_name=axis_name)
    stats = Q.usage_stats(out.codes, K, axis_name=axis_name)
    return state, stats


def test_sharded_equals_unsharded(small, mesh):
    state, z = small
    fresh = Q.init_codebooks(jax.random.key(7), M, K, D)
    key = jax.random.key(8)
    ref_state, ref_stats = jax.jit(_pipeline)(fresh, z, key)
    assert bool(ref_state.initialized)
    assert (np.asarray(ref_stats["counts"]) < 3).any(), "want some rarely used codes so restart is exercised"

    smap = jax.jit(
        jax.shard_map(
            partial(_pipeline, axis_name="data"), mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P())
        )
    )
    repl = NamedSharding(mesh, P())
    gspmd = jax.jit(_pipeline, in_shardings=(repl, NamedSharding(mesh, P("data")), repl), out_shardings=(repl, repl))
    for name, fn in [("shard_map", smap), ("jit+NamedSharding", gspmd)]:
        got_state, got_stats = fn(fresh, z, key)
        for a, b in zip(jax.tree.leaves((got_state, got_stats)), jax.tree.leaves((ref_state, ref_stats))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0, err_msg=name)


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_recovers_planted_clusters_and_is_noop_when_initialized():
    eye = np.eye(16, dtype=np.float32)[:4]
    lab = np.asarray(jax.random.randint(jax.random.key(11), (400,), 0, 4))
    z = 3.0 * eye[lab] + 0.05 * jax.random.normal(jax.random.key(12), (400, 16))  # 4 well separated directions
    # 16 codes for 4 clusters, so random seeding (SPEC §2.5) leaves no cluster without a seed
    state = Q.init_codebooks(jax.random.key(13), 2, 16, 16)
    init = kmeans_init
    got = init(state, z, jax.random.key(14))
    assert bool(got.initialized) and not bool(state.initialized)
    cos = np.asarray(got.codes[0]) @ eye.T  # [16 codes, 4 centres]
    owner = cos.argmax(-1)
    assert (cos.max(-1) > 0.99).all(), cos  # every code sits on a planted centre ...
    assert set(owner.tolist()) == {0, 1, 2, 3}  # ... and every centre is found
    counts = np.asarray(got.cluster_size[0])
    np.testing.assert_allclose([counts[owner == j].sum() for j in range(4)], np.bincount(lab, minlength=4))
    np.testing.assert_allclose(np.asarray(got.cluster_size).sum(-1), [400, 400])
    out = quantize(got, z)
    np.testing.assert_array_equal(owner[np.asarray(out.codes[:, 0])], lab)
    # level 2 was fitted on level 1's residuals: its codes point along them, not along z
    res = np_l2(np.asarray(out.stage_inputs[:, 1]))
    assert (np.sum(res * np.asarray(got.codes[1])[np.asarray(out.codes[:, 1])], -1) > 0.5).mean() > 0.9
    # A3b: a second call (other data, other key) changes nothing, under jit too
    again = init(got, -z, jax.random.key(15))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ dtypes


def test_bf16_input_gives_fp32_codes_of_rounded_input(small):
    state, z = small
    zb = (z * 3).astype(jnp.bfloat16)
    ob = quantize(state, zb)
    of = quantize(state, zb.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(ob.codes), np.asarray(of.codes))
    assert ob.z_q.dtype == jnp.bfloat16 and ob.stage_inputs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ob.stage_inputs), np.asarray(of.stage_inputs), atol=0)
    np.testing.assert_allclose(np.asarray(ob.z_q, np.float32), np.asarray(of.z_q.astype(jnp.bfloat16), np.float32))
    g = jax.jit(jax.grad(lambda x: jnp.sum(Q.quantize(state, x).z_q.astype(jnp.float32))))(zb)
    assert g.dtype == jnp.bfloat16 and bool((g == 1).all())


# ------------------------------------------------------------------------------------------ bad input


def test_bad_arguments_raise_clear_errors(small):
    state, z = small
    with pytest.raises(ValueError, match="num_levels"):
        Q.init_codebooks(jax.random.key(0), 0, 8, 4)
    with pytest.raises(ValueError, match="codebook_size"):
        Q.init_codebooks(jax.random.key(0), 2, 1, 4)
    with pytest.raises(ValueError, match="dim"):
        Q.init_codebooks(jax.random.key(0), 2, 8, 0)
    with pytest.raises(ValueError, match=r"z: expected shape \[..., D\] with D=8"):
        Q.quantize(state, jnp.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"z: expected shape \[..., D\] with D=8"):
        quantize(state, jnp.zeros((4, 9)))  # shapes are static: also raised at trace time
    with pytest.raises(ValueError, match="z: expected a floating dtype"):
        Q.quantize(state, jnp.zeros((4, D), jnp.int32))
    with pytest.raises(ValueError, match="z: expected shape"):
        Q.kmeans_init(state, jnp.zeros((4, 5)), jax.random.key(0))
    with pytest.raises(ValueError, match="iters"):
        Q.kmeans_init(state, z, jax.random.key(0), iters=0)
    out = quantize(state, z)
    with pytest.raises(ValueError, match="stage_inputs"):
        Q.ema_update(state, out.stage_inputs[..., :2, :], out.codes)
    with pytest.raises(ValueError, match="codes"):
        Q.ema_update(state, out.stage_inputs, out.codes[:, :3])
    with pytest.raises(ValueError, match="decay"):
        Q.ema_update(state, out.stage_inputs, out.codes, decay=1.5)
    with pytest.raises(ValueError, match="codes"):
        Q.restart_unused(state, out.stage_inputs, out.codes.astype(jnp.float32), jax.random.key(0))
    with pytest.raises(ValueError, match="state"):
        Q.quantize({"codes": state.codes}, z)
    with pytest.raises(ValueError, match="codebook_size"):
        Q.usage_stats(out.codes, 1)


def test_nonfinite_rows_never_reach_the_codebooks(small):
    state, z = small
    flat = z.reshape(-1, D)
    bad = flat.at[3, 0].set(jnp.nan).at[10].set(jnp.inf).at[20, 5].set(-jnp.inf)
    keep = np.setdiff1d(np.arange(flat.shape[0]), [3, 10, 20])
    out = quantize(state, bad)
    np.testing.assert_array_equal(np.asarray(out.valid), np.isin(np.arange(flat.shape[0]), keep))
    clean = quantize(state, flat[keep])
    np.testing.assert_array_equal(np.asarray(out.codes)[keep], np.asarray(clean.codes))
    # EMA with the bad rows == EMA without them
    a = ema_update(state, out.stage_inputs, out.codes)
    b = ema_update(state, clean.stage_inputs, clean.codes)
    np.testing.assert_allclose(np.asarray(a.codes), np.asarray(b.codes), atol=1e-7)
    np.testing.assert_allclose(np.asarray(a.cluster_size), np.asarray(b.cluster_size), atol=1e-7)
    # restart and k-means stay finite and draw only finite rows
    r = restart_unused(state, out.stage_inputs, out.codes, jax.random.key(1))
    assert np.isfinite(np.asarray(r.codes)).all()
    fresh = Q.init_codebooks(jax.random.key(2), M, K, D)
    km = kmeans_init(fresh, bad, jax.random.key(3))
    assert bool(km.initialized) and np.isfinite(np.asarray(km.codes)).all()
    np.testing.assert_allclose(np.asarray(km.cluster_size).sum(-1), len(keep))
    st = usage_stats(out.codes, K, mask=out.valid)
    np.testing.assert_allclose(np.asarray(st["counts"]).sum(-1), len(keep))
    # a batch without any finite row leaves an uninitialised state untouched (and still uninitialised)
    none = kmeans_init(fresh, jnp.full((8, D), jnp.nan), jax.random.key(3))
    assert not bool(none.initialized)
    np.testing.assert_array_equal(np.asarray(none.codes), np.asarray(fresh.codes))


def test_mask_equals_dropping_the_masked_rows(small):
    """Padded patches (mask False) take no part in the losses, EMA, restart or k-means: as if they were absent."""
    state, z = small
    rng = np.random.default_rng(7)
    mask = rng.random(z.shape[:-1]) > 0.3
    kept = z[mask]
    out = quantize(state, z, mask=jnp.asarray(mask))
    ref = quantize(state, kept)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.codes)[mask], np.asarray(ref.codes))
    a = ema_update(state, out.stage_inputs, out.codes, mask=jnp.asarray(mask))
    b = ema_update(state, ref.stage_inputs, ref.codes)
    np.testing.assert_allclose(np.asarray(a.codes), np.asarray(b.codes), atol=1e-7)
    np.testing.assert_allclose(np.asarray(a.cluster_size), np.asarray(b.cluster_size), atol=1e-7)
    fresh = Q.init_codebooks(jax.random.key(2), M, K, D)
    km = kmeans_init(fresh, z, jax.random.key(3), mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(km.cluster_size).sum(-1), mask.sum())
    r = restart_unused(state, out.stage_inputs, out.codes, jax.random.key(1), mask=jnp.asarray(mask))
    dead = np.asarray(r.codes) != np.asarray(state.codes)
    drawn = np.asarray(r.codes)[dead.any(-1)]
    pool = np.asarray(out.stage_inputs)[mask].reshape(-1, D)
    assert len(drawn) and all(np.isclose(pool, row, atol=1e-6).all(-1).any() for row in drawn)
    with pytest.raises(ValueError, match="mask"):
        quantize(state, z, mask=jnp.ones((3,), bool))
