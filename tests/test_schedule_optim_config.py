"""The plan (schedule.py), the optimizers (optim.py, SPEC 3.2) and config validation (config.py).

- parse_plan: iterations, start/end steps, names; every malformed plan raises ValueError naming the bad entry.
- phase_of_step / total_steps over a whole plan.
- optim: warm-up + half-cycle cosine against a NumPy transcription of the authors' `lr_sched.adjust_learning_rate`;
  AdamW betas (0.9, 0.95) read back from the moments; no weight decay on 1-D params (one update with zero grads);
  two AdamW updates against a NumPy AdamW.
- config.validate: the digits and ImageNet recipes pass; each bad field raises ValueError naming that field.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bridle_jax import config as config_lib
from bridle_jax import config_checks, optim, resolve, schedule
from tests import tiny

load_recipe = tiny.load_config  # configs/<name>.py's get_config(), without ml_collections' config_flags


# ================================================================ schedule


def test_parse_plan_iterations_and_steps():
    rng = np.random.default_rng(11)
    steps = [int(s) for s in rng.integers(1, 1000, size=5)]
    kinds = ["encoder_cold_start", "tokenizer", "encoder", "tokenizer", "encoder"]
    plan = schedule.parse_plan(tuple(f"{k}:{s}" for k, s in zip(kinds, steps)))
    assert [p.index for p in plan] == [0, 1, 2, 3, 4]
    assert [p.kind for p in plan] == ["encoder", "tokenizer", "encoder", "tokenizer", "encoder"]
    assert [p.cold_start for p in plan] == [True, False, False, False, False]
    assert [p.iteration for p in plan] == [1, 2, 2, 3, 3]
    assert [p.steps for p in plan] == steps
    starts = np.concatenate([[0], np.cumsum(steps)[:-1]])
    assert [p.start_step for p in plan] == list(starts)
    assert [p.end_step for p in plan] == list(np.cumsum(steps))
    assert [p.name for p in plan] == [
        "iter1_encoder",
        "iter2_tokenizer",
        "iter2_encoder",
        "iter3_tokenizer",
        "iter3_encoder",
    ]
    assert schedule.total_steps(plan) == sum(steps)


def test_parse_plan_accepts_lists_and_a_single_phase():
    plan = schedule.parse_plan(["encoder_cold_start:7"])
    assert len(plan) == 1 and plan[0].cold_start and plan[0].iteration == 1 and plan[0].end_step == 7
    assert schedule.total_steps(plan) == 7


@pytest.mark.parametrize(
    "phases, bad_index",
    [
        (("encoder:5",), 0),  # must start with the cold start
        (("tokenizer:5",), 0),
        (("encoder_cold_start:0",), 0),  # steps >= 1
        (("encoder_cold_start:-3",), 0),
        (("encoder_cold_start:2.5",), 0),
        (("encoder_cold_start:abc",), 0),
        (("encoder_cold_start",), 0),  # no ':'
        (("encoder_cold_start:",), 0),
        (("bogus:5",), 0),
        (("encoder_cold_start:5", "encoder:5"), 1),  # encoder needs a tokenizer before it
        (("encoder_cold_start:5", "tokenizer:5", "tokenizer:5"), 2),  # tokenizer needs an encoder before it (teacher)
        (("encoder_cold_start:5", "encoder_cold_start:5"), 1),  # cold start only at the start
        (("encoder_cold_start:5", "tokenizer:5", "encoder_cold_start:5"), 2),
        (("encoder_cold_start:5", "tokenizer:5", "encoder:x"), 2),
        (("encoder_cold_start:5", "tokenizer:5", "Encoder:5"), 2),
    ],
)
def test_parse_plan_rejects_bad_entries_naming_them(phases, bad_index):
    with pytest.raises(ValueError) as err:
        schedule.parse_plan(phases)
    msg = str(err.value)
    assert f"entry {bad_index}" in msg, msg
    assert repr(phases[bad_index]) in msg, msg


@pytest.mark.parametrize("phases", [(), [], "encoder_cold_start:5", None])
def test_parse_plan_rejects_empty_or_string(phases):
    with pytest.raises((ValueError, TypeError)):
        schedule.parse_plan(phases)
    if phases is not None:
        with pytest.raises(ValueError):
            schedule.parse_plan(phases)


def test_phase_of_step():
    plan = schedule.parse_plan(("encoder_cold_start:3", "tokenizer:2", "encoder:4"))
    expected = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for step, index in enumerate(expected):
        assert schedule.phase_of_step(plan, step).index == index, step
    # once every step is done, the last phase
    for step in (9, 10, 1000):
        assert schedule.phase_of_step(plan, step).index == 2
    assert schedule.total_steps(plan) == 9


# ================================================================ optim


def np_lr(t, lr, warmup, total):
    """The authors' util/lr_sched.py (per iteration, min_lr = 0)."""
    if t < warmup:
        return lr * t / warmup
    if t >= total:
        return 0.0
    return lr * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize(
    "lr, warmup_fraction, num_steps",
    [(5e-4, 0.05, 400), (2e-4, 0.04, 1000), (1e-3, 0.1, 37), (3e-3, 0.0, 50), (1e-3, 0.5, 10)],
)
def test_learning_rate_schedule_matches_numpy(lr, warmup_fraction, num_steps):
    side = config_lib.base_config().optim.encoder
    side.lr, side.warmup_fraction = lr, warmup_fraction
    sched = optim.learning_rate_schedule(side, num_steps)
    warmup = int(round(warmup_fraction * num_steps))
    for t in range(num_steps + 5):
        np.testing.assert_allclose(
            float(sched(t)), np_lr(t, lr, warmup, num_steps), rtol=1e-5, atol=1e-10, err_msg=f"step {t}"
        )
    if warmup:
        assert float(sched(0)) == 0.0
        np.testing.assert_allclose(float(sched(warmup)), lr, rtol=1e-6)
    else:
        np.testing.assert_allclose(float(sched(0)), lr, rtol=1e-6)


def _toy_params(seed):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "dense": {"kernel": f(6, 5), "bias": f(5)},
        "norm": {"scale": f(5), "bias": f(5)},
        "patch": {"kernel": f(2, 2, 3, 4)},
        "cls": f(1, 1, 5),
    }


def _optim_config(lr, wd, warmup_fraction=0.0):
    c = config_lib.base_config().optim
    c.encoder.lr, c.encoder.weight_decay, c.encoder.warmup_fraction = lr, wd, warmup_fraction
    return c


def test_decay_mask_is_ndim_greater_than_one():
    mask = optim.decay_mask(_toy_params(0))
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
        "patch": {"kernel": True},
        "cls": True,
    }


def test_weight_decay_only_on_matrices_one_update_with_zero_grads():
    lr, wd = 1e-2, 0.3
    tx, sched = optim.make_optimizer(_optim_config(lr, wd), "encoder", 100)
    params = _toy_params(1)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(float(sched(0)), lr, rtol=1e-6)
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        q = new
        for k in path:
            q = q[k.key]
        p, q = np.asarray(p), np.asarray(q)
        if p.ndim > 1:  # decoupled decay: p <- p - lr * wd * p
            np.testing.assert_allclose(q, p * (1 - lr * wd), rtol=1e-6, err_msg=str(path))
            assert not np.array_equal(q, p)
        else:
            np.testing.assert_array_equal(q, p, err_msg=str(path))


def test_adamw_betas_and_two_updates_against_numpy():
    c = _optim_config(lr=1e-2, wd=0.1)
    assert (c.b1, c.b2) == (0.9, 0.95)
    assert (config_lib.base_config().optim.b1, config_lib.base_config().optim.b2) == (0.9, 0.95)
    tx, sched = optim.make_optimizer(c, "encoder", 20)
    params = _toy_params(2)
    state = tx.init(params)
    rng = np.random.default_rng(3)
    np_p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    np_m = jax.tree.map(np.zeros_like, np_p)
    np_v = jax.tree.map(np.zeros_like, np_p)
    for t in range(2):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        lr_t = np_lr(t, 1e-2, 0, 20)

        def np_step(p, m, v, g):
            g = np.asarray(g, np.float64)
            m = 0.9 * m + 0.1 * g
            v = 0.95 * v + 0.05 * g * g
            mh, vh = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.95 ** (t + 1))
            u = mh / (np.sqrt(vh) + c.eps) + (0.1 * p if p.ndim > 1 else 0.0)
            return p - lr_t * u, m, v

        out = jax.tree.map(np_step, np_p, np_m, np_v, grads)
        np_p = jax.tree.map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))
        np_m = jax.tree.map(lambda o: o[1], out, is_leaf=lambda x: isinstance(x, tuple))
        np_v = jax.tree.map(lambda o: o[2], out, is_leaf=lambda x: isinstance(x, tuple))
        if t == 0:  # the first moments read back: mu = (1 - b1) g, nu = (1 - b2) g^2
            adam = [
                s
                for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)
            ]
            assert len(adam) == 1
            for mu, nu, g in zip(jax.tree.leaves(adam[0].mu), jax.tree.leaves(adam[0].nu), jax.tree.leaves(grads)):
                np.testing.assert_allclose(mu, 0.1 * np.asarray(g), rtol=1e-6)
                np.testing.assert_allclose(nu, 0.05 * np.asarray(g) ** 2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(np_p)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


def test_each_side_uses_its_own_lr_and_weight_decay():
    c = config_lib.base_config().optim
    c.encoder.lr, c.tokenizer.lr = 4e-3, 7e-4
    c.encoder.warmup_fraction = c.tokenizer.warmup_fraction = 0.0
    for side, lr in (("encoder", 4e-3), ("tokenizer", 7e-4)):
        _, sched = optim.make_optimizer(c, side, 10)
        np.testing.assert_allclose(float(sched(0)), lr, rtol=1e-6)


# ================================================================ config.validate


@pytest.mark.parametrize("name", ["digits", "imagenet"])
def test_recipes_validate(name):
    c = load_recipe(name)
    config_checks.validate(c)
    if name == "imagenet":  # SPEC 3.3 image recipe, in epochs: resolved with ImageNet's 1,281,167 train images
        assert c.model.variant == "B/16" and c.batch_size == 1024 and c.masking.ratio == 0.8
        assert (c.optim.encoder.lr, c.optim.tokenizer.lr) == (5e-4, 2e-4) and c.optim.tuned_batch_size == 1024
        assert (c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim) == (4, 256, 256)
        assert c.schedule.phases == ("encoder_cold_start:200ep", "tokenizer:50ep", "encoder:200ep")
        c, _ = resolve.pretraining(c, lambda: 1_281_167)
        steps_per_epoch = 1_281_167 // 1024
    plan = schedule.parse_plan(c.schedule.phases)
    assert [p.kind for p in plan] == ["encoder", "tokenizer", "encoder"] and plan[0].cold_start
    if name == "imagenet":
        assert [p.steps for p in plan] == [200 * steps_per_epoch, 50 * steps_per_epoch, 200 * steps_per_epoch]


def test_base_config_validates_and_has_spec_values():
    c = config_lib.base_config()
    config_checks.validate(c)
    assert c.masking.ratio == 0.8
    assert (c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim) == (4, 256, 256)
    assert c.quantizer.decay == 0.99 and c.quantizer.commitment_weight == 0.25
    assert c.optim.encoder.weight_decay == 1e-4


def _set(c, dotted, value):
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value


BAD_FIELDS = [
    ("modality", "audio"),
    ("model.variant", "X/16"),
    ("model.variant", "B16"),
    ("model.variant", "B/0"),
    ("model.tokenizer_variant", "Q/4"),
    ("model.dtype", "float16"),
    ("model.decoder_width", 0),
    ("model.decoder_depth", 0),
    ("model.decoder_heads", 0),
    ("model.estimator_depth", 0),
    ("quantizer.num_levels", 0),
    ("quantizer.codebook_size", 1),
    ("quantizer.dim", 0),
    ("quantizer.decay", 1.0),
    ("quantizer.decay", 0.0),
    ("quantizer.commitment_weight", -0.1),
    ("masking.ratio", 1.0),
    ("masking.ratio", -0.1),
    ("schedule.phases", ("encoder:10",)),
    ("schedule.phases", ("encoder_cold_start:10", "encoder:10")),
    ("schedule.phases", ("encoder_cold_start:0",)),
    ("schedule.phases", ()),
    ("batch_size", 0),
    ("optim.encoder.lr", 0.0),
    ("optim.tokenizer.lr", -1e-3),
    ("optim.encoder.warmup_fraction", 1.0),
    ("optim.tokenizer.warmup_fraction", -0.1),
    ("optim.encoder.weight_decay", -1e-4),
    ("optim.max_consecutive_nonfinite", 0),
    ("mesh.data", 0),
    ("mesh.fsdp", 0),
    ("mesh.data", -2),
    ("checkpoint.every_steps", 0),
    ("checkpoint.max_to_keep", 0),
    ("log_every_steps", 0),
]


@pytest.mark.parametrize("recipe", ["digits", "imagenet"])
@pytest.mark.parametrize("field, value", BAD_FIELDS)
def test_bad_field_raises_naming_it(recipe, field, value):
    c = load_recipe(recipe)
    _set(c, field, value)
    with pytest.raises(ValueError) as err:
        config_checks.validate(c)
    assert f"config.{field}" in str(err.value), str(err.value)


@pytest.mark.parametrize("recipe, size", [("digits", 30), ("digits", 18), ("imagenet", 200), ("imagenet", 225)])
def test_image_size_not_divisible_by_patch(recipe, size):
    c = load_recipe(recipe)
    c.data.image_size = size
    with pytest.raises(ValueError) as err:
        config_checks.validate(c)
    assert "config.data.image_size" in str(err.value)


def test_decoder_width_not_divisible_by_heads():
    c = load_recipe("digits")
    c.model.decoder_width, c.model.decoder_heads = 30, 4
    with pytest.raises(ValueError) as err:
        config_checks.validate(c)
    assert "config.model.decoder_width" in str(err.value)


def test_validate_accepts_reasonable_edits():
    c = load_recipe("digits")
    c.quantizer.num_levels, c.quantizer.codebook_size = 1, 1024  # the VQ baseline
    c.masking.ratio = 0.5
    c.model.dtype = "bfloat16"
    c.model.tokenizer_variant = "mu/4"
    c.mesh.data, c.mesh.fsdp = 2, -1
    c.schedule.phases = ("encoder_cold_start:3", "tokenizer:1", "encoder:2", "tokenizer:1", "encoder:2")
    config_checks.validate(c)


# Fields that would otherwise reach the compiled code unchecked.


def test_image_size_zero_is_rejected():
    c = load_recipe("digits")
    c.data.image_size = 0
    with pytest.raises(ValueError, match="config.data.image_size"):
        config_checks.validate(c)


def test_kmeans_iters_zero_is_rejected():
    c = load_recipe("digits")
    c.quantizer.kmeans_iters = 0
    with pytest.raises(ValueError, match="config.quantizer.kmeans_iters"):
        config_checks.validate(c)


def test_tokenizer_patch_mismatch_is_rejected_by_validate():
    c = load_recipe("digits")
    c.model.tokenizer_variant = "mu/8"
    with pytest.raises(ValueError, match="config.model.tokenizer_variant"):
        config_checks.validate(c)
