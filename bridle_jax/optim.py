"""Optimizers from the config (SPEC 3.2): AdamW (0.9, 0.95), linear warm-up then half-cycle cosine to 0 per phase,
no weight decay on 1-D parameters (biases, LayerNorm scales), as timm's `param_groups_weight_decay`; and the
BEiT-style layer-wise learning-rate decay of fine-tuning (SPEC 4)."""

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


# ---------------------------------------------------------------- layer-wise learning-rate decay (fine-tuning)


def layer_id(path: tuple[str, ...], depth: int) -> int:
    """BEiT's layer index of one parameter, from its path of dict keys in a ViT parameter tree.

    The stem (`patch_embed`), the cls token and position embeddings are layer 0; `block_{i}` is layer i + 1;
    everything after the blocks (the final norm, fc_norm, the head) is layer depth + 1 (MAE `get_layer_id_for_vit`).
    """
    for key in path:
        if key.startswith("block_") and key[len("block_") :].isdigit():
            return int(key[len("block_") :]) + 1
    if any(key in ("patch_embed", "cls", "pos_embed") for key in path):
        return 0
    return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
    """Per-parameter lr multipliers `decay ** (depth + 1 - layer_id)`: 1 for the head, decay**(depth + 1) for the
    stem, so early layers move least (BEiT/MAE fine-tuning, SPEC 4: decay 0.75)."""

    def scale(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        return float(decay) ** (depth + 1 - layer_id(keys, depth))

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by its constant from `scales` (a tree shaped like the params). After AdamW this is a
    per-group lr exactly as PyTorch's param groups (the decoupled weight-decay term is scaled too)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)
