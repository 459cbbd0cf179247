"""Optimizers from the config (SPEC 3.2): AdamW (0.9, 0.95), linear warm-up then half-cycle cosine to 0 per phase,
no weight decay on 1-D parameters (biases, LayerNorm scales), as timm's `param_groups_weight_decay`."""

import jax
import ml_collections
import optax


def learning_rate_schedule(side: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = int(round(side.warmup_fraction * num_steps))
    if warmup == 0:
        return optax.cosine_decay_schedule(side.lr, max(num_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=side.lr, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1), end_value=0.0
    )


def decay_mask(params):
    """True for parameters that get weight decay: matrices and kernels, never vectors."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, side: str, num_steps: int):
    """Returns (optax transformation, learning-rate schedule) for one phase of `side` ("encoder"|"tokenizer")."""
    cfg = optim[side]
    lr = learning_rate_schedule(cfg, num_steps)
    tx = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    return tx, lr
