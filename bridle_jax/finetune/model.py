"""The fine-tuned model and its step: E from the pretraining workdir + MAE's global-pool head, the state, AdamW with
layer-wise lr decay, and the step with its on-device augmentation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from bridle_jax import encoder_store, optim, paths, sharding, steps
from bridle_jax import workdir as workdir_lib
from bridle_jax.finetune import augment
from bridle_jax.finetune.config import validate
from bridle_jax.models import bridle, vit
from bridle_jax.validation import fail, is_int


class Classifier(nn.Module):
    """E + MAE's global-pool head: mean over the valid patch tokens of the last block -> fc_norm -> linear."""

    encoder: vit.ViTEncoder
    num_classes: int
    head_init_std: float = 2e-5

    @nn.compact
    def __call__(self, x, valid=None, keep_idx=None, *, deterministic: bool = True):
        """x: E's input; valid: `[B, N]` bool patch validity or None; keep_idx: `[B, n]` patches E sees (2-D patch
        masking) or None. Returns float32 logits `[B, num_classes]`."""
        _, inter = self.encoder(x, keep_idx, deterministic=deterministic)
        tokens = inter["pre_norm"].astype(jnp.float32)
        if valid is None:
            pooled = jnp.mean(tokens, axis=1)
        else:
            if keep_idx is not None:
                valid = jnp.take_along_axis(valid, keep_idx, axis=1)
            weight = valid.astype(jnp.float32)[..., None]
            pooled = jnp.sum(tokens * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)
        pooled = nn.LayerNorm(epsilon=1e-6, name="fc_norm")(pooled)
        head_init = nn.initializers.truncated_normal(stddev=self.head_init_std)
        return nn.Dense(self.num_classes, kernel_init=head_init, name="head")(pooled)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run derives from the two configs and the checkpoint."""

    config: ml_collections.ConfigDict  # the fine-tune config (data of this fold)
    pretrain_config: ml_collections.ConfigDict
    models: bridle.BridleModels  # built from the pretraining config with the fine-tune data (model_input)
    classifier: Classifier
    encoder_params: Any  # pretrained (or freshly initialised) E
    iteration: int  # the encoder's pretraining iteration (0 = random init)


def _model_config(c, pretrain):
    """The pretraining config with the fine-tune data (and compute dtype): what `build_models` needs."""
    merged = ml_collections.ConfigDict(pretrain.to_dict())
    merged.data = ml_collections.ConfigDict(c.data.to_dict())
    if c.model.dtype:
        merged.model.dtype = c.model.dtype
    return merged


def _check_input_size(c, pretrain) -> None:
    patch = vit.decode_variant(pretrain.model.variant)["patch_size"]
    d = c.data
    if c.modality == "audio":
        sizes = {"data.target_frames": d.target_frames, "data.num_mel_bins": d.num_mel_bins}
    else:
        sizes = {"data.image_size": d.image_size}
    for field, size in sizes.items():
        if not is_int(size) or size < patch or size % patch:
            fail(field, f"a positive multiple of the checkpoint's patch size {patch} ({pretrain.model.variant})", size)
    if c.modality == "video":
        t = pretrain.model.tubelet_size
        if d.num_frames < t or d.num_frames % t:
            fail("data.num_frames", f"a positive multiple of the checkpoint's tubelet size {t}", d.num_frames)
    if c.modality == "audio" and any((c.augment.mask_t_prob, c.augment.mask_f_prob)):
        rows, cols = d.target_frames // patch, d.num_mel_bins // patch
        if int(rows * (1 - c.augment.mask_t_prob)) < 1 or int(cols * (1 - c.augment.mask_f_prob)) < 1:
            fail("augment.mask_t_prob", f"probabilities that keep a row and a column of the {rows}x{cols} grid", 1)


def setup(c: ml_collections.ConfigDict) -> Setup:
    """Validates the config against the checkpoint and loads (or, with init_iteration=0, initialises) E."""
    validate(c)
    workdir = paths.resolve_workdir(c.init_from)
    pretrain = workdir_lib.read_config(workdir)  # FileNotFoundError naming config.json when not a workdir
    if pretrain.get("modality", "image") != c.modality:
        raise ValueError(
            f"config.modality={c.modality!r} does not match the checkpoint: {workdir}/config.json has modality "
            f"{pretrain.get('modality', 'image')!r} (fine-tune with a config of that modality)"
        )
    _check_input_size(c, pretrain)
    iteration = c.init_iteration
    if iteration != 0:  # 0: random init, nothing loaded
        try:
            iteration = encoder_store.pick_iteration(workdir, iteration, field="config.init_iteration", finished=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"config.init_from={workdir!r}: {e}: let the pretraining run reach the end of its first encoder phase, "
                "or set config.init_iteration=0 for a random-init baseline"
            ) from None
    models = bridle.build_models(_model_config(c, pretrain))
    encoder = models.encoder.clone(drop_path=float(c.model.drop_path) if c.mode == "finetune" else 0.0)
    classifier = Classifier(encoder=encoder, num_classes=int(c.num_classes), head_init_std=c.model.head_init_std)
    x = jnp.zeros((1,) + tuple(models.input_shape), jnp.float32)
    abstract = jax.eval_shape(lambda: models.encoder.init(jax.random.PRNGKey(0), x)["params"])
    if iteration == 0:
        params = jax.jit(lambda k: models.encoder.init(k, x)["params"])(jax.random.PRNGKey(c.seed + 17))
    else:
        params = encoder_store.load_encoder_params(workdir, iteration, abstract)
    return Setup(c, pretrain, models, classifier, params, iteration)


@struct.dataclass
class FinetuneState:
    step: jax.Array  # int32: completed fine-tuning steps
    params: dict  # trained: {"encoder", "fc_norm", "head"} (finetune) or {"fc_norm", "head"} (linear_probe)
    frozen: dict  # not trained: {"encoder"} (linear_probe) or {} (finetune)
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array  # int32[2]: (refused steps in the run, refused steps in a row), as pretraining counts


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params):
    """True where AdamW decays: matrices and kernels, never 1-D parameters, the cls token or position embeddings
    (timm's `no_weight_decay` list of its VisionTransformer)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and not {"cls", "pos_embed"} & set(_keys(path)), params
    )


def lr_schedule(c) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then half-cycle cosine to `optim.min_lr` at `num_steps` (MAE's
    `lr_sched.adjust_learning_rate`, stepped per iteration)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, c.optim.lr, int(c.warmup_steps), max(int(c.num_steps), int(c.warmup_steps) + 1), end_value=c.optim.min_lr
    )


def make_optimizer(c, trained_params, depth: int) -> optax.GradientTransformation:
    o = c.optim
    adamw = optax.adamw(
        lr_schedule(c), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask(trained_params)
    )
    scales = optim.layer_decay_scales(trained_params, depth, o.layer_decay)
    return optax.chain(adamw, optim.scale_by_tree(scales))


def init_state(s: Setup, tx_for) -> FinetuneState:
    """The starting state: E from the checkpoint, a fresh head; `tx_for(trained_params)` builds the optimizer."""
    c = s.config
    key = jax.random.PRNGKey(c.seed)
    k_head, k_run = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(s.models.input_shape), jnp.float32)
    params = dict(jax.jit(lambda k: s.classifier.init(k, x)["params"])(k_head))
    params["encoder"] = s.encoder_params
    if c.mode == "linear_probe":
        trained = {k: v for k, v in params.items() if k != "encoder"}
        frozen = {"encoder": params["encoder"]}
    else:
        trained, frozen = params, {}
    tx = tx_for(trained)
    return FinetuneState(
        step=jnp.zeros((), jnp.int32),
        params=trained,
        frozen=frozen,
        opt_state=tx.init(trained),
        rng=k_run,
        nonfinite=jnp.zeros((2,), jnp.int32),
    )


def loss_fn(logits, targets, multi_label: bool):
    """BCE-with-logits averaged over examples and classes (multi-label), else soft-target cross-entropy."""
    if multi_label:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def train_step(state: FinetuneState, batch: dict, *, s: Setup, tx, schedule):
    """One step: on-device augmentation (mixup, log-mel, SpecAugment, 2-D patch masking), forward with drop-path,
    loss, guarded AdamW update. `batch`: {"input", "length", "target" float32 [B, C]}."""
    c, a, models = s.config, s.config.augment, s.models
    spectrogram = models.frontend_spec is not None  # waveforms in, log-mels to the encoder: the audio recipes
    key = jax.random.fold_in(state.rng, state.step)
    k_mix, k_spec, k_mask, k_drop = jax.random.split(key, 4)
    inputs, lengths, targets = batch["input"], batch["length"], batch["target"]
    if a.mixup > 0:
        inputs, targets, _ = augment.mixup(
            k_mix, inputs, lengths if spectrogram else None, targets, rate=a.mixup, alpha=int(a.mixup_alpha)
        )
    x, valid = models.model_input({"input": inputs, "length": lengths})
    if spectrogram and (a.freq_mask or a.time_mask):
        spec = models.frontend_spec
        fill = -spec.mean / (2.0 * spec.std)  # a raw 0 after normalisation (AudioMAE masks before normalising)
        x = augment.spec_augment(k_spec, x[..., 0], freq_mask=a.freq_mask, time_mask=a.time_mask, fill=fill)[..., None]
    keep_idx = None
    if spectrogram and (a.mask_t_prob or a.mask_f_prob):
        keep_idx = augment.patch_mask_2d(
            k_mask, x.shape[0], models.patch_grid, mask_t_prob=a.mask_t_prob, mask_f_prob=a.mask_f_prob
        )
    deterministic = c.mode == "linear_probe"

    def objective(trained):
        params = {**state.frozen, **trained}
        logits = s.classifier.apply(
            {"params": params}, x, valid, keep_idx, deterministic=deterministic, rngs={"dropout": k_drop}
        )
        return loss_fn(logits, targets, c.multi_label)

    loss, grads = jax.value_and_grad(objective)(state.params)
    ok, grad_norm, _, params, opt_state = steps.guarded_update(tx, grads, state.params, state.opt_state, loss)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": schedule(state.step),
        "train/nonfinite": 1 - ok.astype(jnp.int32),
    }
    nonfinite = steps.count_nonfinite(state.nonfinite, ok)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=nonfinite), metrics


def predict(s: Setup, params: dict, batch: dict):
    """Eval logits: no augmentation, every patch, no drop-path."""
    x, valid = s.models.model_input(batch)
    return s.classifier.apply({"params": params}, x, valid, None, deterministic=True)


def _jit_predict(s: Setup, mesh):
    return jax.jit(
        functools.partial(predict, s),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
