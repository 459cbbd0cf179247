"""Linear probe of a frozen encoder (SPEC 4, LP): average-pooled patch tokens (no cls) -> LayerNorm -> linear head
(init std 2e-5), trained with AdamW on the labelled train split; top-1 on the test split.

The features are extracted once with the jitted encoder, then the small head trains in one jitted `lax.scan`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bridle_jax import sharding


def pool(models, encoder_params, batch):
    """The probe's feature: the mean over the (valid, i.e. not padded) patch tokens of E's last layer, cls excluded,
    float32 [B, width]. `batch` is a pipeline batch {"input", "length"}; the modality's front-end runs here."""
    x, valid = models.model_input(batch)
    _, inter = models.encoder.apply({"params": encoder_params}, x)
    patches = inter["patches"].astype(jnp.float32)
    if valid is None:
        return jnp.mean(patches, axis=1)
    weight = valid.astype(jnp.float32)[..., None]
    return jnp.sum(patches * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)


def pooled_features(models, encoder_params, arrays: dict, *, mesh, batch_size: int = 256) -> np.ndarray:
    """`pool` over every example of `arrays` ({"input", "length"} NumPy, as `pipeline.eval_arrays` returns them),
    in chunks sharded over all devices, as float32 NumPy [N, width]."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(shards, batch_size // shards * shards)
    keys = ("input", "length")
    fn = jax.jit(
        lambda p, b: pool(models, p, b),
        in_shardings=(None, {k: sharding.batch_sharding(mesh) for k in keys}),
        out_shardings=sharding.replicated(mesh),
    )
    total = len(arrays["input"])
    out = []
    for start in range(0, total, batch_size):
        chunk = {k: np.asarray(arrays[k][start : start + batch_size]) for k in keys}
        n = len(chunk["input"])
        if n < batch_size:  # pad the last chunk so every call has the same (compiled) shape
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in chunk.items()}
        chunk["input"] = chunk["input"].astype(np.float32)
        chunk["length"] = chunk["length"].astype(np.int32)
        placed = jax.device_put(chunk, sharding.batch_sharding(mesh))
        out.append(np.asarray(fn(encoder_params, placed))[:n])
    return np.concatenate(out)


def _logits(head, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + 1e-6) * head["scale"] + head["bias"]
    return x @ head["kernel"] + head["head_bias"]


@functools.partial(jax.jit, static_argnames=("lr", "num_classes", "steps", "batch_size"))
def _train_head(features, labels, key, lr, *, num_classes: int, steps: int, batch_size: int):
    dim = features.shape[-1]
    k_init, k_batches = jax.random.split(key)
    head = {
        "scale": jnp.ones((dim,)),
        "bias": jnp.zeros((dim,)),
        "kernel": 2e-5 * jax.random.truncated_normal(k_init, -2.0, 2.0, (dim, num_classes)),
        "head_bias": jnp.zeros((num_classes,)),
    }
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
    tx = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(h, idx):
        logits = _logits(h, features[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    def step(carry, k):
        h, opt = carry
        idx = jax.random.randint(k, (batch_size,), 0, features.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(h, idx)
        updates, opt = tx.update(grads, opt, h)
        return (optax.apply_updates(h, updates), opt), loss

    (head, _), losses = jax.lax.scan(step, (head, tx.init(head)), jax.random.split(k_batches, steps))
    return head, losses


def top1(head, features, labels) -> float:
    return float(np.mean(np.asarray(jnp.argmax(_logits(head, jnp.asarray(features)), -1)) == labels))


def linear_probe(
    train_features, train_labels, test_features, test_labels, *, steps: int, lr: float, batch_size: int, seed: int = 0
) -> dict:
    """Trains the head on the train features; returns top-1 on both splits and the final training loss."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head, losses = _train_head(
        jnp.asarray(train_features),
        jnp.asarray(train_labels, jnp.int32),
        jax.random.PRNGKey(seed),
        lr,
        num_classes=num_classes,
        steps=steps,
        batch_size=min(batch_size, len(train_features)),
    )
    return {
        "top1_train": top1(head, train_features, train_labels),
        "top1_test": top1(head, test_features, test_labels),
        "final_loss": float(losses[-1]),
    }
