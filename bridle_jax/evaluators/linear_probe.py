"""Linear probe of a frozen encoder (SPEC 4, LP): average-pooled patch tokens (no cls) -> LayerNorm -> linear head
(init std 2e-5), trained with AdamW on the labelled train split; top-1 on the test split.

The features are extracted once per encoder with the jitted encoder, streamed batch by batch from the eval reader
(`split_features` over `pipeline.eval_batches`: only one batch of decoded inputs and the pooled features, N x width
float32, are ever held), then the small head trains in one jitted `lax.scan`.

Public API:
  pool(models, encoder_params, batch)                      the pooled feature of one batch (jittable)
  pooled_features(models, encoder_params, data, mesh=...)   over arrays or an iterable of batches, sharded
  split_features(models, encoder_params, data_config, split, max_examples, mesh=...) -> (features, labels), streamed
  fit(train_x, train_y, test_x, test_y, steps=, lr=, batch_size=, seed=) -> ProbeFit (head, accuracies, predictions)
  linear_probe(...) -> {"top1_train", "top1_test", "final_loss"}  (what the training loop records)
  train_head, logits, predict, top1                         the pieces of `fit`
"""

import collections.abc
import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bridle_jax import sharding
from bridle_jax.data import pipeline

_KEYS = ("input", "length")


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


def chunk_size(mesh, batch_size: int) -> int:
    """`batch_size` rounded down to a multiple of the mesh's batch shards (at least one row per shard): the rows of
    every call of the jitted feature extractor."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(shards, int(batch_size) // shards * shards)


def _chunks(data, size: int):
    """{"input", "length"} chunks of exactly `size` rows (the last one shorter) from a dict of arrays (sliced, no
    copy) or an iterable of batches of any sizes (re-cut only when their size is not `size`)."""
    if isinstance(data, collections.abc.Mapping):
        for start in range(0, len(data["input"]), size):
            yield {k: data[k][start : start + size] for k in _KEYS}
        return
    pending, held = [], 0
    for batch in data:
        batch = {k: np.asarray(batch[k]) for k in _KEYS}
        n = len(batch["input"])
        if n == 0:
            continue
        if not pending and n == size:
            yield batch
            del batch  # not held while the next batch is read
            continue
        pending.append(batch)
        held += n
        while held >= size:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in _KEYS}
            yield {k: v[:size] for k, v in joined.items()}
            held -= size
            pending = [{k: v[size:] for k, v in joined.items()}] if held else []
    if pending:
        yield {k: np.concatenate([b[k] for b in pending]) for k in _KEYS}


_POOL_FNS: dict = {}  # id(models) -> (weakref to models, {mesh: jitted pool})


def _pool_fn(models, mesh):
    """The jitted, sharded `pool` of `models` on `mesh`, built once per models object and mesh: every probe of a run
    (both splits, every encoder) reuses one compiled function instead of tracing and compiling it per call."""
    entry = _POOL_FNS.get(id(models))
    if entry is None or entry[0]() is not models:
        key = id(models)
        entry = (weakref.ref(models, lambda _: _POOL_FNS.pop(key, None)), {})
        _POOL_FNS[key] = entry
    ref, fns = entry
    if mesh not in fns:
        fns[mesh] = jax.jit(
            lambda p, b: pool(ref(), p, b),  # a weak reference: the cache never keeps a models object alive
            in_shardings=(None, {k: sharding.batch_sharding(mesh) for k in _KEYS}),
            out_shardings=sharding.replicated(mesh),
        )
    return fns[mesh]


def pooled_features(models, encoder_params, data, *, mesh, batch_size: int = 256) -> np.ndarray:
    """`pool` over every example of `data`, as float32 NumPy [N, width].

    `data` is a dict of NumPy arrays {"input", "length"} (as `pipeline.eval_arrays` and `preprocess_eval` return
    them) or an iterable of such batches (`pipeline.eval_batches`: streamed, consumed once, batches of any size).
    The examples go through the jitted encoder in chunks of `batch_size` rows (rounded to a multiple of the mesh's
    batch shards: `chunk_size`), each sharded over all devices; the last chunk is padded to that shape (its last row
    repeated, so nothing recompiles) and the padding trimmed from the features. Only one chunk of inputs (and the one
    before it, in flight on the devices) is held besides the features. On several processes every process passes
    the same examples (each reads the whole split) and gets every feature."""
    size = chunk_size(mesh, batch_size)
    fn = _pool_fn(models, mesh)
    out, in_flight = [], None
    for chunk in _chunks(data, size):
        n = len(chunk["input"])
        if n < size:  # pad the last chunk so every call has the same (compiled) shape
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in chunk.items()}
        chunk = {"input": np.asarray(chunk["input"], np.float32), "length": np.asarray(chunk["length"], np.int32)}
        placed = jax.device_put(chunk, sharding.batch_sharding(mesh))
        features = fn(encoder_params, placed)  # dispatched: the next chunk is read while the devices run this one
        del chunk, placed
        if in_flight is not None:
            out.append(np.asarray(in_flight[0])[: in_flight[1]])
        in_flight = (features, n)
    if in_flight is not None:
        out.append(np.asarray(in_flight[0])[: in_flight[1]])
    if not out:
        raise ValueError("pooled_features: no examples")
    return np.concatenate(out)


def split_features(
    models, encoder_params, data_config, split: str, max_examples: int | None = None, *, mesh, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features float32 [N, width], labels [N]) of a labelled split, streamed from
    `pipeline.eval_batches(data_config, split, max_examples, ...)`: the records and values of `eval_arrays` (same
    eval preprocessing, same order, same cap), of which one batch of decoded inputs is held at a time."""
    size = chunk_size(mesh, batch_size)
    labels = []

    def batches():
        for batch in pipeline.eval_batches(data_config, split, max_examples, size):
            labels.append(batch["label"])
            yield batch
            del batch  # not held while the next batch is read

    features = pooled_features(models, encoder_params, batches(), mesh=mesh, batch_size=size)
    return features, np.concatenate(labels)


def logits(head, features) -> jax.Array:
    """The probe head's logits: LayerNorm (eps 1e-6, the head's scale and bias) then the linear layer."""
    x = jnp.asarray(features)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + 1e-6) * head["scale"] + head["bias"]
    return x @ head["kernel"] + head["head_bias"]


_logits = logits  # the name older callers used


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
        out = logits(h, features[idx])
        return optax.softmax_cross_entropy_with_integer_labels(out, labels[idx]).mean()

    def step(carry, k):
        h, opt = carry
        idx = jax.random.randint(k, (batch_size,), 0, features.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(h, idx)
        updates, opt = tx.update(grads, opt, h)
        return (optax.apply_updates(h, updates), opt), loss

    (head, _), losses = jax.lax.scan(step, (head, tx.init(head)), jax.random.split(k_batches, steps))
    return head, losses


def train_head(
    features, labels, *, num_classes: int, steps: int, lr: float, batch_size: int, seed: int = 0
) -> tuple[dict, np.ndarray]:
    """The probe's head {"scale", "bias", "kernel", "head_bias"} trained for `steps` AdamW steps (warm-up 10 %,
    cosine) on minibatches of `batch_size` (at most N) drawn with `seed`; returns (head, per-step losses)."""
    head, losses = _train_head(
        jnp.asarray(features),
        jnp.asarray(labels, jnp.int32),
        jax.random.PRNGKey(seed),
        lr,
        num_classes=int(num_classes),
        steps=int(steps),
        batch_size=min(int(batch_size), len(features)),
    )
    return head, np.asarray(losses)


def predict(head, features) -> np.ndarray:
    """The head's predicted class per row of `features`."""
    return np.asarray(jnp.argmax(logits(head, features), -1))


def top1(head, features, labels) -> float:
    return float(np.mean(predict(head, features) == np.asarray(labels)))


@dataclasses.dataclass(frozen=True)
class ProbeFit:
    """A fitted probe: the head, its accuracies, the test predictions (for a confusion matrix) and the losses."""

    head: dict
    num_classes: int
    top1_train: float
    top1_test: float
    final_loss: float
    test_predictions: np.ndarray
    losses: np.ndarray

    def result(self) -> dict:
        """What the training loop records in linear_probe.json."""
        return {"top1_train": self.top1_train, "top1_test": self.top1_test, "final_loss": self.final_loss}

    def confusion_matrix(self, test_labels) -> np.ndarray:
        """[num_classes, num_classes] counts: rows the true class, columns the predicted one."""
        n = self.num_classes
        true = np.asarray(test_labels, np.int64)
        return np.bincount(true * n + self.test_predictions.astype(np.int64), minlength=n * n).reshape(n, n)


def fit(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> ProbeFit:
    """Trains the head on the train features (`train_head`) and scores both splits. `num_classes` defaults to the
    largest label of either split + 1."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head, losses = train_head(
        train_features, train_labels, num_classes=num_classes, steps=steps, lr=lr, batch_size=batch_size, seed=seed
    )
    predictions = predict(head, test_features)
    return ProbeFit(
        head=head,
        num_classes=int(num_classes),
        top1_train=top1(head, train_features, train_labels),
        top1_test=float(np.mean(predictions == test_labels)),
        final_loss=float(losses[-1]),
        test_predictions=predictions,
        losses=losses,
    )


def linear_probe(
    train_features, train_labels, test_features, test_labels, *, steps: int, lr: float, batch_size: int, seed: int = 0
) -> dict:
    """Trains the head on the train features; returns top-1 on both splits and the final training loss."""
    return fit(
        train_features, train_labels, test_features, test_labels, steps=steps, lr=lr, batch_size=batch_size, seed=seed
    ).result()
