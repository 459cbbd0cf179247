"""The attention backends (bridle_jax/models/attention.py) against the einsum path, on CPU.

- forward and gradients of the library reference (`jax.nn.dot_product_attention(implementation="xla")` on the
  arguments the cudnn call gets) and of the Pallas TPU flash kernel (interpret mode) equal the einsum path's, with
  and without a key padding mask, in float32 and bfloat16, at a ViT-B size (197 tokens, 12 heads of 64, batch 1) and at
  Kinetics's 1,568 tokens; the Pallas kernel also with several 128-token blocks (its online softmax across blocks);
- the cudnn call's arguments: [B, N, H, hd] layout, scale 1, a [B, 1, N, N] bool mask;
- "auto" picks xla on CPU (identical encoder output to "xla"), pallas on one TPU chip, xla on GPU for float32;
- the encoder's key mask follows keep_idx, keeps the cls token, and makes valid tokens blind to padded patches;
- config_checks.validate refuses an unknown backend and cudnn / pallas on CPU, naming config.model.attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from bridle_jax import config_checks
from bridle_jax.models import attention, bridle, vit

# max |backend - einsum| / max |einsum| allowed: float32 differs by summation order only; bfloat16 by the rounding
# of the probabilities (and the kernels' block order) before the value product
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _inputs(b, h, n, d, dtype, padded, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, d_out = (jax.random.normal(kk, (b, h, n, d), jnp.float32) for kk in ks[:4])
    q = q * d**-0.5  # attend takes q already scaled
    valid = None
    if padded:  # a different number of trailing padded keys per example, and a few scattered ones
        lengths = jnp.asarray([n - 17 * (i + 1) for i in range(b)])
        valid = (jnp.arange(n)[None, :] < lengths[:, None]) & (jax.random.uniform(ks[4], (b, n)) > 0.1)
    return tuple(t.astype(dtype) for t in (q, k, v, d_out)), valid


def _fwd_and_grads(fn, q, k, v, d_out, valid):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, valid), q, k, v)
    return (out,) + vjp(d_out)


def _rel_err(got, want):
    got, want = (np.asarray(t, np.float32) for t in (got, want))
    return float(np.abs(got - want).max() / np.abs(want).max())


def _compare(shape, dtype, padded, backends):
    (q, k, v, d_out), valid = _inputs(*shape, dtype, padded)
    want = jax.jit(lambda *a: _fwd_and_grads(attention.xla_attention, *a))(q, k, v, d_out, valid)
    errors = {}
    for name, fn in backends.items():
        got = jax.jit(lambda *a, fn=fn: _fwd_and_grads(fn, *a))(q, k, v, d_out, valid)
        for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert g.dtype == w.dtype == dtype, (name, what, g.dtype)
            errors[(name, what)] = _rel_err(g, w)
    print(shape, jnp.dtype(dtype).name, "padded" if padded else "unpadded", errors)
    assert max(errors.values()) < TOL[dtype], errors
    return errors


def _reference(q, k, v, valid):
    return attention.cudnn_attention(q, k, v, valid, implementation="xla")


def _pallas(q, k, v, valid):
    return attention.pallas_attention(q, k, v, valid, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_backends_match_einsum_at_vit_size(dtype, padded):
    _compare((1, 12, 197, 64), dtype, padded, {"reference": _reference, "pallas": _pallas})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_backends_match_einsum_at_kinetics_length(dtype):
    _compare((1, 2, 1568, 64), dtype, True, {"reference": _reference, "pallas": _pallas})


def test_pallas_online_softmax_over_several_blocks():
    """300 tokens padded to 384 in 128-token blocks: the kernel's running max and sum across key blocks, and a key
    block with no valid key (the second example's keys from 100 on are invalid)."""
    (q, k, v, d_out), _ = _inputs(2, 1, 300, 64, jnp.float32, False)
    valid = jnp.arange(300)[None, :] < jnp.asarray([[283], [100]])

    def pallas(q, k, v, valid):
        return attention.pallas_attention(q, k, v, valid, interpret=True, block=128)

    got = jax.jit(lambda *a: _fwd_and_grads(pallas, *a))(q, k, v, d_out, valid)
    want = _fwd_and_grads(attention.xla_attention, q, k, v, d_out, valid)
    errors = [_rel_err(g, w) for g, w in zip(got, want)]
    print("pallas 128-token blocks", errors)
    assert max(errors) < TOL[jnp.float32], errors


def test_masked_keys_get_zero_weight_and_zero_gradient():
    (q, k, v, d_out), valid = _inputs(2, 2, 40, 16, jnp.float32, True)
    out, dq, dk, dv = _fwd_and_grads(attention.xla_attention, q, k, v, d_out, valid)
    # invalid keys and values can be anything: the output does not move, and they get no gradient
    junk = jnp.where(valid[:, None, :, None], 0.0, 1e3)
    out2 = attention.xla_attention(q, k + junk, v - junk, valid)
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(jnp.where(valid[:, None, :, None], 0.0, dk)).max()) == 0.0
    assert float(jnp.abs(jnp.where(valid[:, None, :, None], 0.0, dv)).max()) == 0.0
    # an all-valid mask is the unmasked path, bit for bit
    all_valid = jnp.ones(valid.shape, bool)
    np.testing.assert_array_equal(attention.xla_attention(q, k, v, all_valid), attention.xla_attention(q, k, v))


def test_cudnn_arguments():
    (q, k, v, _), valid = _inputs(2, 3, 10, 8, jnp.bfloat16, True)
    args, kwargs = attention.cudnn_arguments(q, k, v, valid)
    assert [a.shape for a in args] == [(2, 10, 3, 8)] * 3 and all(a.dtype == jnp.bfloat16 for a in args)
    np.testing.assert_array_equal(args[0], jnp.transpose(q, (0, 2, 1, 3)))
    assert kwargs["scale"] == 1.0
    mask = kwargs["mask"]
    assert mask.shape == (2, 1, 10, 10) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask, jnp.broadcast_to(valid[:, None, None, :], (2, 1, 10, 10)))
    assert "mask" not in attention.cudnn_arguments(q, k, v)[1]
    out = attention.cudnn_attention(q, k, v, valid, implementation="xla")
    assert out.shape == q.shape and out.dtype == jnp.bfloat16


def test_auto_resolution(monkeypatch):
    assert attention.resolve("auto", jnp.float32, 64) == "xla"  # the tests' platform is CPU
    assert attention.resolve("auto", jnp.bfloat16, 64, platform="cpu") == "xla"
    assert attention.resolve("auto", jnp.bfloat16, 64, platform="tpu") == "xla"  # 8 devices: not partitioned yet
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert attention.resolve("auto", jnp.bfloat16, 64, platform="tpu") == "pallas"
    assert attention.resolve("auto", jnp.float32, 64, platform="gpu") == "xla"  # cuDNN has no float32 kernel
    assert attention.resolve("xla", jnp.bfloat16, 64, platform="tpu") == "xla"
    with pytest.raises(ValueError, match="config.model.attention"):
        attention.resolve("flash", jnp.float32, 64)


def _encoder_out(config, x, **kw):
    enc = bridle.encoder_from_config(config)
    params = enc.init(jax.random.PRNGKey(0), x)["params"]
    return enc.apply({"params": params}, x, **kw)[0]


def test_config_attention_xla_equals_auto_on_cpu():
    c = tiny_config()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    assert c.model.attention == "auto" and bridle.encoder_from_config(c).attention == "auto"
    auto = _encoder_out(c, x)
    c.model.attention = "xla"
    models = bridle.build_models(c)
    assert {models.encoder.attention, models.tokenizer.attention, models.decoder.attention} == {"xla"}
    assert models.estimator.attention == "xla"
    np.testing.assert_array_equal(_encoder_out(c, x), auto)


def test_encoder_key_mask_with_keep_idx(monkeypatch):
    """Valid tokens do not see padded patches; the mask follows keep_idx; the Pallas backend (interpret mode, from
    the environment as a model would get it) gives the einsum path's output."""
    enc = vit.ViTEncoder(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, attention="xla")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    params = enc.init(jax.random.PRNGKey(0), x)["params"]
    valid = jnp.arange(16)[None, :] < jnp.asarray([[12], [8]])  # trailing padded patches (rows of the 4x4 grid)
    keep = jnp.asarray([[0, 15, 3, 9, 14, 1], [7, 2, 12, 5, 10, 0]])
    out = enc.apply({"params": params}, x, keep, key_valid=valid)[0]
    # rows 3 (ex. 1) and 2-3 (ex. 2) of patches changed: the valid visible tokens and cls do not move
    noise = jnp.where(jnp.arange(16)[None, :, None, None] >= jnp.asarray([12, 8])[:, None, None, None], 5.0, 0.0)
    x2 = x + jnp.repeat(jnp.repeat(noise.reshape(2, 4, 4, 1), 4, 1), 4, 2)
    out2 = enc.apply({"params": params}, x2, keep, key_valid=valid)[0]
    kept_valid = np.concatenate([np.ones((2, 1), bool), np.take_along_axis(np.asarray(valid), keep, 1)], 1)
    np.testing.assert_allclose(np.asarray(out2)[kept_valid], np.asarray(out)[kept_valid], rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out2)[~kept_valid], np.asarray(out)[~kept_valid])
    # without a mask the valid tokens do see them (the default: the authors' encoder attends to padding)
    out3 = enc.apply({"params": params}, x2, keep)[0]
    assert not np.allclose(np.asarray(out3)[kept_valid], np.asarray(out)[kept_valid])
    monkeypatch.setenv(attention.INTERPRET_ENV, "1")
    pallas = enc.clone(attention="pallas").apply({"params": params}, x, keep, key_valid=valid)[0]
    np.testing.assert_allclose(pallas, out, rtol=1e-4, atol=1e-4)


def test_validate_refuses_bad_or_unavailable_backends(monkeypatch):
    monkeypatch.delenv(attention.INTERPRET_ENV, raising=False)
    c = tiny_config()
    for ok in ("auto", "xla"):
        c.model.attention = ok
        config_checks.validate(c)
    c.model.attention = "flash"
    with pytest.raises(ValueError, match=r"config\.model\.attention: expected one of"):
        config_checks.validate(c)
    c.model.attention = "cudnn"
    with pytest.raises(ValueError, match=r"config\.model\.attention: .*needs an NVIDIA GPU"):
        config_checks.validate(c)
    c.model.attention = "pallas"
    with pytest.raises(ValueError, match=r"config\.model\.attention: .*TPU kernel"):
        config_checks.validate(c)
    monkeypatch.setenv(attention.INTERPRET_ENV, "1")  # tests only
    config_checks.validate(c)
    assert "bfloat16" in attention.unsupported_reason("cudnn", platform="gpu", dtype="float32")
    assert attention.unsupported_reason("cudnn", platform="gpu", dtype="bfloat16") is None
