"""The attention kernels behind `vit.Attention`, chosen by `config.model.attention`: one entry, `attend`.

  xla     two einsums around a float32 softmax with a hand-written backward (`xla_attention`): the best on CPU
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention (GPU, bf16/fp16)
  pallas  the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`)
  auto    xla on CPU, cudnn on GPU when it supports the dtype and head size (else xla), pallas on one TPU chip (xla on
          a multi-chip mesh: the Pallas call is not partitioned for sharded batches yet); decided from
          `jax.default_backend()` when the model is traced

Every backend takes heads-major `[B, H, N, hd]` inputs with q already scaled by hd^-1/2 and returns `[B, H, N, hd]`
in the inputs' dtype. bf16 inputs keep float32 logits, softmax statistics and accumulators in every backend.
`key_valid` `[B, N]` bool (None = every key valid) drops the invalid keys from every query's softmax; an example
needs at least one valid key. The models do not pass it today (the encoder attends to padded audio patches, as the
authors' code does): it is an explicit option the backends support and tests/test_attention.py checks.

The Pallas kernel runs on CPU only in Pallas's TPU interpret mode, which is for tests: `attend(..., interpret=True)`
or the environment variable BRIDLE_PALLAS_INTERPRET=1, never a config field.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "pallas")
INTERPRET_ENV = "BRIDLE_PALLAS_INTERPRET"
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_PALLAS_LANES = 128  # the TPU kernel's sequence blocks are multiples of 128 tokens
_PALLAS_BLOCK = 512  # the largest sequence block tried on TPU (the library default is 128)


def pallas_interpret() -> bool:
    """Whether the Pallas kernel runs in TPU interpret mode (tests on CPU): BRIDLE_PALLAS_INTERPRET=1."""
    return os.environ.get(INTERPRET_ENV, "") == "1"


def unsupported_reason(backend: str, platform: str | None = None, dtype=None) -> str | None:
    """Why `backend` cannot run on `platform` (default: `jax.default_backend()`) with compute `dtype`, or None.

    `auto` always runs (it falls back to xla). Used by `config_checks.validate` and by `attend`."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; known: {BACKENDS}"
    platform = platform or jax.default_backend()
    if backend == "cudnn":
        if platform not in ("gpu", "cuda"):
            return f"cudnn attention needs an NVIDIA GPU, but JAX's platform is {platform!r}"
        if dtype is not None and jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
            return f"cudnn attention needs bfloat16 or float16 compute (config.model.dtype), got {jnp.dtype(dtype)}"
    if backend == "pallas" and platform != "tpu" and not pallas_interpret():
        return (
            f"pallas attention is a TPU kernel, but JAX's platform is {platform!r} "
            f"(tests run it on CPU in interpret mode with {INTERPRET_ENV}=1)"
        )
    return None


def _cudnn_supported(dtype, head_dim: int) -> bool:
    """cuDNN's fused attention: bf16/fp16, head size a multiple of 8 up to 128, compute capability >= 8.0."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES] or head_dim % 8 or head_dim > 128:
        return False
    try:
        return float(getattr(jax.devices()[0], "compute_capability", "0")) >= 8.0
    except (TypeError, ValueError):
        return False


def resolve(backend: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The backend that runs: `backend` itself, or for "auto" the platform's choice (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"config.model.attention: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda") and _cudnn_supported(dtype, head_dim):
        return "cudnn"
    if platform == "tpu" and jax.device_count() == 1:
        # The Pallas call has no partitioning rule here (no shard_map wrapper yet, untested on a slice): on a
        # multi-chip mesh XLA could gather the whole batch onto every chip, so "auto" keeps xla there.
        return "pallas"
    return "xla"


# ---------------------------------------------------------------------------------------------------------- xla


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ) v over heads-major `[B, H, N, hd]` inputs, q already scaled; float32 logits and softmax.

    Written out (not `jax.nn.dot_product_attention`) with a hand-written backward pass, because on CPU the N×N
    probability tensors dominate the attention's cost: the backward saves only the probabilities (one `[B, H, N, N]`
    per layer, where autodiff of the library version kept two and materialised broadcasts of the softmax
    denominator and of the scale at that size), and gets the softmax's row term from the small tensors
    (Σ_s dP∘P = Σ_d dO∘O), which spares one more N×N pass. Same math as the library version (float32: outputs and
    gradients agree to ~1e-6 relative; scaling q instead of the logits is the only reordering). Invalid keys get the
    float32 minimum as logit, so their probability is exactly 0 (and so is their gradient).
    """
    return _xla_fwd(q, k, v, key_valid)[0]


def _xla_fwd(q, k, v, key_valid):
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    if key_valid is not None:
        logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _xla_bwd(res, d_out):
    q, k, v, probs, out = res
    dtype = v.dtype
    d_v = jnp.einsum("bhts,bhtd->bhsd", probs.astype(dtype), d_out)
    d_probs = jnp.einsum("bhtd,bhsd->bhts", d_out, v, preferred_element_type=jnp.float32)
    # softmax backward: dS = P ∘ (dP − Σ_s dP∘P), and Σ_s dP∘P = Σ_d dO∘O (O = P V), an [B, H, N, hd] reduction.
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (probs * (d_probs - row)).astype(dtype)
    d_q = jnp.einsum("bhts,bhsd->bhtd", d_logits, k)
    d_k = jnp.einsum("bhts,bhtd->bhsd", d_logits, q)
    return d_q, d_k, d_v, None  # key_valid is boolean: no cotangent


xla_attention.defvjp(_xla_fwd, _xla_bwd)


# -------------------------------------------------------------------------------------------------------- cudnn


def cudnn_arguments(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None) -> tuple:
    """`(args, kwargs)` of the `jax.nn.dot_product_attention` call: `[B, N, H, hd]` q, k, v (the library's layout),
    scale 1 (q is already scaled) and the key mask as a `[B, 1, N, N]` bool mask (cuDNN's bias must span both
    sequence lengths; the library turns it into a bias in the inputs' dtype). Separate from the call so tests can
    check it against the library's xla implementation on CPU."""
    args = tuple(jnp.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))
    kwargs = dict(scale=1.0)
    if key_valid is not None:
        b, _, n, _ = q.shape
        kwargs["mask"] = jnp.broadcast_to(key_valid.astype(bool)[:, None, None, :], (b, 1, n, key_valid.shape[1]))
    return args, kwargs


def cudnn_attention(q, k, v, key_valid=None, *, implementation: str = "cudnn") -> jax.Array:
    """cuDNN's fused attention (float32 softmax statistics inside the kernel); `implementation="xla"` is the
    library's reference path on the same arguments (tests)."""
    args, kwargs = cudnn_arguments(q, k, v, key_valid)
    out = jax.nn.dot_product_attention(*args, **kwargs, implementation=implementation)
    return jnp.transpose(out, (0, 2, 1, 3))


# ------------------------------------------------------------------------------------------------------- pallas


def _pallas_block(n_pad: int, interpret: bool) -> int:
    """The sequence block: in interpret mode the whole padded sequence (one grid step per head, which keeps the
    CPU tests fast), else the largest of 512/256/128 that divides it."""
    if interpret:
        return n_pad
    return next(b for b in (_PALLAS_BLOCK, 256, _PALLAS_LANES) if n_pad % b == 0)


def pallas_attention(q, k, v, key_valid=None, *, interpret: bool | None = None, block: int | None = None):
    """The Pallas TPU flash-attention kernel (online softmax, float32 statistics and accumulators; its own fused
    backward). The sequence is padded to a multiple of 128 tokens; padded and invalid keys get segment id 0 and
    every query segment id 1, so they drop out of every softmax. `block` overrides the sequence block (tests)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    interpret = pallas_interpret() if interpret is None else interpret
    b, _, n, _ = q.shape
    n_pad = -(-n // _PALLAS_LANES) * _PALLAS_LANES
    valid = jnp.ones((b, n), bool) if key_valid is None else key_valid.astype(bool)
    if n_pad != n:
        pad = ((0, 0), (0, 0), (0, n_pad - n), (0, 0))
        q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, n_pad - n)))
    s = block or _pallas_block(n_pad, interpret)
    sizes = fa.BlockSizes(
        block_q=s,
        block_k_major=s,
        block_k=s,
        block_b=1,
        block_q_major_dkv=s,
        block_k_major_dkv=s,
        block_k_dkv=s,
        block_q_dkv=s,
        block_k_major_dq=s,
        block_k_dq=s,
        block_q_dq=s,
    )

    def call(q, k, v, kv_segments):
        segments = fa.SegmentIds(q=jnp.ones(kv_segments.shape, jnp.int32), kv=kv_segments)
        return fa.flash_attention(q, k, v, segment_ids=segments, sm_scale=1.0, block_sizes=sizes)

    out = (_interpreted(call) if interpret else call)(q, k, v, valid.astype(jnp.int32))
    return out[:, :, :n]


def _interpreted(fn):
    """`fn(q, k, v, segments)` with every Pallas call of its forward and backward passes in TPU interpret mode (the
    mode applies to the calls traced under it, and the backward's are traced after the forward returns)."""
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def run(q, k, v, segments):
        with pltpu.force_tpu_interpret_mode():
            return fn(q, k, v, segments)

    def fwd(q, k, v, segments):
        with pltpu.force_tpu_interpret_mode():
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segments), q, k, v)
        return out, vjp

    def bwd(vjp, d_out):
        with pltpu.force_tpu_interpret_mode():
            return (*vjp(d_out), None)

    run.defvjp(fwd, bwd)
    return run


# -------------------------------------------------------------------------------------------------------- entry


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array | None = None, backend: str = "auto"
) -> jax.Array:
    """Self-attention over heads-major `[B, H, N, hd]` q (already scaled), k, v with `backend` (module docstring);
    `key_valid` `[B, N]` bool masks keys out (None: attend to all)."""
    name = resolve(backend, q.dtype, q.shape[-1])
    if backend != "auto":
        reason = unsupported_reason(name, dtype=q.dtype)
        if reason is not None:
            raise ValueError(f"config.model.attention={backend!r}: {reason}")
    if key_valid is not None and key_valid.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"attend: key_valid must be [B={q.shape[0]}, N={k.shape[2]}] bool, got {key_valid.shape}")
    if name == "cudnn":
        return cudnn_attention(q, k, v, key_valid)
    if name == "pallas":
        return pallas_attention(q, k, v, key_valid)
    if key_valid is None:
        return xla_attention(q, k, v)
    return xla_attention(q, k, v, key_valid)
