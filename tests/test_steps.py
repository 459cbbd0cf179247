"""The jitted phase steps (steps.py), the state and its hand-over (state.py), on a tiny config.

- sharded == single device: the same initial state and global batches through prepare_codebooks + 2 cold-start
  encoder steps + hand-over + prepare + 2 tokenizer steps on 8 fake devices (data=2 x fsdp=4: kernels split along
  "embed" by the logical rules, codebooks replicated), the encoder phase also on data=8, and on 1 device (which also
  runs hand-over + 1
  warm encoder step): metrics and every leaf of every intermediate state agree (rtol 1e-5, atol 1e-6; ints exactly).
- encoder_step (SPEC 2.1, 2.8): only params["encoder"] change; the loss is recomputed outside the step (same mask
  key, tokenizer codes, NumPy CE on the logits); the loss falls over 20 steps on a fixed batch.
- tokenizer_step (SPEC 2.2, 2.4, 2.8): only params["tokenizer"] and the codebooks change; the codebook change is
  quantizer.ema_update on the forward's stage inputs; the loss is recomputed outside the step.
- prepare_codebooks: sets `initialized`; a no-op on initialised codebooks (A3b).
- hand_over (SPEC 3.1, A7): tokenizer phase -> fresh codebooks, kept params, fresh optimizer; encoder phase -> kept
  codebooks, warm or re-initialised encoder; non-finite counters reset.
- non-finite guard: a NaN batch / inf params leave params, opt_state and codebooks unchanged, count the step, and a
  following finite step resets the in-a-row counter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bridle_jax import losses, masking, optim, quantizer, schedule, sharding, steps
from bridle_jax import state as state_lib
from bridle_jax.config_checks import validate
from bridle_jax.models.bridle import build_models
from tests import tiny

PHASES = ("encoder_cold_start:20", "tokenizer:20", "encoder:20")
LR = 2e-3
SEED = 3


def tiny_config():
    c = tiny.tiny_config()
    c.schedule.phases = PHASES
    # no warm-up: the first update of every phase has the peak lr (a zero-lr step would hide frozen/trained mix-ups)
    c.optim.encoder.warmup_fraction = c.optim.tokenizer.warmup_fraction = 0.0
    c.optim.encoder.lr = c.optim.tokenizer.lr = LR
    # Adam's eps: with the default 1e-8 an update is lr * g / (|g| + 1e-8), so a gradient entry that is ~0 up to float
    # noise (e.g. every attention key bias: q.b_k is the same for every key, the softmax ignores it) moves by up to
    # +-lr in a direction set by the noise, and sharded vs single-device parameters cannot be compared at float
    # tolerance. 1e-4 keeps d(update)/dg <= lr/eps small; the sharding logic under test does not depend on eps.
    c.optim.eps = 1e-4
    validate(c)
    return c


def host(tree):
    """A NumPy copy (the jitted steps donate their state)."""
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def to_device(tree, shardings):
    """Device copies of a host tree. The steps donate their state, and on CPU `device_put` may alias the NumPy
    buffers, so without a forced copy a donated step could write into (or free) the host snapshots."""
    return jax.device_put(tree, shardings, may_alias=False)


def assert_trees_equal(a, b, what=""):
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb], what
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{p}")


def assert_all_leaves_differ(a, b, what=""):
    """Every floating leaf changed (no leaf was silently frozen)."""
    same = [
        p
        for (p, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b))
        if np.issubdtype(x.dtype, np.floating) and np.array_equal(x, y)
    ]
    assert not same, f"{what}: unchanged leaves {same}"


def random_images(seed, n=16, size=16):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def txs(config, plan):
    return [optim.make_optimizer(config.optim, p.kind, p.steps) for p in plan]


def fast_forward(state, step):
    """The loop hands over at `phase.start_step`; the tests run 2 steps of each 20-step phase, then jump there."""
    return state.replace(step=to_device(np.int32(step), state.step.sharding))


# Which image of the `images` fixture each step of the pipeline sees (prepare uses the phase's first one).
BATCHES = {"phase0_step0": 0, "phase0_step1": 0, "phase1_step0": 2, "phase1_step1": 3, "phase2_step0": 4}


def run_pipeline(config, mesh, images, init=None, *, num_phases=3):
    """What train.py does, for the first steps of the first `num_phases` phases of PHASES.

    `init`: a host copy of the initial state to start from (put on this mesh's shardings); None = create_sharded.
    `num_phases`: how many phases of PHASES to run (2 steps each, 1 in the third).
    Returns host snapshots of the state after every stage, the metrics of every step, and the jitted step functions.
    """
    plan = schedule.parse_plan(config.schedule.phases)
    models = build_models(config)
    tx_lr = txs(config, plan)
    bs = sharding.batch_sharding(mesh)
    if init is None:
        state = state_lib.create_sharded(models, config, tx_lr[0][0], plan[0], SEED, mesh)
    else:
        state = to_device(init, state_lib.shardings_for(models, config, tx_lr[0][0], plan[0], mesh))
    snaps, metrics, fns = {"init": host(state)}, {}, {}
    for phase, (tx, lr) in zip(plan, tx_lr):
        if phase.index >= num_phases:
            break
        if phase.index > 0:
            state = fast_forward(state, phase.start_step)
            state = state_lib.hand_over_sharded(state, models, config, tx, phase, mesh)
            snaps[f"handed{phase.index}"] = host(state)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        kw = dict(models=models, config=config, state_shardings=shardings, batch_sharding=bs)
        step_fn = steps.jit_step(phase, tx=tx, lr_schedule=lr, **kw)
        fns[phase.index] = (step_fn, shardings)
        for i in range(1 if phase.index == 2 else 2):
            name = f"phase{phase.index}_step{i}"
            b = sharding.global_batch(mesh, {"input": images[BATCHES[name]]})
            if i == 0 and (phase.cold_start or phase.kind == "tokenizer"):
                state = steps.jit_prepare_codebooks(phase, **kw)(state, b)
                snaps[f"prepared{phase.index}"] = host(state)
            state, m = step_fn(state, b)
            snaps[name] = host(state)
            metrics[name] = host(m)
    return dict(
        snaps=snaps,
        metrics=metrics,
        fns=fns,
        models=models,
        plan=plan,
        txs=tx_lr,
        mesh=mesh,
        fingerprint=fingerprint(snaps),
    )


def fingerprint(snaps):
    import hashlib

    return {
        name: hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in jax.tree.leaves(tree))).hexdigest()
        for name, tree in snaps.items()
    }


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def images():
    return np.stack([random_images(100 + i) for i in range(6)])


@pytest.fixture(scope="module")
def single(config, images):
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    return run_pipeline(config, mesh, images)


@pytest.fixture(scope="module")
def data8(config, images, single):
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp = 8, 1
    # the cold-start encoder phase only (the tokenizer phase on 8 batch shards is covered by fsdp4, data=2 x fsdp=4)
    return run_pipeline(c, sharding.make_mesh(c.mesh), images, single["snaps"]["init"], num_phases=1)


@pytest.fixture(scope="module")
def fsdp4(config, images, single):
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp = 2, 4
    return run_pipeline(c, sharding.make_mesh(c.mesh), images, single["snaps"]["init"], num_phases=2)


# ---------------------------------------------------------------- sharded == single device


def assert_close_leaves(a, b, what, rtol=1e-5, atol=1e-6):
    """Floating leaves within float tolerance; integer and bool leaves (codes, steps, flags, rng) exactly."""
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb], what
    for (p, x), (_, y) in zip(la, lb):
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}{p}")
        else:
            np.testing.assert_array_equal(x, y, err_msg=f"{what}{p}")


def _compare_runs(run, ref):
    assert set(run["snaps"]) <= set(ref["snaps"])
    assert {"prepared0", "phase0_step1"} <= set(run["snaps"])
    for name in run["snaps"]:
        assert_close_leaves(run["snaps"][name], ref["snaps"][name], name)
    assert set(run["metrics"]) <= set(ref["metrics"])
    for name in run["metrics"]:
        ma, mb = run["metrics"][name], ref["metrics"][name]
        assert ma.keys() == mb.keys()
        for k in mb:
            np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


def np_rq_codes(codebooks, z):
    """The RQ code look-up in NumPy (normalised stage inputs, residual on the raw z)."""
    r = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    codes = []
    for c in np.asarray(codebooks, np.float64):
        u = r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12)
        k = np.argmin((c * c).sum(-1)[None] - 2 * u @ c.T, axis=-1)
        codes.append(k)
        r = r - c[k]
    return np.stack(codes, -1)


@pytest.fixture(scope="module")
def features(single, images):
    """Cold-start z of the encoder phase's batch, tokenizer z of the tokenizer phase's first batch (single run)."""
    models, snaps = single["models"], single["snaps"]
    cold = jax.jit(models.cold_start.apply)({"params": snaps["init"].params["cold_start"]}, images[0])
    tok = jax.jit(models.tokenizer.apply)({"params": snaps["handed1"].params["tokenizer"]["tokenizer"]}, images[2])
    return {
        "prepared0": np.asarray(cold),
        "phase0_step1": np.asarray(cold),
        "prepared1": np.asarray(tok),
        "phase1_step1": np.asarray(tok),
    }


def _compare_codes(run, ref, features):
    """The targets/codes of a sharded run's codebooks equal the single-device run's, exactly."""
    for name in set(run["snaps"]) & set(features):
        got = np_rq_codes(run["snaps"][name].codebooks.codes, features[name])
        want = np_rq_codes(ref["snaps"][name].codebooks.codes, features[name])
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert len(np.unique(want[:, 0])) > 8, name


def test_sharded_data8_equals_single_device(data8, single, features):
    assert data8["mesh"].shape == {"data": 8, "fsdp": 1}
    assert set(data8["metrics"]) == {"phase0_step0", "phase0_step1"}
    assert single["mesh"].devices.size == 1
    _compare_runs(data8, single)
    _compare_codes(data8, single, features)


def test_global_batch_is_split_over_every_device(config, images):
    for data, fsdp in ((8, 1), (2, 4)):
        c = config.copy_and_resolve_references()
        c.mesh.data, c.mesh.fsdp = data, fsdp
        mesh = sharding.make_mesh(c.mesh)
        b = sharding.global_batch(mesh, {"input": images[0]})["input"]
        shards = b.addressable_shards
        assert len(shards) == 8 and all(sh.data.shape == (2, 16, 16, 3) for sh in shards)
        got = np.concatenate([np.asarray(sh.data) for sh in sorted(shards, key=lambda sh: sh.index[0].start)])
        np.testing.assert_array_equal(got, images[0])


def test_sharded_fsdp4_equals_single_device(fsdp4, single, features):
    assert fsdp4["mesh"].shape == {"data": 2, "fsdp": 4}
    assert set(fsdp4["metrics"]) == {"phase0_step0", "phase0_step1", "phase1_step0", "phase1_step1"}
    # FSDP really splits parameters here; the codebooks stay replicated
    shardings = fsdp4["fns"][0][1]
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    assert any("fsdp" in tuple(spec) for spec in specs)
    assert all(axes is None for axes in shardings.codebooks.codes.spec)
    _compare_runs(fsdp4, single)
    _compare_codes(fsdp4, single, features)


def test_pipeline_losses_are_finite_and_move(single):
    ms = single["metrics"]
    for name, m in ms.items():
        assert np.isfinite(m["train/loss"]), name
        assert m["train/nonfinite"] == 0, name
    # cold-start encoder: CE starts near log(K) = log 16 (the predictor is untrained)
    assert 1.5 < ms["phase0_step0"]["train/loss"] < 4.5
    for name in ("phase0_step0", "phase1_step0", "phase2_step0"):
        assert ms[name]["train/lr"] == pytest.approx(LR, rel=1e-6)
    assert ms["phase0_step1"]["train/lr"] == pytest.approx(LR * 0.5 * (1 + np.cos(np.pi / 20)), rel=1e-5)
    snaps = single["snaps"]
    assert [
        int(snaps[k].step) for k in ("phase0_step0", "phase0_step1", "phase1_step0", "phase1_step1", "phase2_step0")
    ] == [1, 2, 21, 22, 41]


# ---------------------------------------------------------------- encoder_step


def _forward_encoder_loss(models, config, state, images, *, cold_start):
    """The encoder-phase loss recomputed outside the step: same mask key, same codes, CE in NumPy."""
    key = jax.random.fold_in(state.rng, state.step)
    mask = masking.random_mask(key, images.shape[0], models.num_patches, config.masking.ratio)
    if cold_start:
        z = models.cold_start.apply({"params": state.params["cold_start"]}, images)
    else:
        z = models.tokenizer.apply({"params": state.params["tokenizer"]["tokenizer"]}, images)
    q = config.quantizer
    codes = quantizer.quantize(
        state.codebooks, z, normalize_stage_inputs=q.normalize_stage_inputs, commitment_weight=q.commitment_weight
    ).codes
    enc = state.params["encoder"]
    encoded, _ = models.encoder.apply({"params": enc["encoder"]}, images, keep_idx=mask.keep_idx)
    logits = models.decoder.apply({"params": enc["decoder"]}, encoded, mask.restore_idx, models.patch_grid)
    return logits, codes, mask


def _np_ce(logits, codes, masked):
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(codes)[..., None], -1)[..., 0]  # [B, N, M]
    masked = np.asarray(masked)
    per_level = nll[masked].mean(axis=0)
    acc = (np.argmax(logits, -1) == np.asarray(codes))[masked].mean(axis=0)
    return nll[masked].mean(), per_level, acc


@pytest.fixture(scope="module")
def encoder_forward(single, config):
    """Jitted `_forward_encoder_loss` per cold_start (compiled once each for the module)."""
    cache = {}

    def get(cold_start):
        if cold_start not in cache:
            cache[cold_start] = jax.jit(
                functools.partial(_forward_encoder_loss, single["models"], config, cold_start=cold_start)
            )
        return cache[cold_start]

    return get


@pytest.mark.parametrize(
    "before, after", [("prepared0", "phase0_step0"), ("phase0_step0", "phase0_step1"), ("handed2", "phase2_step0")]
)
def test_encoder_step_trains_only_the_encoder_and_its_loss_is_the_masked_ce(
    single, images, config, encoder_forward, before, after
):
    s0, s1 = single["snaps"][before], single["snaps"][after]
    m = single["metrics"][after]
    cold_start = after.startswith("phase0")
    # frozen: the tokenizer side, the cold-start tokenizer, the codebooks (no EMA in the encoder phase)
    assert_trees_equal(s0.params["tokenizer"], s1.params["tokenizer"], "tokenizer")
    assert_trees_equal(s0.params["cold_start"], s1.params["cold_start"], "cold_start")
    assert_trees_equal(s0.codebooks, s1.codebooks, "codebooks")
    assert_trees_equal(s0.rng, s1.rng, "rng")
    # trained: every encoder and decoder leaf
    assert_all_leaves_differ(s0.params["encoder"], s1.params["encoder"], "encoder")
    assert int(s1.step) == int(s0.step) + 1
    assert int(s1.opt_state[0].count) == int(s0.opt_state[0].count) + 1
    np.testing.assert_array_equal(s1.nonfinite, [0, 0])
    # the loss, recomputed outside the step with the same mask key (fold_in(rng, step)) and the frozen tokenizer
    logits, codes, mask = encoder_forward(cold_start)(s0, images[BATCHES[after]])
    assert int(mask.masked.sum()) == 16 * (16 - masking.num_kept(16, 0.8))
    ref_loss, ref_per_level, ref_acc = _np_ce(logits, codes, mask.masked)
    np.testing.assert_allclose(m["train/loss"], ref_loss, rtol=1e-5)
    jax_loss, _, _ = losses.masked_code_cross_entropy(logits, codes, mask.masked)
    np.testing.assert_allclose(m["train/loss"], float(jax_loss), rtol=1e-6)
    for lvl in range(config.quantizer.num_levels):
        np.testing.assert_allclose(m[f"train/encoder/ce_level{lvl}"], ref_per_level[lvl], rtol=1e-5)
        np.testing.assert_allclose(m[f"train/encoder/accuracy_level{lvl}"], ref_acc[lvl], rtol=1e-6)
    # the targets are not trivial: several codes per level in use
    assert all(len(np.unique(np.asarray(codes)[..., l])) > 3 for l in range(codes.shape[-1]))
    # a different mask key gives a different loss (the step really uses fold_in(rng, step))
    lg, cd, mk = encoder_forward(cold_start)(s0.replace(step=s0.step + 1), images[BATCHES[after]])
    assert not np.array_equal(np.asarray(mk.masked), np.asarray(mask.masked))
    assert not np.isclose(float(losses.masked_code_cross_entropy(lg, cd, mk.masked)[0]), m["train/loss"], rtol=1e-6)


def test_encoder_step_update_is_adamw_on_the_gradient_of_that_loss(single, images, config):
    """The first step of a phase: params <- AdamW(grad of the recomputed loss) from a fresh optimizer state."""
    s0, s1 = single["snaps"]["prepared0"], single["snaps"]["phase0_step0"]
    models = single["models"]

    def loss_of(enc_params, state):
        state = state.replace(params={**state.params, "encoder": enc_params})
        logits, codes, mask = _forward_encoder_loss(models, config, state, images[0], cold_start=True)
        return losses.masked_code_cross_entropy(logits, codes, mask.masked)[0]

    tx = single["txs"][0][0]

    @jax.jit
    def reference_step(state):
        params = state.params["encoder"]
        grads = jax.grad(loss_of)(params, state)
        updates, opt_state = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    expected, opt_state, grad_norm = host(reference_step(s0))
    np.testing.assert_allclose(grad_norm, single["metrics"]["phase0_step0"]["train/grad_norm"], rtol=1e-5)
    assert_close_leaves(expected, s1.params["encoder"], "encoder", rtol=1e-5, atol=1e-6)
    assert_close_leaves(opt_state, s1.opt_state, "opt_state", rtol=1e-4, atol=1e-9)


def test_encoder_loss_decreases_on_a_fixed_batch(single, images):
    """20 cold-start steps on one batch (fresh masks every step): the first 2 are the pipeline's, 18 more here."""
    step_fn, shardings = single["fns"][0]
    mesh = single["mesh"]
    state = to_device(single["snaps"]["phase0_step1"], shardings)
    batch = sharding.global_batch(mesh, {"input": images[BATCHES["phase0_step0"]]})
    history = [float(single["metrics"][f"phase0_step{i}"]["train/loss"]) for i in range(2)]
    for _ in range(18):
        state, m = step_fn(state, batch)
        history.append(float(m["train/loss"]))
    assert int(state.step) == 20
    assert np.all(np.isfinite(history))
    # 20 steps of a cosine schedule on 3 visible patches of 16: a clear, steady fall, ending below the loss of the
    # best input-independent predictor's upper bound log K (uniform over the 16 codes)
    assert np.mean(history[-4:]) < 0.95 * np.mean(history[:4]), history
    assert np.mean(history[-4:]) < np.log(16) - 0.05, history
    assert np.mean(history[10:]) < np.mean(history[:10]), history


# ---------------------------------------------------------------- tokenizer_step


def _forward_tokenizer(models, config, state, images):
    q = config.quantizer
    target = models.encoder.apply({"params": state.params["encoder"]["encoder"]}, images)[0][:, 1:]
    tok = state.params["tokenizer"]
    z = models.tokenizer.apply({"params": tok["tokenizer"]}, images)
    out = quantizer.quantize(
        state.codebooks, z, normalize_stage_inputs=q.normalize_stage_inputs, commitment_weight=q.commitment_weight
    )
    pred = models.estimator.apply({"params": tok["estimator"]}, out.z_q, models.patch_grid)
    ema = quantizer.ema_update(state.codebooks, out.stage_inputs, out.codes, decay=q.decay, renormalize=q.renormalize)
    return target, pred, out, ema


@pytest.fixture(scope="module")
def tokenizer_forward(single, config):
    return jax.jit(functools.partial(_forward_tokenizer, single["models"], config))


@pytest.mark.parametrize("before, after", [("prepared1", "phase1_step0"), ("phase1_step0", "phase1_step1")])
def test_tokenizer_step_trains_tokenizer_and_ema_only(single, images, config, tokenizer_forward, before, after):
    s0, s1 = single["snaps"][before], single["snaps"][after]
    m = single["metrics"][after]
    # frozen: E and D (the teacher), the cold-start tokenizer
    assert_trees_equal(s0.params["encoder"], s1.params["encoder"], "encoder")
    assert_trees_equal(s0.params["cold_start"], s1.params["cold_start"], "cold_start")
    # trained: every tokenizer and estimator leaf
    assert_all_leaves_differ(s0.params["tokenizer"], s1.params["tokenizer"], "tokenizer")
    assert int(s1.step) == int(s0.step) + 1
    assert bool(s1.codebooks.initialized)
    # the codebook change is one EMA step on the forward's stage inputs (codes read before the update)
    target, pred, out, ema = tokenizer_forward(s0, images[BATCHES[after]])
    if before != "prepared1":
        # (at the phase's first step the codebooks are the k-means centroids of this very batch, a near fixed point
        # of the EMA; from the second step on they move)
        assert not np.allclose(np.asarray(s1.codebooks.codes), np.asarray(s0.codebooks.codes))
    np.testing.assert_allclose(s1.codebooks.codes, np.asarray(ema.codes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1.codebooks.cluster_size, np.asarray(ema.cluster_size), rtol=1e-5, atol=1e-6)
    # with NumPy: used codes move towards the normalised mean of their stage inputs, unused ones stay
    u, c = np.asarray(out.stage_inputs, np.float64), np.asarray(out.codes)
    old = np.asarray(s0.codebooks.codes, np.float64)
    ref = old.copy()
    for lvl in range(c.shape[-1]):
        for k in np.unique(c[..., lvl]):
            mean = u[..., lvl, :][c[..., lvl] == k].mean(axis=0)
            ref[lvl, k] = 0.99 * old[lvl, k] + 0.01 * mean / np.linalg.norm(mean)
    np.testing.assert_allclose(s1.codebooks.codes, ref, rtol=1e-5, atol=1e-6)
    # the loss: (1 - cos)(TE(z_q), E(x)[:, 1:]) + L_cb
    t, p = np.asarray(target, np.float64), np.asarray(pred, np.float64)
    cos = ((t * p).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(p, axis=-1))).mean()
    np.testing.assert_allclose(m["train/tokenizer/cos"], 1 - cos, rtol=1e-5)
    np.testing.assert_allclose(m["train/tokenizer/codebook_loss"], float(out.loss), rtol=1e-5)
    np.testing.assert_allclose(m["train/loss"], 1 - cos + float(out.loss), rtol=1e-5)


# ---------------------------------------------------------------- prepare_codebooks


def test_prepare_codebooks_initialises_fresh_codebooks(single):
    snaps = single["snaps"]
    for before, after in (("init", "prepared0"), ("handed1", "prepared1")):
        assert not bool(snaps[before].codebooks.initialized)
        assert bool(snaps[after].codebooks.initialized)
        assert not np.allclose(snaps[before].codebooks.codes, snaps[after].codebooks.codes)
        # k-means on normalised stage inputs: level-0 codes are (near) unit vectors, unlike the uniform init
        np.testing.assert_allclose(np.linalg.norm(snaps[after].codebooks.codes[0], axis=-1), 1.0, atol=1e-4)
        assert_trees_equal(snaps[before].params, snaps[after].params, "params")
        assert_trees_equal(snaps[before].opt_state, snaps[after].opt_state, "opt_state")
        assert int(snaps[before].step) == int(snaps[after].step)


def test_prepare_codebooks_is_a_noop_on_initialised_codebooks(single, images, config):
    """A3b: a trained codebook is never k-means'd again, whichever tokenizer feeds prepare_codebooks (an encoder
    phase after the tokenizer phase, or a cold-start prepare on a restored state)."""
    trained = single["snaps"]["phase1_step1"]
    assert bool(trained.codebooks.initialized)
    prep = functools.partial(steps.prepare_codebooks, models=single["models"], config=config, restart=False)
    both = jax.jit(
        lambda st, b: (
            prep(st, b, cold_start=False),
            prep(st, b, cold_start=True),
            prep(st.replace(codebooks=st.codebooks.replace(initialized=jnp.asarray(False))), b, cold_start=False),
        )
    )
    warm, cold, fresh = host(both(trained, {"input": jnp.asarray(images[4])}))
    assert_trees_equal(trained, warm, "encoder-phase prepare")
    assert_trees_equal(trained, cold, "cold-start prepare")
    # control: the same call on the same codebooks marked uninitialised does re-fit them
    assert bool(fresh.codebooks.initialized)
    assert not np.allclose(fresh.codebooks.codes, trained.codebooks.codes)


def test_prepare_then_tokenizer_restart_uses_every_code(single, images, config):
    """The tokenizer phase's prepare = k-means + the one-shot dead-code restart (A4): on a batch of one image
    repeated (16 distinct vectors for 16 codes, so k-means leaves duplicate, dead codes), the restart replaces every
    dead code by a stage input of the batch; without it (the encoder phase's prepare) they stay dead."""
    start = single["snaps"]["handed1"]
    models = single["models"]
    batch = {"input": jnp.asarray(np.repeat(images[5][:1], 16, axis=0))}
    prep = functools.partial(steps.prepare_codebooks, models=models, config=config, cold_start=False)
    with_restart, without = host(
        jax.jit(lambda st, b: (prep(st, b, restart=True), prep(st, b, restart=False)))(start, batch)
    )
    # k-means on 16 distinct vectors for 16 codes leaves dead and duplicate codes; duplicates make quantisation ties,
    # so which of two equal codes a batch "uses" depends on rounding: the test checks the restart's contract on the
    # codes it replaced, not a recount of the ties
    dead = without.codebooks.cluster_size == 0
    assert np.any(dead), without.codebooks.cluster_size  # the scenario does leave dead codes
    replaced = np.any(with_restart.codebooks.codes != without.codebooks.codes, axis=-1)
    assert replaced.sum() >= max(1, dead.sum() // 2), (replaced, dead)
    assert np.all(with_restart.codebooks.cluster_size[replaced] == 1.0)
    np.testing.assert_array_equal(
        with_restart.codebooks.cluster_size[~replaced], without.codebooks.cluster_size[~replaced]
    )
    dead = replaced
    # level 0: every restarted code is one of the batch's stage inputs l2(z)
    z = np.asarray(
        jax.jit(models.tokenizer.apply)({"params": start.params["tokenizer"]["tokenizer"]}, batch["input"]), np.float64
    ).reshape(-1, config.quantizer.dim)
    u0 = z / np.linalg.norm(z, axis=-1, keepdims=True)
    for k in np.flatnonzero(dead[0]):
        assert np.min(np.abs(u0 - with_restart.codebooks.codes[0, k]).max(-1)) < 1e-5, k
    # and the pipeline's tokenizer-phase prepare left no code unused on its batch
    assert np.all(single["snaps"]["prepared1"].codebooks.cluster_size >= 1.0)


# ---------------------------------------------------------------- hand_over


def _poisoned_counters(state):
    return state.replace(nonfinite=jnp.asarray([5, 3], jnp.int32))


def _is_fresh_opt_state(opt_state, params):
    adam = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam) == 1
    assert int(adam[0].count) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves((adam[0].mu, adam[0].nu)))
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(params)


def test_hand_over_into_tokenizer_phase(single, config):
    models, plan, (tx, _) = single["models"], single["plan"], single["txs"][1]
    end = single["snaps"]["phase0_step1"]
    assert int(end.opt_state[0].count) == 2
    new = host(state_lib.hand_over(_poisoned_counters(jax.tree.map(jnp.asarray, end)), models, config, tx, plan[1]))
    assert_trees_equal(end.params, new.params, "params")  # everything kept, the tokenizer included
    assert not bool(new.codebooks.initialized)  # re-initialised: k-means on the next batch
    assert not np.allclose(new.codebooks.codes, end.codebooks.codes)
    assert not np.any(new.codebooks.cluster_size)
    _is_fresh_opt_state(new.opt_state, end.params["tokenizer"])
    np.testing.assert_array_equal(new.nonfinite, [5, 3])  # refused steps in a row count across the hand-over
    assert int(new.step) == int(end.step)
    np.testing.assert_array_equal(new.rng, end.rng)
    # the jitted/sharded variant the loop uses gives the same state
    at_start = jax.tree.map(jnp.asarray, end.replace(step=np.int32(plan[1].start_step)))
    assert_trees_equal(
        single["snaps"]["handed1"],
        host(state_lib.hand_over(at_start, models, config, tx, plan[1])),
        "hand_over_sharded vs hand_over",
    )


@pytest.mark.parametrize("warm", [True, False])
def test_hand_over_into_encoder_phase(single, config, warm):
    models, plan, (tx, _) = single["models"], single["plan"], single["txs"][2]
    end = single["snaps"]["phase1_step1"]
    c = config.copy_and_resolve_references()
    c.schedule.encoder_warm_start = warm
    new = host(jax.jit(lambda st: state_lib.hand_over(st, models, c, tx, plan[2]))(_poisoned_counters(end)))
    assert_trees_equal(end.codebooks, new.codebooks, "codebooks")  # trained codebooks kept (A3b)
    assert bool(new.codebooks.initialized)
    assert_trees_equal(end.params["tokenizer"], new.params["tokenizer"], "tokenizer")
    assert_trees_equal(end.params["cold_start"], new.params["cold_start"], "cold_start")
    if warm:  # A7: warm start from the previous E and D
        assert_trees_equal(end.params["encoder"], new.params["encoder"], "encoder")
    else:
        old_l, new_l = leaves_with_paths(end.params["encoder"]), leaves_with_paths(new.params["encoder"])
        assert [(p, x.shape) for p, x in old_l] == [(p, x.shape) for p, x in new_l]
        # every randomly initialised leaf (kernels, tokens) is new; biases/LN start from the same constants
        random_leaves = [p for p, x in new_l if np.std(x) > 0]
        assert len(random_leaves) >= 10
        for (p, x), (_, y) in zip(old_l, new_l):
            if np.std(y) > 0:
                assert not np.allclose(x, y), p
        # it is a fresh initialisation: same distribution as the start of the run, different draw
        init = single["snaps"]["init"].params["encoder"]
        for (p, x), (_, y) in zip(leaves_with_paths(init), new_l):
            if np.std(y) > 0:
                assert not np.array_equal(x, y), p
                np.testing.assert_allclose(np.std(y), np.std(x), rtol=0.5, err_msg=p)
            else:
                np.testing.assert_array_equal(x, y, err_msg=p)
    _is_fresh_opt_state(new.opt_state, end.params["encoder"])
    np.testing.assert_array_equal(new.nonfinite, [5, 3])  # refused steps in a row count across the hand-over
    assert int(new.step) == int(end.step)


def test_hand_over_is_deterministic_and_phase_dependent(single, config):
    models, plan, (tx, _) = single["models"], single["plan"], single["txs"][1]
    end = jax.tree.map(jnp.asarray, single["snaps"]["phase0_step1"])
    a = host(state_lib.hand_over(end, models, config, tx, plan[1]))
    b = host(state_lib.hand_over(end, models, config, tx, plan[1]))
    assert_trees_equal(a, b)
    later = schedule.parse_plan(PHASES + ("tokenizer:2",))[3]
    c = host(state_lib.hand_over(end, models, config, tx, later))
    assert not np.allclose(a.codebooks.codes, c.codebooks.codes)


# ---------------------------------------------------------------- non-finite guard


def _run_guard(single, phase_index, start, batches):
    step_fn, shardings = single["fns"][phase_index]
    mesh = single["mesh"]
    state = to_device(start, shardings)
    out = []
    for b in batches:
        state, m = step_fn(state, sharding.global_batch(mesh, {"input": b}))
        out.append((host(state), host(m)))
    return out


def _assert_skipped(before, after, what):
    assert_trees_equal(before.params, after.params, f"{what} params")
    assert_trees_equal(before.opt_state, after.opt_state, f"{what} opt_state")
    assert_trees_equal(before.codebooks, after.codebooks, f"{what} codebooks")
    assert int(after.step) == int(before.step) + 1


@pytest.mark.parametrize("phase_index, start", [(0, "phase0_step0"), (1, "phase1_step0")])
def test_nonfinite_batch_is_skipped_and_counted(single, images, phase_index, start):
    s0 = single["snaps"][start]
    bad = images[1].copy()
    bad[3, 5, 7, 1] = np.nan
    bad2 = images[2].copy()
    bad2[11, 0, 0, 0] = np.inf
    (s1, m1), (s2, m2), (s3, m3), (s4, m4) = _run_guard(single, phase_index, s0, [bad, bad2, images[3], bad])
    assert not np.isfinite(m1["train/loss"]) and m1["train/nonfinite"] == 1
    _assert_skipped(s0, s1, "1st bad")
    np.testing.assert_array_equal(s1.nonfinite, [1, 1])
    _assert_skipped(s1, s2, "2nd bad")
    np.testing.assert_array_equal(s2.nonfinite, [2, 2])
    # a finite step applies and resets the in-a-row counter, keeping the total
    assert np.isfinite(m3["train/loss"]) and m3["train/nonfinite"] == 0
    np.testing.assert_array_equal(s3.nonfinite, [2, 0])
    side = "encoder" if phase_index == 0 else "tokenizer"
    assert_all_leaves_differ(s2.params[side], s3.params[side], side)
    assert int(s3.step) == int(s0.step) + 3
    if phase_index == 1:
        assert not np.allclose(s2.codebooks.codes, s3.codebooks.codes)
    _assert_skipped(s3, s4, "3rd bad")
    np.testing.assert_array_equal(s4.nonfinite, [3, 1])


def test_nonfinite_params_are_skipped(single, images):
    s0 = single["snaps"]["phase0_step0"]
    enc = jax.tree.map(np.copy, s0.params["encoder"])
    enc["decoder"]["head"]["kernel"][0, 0] = np.inf
    poisoned = s0.replace(params={**s0.params, "encoder": enc})
    ((s1, m1),) = _run_guard(single, 0, poisoned, [images[1]])
    assert not np.isfinite(m1["train/loss"]) or not np.isfinite(m1["train/grad_norm"])
    _assert_skipped(poisoned, s1, "inf params")
    np.testing.assert_array_equal(s1.nonfinite, [1, 1])


def test_guarded_update_writes_the_new_state_in_place():
    """The guards judge the update from its norms alone, then apply it over the donated params and moments. XLA:CPU
    may still store each leaf's squared gradient and update for its reductions (temp 2x the params here), but never
    the new params and moments beside the old ones, as judging a materialised update did (temp 4x the params)."""
    params = {f"w{i}": jnp.full((512, 256), 0.5 + i, jnp.float32) for i in range(4)}  # 2 MiB of params
    tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.05)
    grads = jax.tree.map(lambda p: 1e-2 * jnp.sin(p), params)

    def update(params, opt_state, grads):
        ok, _, _, params, opt_state = steps.guarded_update(tx, grads, params, opt_state, jnp.float32(1.0), 10.0)
        return ok, params, opt_state

    fn = jax.jit(update, donate_argnums=(0, 1))
    memory = fn.lower(params, tx.init(params), grads).compile().memory_analysis()
    param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
    assert memory.temp_size_in_bytes < 3 * param_bytes, (memory.temp_size_in_bytes, param_bytes)
    ok, new, _ = fn(params, tx.init(params), grads)
    assert bool(ok) and not np.allclose(new["w0"], 0.5)


# ---------------------------------------------------------------- last: nothing above wrote into the shared snapshots


def test_host_snapshots_were_not_mutated(single):
    """Every test above reads the module's host snapshots; a donated step aliasing one of them would corrupt the
    others silently."""
    assert fingerprint(single["snaps"]) == single["fingerprint"]
