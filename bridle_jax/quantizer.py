"""Residual-quantisation (RQ) codebooks: a pure-functional, jittable, shardable JAX library.

Algorithm (SPEC §2.3–2.7, the authors' ``RQBottleneck``).  M codebooks ``C[m]`` of K rows in R^D.  For a feature z:

    r_0 = z                                    # the residual is NOT normalised (A1, authors' version)
    for m in 1..M:
        u_m = ℓ2(r_{m-1})                      # "stage input"; r_{m-1} itself when normalize_stage_inputs=False
        k_m = argmin_k ‖u_m − C[m]_k‖²          # squared-L2 nearest code (float32)
        q_m = C[m]_{k_m};   r_m = r_{m-1} − q_m
    z_q = z + sg(Σ_m q_m − z)                  # straight-through; forward value Σ_m q_m = z − r_M
    L_cb = mean_m [ mse(sg r_{m-1}, q_m) + β·mse(r_{m-1}, sg q_m) ]

The codebooks are trained by EMA (§2.4), not by gradients: per code, over the *global* batch,
``C_k ← λ·C_k + (1−λ)·ℓ2(mean of its stage inputs)``; empty codes keep their value; ``cluster_size`` is an EMA of the
counts kept as a statistic only.  ``kmeans_init`` (§2.5) and ``restart_unused`` (§2.6) initialise and repair them.

Choices and deviations (SPEC §7):

* A1 — each stage normalises its own input and the unnormalised residual carries on (the authors' code) by
  default; ``normalize_stage_inputs=False`` gives plain RQ on raw residuals (then k-means is Euclidean, not
  spherical, because the codes are no longer ≈ unit norm).
* A2 — no re-normalisation after the EMA for RQ; ``ema_update(..., renormalize=True)`` is the BEATs / BRIDLE-VQ
  variant.  Every op runs in float32 (distance matmuls at ``Precision.HIGHEST`` so TPUs/GPUs do not drop to
  bf16/TF32); ``z_q`` is cast back to the input dtype.
* A3/A3b — k-means runs on the global batch (Lloyd sums and counts are ``psum``-ed, the initial means are the
  same global rows on every replica), and is a no-op when ``state.initialized`` is set, also under ``jit``
  (``lax.cond`` on the flag), so a restored, trained codebook is never re-initialised.
* A4 — ``restart_unused`` is a plain function: the caller decides when (BRIDLE: once, at the first tokenizer-phase
  step, after k-means).  Replacements come from the global batch; a restarted code's ``cluster_size`` is set to 1
  (the rq-vae convention: as if used once by its new vector).
* Ordering — ``quantize`` reads the codes *before* the step's EMA update.  In the authors' train-mode forward,
  level m's EMA update happens before q_m is read (a difference of order 1−λ in q_m and in the residual passed on).
  Splitting look-up from update keeps ``quantize`` pure, shares it between the tokenizer and encoder phases, and is
  what the golden vectors (eval mode) pin.  :func:`quantize_with_ema` (``config.quantizer.lookup_after_ema``) is the
  authors' order, and :func:`ema_update_vqvae` (``ema_kind="vqvae"``) their video EMA (README "Parity").
* Non-finite rows — a row of z with a NaN/Inf (or whose squared norm overflows float32) is *masked out* of every
  codebook statistic (EMA, k-means, restart, ``usage_stats`` with ``mask``) instead of raising, because values are
  not inspectable under ``jit``.  Such rows still get (meaningless) codes and a NaN ``z_q``/loss, so the training
  loss shows the problem; ``QuantizeOutput.valid`` says which rows were usable.  Shape and argument errors raise
  ``ValueError`` eagerly (shapes are static, so also at trace time).

Sharding.  Under ``jax.jit`` on global arrays sharded with ``NamedSharding`` (GSPMD) leave ``axis_name=None``: the
batch sums are global and XLA inserts the all-reduces.  Inside ``jax.shard_map``/``pmap`` pass the mapped axis name:
counts and sums are ``psum``-ed and sampled rows are fetched by ``psum`` from their owner, so every replica computes
bit-identical codebooks.

Example::

    state = init_codebooks(jax.random.key(0), num_levels=4, codebook_size=256, dim=256)
    state = kmeans_init(state, z, jax.random.key(1))            # no-op once initialised
    out = quantize(state, z)                                    # z: [..., 256], any float dtype
    loss = task_loss(out.z_q) + out.loss                        # gradient reaches z via STE + commitment
    state = ema_update(state, out.stage_inputs, out.codes)      # codebooks are not trained by gradients
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "CodebookState",
    "QuantizeOutput",
    "init_codebooks",
    "quantize",
    "ema_update",
    "kmeans_init",
    "restart_unused",
    "usage_stats",
    "quantize_with_ema",
    "ema_update_vqvae",
    "vqvae_accumulator",
]

_F32 = jnp.float32
_EPS = 1e-12  # torch.nn.functional.normalize's eps, so ℓ2 matches the authors' bit for bit on tiny norms
_HI = lax.Precision.HIGHEST


@flax.struct.dataclass
class CodebookState:
    """All codebook state, a pytree (checkpoint it, shard it replicated, keep it out of the optimiser).

    The RQ EMA of SPEC §2.4 needs no accumulator beyond ``codes`` itself: the new value is a convex combination of
    the old code and the normalised batch mean.  ``cluster_size`` is the EMA of the per-code counts (statistics).
    """

    codes: jax.Array  # [M, K, D] float32
    cluster_size: jax.Array  # [M, K] float32
    initialized: jax.Array  # [] bool: set by kmeans_init; guards against re-initialising a trained codebook

    @property
    def num_levels(self) -> int:
        return self.codes.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codes.shape[1]

    @property
    def dim(self) -> int:
        return self.codes.shape[2]


class QuantizeOutput(NamedTuple):
    """Result of :func:`quantize` (a pytree; leading shape ``[...]`` is that of z without its last axis)."""

    z_q: jax.Array  # [..., D] input dtype; forward value Σ_m q_m, gradient = identity (straight-through)
    codes: jax.Array  # [..., M] int32
    stage_inputs: jax.Array  # [..., M, D] float32, no gradient: what ema_update / restart_unused consume
    commit_loss: jax.Array  # [] β · mean_m mse(r_{m-1}, sg q_m): the only gradient into z
    loss: jax.Array  # [] the authors' L_cb value (1+β)·mean_m mse(r_{m-1}, q_m); same gradient as commit_loss
    level_mse: jax.Array  # [M] mse(r_{m-1}, q_m) per level (no gradient), for logging
    code_norms: jax.Array  # [..., M] ‖q_m‖ per row and level (SPEC §5.3 "codebook norms by depth")
    valid: jax.Array  # [...] bool: row finite (masked out of all codebook statistics otherwise)


# ----------------------------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _check_state(state) -> None:
    if not isinstance(state, CodebookState):
        raise ValueError(f"state: expected a CodebookState, got {type(state).__name__}")
    if state.codes.ndim != 3:
        raise ValueError(f"state.codes: expected shape [M, K, D], got {tuple(state.codes.shape)}")
    if tuple(state.cluster_size.shape) != tuple(state.codes.shape[:2]):
        raise ValueError(
            f"state.cluster_size: expected shape {tuple(state.codes.shape[:2])} (= codes [M, K]), "
            f"got {tuple(state.cluster_size.shape)}"
        )


def _check_features(name: str, z, dim: int) -> None:
    if jnp.ndim(z) < 1 or z.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape [..., D] with D={dim} (the codebook dim), got {tuple(jnp.shape(z))}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {z.dtype}")


def _check_stats_inputs(state: CodebookState, stage_inputs, codes) -> tuple[int, int, int]:
    _check_state(state)
    m, k, d = state.codes.shape
    if jnp.ndim(stage_inputs) < 2 or tuple(stage_inputs.shape[-2:]) != (m, d):
        raise ValueError(
            f"stage_inputs: expected shape [..., M, D] = [..., {m}, {d}], got {tuple(jnp.shape(stage_inputs))}"
        )
    if tuple(codes.shape) != tuple(stage_inputs.shape[:-1]):
        raise ValueError(
            f"codes: expected shape {tuple(stage_inputs.shape[:-1])} (stage_inputs without D), got {tuple(codes.shape)}"
        )
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes: expected an integer dtype, got {codes.dtype}")
    return m, k, d


# ----------------------------------------------------------------------------------------------- helpers


def _l2(x: jax.Array) -> jax.Array:
    """ℓ2-normalise rows like ``F.normalize``: x / max(‖x‖, eps)."""
    n2 = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(n2, _EPS * _EPS))


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def _row_min(x: jax.Array) -> jax.Array:
    """min over the last axis, keepdims, as a halving tree of elementwise minima (exact: min is idempotent, so the
    overlap of the two halves when the length is odd is harmless).  XLA:CPU fuses these slices into plain
    vectorised loops; ``jnp.min`` here became a slow library reduce writing a broadcast [N, K] result, once the
    stage inputs also feed ``ema_update`` in the same jit (≈ 5 ms a level; BENCHMARKS.md)."""
    while x.shape[-1] > 1:
        h = (x.shape[-1] + 1) // 2
        x = jnp.minimum(x[..., :h], x[..., x.shape[-1] - h :])
    return x


def _nearest(u: jax.Array, codes: jax.Array, code_sq: jax.Array) -> jax.Array:
    """argmin_k ‖u − C_k‖²; ‖u‖² is constant per row and dropped.

    Bit-identical to ``jnp.argmin(code_sq - 2 u·Cᵀ)`` (first index on ties) but ≈ 1.4x faster for the whole
    quantize + EMA step on CPU (BENCHMARKS.md): XLA:CPU runs ``argmin``'s variadic (value, index) reduce as a
    scalar loop (≈ 3.5 ms for 8192×256 a level), while the row minimum and then a ``min`` over a float iota masked
    by ``d == min`` vectorise.  The −2 is folded into the codebook (scaling by a power of two is exact, so the
    product is bitwise −2·u·Cᵀ).  A row with a NaN (an invalid row) matches no index and is clamped to a valid,
    meaningless code.
    """
    k = codes.shape[0]
    dist = code_sq + jnp.dot(u, (-2.0 * codes).T, precision=_HI, preferred_element_type=_F32)
    iota = lax.broadcasted_iota(_F32, dist.shape, dist.ndim - 1)  # float indices are exact up to 2**24 codes
    first = jnp.min(jnp.where(dist == _row_min(dist), iota, float(k)), axis=-1)
    return jnp.minimum(first, k - 1).astype(jnp.int32)


def _stage_input(r: jax.Array, normalize: bool, need_norm: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """(stage input, per-row squared norm of r) — the norm doubles as the row-validity test (NaN/Inf/overflow)."""
    if not (normalize or need_norm):
        return r, None
    n2 = jnp.sum(r * r, axis=-1, keepdims=True)
    u = r * lax.rsqrt(jnp.maximum(n2, _EPS * _EPS)) if normalize else r
    return u, n2[..., 0]


def _sample_rows(u: jax.Array, valid: jax.Array, key: jax.Array, k: int, axis_name) -> jax.Array:
    """k rows drawn from the *global* batch of valid rows (without replacement when there are enough).

    Every replica draws the same global indices from the same key; each contributes the rows it owns and a
    ``psum`` assembles them, so the result is bit-identical on all replicas and equal to the unsharded draw.
    """
    n = u.shape[0]
    if axis_name is None:
        gvalid, offset = valid, 0
    else:
        gvalid = lax.all_gather(valid, axis_name, tiled=True)
        offset = lax.axis_index(axis_name) * n
    n_glob = gvalid.shape[0]
    k_perm, k_repl = jax.random.split(key)
    scores = jnp.where(gvalid, jax.random.uniform(k_perm, (n_glob,)), -1.0)
    _, order = lax.top_k(scores, min(k, n_glob))  # valid rows first, in random order
    n_valid = jnp.sum(gvalid, dtype=jnp.int32)
    pos = jnp.arange(k, dtype=jnp.int32)
    # Fewer valid rows than k: fill the rest with replacement (as torch.randint in the authors' kmeans).
    pos = jnp.where(pos < n_valid, pos, jax.random.randint(k_repl, (k,), 0, jnp.maximum(n_valid, 1)))
    local = order[pos] - offset
    mine = (local >= 0) & (local < n)
    rows = jnp.where(mine[:, None], jnp.take(u, jnp.clip(local, 0, n - 1), axis=0), 0.0)
    return _psum(rows, axis_name)


def _flatten(z: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    lead = z.shape[:-1]
    return z.reshape(-1, z.shape[-1]).astype(_F32), lead


# ----------------------------------------------------------------------------------------------- public API


def init_codebooks(key: jax.Array, num_levels: int, codebook_size: int, dim: int) -> CodebookState:
    """Uniform [0, 1) codebooks (SPEC §2.5, ``init_weight_multiplier`` 1.0); ``initialized=False`` so that a
    following :func:`kmeans_init` replaces them."""
    _check_int("num_levels", num_levels, 1)
    _check_int("codebook_size", codebook_size, 2)
    _check_int("dim", dim, 1)
    codes = jax.random.uniform(key, (num_levels, codebook_size, dim), _F32)
    return CodebookState(
        codes=codes,
        cluster_size=jnp.zeros((num_levels, codebook_size), _F32),
        initialized=jnp.asarray(False),
    )


def quantize(
    state: CodebookState,
    z: jax.Array,
    *,
    normalize_stage_inputs: bool = True,
    commitment_weight: float = 0.25,
    mask: jax.Array | None = None,
) -> QuantizeOutput:
    """Pure look-up through the M levels (no state change).

    ``mask`` (bool, shape = z's leading dims; False = e.g. a padded patch) removes rows from the losses' means; such
    rows still get codes.

    Only the residual is carried from level to level (Σ q_m is recovered as z − r_M), which keeps the memory traffic
    of the sequential levels down; the codebooks are stop-gradiented, so gradients reach z through the
    straight-through z_q and through every r_{m-1} in the commitment term.
    """
    _check_state(state)
    _check_features("z", z, state.dim)
    codebooks = lax.stop_gradient(state.codes.astype(_F32))
    code_sq = jnp.sum(codebooks * codebooks, axis=-1)  # [M, K]
    z32, lead = _flatten(z)
    keep = _flat_mask(mask, lead)
    weight = None if keep is None else keep.astype(_F32) / jnp.maximum(jnp.sum(keep, dtype=_F32), 1.0)
    r = z32
    codes, inputs, mses, norms = [], [], [], []
    valid = None
    for m in range(state.num_levels):
        u, n2 = _stage_input(lax.stop_gradient(r), normalize_stage_inputs, need_norm=valid is None)
        if valid is None:
            valid = jnp.isfinite(n2)
        k = _nearest(u, codebooks[m], code_sq[m])
        r = r - jnp.take(codebooks[m], k, axis=0)
        codes.append(k)
        inputs.append(u)
        # = mse(r_{m-1}, sg q_m); differentiable in z through r
        mses.append(jnp.mean(r * r) if weight is None else jnp.sum(weight * r * r) / state.dim)
        norms.append(jnp.take(jnp.sqrt(code_sq[m]), k))
    mse = jnp.stack(mses)
    commit = commitment_weight * jnp.mean(mse)
    z_q = (z32 - lax.stop_gradient(r)).astype(z.dtype)  # forward z − r_M = Σ q_m, gradient identity
    return QuantizeOutput(
        z_q=z_q.reshape(z.shape),
        codes=jnp.stack(codes, axis=-1).reshape(*lead, -1),
        stage_inputs=jnp.stack(inputs, axis=-2).reshape(*lead, state.num_levels, state.dim),
        commit_loss=commit,
        loss=commit + lax.stop_gradient(jnp.mean(mse)),
        level_mse=lax.stop_gradient(mse),
        code_norms=jnp.stack(norms, axis=-1).reshape(*lead, -1),
        valid=valid.reshape(lead),
    )


def _batch_stats(u, ids, valid, num_segments, axis_name):
    """Per-segment counts and sums of the rows of ``u`` [N, D] via scatter-add (no one-hot matmul, which costs as
    much as the distance matmul).  Invalid rows go to an extra bucket that is dropped, so their NaNs never touch a
    real code."""
    ids = jnp.where(valid, ids, num_segments)
    counts = jax.ops.segment_sum(jnp.ones(ids.shape, _F32), ids, num_segments + 1)[:-1]
    sums = jax.ops.segment_sum(u, ids, num_segments + 1)[:-1]
    return _psum(counts, axis_name), _psum(sums, axis_name)


def _row_valid(stage_inputs: jax.Array, codes: jax.Array, k: int) -> jax.Array:
    finite = jnp.isfinite(jnp.sum(stage_inputs * stage_inputs, axis=-1))
    return finite & (codes >= 0) & (codes < k)


def _flat_mask(mask, lead: tuple[int, ...]) -> jax.Array | None:
    """``mask`` (True = the row takes part; shape = the features' leading dims) flattened to [N, 1], or None."""
    if mask is None:
        return None
    if tuple(jnp.shape(mask)) != tuple(lead):
        raise ValueError(f"mask: expected a bool array of shape {tuple(lead)}, got {tuple(jnp.shape(mask))}")
    return jnp.asarray(mask, bool).reshape(-1, 1)


def ema_update(
    state: CodebookState,
    stage_inputs: jax.Array,
    codes: jax.Array,
    *,
    decay: float = 0.99,
    renormalize: bool = False,
    axis_name=None,
    mask: jax.Array | None = None,
) -> CodebookState:
    """EMA of SPEC §2.4: per code, counts and sums by scatter-add over the (global) batch, then the convex update.

    ``C_k ← λC_k + (1−λ)ℓ2(s_k / n_k)`` for codes used in the batch, unchanged otherwise; ``renormalize=True``
    re-projects onto the sphere afterwards (BEATs / VQ).  Non-finite rows, and rows where ``mask`` (shape = the
    leading dims of ``codes``) is False, e.g. padded patches, are ignored.
    """
    m, k, d = _check_stats_inputs(state, stage_inputs, codes)
    keep = _flat_mask(mask, codes.shape[:-1])
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay: expected a float in [0, 1], got {decay!r}")
    u = stage_inputs.reshape(-1, m, d).astype(_F32)
    c = codes.reshape(-1, m).astype(jnp.int32)

    # One scatter per level on the slice u[:, i]: inside a jitted step, XLA folds slice(stack(u_1..u_M)) back to
    # u_i, so the stacked [N, M, D] stage inputs are never materialised; measured 1.5x faster for the whole step
    # than a single fused [N·M]-row scatter (see BENCHMARKS.md).
    def level_valid(i):
        valid = _row_valid(u[:, i], c[:, i], k)
        return valid if keep is None else valid & keep[:, 0]

    stats = [_batch_stats(u[:, i], c[:, i], level_valid(i), k, None) for i in range(m)]
    counts, sums = _psum(
        (jnp.stack([s[0] for s in stats]), jnp.stack([s[1] for s in stats])), axis_name
    )  # one all-reduce
    lam = jnp.asarray(decay, _F32)
    old = state.codes.astype(_F32)
    mean = _l2(sums / jnp.maximum(counts, 1.0)[..., None])
    # Empty codes keep their value exactly (λC + (1−λ)C would drift by an ulp per step).
    new = jnp.where((counts > 0)[..., None], lam * old + (1.0 - lam) * mean, old)
    if renormalize:
        new = _l2(new)
    return state.replace(codes=new, cluster_size=lam * state.cluster_size + (1.0 - lam) * counts)


def _level_ema(book, size, acc, u, k, rows, lam, axis_name):
    """One level's EMA: (codebook [K, D], cluster_size [K], accumulator [K, D] or None) -> updated. Without an
    accumulator the project's convex update (:func:`ema_update`); with one the VQ-VAE update
    (:func:`ema_update_vqvae`)."""
    k_size = book.shape[0]
    counts, sums = _batch_stats(u, k, rows, k_size, axis_name)
    size = lam * size + (1.0 - lam) * counts
    if acc is None:
        mean = _l2(sums / jnp.maximum(counts, 1.0)[:, None])
        return jnp.where((counts > 0)[:, None], lam * book + (1.0 - lam) * mean, book), size, None
    acc = lam * acc + (1.0 - lam) * sums
    n = jnp.sum(size)
    return acc / (n * (size + _VQVAE_EPS) / (n + k_size * _VQVAE_EPS))[:, None], size, acc


_VQVAE_EPS = 1e-5  # the authors' VQEmbedding eps (Laplace smoothing of the counts)


def quantize_with_ema(
    state: CodebookState,
    z: jax.Array,
    *,
    decay: float = 0.99,
    normalize_stage_inputs: bool = True,
    commitment_weight: float = 0.25,
    mask: jax.Array | None = None,
    axis_name=None,
    embed_ema: jax.Array | None = None,
):
    """The authors' train-mode order (config.quantizer.lookup_after_ema; see "Ordering" above): per level, the
    nearest code on the step's codebook, *then that level's EMA*, then the look-up of q_m from the updated codebook,
    so the residual passed on, z_q and the loss use post-EMA codes. Returns (output, updated state, embed_ema).

    The update is :func:`ema_update`'s (the same statistics, so ``ema_update(state, out.stage_inputs, out.codes)``
    gives the same codebooks); with an ``embed_ema`` accumulator [M, K, D] it is instead the authors' video VQ-VAE
    EMA of :func:`ema_update_vqvae`, and the updated accumulator is returned."""
    _check_state(state)
    _check_features("z", z, state.dim)
    z32, lead = _flatten(z)
    keep = _flat_mask(mask, lead)
    weight = None if keep is None else keep.astype(_F32) / jnp.maximum(jnp.sum(keep, dtype=_F32), 1.0)
    lam = jnp.asarray(decay, _F32)
    old = lax.stop_gradient(state.codes.astype(_F32))
    k_size = state.codebook_size
    r = z32
    books, sizes, accs, codes, inputs, mses, norms = [], [], [], [], [], [], []
    valid = None
    for m in range(state.num_levels):
        u, n2 = _stage_input(lax.stop_gradient(r), normalize_stage_inputs, need_norm=valid is None)
        if valid is None:
            valid = jnp.isfinite(n2)
        k = _nearest(u, old[m], jnp.sum(old[m] * old[m], axis=-1))
        rows = _row_valid(u, k, k_size) if keep is None else _row_valid(u, k, k_size) & keep[:, 0]
        acc = None if embed_ema is None else embed_ema[m].astype(_F32)
        book, size, acc = _level_ema(old[m], state.cluster_size[m], acc, u, k, rows, lam, axis_name)
        books.append(book)
        sizes.append(size)
        accs.append(acc)
        q = jnp.take(book, k, axis=0)
        r = r - q
        codes.append(k)
        inputs.append(u)
        mses.append(jnp.mean(r * r) if weight is None else jnp.sum(weight * r * r) / state.dim)
        norms.append(jnp.sqrt(jnp.sum(q * q, axis=-1)))
    mse = jnp.stack(mses)
    commit = commitment_weight * jnp.mean(mse)
    z_q = (z32 - lax.stop_gradient(r)).astype(z.dtype)
    out = QuantizeOutput(
        z_q=z_q.reshape(z.shape),
        codes=jnp.stack(codes, axis=-1).reshape(*lead, -1),
        stage_inputs=jnp.stack(inputs, axis=-2).reshape(*lead, state.num_levels, state.dim),
        commit_loss=commit,
        loss=commit + lax.stop_gradient(jnp.mean(mse)),
        level_mse=lax.stop_gradient(mse),
        code_norms=jnp.stack(norms, axis=-1).reshape(*lead, -1),
        valid=valid.reshape(lead),
    )
    new_state = state.replace(codes=jnp.stack(books), cluster_size=jnp.stack(sizes))
    return out, new_state, None if embed_ema is None else jnp.stack(accs)


def vqvae_accumulator(state: CodebookState) -> jax.Array:
    """The VQ-VAE EMA's ``embed_ema`` [M, K, D] recovered from the state: the update sets ``C = embed_ema /
    normalised(cs)``, so ``embed_ema = C · normalised(cs)`` (to float rounding) and no extra state is needed.
    After k-means this is ``means · normalised(counts)``; the authors' code instead keeps the random values the
    accumulator was built with (README "Parity")."""
    cs = state.cluster_size.astype(_F32)
    n = jnp.sum(cs, axis=-1, keepdims=True)
    return state.codes.astype(_F32) * (n * (cs + _VQVAE_EPS) / (n + state.codebook_size * _VQVAE_EPS))[..., None]


def ema_update_vqvae(
    state: CodebookState,
    embed_ema: jax.Array | None,
    stage_inputs: jax.Array,
    codes: jax.Array,
    *,
    decay: float = 0.99,
    mask: jax.Array | None = None,
) -> tuple[CodebookState, jax.Array]:
    """The classic VQ-VAE EMA of the authors' *video* RQ (config.quantizer.ema_kind="vqvae", README "Parity"): an
    accumulator ``embed_ema`` [M, K, D] of per-code sums, and ``C = embed_ema / (n·(cs + eps)/(n + K·eps))`` with
    ``n = Σ cs`` (Laplace-smoothed counts); no ℓ2 of the mean, and every code moves (also unused ones, through n).
    ``embed_ema=None`` recovers it from the state (:func:`vqvae_accumulator`). Returns (state, embed_ema)."""
    m, k, d = _check_stats_inputs(state, stage_inputs, codes)
    keep = _flat_mask(mask, codes.shape[:-1])
    embed_ema = vqvae_accumulator(state) if embed_ema is None else embed_ema
    u = stage_inputs.reshape(-1, m, d).astype(_F32)
    c = codes.reshape(-1, m).astype(jnp.int32)
    lam = jnp.asarray(decay, _F32)

    def rows(i):
        valid = _row_valid(u[:, i], c[:, i], k)
        return valid if keep is None else valid & keep[:, 0]

    out = [
        _level_ema(
            state.codes[i].astype(_F32),
            state.cluster_size[i],
            embed_ema[i].astype(_F32),
            u[:, i],
            c[:, i],
            rows(i),
            lam,
            None,
        )
        for i in range(m)
    ]
    new = state.replace(codes=jnp.stack([o[0] for o in out]), cluster_size=jnp.stack([o[1] for o in out]))
    return new, jnp.stack([o[2] for o in out])


def _kmeans_level(u, valid, key, k, iters, spherical, axis_name):
    """Lloyd's algorithm on the global batch; spherical = assign by max dot product, means re-normalised."""
    init = _sample_rows(u, valid, key, k, axis_name)

    def step(_, carry):
        means, _ = carry
        if spherical:
            a = jnp.argmax(jnp.dot(u, means.T, precision=_HI), axis=-1).astype(jnp.int32)
        else:
            a = _nearest(u, means, jnp.sum(means * means, axis=-1))
        counts, sums = _batch_stats(u, a, valid, k, axis_name)
        upd = _l2(sums) if spherical else sums / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where((counts > 0)[:, None], upd, means), counts

    return lax.fori_loop(0, iters, step, (init, jnp.zeros((k,), _F32)))


def kmeans_init(
    state: CodebookState,
    z: jax.Array,
    key: jax.Array,
    *,
    iters: int = 10,
    axis_name=None,
    normalize_stage_inputs: bool = True,
    mask: jax.Array | None = None,
) -> CodebookState:
    """k-means initialisation stage by stage (SPEC §2.5, A3): level m is fitted on the stage inputs left by the
    freshly initialised levels 1..m−1, on the global batch; ``cluster_size`` = final counts; sets ``initialized``.

    A no-op when ``state.initialized`` is already True, decided by ``lax.cond`` so it is safe inside ``jit`` (A3b:
    a restored, trained codebook must never be overwritten).  A batch without a single finite row also leaves the
    state unchanged (and the flag False, so a later call retries).  Rows where ``mask`` (shape = z's leading
    dims) is False take no part.
    """
    _check_state(state)
    _check_features("z", z, state.dim)
    _check_int("iters", iters, 1)
    m_levels, k, _ = state.codes.shape
    z32, lead = _flatten(z)
    keep = _flat_mask(mask, lead)

    def fit(st: CodebookState) -> CodebookState:
        r = z32
        books, sizes = [], []
        valid = None
        for m, km in enumerate(jax.random.split(key, m_levels)):
            u, n2 = _stage_input(r, normalize_stage_inputs, need_norm=valid is None)
            if valid is None:
                valid = jnp.isfinite(n2) if keep is None else jnp.isfinite(n2) & keep[:, 0]
            means, counts = _kmeans_level(u, valid, km, k, iters, normalize_stage_inputs, axis_name)
            books.append(means)
            sizes.append(counts)
            r = r - jnp.take(means, _nearest(u, means, jnp.sum(means * means, axis=-1)), axis=0)
        any_valid = _psum(jnp.sum(valid, dtype=jnp.int32), axis_name) > 0
        new = st.replace(codes=jnp.stack(books), cluster_size=jnp.stack(sizes), initialized=jnp.asarray(True))
        return jax.tree.map(lambda a, b: jnp.where(any_valid, a, b), new, st)

    return lax.cond(state.initialized, lambda st: st, fit, state)


def restart_unused(
    state: CodebookState,
    stage_inputs: jax.Array,
    codes: jax.Array,
    key: jax.Array,
    *,
    min_count: float = 1.0,
    axis_name=None,
    mask: jax.Array | None = None,
) -> CodebookState:
    """Replace every code used fewer than ``min_count`` times in this (global) batch by a stage input drawn from the
    global batch (SPEC §2.6, A4), identically on all replicas, with static shapes; the replaced codes'
    ``cluster_size`` is reset to 1.  Rows where ``mask`` (shape = the leading dims of ``codes``) is False are neither
    counted nor drawn."""
    m, k, d = _check_stats_inputs(state, stage_inputs, codes)
    keep = _flat_mask(mask, codes.shape[:-1])
    u = stage_inputs.reshape(-1, m, d).astype(_F32)
    c = codes.reshape(-1, m).astype(jnp.int32)
    valid = _row_valid(u, c, k) if keep is None else _row_valid(u, c, k) & keep
    ids = c + (jnp.arange(m, dtype=jnp.int32) * k)[None, :]
    ids = jnp.where(valid, ids, m * k).reshape(-1)
    counts = _psum(jax.ops.segment_sum(jnp.ones(ids.shape, _F32), ids, m * k + 1)[:-1], axis_name).reshape(m, k)
    cand = jnp.stack(
        [_sample_rows(u[:, i], valid[:, i], km, k, axis_name) for i, km in enumerate(jax.random.split(key, m))]
    )
    has_rows = _psum(jnp.sum(valid, axis=0, dtype=jnp.int32), axis_name) > 0  # [M]
    dead = (counts < min_count) & has_rows[:, None]
    return state.replace(
        codes=jnp.where(dead[..., None], cand, state.codes),
        cluster_size=jnp.where(dead, 1.0, state.cluster_size),
    )


def usage_stats(codes: jax.Array, codebook_size: int, axis_name=None, *, mask: jax.Array | None = None) -> dict:
    """Per-level code statistics (SPEC §5.3): ``usage`` (CUR, fraction of codes used), ``entropy`` (bits, over the
    used codes), ``perplexity`` (2**entropy) and the raw ``counts`` [M, K].  Counts are psum-ed over ``axis_name``,
    so the statistics are global; accumulate ``counts`` over batches for dataset-level figures."""
    _check_int("codebook_size", codebook_size, 2)
    if jnp.ndim(codes) < 1 or not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes: expected an integer array [..., M], got {codes.dtype} {tuple(jnp.shape(codes))}")
    m = codes.shape[-1]
    c = codes.reshape(-1, m).astype(jnp.int32)
    ok = (c >= 0) & (c < codebook_size)
    if mask is not None:
        if tuple(mask.shape) != tuple(codes.shape[:-1]):
            raise ValueError(f"mask: expected shape {tuple(codes.shape[:-1])}, got {tuple(mask.shape)}")
        ok = ok & mask.reshape(-1, 1)
    ids = jnp.where(ok, c + (jnp.arange(m, dtype=jnp.int32) * codebook_size)[None, :], m * codebook_size)
    counts = jax.ops.segment_sum(jnp.ones(ids.size, _F32), ids.reshape(-1), m * codebook_size + 1)[:-1]
    counts = _psum(counts, axis_name).reshape(m, codebook_size)
    p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return {
        "usage": jnp.mean(counts > 0, axis=-1),
        "entropy": entropy,
        "perplexity": jnp.exp2(entropy),
        "counts": counts,
    }
