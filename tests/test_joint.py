"""The joint phase ("joint:N", the authors' jointBRIDLE, SPEC 3.5), against references built outside it.

- the plan: where "joint" may stand, its iterations and names; which steps train the tokenizer, against a replay of
  the authors' loop (`data_iter_step % tokenizer_train_step == 0`, the index restarting every epoch);
- one joint step against the two phase steps (which test_parity pins to the authors' code), on 8 fake devices
  (data 2 x fsdp 4). With a "recording" optimizer (update = -gradient) the step's changes are its gradients:
  * a tokenizer step: E+D change exactly as `encoder_step` would, T+TE as `tokenizer_step` would, times the ratio;
    the codebooks take the tokenizer step's EMA; the loss is L_enc + ratio * L_tok;
  * any other step: E+D as `encoder_step`; T+TE, the codebooks and the cold-start projection unchanged to the bit;
  * gradient accumulation (2 micro-batches) gives the same step; a NaN batch changes nothing but the counters;
- one AdamW state over both parts: after a tokenizer step, a step without L_tok still moves T by its decayed
  moments and weight decay, as a NumPy AdamW with a zero gradient computes (the authors' PyTorch 1.7 `zero_grad`);
- end to end ("joint:6", "tokenizer:3", "encoder:4" with FSDP): every phase runs, the joint phase keeps and probes
  its encoder, logs both losses and codebook health without NaN, and a resume in the middle of the joint phase is
  bit-identical.
"""

import json
import os

import jax
import numpy as np
import optax
import pytest

import bridle_jax
from bridle_jax import encoder_store, optim, schedule, sharding, steps, train
from bridle_jax import state as state_lib
from bridle_jax.config_checks import validate
from bridle_jax.models.bridle import build_models
from tests import tiny

RATIO = 0.2
EVERY = 4


# ---------------------------------------------------------------- the plan


def test_joint_may_start_a_plan_or_follow_any_phase_and_teaches_or_targets_the_next():
    plan = schedule.parse_plan(("joint:10", "tokenizer:3", "encoder:4", "joint:5", "encoder:2"))
    assert [(p.kind, p.iteration, p.name) for p in plan] == [
        ("joint", 1, "iter1_joint"),
        ("tokenizer", 2, "iter2_tokenizer"),
        ("encoder", 2, "iter2_encoder"),
        ("joint", 3, "iter3_joint"),
        ("encoder", 3, "iter3_encoder"),
    ]
    assert [p.start_step for p in plan] == [0, 10, 13, 17, 22]
    joint = plan[0]
    assert joint.trains_encoder and joint.fresh_codebooks and joint.restarts_codes and not joint.cold_start
    assert [p.name for p in schedule.parse_plan(("encoder_cold_start:2", "joint:3"))] == [
        "iter1_encoder",
        "iter2_joint",
    ]
    for bad, reason in [
        (("tokenizer:3", "joint:3"), "starts with encoder_cold_start or joint"),
        (("joint:3", "encoder_cold_start:3"), "comes first"),
        (("joint:0",), "positive length"),
    ]:
        with pytest.raises(ValueError, match=reason):
            schedule.parse_plan(bad)
    schedule.check_plan(("joint:200ep",))


def _authors_flags(epochs: int, steps_per_epoch: int, every: int) -> list[bool]:
    """The authors' train_one_epoch: `data_iter_step` enumerates the batches of each epoch from 0."""
    return [data_iter_step % every == 0 for _ in range(epochs) for data_iter_step in range(steps_per_epoch)]


@pytest.mark.parametrize("steps_per_epoch", [7, 8, 10])
def test_the_tokenizer_steps_follow_the_authors_loop_epoch_by_epoch(steps_per_epoch):
    phase = schedule.parse_plan(("encoder_cold_start:5", "joint:40"))[1]  # starts at global step 5
    flags = [bool(schedule.joint_tokenizer_step(phase, s, EVERY, steps_per_epoch)) for s in range(5, 5 + 40)]
    expected = _authors_flags(-(-40 // steps_per_epoch), steps_per_epoch, EVERY)[:40]
    assert flags == expected
    # a plan in steps counts from the phase's start
    assert [bool(schedule.joint_tokenizer_step(phase, s, 3, None)) for s in range(5, 12)] == [1, 0, 0, 1, 0, 0, 1]


def test_the_config_checks_the_joint_settings():
    c = tiny.tiny_config()
    c.schedule.phases = ("joint:8",)
    validate(c)
    for field, value, match in [
        ("tokenizer_every", 0, "joint.tokenizer_every"),
        ("tokenizer_every", -4, "joint.tokenizer_every"),
        ("tokenizer_loss_ratio", 0.0, "joint.tokenizer_loss_ratio"),
    ]:
        bad = c.copy_and_resolve_references()
        bad.joint[field] = value
        with pytest.raises(ValueError, match=match):
            validate(bad)
    bad = c.copy_and_resolve_references()
    bad.optim.joint.lr = -1.0
    with pytest.raises(ValueError, match="optim.joint.lr"):
        validate(bad)


# ---------------------------------------------------------------- one step against the two phase steps


def _step_config(accumulation: int = 1):
    c = tiny.tiny_config()
    c.schedule.phases = ("joint:8",)
    c.joint.tokenizer_every, c.joint.tokenizer_loss_ratio = EVERY, RATIO
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.optim.max_update_ratio = 1e9  # the recording optimizer's "update" is a raw gradient
    c.optim.accumulation_steps = accumulation
    validate(c)
    return c


def recording_tx():
    """update = -gradient, with an optimizer count (the lr metric reads one) and no per-parameter state, so the
    same optimizer state serves every phase kind."""
    return optax.chain(optax.scale(-1.0), optax.scale_by_schedule(lambda count: 1.0))


def host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def _phase(kind, cold_start=False):
    return schedule.Phase(index=0, kind=kind, cold_start=cold_start, steps=8, iteration=1, start_step=0)


class _Runner:
    """Runs any phase's jitted step (the loop's `steps.jit_step`) from a host copy of a state."""

    def __init__(self, config, tx):
        self.config, self.tx = config, tx
        self.models = build_models(config)
        self.mesh = sharding.make_mesh(config.mesh)
        self.shardings = state_lib.shardings_for(self.models, config, tx, _phase("joint"), self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self._steps = {}

    def initial(self, images):
        """A joint phase's first state, its codebooks prepared (k-means + restart) on `images`."""
        state = state_lib.create_sharded(self.models, self.config, self.tx, _phase("joint"), 3, self.mesh)
        prepare = steps.jit_prepare_codebooks(_phase("joint"), **self._kw())
        return host(prepare(state, self.batch(images)))

    def batch(self, images):
        return sharding.global_batch(self.mesh, {"input": images})

    def _kw(self):
        return dict(
            models=self.models,
            config=self.config,
            state_shardings=self.shardings,
            batch_sharding=self.batch_sharding,
        )

    def step(self, kind, snapshot, images, step=None):
        if step is not None:
            snapshot = snapshot.replace(step=np.int32(step))
        if kind not in self._steps:  # one jitted step per kind (each call of jit_step traces anew)
            self._steps[kind] = steps.jit_step(_phase(kind), tx=self.tx, lr_schedule=lambda count: 1.0, **self._kw())
        fn = self._steps[kind]
        state, metrics = fn(jax.device_put(snapshot, self.shardings, may_alias=False), self.batch(images))
        return host(state), host(metrics)


def _images(seed):
    return np.random.default_rng(seed).normal(size=(16, 16, 16, 3)).astype(np.float32)


def _delta(new, old):
    return jax.tree.map(lambda a, b: a - b, new, old)


def _assert_close(a, b, what, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], what
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _assert_equal(a, b, what):
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def recorded():
    runner = _Runner(_step_config(), recording_tx())
    start = runner.initial(_images(0))
    out = {"runner": runner, "start": start}
    # step 0 trains the tokenizer, step 1 does not
    out["joint0"] = runner.step("joint", start, _images(1))
    out["encoder0"] = runner.step("encoder", start, _images(1))
    out["tokenizer0"] = runner.step("tokenizer", start, _images(1))
    after = out["joint0"][0]
    out["joint1"] = runner.step("joint", after, _images(2))
    out["encoder1"] = runner.step("encoder", after, _images(2))
    return out


def test_a_tokenizer_step_is_the_encoder_step_plus_ratio_times_the_tokenizer_step(recorded):
    start = recorded["start"]
    (joint, jm), (enc, em), (tok, tm) = recorded["joint0"], recorded["encoder0"], recorded["tokenizer0"]
    assert int(jm["train/joint/tokenizer_step"]) == 1
    # E+D: the encoder step's gradients (same mask draw, same codes)
    _assert_close(
        _delta(joint.params["encoder"], start.params["encoder"]),
        _delta(enc.params["encoder"], start.params["encoder"]),
        "E+D",
    )
    # T+TE: ratio x the tokenizer step's gradients
    tok_delta = jax.tree.map(lambda d: RATIO * d, _delta(tok.params["tokenizer"], start.params["tokenizer"]))
    _assert_close(_delta(joint.params["tokenizer"], start.params["tokenizer"]), tok_delta, "T+TE", atol=1e-7)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(tok_delta)) > 1e-4  # the tokenizer did train
    # the codebooks: the tokenizer step's EMA step (its only EMA)
    _assert_close(joint.codebooks, tok.codebooks, "codebooks")
    assert not np.allclose(joint.codebooks.codes, start.codebooks.codes)
    _assert_equal(joint.params["cold_start"], start.params["cold_start"], "cold start")
    # the losses: L_enc + ratio * L_tok
    np.testing.assert_allclose(jm["train/encoder/loss"], em["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(jm["train/tokenizer/loss"], tm["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(jm["train/tokenizer/cos"], tm["train/tokenizer/cos"], rtol=1e-5)
    np.testing.assert_allclose(jm["train/loss"], em["train/loss"] + RATIO * tm["train/loss"], rtol=1e-5)
    for m in range(2):
        np.testing.assert_allclose(jm[f"train/encoder/accuracy_level{m}"], em[f"train/encoder/accuracy_level{m}"])
        assert 0.0 < jm[f"codebook/level{m}/usage"] <= 1.0


def test_other_steps_train_only_the_encoder_and_leave_the_codebooks(recorded):
    before = recorded["joint0"][0]
    (joint, jm), (enc, em) = recorded["joint1"], recorded["encoder1"]
    assert int(jm["train/joint/tokenizer_step"]) == 0 and int(joint.step) == 2
    _assert_close(
        _delta(joint.params["encoder"], before.params["encoder"]),
        _delta(enc.params["encoder"], before.params["encoder"]),
        "E+D",
    )
    _assert_equal(joint.params["tokenizer"], before.params["tokenizer"], "T+TE")  # zero gradients, zero update
    _assert_equal(joint.codebooks, before.codebooks, "codebooks")  # the EMA is off
    np.testing.assert_allclose(jm["train/loss"], em["train/loss"], rtol=1e-5)
    assert all(np.isnan(jm[k]) for k in steps.JOINT_TOKENIZER_METRICS)  # not computed (the loop logs the last ones)


def test_gradient_accumulation_gives_the_same_joint_step(recorded):
    runner = _Runner(_step_config(accumulation=2), recording_tx())
    joint, metrics = runner.step("joint", recorded["start"], _images(1))
    ref, ref_metrics = recorded["joint0"]
    _assert_close(joint.params, ref.params, "params", rtol=1e-4, atol=1e-6)
    _assert_close(joint.codebooks, ref.codebooks, "codebooks", rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5)


def test_a_nonfinite_joint_step_changes_nothing(recorded):
    runner, start = recorded["runner"], recorded["start"]
    bad = _images(1)
    bad[3, 2, 2, 0] = np.nan
    state, metrics = runner.step("joint", start, bad)
    assert int(metrics["train/nonfinite"]) == 1 and int(state.step) == 1
    assert state.nonfinite.tolist() == [1, 1]
    _assert_equal(state.params, start.params, "params")
    _assert_equal(state.codebooks, start.codebooks, "codebooks")
    _assert_equal(state.opt_state, start.opt_state, "opt_state")


def test_one_adamw_state_keeps_moving_the_tokenizer_between_its_steps(recorded):
    """The joint optimizer over {"encoder", "tokenizer"} fed what `joint_step` feeds it (step 0: T+TE's gradient
    ratio x g; step 1: zeros, as the recorded steps above show) still moves T+TE on step 1, as the authors' PyTorch
    1.7 AdamW does with zero-filled gradients: m <- b1 m, v <- b2 v, p <- p - lr (m^ / (sqrt(v^) + eps) + wd p)."""
    c = _step_config()
    tx, lr = optim.make_optimizer(c.optim, "joint", 8)
    start, o = recorded["start"], c.optim
    params = state_lib.trained_params(start.params, "joint")
    g_tok = jax.tree.map(
        lambda d: -RATIO * d, _delta(recorded["tokenizer0"][0].params["tokenizer"], start.params["tokenizer"])
    )
    g_enc = jax.tree.map(lambda d: -d, _delta(recorded["encoder0"][0].params["encoder"], start.params["encoder"]))
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    opt = tx.init(params)
    u1, opt = update({"encoder": g_enc, "tokenizer": g_tok}, opt, params)
    p1 = optax.apply_updates(params, u1)
    u2, _ = update({"encoder": g_enc, "tokenizer": jax.tree.map(np.zeros_like, g_tok)}, opt, p1)
    p2 = optax.apply_updates(p1, u2)

    def reference(p0, g, decayed):
        wd = o.joint.weight_decay if decayed else 0.0
        m, v = (1 - o.b1) * g, (1 - o.b2) * g * g
        q1 = p0 - lr(0) * (m / (1 - o.b1) / (np.sqrt(v / (1 - o.b2)) + o.eps) + wd * p0)
        m, v = o.b1 * m, o.b2 * v  # step 1: a zero gradient
        q2 = q1 - lr(1) * (m / (1 - o.b1**2) / (np.sqrt(v / (1 - o.b2**2)) + o.eps) + wd * q1)
        return q1, q2

    leaves = zip(
        jax.tree_util.tree_leaves_with_path(params["tokenizer"]),
        jax.tree.leaves(g_tok),
        jax.tree.leaves(p1["tokenizer"]),
        jax.tree.leaves(p2["tokenizer"]),
    )
    moved = 0
    for (path, p0), g, got1, got2 in leaves:
        want1, want2 = reference(np.float64(p0), np.float64(g), p0.ndim > 1)
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(got1, want1, rtol=1e-5, atol=1e-8, err_msg=f"step 0 {name}")
        np.testing.assert_allclose(got2, want2, rtol=1e-5, atol=1e-8, err_msg=f"step 1 {name}")
        moved += int(not np.array_equal(np.asarray(got2), np.asarray(got1)))
    assert moved == len(jax.tree.leaves(params["tokenizer"]))  # every T+TE leaf moved on the step without L_tok


# ---------------------------------------------------------------- end to end

PLAN = ("joint:6", "tokenizer:3", "encoder:4")
TOTAL = 13


def _e2e_config():
    c = tiny.tiny_config()
    c.schedule.phases = PLAN
    c.mesh.data, c.mesh.fsdp = 4, 2
    c.log_every_steps = 2
    c.checkpoint.every_steps = 100  # at phase ends and planned stops only (saves are seconds each here)
    return c


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("joint"))
    return workdir, train.train_and_evaluate(_e2e_config(), workdir)


def test_a_joint_plan_runs_end_to_end_and_keeps_its_encoder(joint_run):
    workdir, summary = joint_run
    assert summary["done"] and int(summary["final_state"].step) == TOTAL
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    joint_lines = [l for l in lines if l.get("phase") == "iter1_joint" and "train/loss" in l]
    assert [l["step"] for l in joint_lines] == [2, 4, 6]
    for line in joint_lines:  # both losses and codebook health at every log step, never NaN
        for key in (
            *steps.JOINT_TOKENIZER_METRICS,
            "train/encoder/loss",
            "train/encoder/accuracy_level0",
            "train/encoder/position_only_accuracy_level0",
            "codebook/level0/usage",
            "codebook/level1/perplexity",
        ):
            assert np.isfinite(line[key]), (line["step"], key)
    assert {l["phase"] for l in lines} == {"iter1_joint", "iter2_tokenizer", "iter2_encoder"}
    assert [l["step"] for l in lines if "eval/linear_probe/top1" in l] == [6, TOTAL]
    assert encoder_store.saved_iterations(workdir) == [0, 1, 2]
    assert set(summary["linear_probe"]) == {"iteration_0", "iteration_1", "iteration_2"}
    joint_encoder = bridle_jax.load_encoder(workdir, iteration=1)
    features = joint_encoder.embed(np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32))
    assert features.shape == (3, 64) and np.isfinite(features).all()


def test_a_resume_in_the_middle_of_the_joint_phase_is_bit_identical(joint_run, tmp_path):
    _, summary = joint_run
    resumed_dir = str(tmp_path / "resumed")
    c = _e2e_config()
    c.evals.linear_probe.enabled = False  # the probes read the state; the state is what must match
    train.train_and_evaluate(c, resumed_dir, stop_at_step=3)  # after a tokenizer step, before the next
    resumed = train.train_and_evaluate(c, resumed_dir)
    for x, y in zip(jax.tree.leaves(summary["final_state"]), jax.tree.leaves(resumed["final_state"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = [json.loads(l) for l in open(os.path.join(resumed_dir, "metrics.jsonl"), encoding="utf-8")]
    first = next(l for l in lines if l.get("phase") == "iter1_joint" and l["step"] == 4 and "train/loss" in l)
    # the resumed start has not computed the tokenizer's losses before its first log: they are left out, not NaN
    assert not set(steps.JOINT_TOKENIZER_METRICS) & set(first) and np.isfinite(first["train/loss"])
