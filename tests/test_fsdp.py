"""FSDP through logical axis names (sharding.py, state.py): the 2 data x 4 fsdp mesh computes what pure data
parallelism (8 x 1) computes, while each device holds a quarter of every kernel and of its Adam moments.

- 2 cold-start encoder steps, the sharded hand-over and 2 tokenizer steps on both meshes, the state created born
  sharded on its mesh (same seed): the initial states agree exactly; every later state and every metric within
  float tolerance.
- Per-device bytes (`addressable_shards[0].data.nbytes`) of every transformer kernel, and of its Adam moments, are
  1/4 of the full array under fsdp=4; biases, LayerNorms and the codebooks stay whole on every device.
- The residual stream is constrained to batch-split, width-whole activations in the compiled step.
- Rule table validation, the divisibility fallback (a dimension fsdp does not divide is replicated), plain init trees
  outside `logical_params()`.
"""

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from bridle_jax import config_checks, optim, quantizer, schedule, sharding, steps
from bridle_jax import state as state_lib
from bridle_jax.models.bridle import build_models
from tests import tiny

SEED = 5
BIG_KERNELS = ("qkv", "proj", "fc1", "fc2")


def tiny_config(data, fsdp):
    c = tiny.tiny_config()
    c.schedule.phases = ("encoder_cold_start:10", "tokenizer:10")
    c.optim.encoder.warmup_fraction = c.optim.tokenizer.warmup_fraction = 0.0
    c.optim.encoder.lr = c.optim.tokenizer.lr = 2e-3
    c.optim.eps = 1e-4  # see tests/test_steps.py: keeps Adam's update smooth in gradients that are ~0 up to noise
    c.mesh.data, c.mesh.fsdp = data, fsdp
    config_checks.validate(c)
    return c


def host(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def fixed_codebooks(config):
    """Trained-looking codebooks without the k-means compile (tests/test_steps.py covers prepare on this mesh):
    unit-norm level-0 codes, smaller level-1 residual codes."""
    q = config.quantizer
    rng = np.random.default_rng(21)
    codes = rng.normal(size=(q.num_levels, q.codebook_size, q.dim)).astype(np.float32)
    codes[0] /= np.linalg.norm(codes[0], axis=-1, keepdims=True)
    codes[1:] *= 0.3 / np.sqrt(q.dim)
    sizes = np.ones((q.num_levels, q.codebook_size), np.float32)
    return quantizer.CodebookState(codes=codes, cluster_size=sizes, initialized=np.asarray(True))


def run(data, fsdp, batches):
    """As train.py: the state created sharded on the mesh, 2 cold-start encoder steps, the sharded hand-over, 2
    tokenizer steps (fixed codebooks in both phases)."""
    config = tiny_config(data, fsdp)
    mesh = sharding.make_mesh(config.mesh)
    models = build_models(config)
    plan = schedule.parse_plan(config.schedule.phases)
    out = {"snaps": {}, "metrics": {}, "states": {}, "steps": {}, "mesh": mesh}
    for phase in plan:
        tx, lr = optim.make_optimizer(config.optim, phase.kind, phase.steps)
        if phase.index == 0:
            state = state_lib.create_sharded(models, config, tx, phase, SEED, mesh)
        else:
            state = state.replace(step=jax.device_put(np.int32(phase.start_step), state.step.sharding))
            state = state_lib.hand_over_sharded(state, models, config, tx, phase, mesh)
        state = state.replace(codebooks=jax.device_put(fixed_codebooks(config), sharding.replicated(mesh)))
        out["snaps"][f"init{phase.index}"] = host(state)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        kw = dict(models=models, config=config, state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
        step_fn = steps.jit_step(phase, tx=tx, lr_schedule=lr, **kw)
        for i in range(2):
            batch = sharding.global_batch(mesh, {"input": batches[phase.index * 2 + i]})
            if i == 1:
                # a copy (the step donates its state) to inspect the layout and lower the step with
                out["states"][phase.index] = jax.device_put(state, shardings, may_alias=False)
                out["steps"][phase.index] = (step_fn, batch)
            state, metrics = step_fn(state, batch)
            out["snaps"][f"phase{phase.index}_step{i}"] = host(state)
            out["metrics"][f"phase{phase.index}_step{i}"] = host(metrics)
    return out


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(11)
    return [rng.normal(size=(16, 16, 16, 3)).astype(np.float32) for _ in range(4)]


@pytest.fixture(scope="module")
def data_parallel(batches):
    return run(8, 1, batches)


@pytest.fixture(scope="module")
def fsdp(batches):
    return run(2, 4, batches)


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_fsdp_steps_equal_data_parallel(fsdp, data_parallel):
    assert fsdp["mesh"].shape == {"data": 2, "fsdp": 4} and data_parallel["mesh"].shape == {"data": 8, "fsdp": 1}
    assert set(fsdp["snaps"]) == set(data_parallel["snaps"]) == {
        "init0", "phase0_step0", "phase0_step1", "init1", "phase1_step0", "phase1_step1"}  # fmt: skip
    for name, ref in data_parallel["snaps"].items():
        got = _leaves(fsdp["snaps"][name])
        want = _leaves(ref)
        assert [p for p, _ in got] == [p for p, _ in want], name
        for (p, x), (_, y) in zip(got, want):
            if name == "init0" or not np.issubdtype(y.dtype, np.floating):
                np.testing.assert_array_equal(x, y, err_msg=f"{name}{p}")  # born sharded: the same draw, exactly
            else:
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{name}{p}")
    for name, ref in data_parallel["metrics"].items():
        assert fsdp["metrics"][name].keys() == ref.keys()
        for k in ref:
            np.testing.assert_allclose(fsdp["metrics"][name][k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    # the steps did train (otherwise equality would be trivial)
    a, b = data_parallel["snaps"]["init0"], data_parallel["snaps"]["phase0_step1"]
    k0 = a.params["encoder"]["encoder"]["transformer"]["block_0"]["fc1"]["kernel"]
    assert not np.allclose(k0, b.params["encoder"]["encoder"]["transformer"]["block_0"]["fc1"]["kernel"])
    assert not np.allclose(
        data_parallel["snaps"]["init1"].params["tokenizer"]["estimator"]["head"]["kernel"],
        data_parallel["snaps"]["phase1_step1"].params["tokenizer"]["estimator"]["head"]["kernel"],
    )
    assert all(np.isfinite(m["train/loss"]) and m["train/nonfinite"] == 0 for m in data_parallel["metrics"].values())


def _shard_fraction(x):
    return x.addressable_shards[0].data.nbytes / x.nbytes


def test_kernels_and_adam_moments_are_split_four_ways(fsdp, data_parallel):
    for phase, side, modules in ((0, "encoder", ("encoder", "decoder")), (1, "tokenizer", ("tokenizer", "estimator"))):
        state = fsdp["states"][phase]
        mu = state.opt_state[0].mu
        checked = 0
        for module in modules:
            params = state.params[side][module]
            blocks = (params["vit"] if module == "tokenizer" else params)["transformer"]
            for name, block in blocks.items():
                kernels = {"qkv": block["attn"]["qkv"], "proj": block["attn"]["proj"], "fc1": block["fc1"],
                           "fc2": block["fc2"]}  # fmt: skip
                for kname, layer in kernels.items():
                    where = f"{side}/{module}/{name}/{kname}"
                    assert _shard_fraction(layer["kernel"]) == 0.25, where
                    assert "fsdp" in tuple(layer["kernel"].sharding.spec), where
                    assert _shard_fraction(layer["bias"]) == 1.0, where  # vectors stay whole
                    checked += 1
                assert _shard_fraction(block["norm1"]["scale"]) == 1.0
            # the Adam moments mirror the parameters' layout
            mu_module = mu[module]
            mu_blocks = (mu_module["vit"] if module == "tokenizer" else mu_module)["transformer"]
            for block in mu_blocks.values():
                assert _shard_fraction(block["fc1"]["kernel"]) == 0.25
                assert _shard_fraction(block["attn"]["qkv"]["kernel"]) == 0.25
        assert checked == 4 * 3  # 2 + 1 blocks of 4 kernels per side
        # codebooks replicated: every device holds the whole codebook
        assert _shard_fraction(state.codebooks.codes) == 1.0
        assert all(axes is None for axes in state.codebooks.codes.sharding.spec)
        # the whole trained side: per-device bytes ~ 1/4 (kernels dominate), vs everything on every device at fsdp=1
        side_leaves = jax.tree.leaves(state.params[side])
        frac = sum(x.addressable_shards[0].data.nbytes for x in side_leaves) / sum(x.nbytes for x in side_leaves)
        assert 0.25 < frac < 0.32, frac
        dp_leaves = jax.tree.leaves(data_parallel["states"][phase].params[side])
        assert all(_shard_fraction(x) == 1.0 for x in dp_leaves)


def test_residual_stream_is_split_by_example_not_width(fsdp):
    step_fn, batch = fsdp["steps"][0]
    text = step_fn.lower(fsdp["states"][0], batch).as_text()
    # [B, N, 64] residual activations: batch over (data, fsdp), tokens and width whole
    assert text.count('sharding_constraint') >= 4
    assert '[{"data", "fsdp"}, {}, {}]' in text


def test_init_is_plain_and_constraints_apply_only_under_the_rules(data_parallel, batches):
    config = tiny_config(2, 4)
    models = build_models(config)
    k_params = jax.random.split(jax.random.PRNGKey(SEED), 3)[0]  # state.create's parameter key
    init = data_parallel["snaps"]["init0"].params
    boxes = jax.tree.leaves(init, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert not any(isinstance(x, nn.LogicallyPartitioned) for x in boxes)
    boxed = jax.eval_shape(lambda: models.init_params(k_params, boxed=True))
    names = nn.get_partition_spec(boxed)
    assert names["encoder"]["encoder"]["transformer"]["block_0"]["fc1"]["kernel"] == P("embed", "mlp")
    assert names["encoder"]["decoder"]["head"]["kernel"] == P("embed", "vocab")
    assert names["encoder"]["encoder"]["norm"]["scale"] == P()
    assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(init)
    # same values boxed or not (the boxes only carry names): the estimator's init, boxed, vs the state's
    est = models.estimator
    z = jax.numpy.zeros((1, models.num_patches, config.quantizer.dim))
    k_est = jax.random.split(k_params, 5)[3]
    with sharding.logical_params():
        boxed_est = jax.jit(lambda k: est.init(k, z, models.patch_grid)["params"])(k_est)
    assert isinstance(boxed_est["head"]["kernel"], nn.LogicallyPartitioned)
    for (p, x), (_, y) in zip(_leaves(nn.meta.unbox(boxed_est)), _leaves(init["tokenizer"]["estimator"])):
        np.testing.assert_array_equal(x, y, err_msg=p)
    # the residual-stream constraints exist only under the rules (so e.g. the probe's feature extraction, which
    # applies the encoder without them, runs on any input placement)
    apply = lambda p, x: models.encoder.apply({"params": p}, x)
    args = (init["encoder"]["encoder"], batches[0][:8])
    assert "sharding_constraint" not in str(jax.make_jaxpr(apply)(*args))
    with sharding.activation_rules(data_parallel["mesh"], sharding.DEFAULT_RULES):
        assert str(jax.make_jaxpr(apply)(*args)).count("sharding_constraint") == 1 + 2  # before and after each block


def test_dimensions_fsdp_does_not_divide_fall_back_to_replication():
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 8}))
    assert sharding.fit_spec(P("fsdp", None), (64, 12), mesh) == P("fsdp", None)
    assert sharding.fit_spec(P("fsdp", None), (36, 12), mesh) == P(None, None)
    assert sharding.fit_spec(P(None, ("data", "fsdp")), (3, 16), mesh) == P(None, ("data", "fsdp"))
    # a model whose label predictor is 36 wide (not a multiple of 8): its kernels replicate, the encoder's split
    config = tiny_config(1, 8)
    config.model.decoder_width, config.model.decoder_heads = 36, 2
    models = build_models(config)
    plan = schedule.parse_plan(config.schedule.phases)
    tx, _ = optim.make_optimizer(config.optim, "encoder", 10)
    shardings = state_lib.shardings_for(models, config, tx, plan[0], mesh)
    enc = shardings.params["encoder"]
    assert enc["encoder"]["transformer"]["block_0"]["fc1"]["kernel"].spec == P("fsdp", None)
    assert enc["decoder"]["transformer"]["block_0"]["fc1"]["kernel"].spec == P(None, None)  # 36 % 8 != 0
    assert enc["decoder"]["head"]["kernel"].spec == P(None, None)
    mu = shardings.opt_state[0].mu
    assert mu["encoder"]["transformer"]["block_0"]["fc1"]["kernel"].spec == P("fsdp", None)
    boxed = jax.eval_shape(lambda: models.init_params(jax.random.PRNGKey(0), boxed=True))
    lines = sharding.describe(mesh, boxed, sharding.logical_rules(config.mesh))
    assert any("['decoder']['head']['kernel']" in line and "replicated" in line for line in lines)
    assert not any("['encoder']['transformer']['block_0']['fc1']" in line and "replicated" in line for line in lines)


def test_rules_are_validated_and_read_back_from_json():
    c = tiny_config(8, 1)
    assert sharding.logical_rules(c.mesh) == sharding.DEFAULT_RULES
    # a config read back from config.json has lists
    as_json = ml_collections.ConfigDict(
        {"rules": [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])] for r in sharding.DEFAULT_RULES]}
    )
    assert sharding.logical_rules(as_json) == sharding.DEFAULT_RULES
    assert sharding.logical_rules(ml_collections.ConfigDict({"data": 1})) == sharding.DEFAULT_RULES
    for rules, match in [
        ((("batch", ("data", "fsdp")), ("embed", "model")), r"rules\[1\] \('embed'\).*mesh axis"),
        ((("batch", "data"), ("batch", "fsdp")), r"rules\[1\]: logical name 'batch' appears twice"),
        ((("embed",),), r"rules\[0\]: expected a pair"),
        ((("batch", ("data", "data")),), r"rules\[0\] \('batch'\): mesh axes repeat"),
    ]:
        bad = tiny_config(8, 1)
        bad.mesh.rules = rules
        with pytest.raises(ValueError, match=match):
            config_checks.validate(bad)


def test_batch_must_split_into_micro_batches_times_shards():
    c = tiny_config(2, 4)
    c.optim.accumulation_steps = 4  # 16 examples, 4 micro-batches of 4 < 8 shards
    with pytest.raises(ValueError, match=r"config.batch_size: expected a multiple of optim.accumulation_steps=4 x 8"):
        config_checks.validate(c)
    c.optim.accumulation_steps = 0
    with pytest.raises(ValueError, match="optim.accumulation_steps: expected an integer >= 1"):
        config_checks.validate(c)
    # a -1 mesh axis is only known at run time: jit_step checks the real mesh
    c.mesh.data, c.optim.accumulation_steps = -1, 4
    config_checks.validate(c)
    mesh = sharding.make_mesh(c.mesh)
    with pytest.raises(
        ValueError,
        match=r"config.batch_size: expected a multiple of config.optim.accumulation_steps"
        r"=4 x 8 batch shards \(mesh data=2 x fsdp=4\), got 16",
    ):
        sharding.check_batch_split(c.batch_size, mesh, 4)
    models = build_models(c)
    phase = schedule.parse_plan(c.schedule.phases)[0]
    tx, lr = optim.make_optimizer(c.optim, "encoder", 10)
    with pytest.raises(ValueError, match="accumulation_steps=4 x 8 batch shards"):
        steps.jit_step(
            phase,
            models=models,
            config=c,
            tx=tx,
            lr_schedule=lr,
            state_shardings=None,
            batch_sharding=sharding.batch_sharding(mesh),
        )
    with pytest.raises(ValueError, match="accumulation_steps=4 x 8 batch shards"):
        sharding.local_batch_size(16, mesh, 4)
    assert sharding.local_batch_size(32, mesh, 4) == 32
