"""The joint step against the authors' `jointBRIDLE` (README "Joint training"): tests/golden/official_joint_tiny.npz
holds their joint model's steps at the tiny image sizes of the other golden file (`make_official_joint.py` says how
it was made): one step that trains the tokenizer (`joint_tok`) and one that does not (`joint_enc`), from the same
k-means'd state, with the recorded masks.

The jitted `steps.joint_step` runs on that state (converted by `convert.from_official`, the authors'-behaviour
switches of tests/test_parity.py plus `encoder_cluster_size_ema`, their eval-mode count) with `make_mask` replaced by
the recorded mask and an optimizer whose update is minus the gradient, so the step's change of each parameter is
its gradient. Compared: the loss and its two parts, every gradient (mapped to PyTorch names; the authors' unused
parameters get none, ours exactly zero), the codebooks and cluster sizes after the step. Tolerances as
tests/test_parity.py, plus the rounding of p - g in float32 (half an ulp of the parameter, <= 6e-8 here).
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bridle_jax import convert, masking, schedule, steps
from bridle_jax import state as state_lib
from bridle_jax.models.bridle import build_models
from tests.test_parity import BOOK_ATOL, LOSS_RTOL, check_grads, official_config

GOLDEN = Path(__file__).resolve().parent / "golden" / "official_joint_tiny.npz"
RATIO = 0.2


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def joint_config():
    c = official_config("image")
    c.schedule.phases = ("joint:8",)
    c.joint.tokenizer_every, c.joint.tokenizer_loss_ratio = 4, RATIO
    c.quantizer.encoder_cluster_size_ema = True  # the authors' eval-mode forward counts the codes it makes
    c.optim.max_update_ratio = 1e9  # the "update" is a raw gradient
    return c


def run_case(golden, case: str, monkeypatch):
    c = joint_config()
    models = build_models(c)
    sd = {k.split("model0/", 1)[1]: v for k, v in golden.items() if k.startswith("model0/")}
    params, codebooks, _ = convert.from_official(sd, models)
    masked = golden[f"{case}/mask"]
    recorded = masking.Mask(
        jnp.asarray(golden[f"{case}/ids_keep"]), jnp.asarray(golden[f"{case}/ids_restore"]), jnp.asarray(masked)
    )
    monkeypatch.setattr(steps.masking, "make_mask", lambda *a, **k: recorded)
    phase = schedule.Phase(index=0, kind="joint", cold_start=False, steps=8, iteration=1, start_step=0)
    tx = optax.chain(optax.scale(-1.0), optax.scale_by_schedule(lambda count: 1.0))  # update = -gradient
    step_number = 0 if case == "joint_tok" else 1  # step 1 of a phase in steps: 1 % 4 != 0, no tokenizer loss
    state = state_lib.create(models, c, tx, phase, 0).replace(
        params=params, codebooks=codebooks, step=jnp.asarray(step_number, jnp.int32)
    )
    fn = jax.jit(
        functools.partial(steps.joint_step, models=models, config=c, tx=tx, lr_schedule=lambda n: 1.0, phase=phase)
    )
    new, metrics = fn(state, {"input": jnp.asarray(np.moveaxis(golden["image/x"], 1, -1))})
    trained = state_lib.JOINT_PARTS
    grads = {k: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params[k], new.params[k]) for k in trained}
    return models, params, new, jax.device_get(metrics), grads


@pytest.mark.parametrize("case", ["joint_tok", "joint_enc"])
def test_the_joint_step_matches_the_authors(golden, case, monkeypatch):
    models, params, new, metrics, grads = run_case(golden, case, monkeypatch)
    assert int(metrics["train/nonfinite"]) == 0
    np.testing.assert_allclose(metrics["train/loss"], golden[f"{case}/loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(metrics["train/encoder/loss"], golden[f"{case}/loss_encoder"], rtol=LOSS_RTOL)
    if case == "joint_tok":
        assert int(metrics["train/joint/tokenizer_step"]) == 1
        np.testing.assert_allclose(metrics["train/tokenizer/loss"], golden[f"{case}/loss_tokenizer"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(
            golden[f"{case}/loss"], golden[f"{case}/loss_encoder"] + RATIO * golden[f"{case}/loss_tokenizer"], rtol=1e-6
        )
    else:
        assert int(metrics["train/joint/tokenizer_step"]) == 0
        for leaf in jax.tree.leaves(grads["tokenizer"]):  # the authors' tokenizer gets no gradient; ours zeros
            assert not np.any(leaf)
    official = convert.to_official(grads, models)
    grad_abs, grad_rel = check_grads(official, golden, case)
    loss_rel = abs(float(metrics["train/loss"]) / float(golden[f"{case}/loss"]) - 1)
    book_abs = float(np.abs(np.asarray(new.codebooks.codes) - golden[f"{case}/rq/codebook_after"]).max())
    print(
        f"\n{case}: loss rel {loss_rel:.2g}, gradients max abs {grad_abs:.2g} / rel {grad_rel:.2g}, "
        f"codebooks {book_abs:.2g}"
    )
    none = {str(n) for n in np.atleast_1d(golden[f"{case}/grad_none"]) if str(n)}
    assert any(n.startswith("tokenizer.cold_start_encoder") for n in none)  # never used by the joint model
    if case == "joint_enc":
        assert any(n.startswith("tokenizer.blocks") for n in none)
    np.testing.assert_allclose(new.codebooks.codes, golden[f"{case}/rq/codebook_after"], atol=BOOK_ATOL)
    np.testing.assert_allclose(new.codebooks.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"], atol=BOOK_ATOL)
    before = np.stack([golden[f"model0/tokenizer.quantizer.codebooks.{m}.weight"][:-1] for m in range(2)])
    moved = not np.array_equal(np.asarray(new.codebooks.codes), before)
    assert moved == (case == "joint_tok")  # the codebook EMA ran only in the tokenizer sub-step
