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
