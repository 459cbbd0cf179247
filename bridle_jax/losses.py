"""The two training objectives (SPEC 2.1, 2.2), computed in float32 whatever the model's compute dtype."""

import jax
import jax.numpy as jnp


def masked_code_cross_entropy(logits, codes, masked):
    """Cross-entropy of the predicted codes over the masked patches and the M levels (no label smoothing).

    logits [B, N, M, K], codes [B, N, M] int, masked [B, N] bool (True = prediction target).
    Returns (loss, per-level loss [M], per-level accuracy [M]); the loss is the mean over masked (patch, level)
    pairs, i.e. PyTorch's `CrossEntropyLoss()` on the flattened masked targets.
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, codes[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B, N, M]
    weight = masked.astype(jnp.float32)[..., None]  # [B, N, 1]
    count = jnp.maximum(jnp.sum(weight), 1.0)
    per_level = jnp.sum(nll * weight, axis=(0, 1)) / count
    correct = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
    accuracy = jnp.sum(correct * weight, axis=(0, 1)) / count
    return jnp.mean(per_level), per_level, accuracy


def position_only_accuracy(codes, targets, codebook_size: int):
    """Accuracy per level [M] of the best position-only predictor of `codes` on this batch's targets.

    codes [B, N, M] int, targets [B, N] bool (True = a masked patch that is a prediction target; padded or invalid
    patches must be False). For each patch position n and level m the predictor answers the code most frequent at
    (n, m) over the batch's examples where n is a target (argmax of the counts: on a tie, the lowest code index);
    the result is its accuracy on those same targets, i.e. sum_n max_k count[n, m, k] / (number of targets), which
    the tie-break does not change. It is an in-batch (in-sample) baseline: "the codes carry the position, not the
    content". An encoder not clearly above it predicts its targets from their positions. With few targets per
    position it is above 1/K even for codes that do not depend on the position (a mode of a small sample).

    All counting is in int32 with one segment sum over the flattened (position, level, code) ids (no one-hot
    [B, N, M, K] array, no loop over positions); jittable, and plain jnp, so a batch sharded over the mesh works
    under jit. Codes outside [0, K) are not counted (they count as misses). 0 when there are no targets.
    """
    b, n, m = codes.shape
    if tuple(targets.shape) != (b, n):
        raise ValueError(f"targets: expected shape {(b, n)}, got {tuple(targets.shape)}")
    c = codes.astype(jnp.int32)
    ok = targets[..., None] & (c >= 0) & (c < codebook_size)  # [B, N, M]
    cell = (jnp.arange(n, dtype=jnp.int32)[:, None] * m + jnp.arange(m, dtype=jnp.int32)[None, :]) * codebook_size
    bins = n * m * codebook_size
    ids = jnp.where(ok, cell[None] + c, bins)  # the last bin collects what is not counted
    counts = jax.ops.segment_sum(jnp.ones(ids.size, jnp.int32), ids.reshape(-1), bins + 1)[:-1]
    counts = counts.reshape(n, m, codebook_size)
    mode = jnp.argmax(counts, axis=-1)  # [N, M]: the predictor (first maximum = lowest code index)
    hits = jnp.take_along_axis(counts, mode[..., None], axis=-1)[..., 0]  # [N, M]
    total = jnp.maximum(jnp.sum(targets, dtype=jnp.int32), 1).astype(jnp.float32)
    return jnp.sum(hits, axis=0).astype(jnp.float32) / total


def cosine_distance(pred, target, eps: float = 1e-8, valid=None):
    """Mean over tokens of 1 - cos(pred, target) (BEATs/BRIDLE distillation, SPEC 2.2); with `valid` ([B, N] bool),
    the mean over the valid tokens only (padded patches are not distillation targets)."""
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    dot = jnp.sum(pred * target, axis=-1)
    # Clamping the squared norms (not the norms) keeps the gradient finite at an all-zero row, where d‖x‖ is 0/0.
    sq_norms = jnp.sum(pred * pred, axis=-1) * jnp.sum(target * target, axis=-1)
    dist = 1.0 - dot * jax.lax.rsqrt(jnp.maximum(sq_norms, eps * eps))
    if valid is None:
        return jnp.mean(dist)
    weight = valid.astype(jnp.float32)
    return jnp.sum(dist * weight) / jnp.maximum(jnp.sum(weight), 1.0)
