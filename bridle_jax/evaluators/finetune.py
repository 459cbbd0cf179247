"""Fine-tuning and linear-probe recipes from a pretraining workdir (SPEC 4, A12-A14).

`run(config, workdir)` reads the encoder E of `config.init_from` (its architecture from that run's config.json; the
fine-tune config supplies the data and the optimisation), adds MAE's global-pool head -- the mean over the valid
patch tokens of the last block (before E's final LayerNorm, which MAE's global pool drops), `fc_norm` LayerNorm,
a linear layer initialised with std 2e-5 -- and trains:

  mode "finetune"      everything, AdamW with BEiT layer-wise lr decay (0.75), weight decay 5e-4 (none on 1-D
                       parameters, the cls token and position embeddings), drop-path 0.1, warm-up then cosine to
                       min_lr per step, BCE (multi-label) or soft-target CE
  mode "linear_probe"  only fc_norm and the head; E frozen (SPEC 4 LP rows: AdamW, the dataset augmentation on)

Augmentation: audio mixup (waveforms), SpecAugment and 2-D time/frequency patch masking run inside the jitted step
(`augment`); the input pipeline's fine-tune stream (`pipeline.train_iterator(..., augment=config.augment)`) gives
images RandAugment + random erasing, audio the class-balancing sampler where set, video clips the multi-scale crop
and flip (SPEC 4's K400 row; no RandAugment/erasing for clips here). Every `eval_every_steps` the eval split
(`pipeline.eval_batches`, streamed) is scored (mAP for multi-label, top-1/top-5 otherwise);
`<workdir>/finetune.json` (written atomically) keeps the whole history and BOTH the best-eval and the last-eval
numbers (A12: the authors report the best epoch). With
`config.cv_folds` (ESC-50, the sounds demo) one run per test fold goes to `<workdir>/fold_<k>`, and the summary has
the mean and std over folds. Runs checkpoint (Orbax: state + data iterator) and resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import encoder_store
from bridle_jax import paths
from bridle_jax import preemption
from bridle_jax import workdir as workdir_lib
from bridle_jax import config as config_lib
from bridle_jax import reporting
from bridle_jax import optim, resolve, sharding, steps
from bridle_jax.data import pipeline
from bridle_jax.evaluators import augment
from bridle_jax.evaluators import scoring
from bridle_jax.models import bridle, vit
from bridle_jax.validation import fail, is_int

RESULT_FILE = "finetune.json"
MODES = ("finetune", "linear_probe")
_DTYPES = ("", "float32", "bfloat16")


# ================================================================================================ config


def base_config(modality: str) -> ml_collections.ConfigDict:
    """Defaults every fine-tune recipe starts from (SPEC 4 "common"); recipes change what differs."""
    placeholder = ml_collections.config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.init_from = placeholder(str)  # the pretraining workdir (its config.json and encoders/iteration_*)
    c.init_iteration = placeholder(int)  # None: the latest finished encoder; 0: random init (a baseline)
    c.mode = "finetune"  # or "linear_probe"
    c.seed = 0
    c.modality = modality  # must be the checkpoint's
    c.data = pipeline.module_for_modality(modality).default_data_config()
    c.num_classes = placeholder(int)  # required: the dataset's class count
    c.multi_label = False  # AudioSet: BCE and mAP
    c.batch_size = 256
    c.num_steps = 1000
    c.warmup_steps = 100
    c.eval_every_steps = 100
    # Recipes state their length in epochs (None: the *_steps above are used as given). The run resolves them from
    # the train split's size (or augment.epoch_len) and this run's batch, so another batch keeps the epochs
    # (bridle_jax/resolve.py); `steps_per_epoch` is recorded by the run, never set by hand.
    c.epochs = placeholder(float)
    c.warmup_epochs = placeholder(float)
    c.eval_every_epochs = placeholder(float)
    c.steps_per_epoch = placeholder(int)
    c.eval_batch_size = 256
    c.cv_folds = ()  # ESC-50: (1, 2, 3, 4, 5) = one run per test fold, the others train
    c.model = ml_collections.ConfigDict(
        {
            "drop_path": 0.1,  # stochastic depth of the last block (linear in depth); fine-tuning only
            "head_init_std": 2e-5,
            "dtype": "",  # "" = the checkpoint's compute dtype; "float32" | "bfloat16"
        }
    )
    c.optim = ml_collections.ConfigDict(
        {"lr": 1e-3, "min_lr": 1e-6, "weight_decay": 5e-4, "layer_decay": 0.75, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
    )
    # non-finite steps are skipped; this many in a row stop the run (as pretraining's optim field)
    c.optim.max_consecutive_nonfinite = 5
    # the global batch `lr` was tuned for; at another batch the lr is kept (the authors' absolute lrs) unless
    # lr_scaling="linear" (lr x batch_size / tuned_batch_size); the run says which (bridle_jax/resolve.py)
    c.optim.tuned_batch_size = placeholder(int)
    c.optim.lr_scaling = "none"
    c.augment = ml_collections.ConfigDict(
        {
            # audio, on device (SPEC 4, A12)
            "mixup": 0.0,  # probability of mixing an example (waveform mixup, soft labels)
            "mixup_alpha": 10,  # lambda ~ Beta(alpha, alpha), alpha a positive integer
            "freq_mask": 0,  # SpecAugment FrequencyMasking parameter (mel bins)
            "time_mask": 0,  # SpecAugment TimeMasking parameter (frames)
            "mask_t_prob": 0.0,  # 2-D patch masking: fraction of time rows dropped
            "mask_f_prob": 0.0,  # ... and of frequency columns
            "weighted_sampler": False,  # AudioSet-2M: AST's class-balancing sampler
            "epoch_len": 0,  # examples per sampler "epoch" (200k for AS-2M); 0 = the train split's size
            # images, in the Grain pipeline (timm create_transform)
            "crop_scale": (0.08, 1.0),
            "crop_ratio": (3 / 4, 4 / 3),
            "flip": True,
            "randaugment_ops": 2,  # 0 = off
            "randaugment_magnitude": 9.0,
            "randaugment_magnitude_std": 0.5,
            "random_erasing": 0.0,  # probability (timm reprob)
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "max_to_keep": 1, "async_save": True})
    c.log_every_steps = 50
    return c


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    """Durations are in steps; recipes given in epochs convert with this (drop_last, as the authors' loaders)."""
    return max(1, round(epochs * (examples // batch_size)))


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks the fine-tune config before anything is read or compiled; errors name the field."""
    if c.mode not in MODES:
        fail("mode", f"one of {MODES}", c.mode)
    if not c.init_from:
        fail("init_from", "the pretraining workdir to start from (--config.init_from=DIR)", c.init_from)
    if c.init_iteration is not None and (not is_int(c.init_iteration) or c.init_iteration < 0):
        fail("init_iteration", "None (the latest encoder), 0 (random init) or an iteration >= 1", c.init_iteration)
    if c.data.name not in pipeline.DATASETS:
        fail("data.name", f"one of {sorted(pipeline.DATASETS)}", c.data.name)
    if pipeline.DATASETS[c.data.name] != c.modality:
        fail("data.name", f"a dataset of modality {c.modality!r} (config.modality)", c.data.name)
    pipeline.module_for(c.data).validate_data_config(c.data)
    if not is_int(c.num_classes) or c.num_classes < 2:
        fail("num_classes", "the dataset's number of classes (an int >= 2)", c.num_classes)
    for field in ("batch_size", "num_steps", "eval_every_steps", "eval_batch_size", "log_every_steps"):
        if not is_int(c[field]) or c[field] < 1:
            fail(field, "an int >= 1", c[field])
    if not is_int(c.warmup_steps) or not 0 <= c.warmup_steps < c.num_steps:
        fail("warmup_steps", f"an int in [0, num_steps={c.num_steps})", c.warmup_steps)
    if c.epochs is not None:
        if isinstance(c.epochs, bool) or not c.epochs > 0:
            fail("epochs", "None (num_steps as given) or a number of epochs > 0", c.epochs)
        if c.warmup_epochs is not None and not 0 <= c.warmup_epochs < c.epochs:
            fail("warmup_epochs", f"None or a number in [0, epochs={c.epochs})", c.warmup_epochs)
        if c.eval_every_epochs is not None and not c.eval_every_epochs > 0:
            fail("eval_every_epochs", "None (eval_every_steps as given) or a number > 0", c.eval_every_epochs)
    elif c.warmup_epochs is not None or c.eval_every_epochs is not None:
        fail("epochs", "a number of epochs when warmup_epochs or eval_every_epochs is set", c.epochs)
    tuned = c.optim.tuned_batch_size
    if tuned is not None and (not is_int(tuned) or tuned < 1):
        fail("optim.tuned_batch_size", "None or the global batch the lr was tuned for (an int >= 1)", tuned)
    if c.optim.lr_scaling not in config_lib.LR_SCALINGS:
        fail("optim.lr_scaling", f"one of {config_lib.LR_SCALINGS}", c.optim.lr_scaling)
    o = c.optim
    if not o.lr > 0 or not 0 <= o.min_lr <= o.lr:
        fail("optim.lr", f"> 0 and >= optim.min_lr={o.min_lr}", o.lr)
    if o.weight_decay < 0:
        fail("optim.weight_decay", ">= 0", o.weight_decay)
    limit = o.get("max_consecutive_nonfinite", 5)
    if not is_int(limit) or limit < 1:
        fail("optim.max_consecutive_nonfinite", "an int >= 1", limit)
    if not 0 < o.layer_decay <= 1:
        fail("optim.layer_decay", "a value in (0, 1] (1 = no decay)", o.layer_decay)
    if not 0 <= c.model.drop_path < 1:
        fail("model.drop_path", "a rate in [0, 1)", c.model.drop_path)
    if c.model.dtype not in _DTYPES:
        fail("model.dtype", f"one of {_DTYPES} ('' = the checkpoint's)", c.model.dtype)
    a = c.augment
    if not 0 <= a.mixup <= 1:
        fail("augment.mixup", "a probability in [0, 1]", a.mixup)
    if isinstance(a.mixup_alpha, bool) or not float(a.mixup_alpha).is_integer() or a.mixup_alpha < 1:
        fail(
            "augment.mixup_alpha",
            "a positive integer (Beta(a, a) is drawn loop-free, see augment.beta_symmetric)",
            a.mixup_alpha,
        )
    for field in ("mask_t_prob", "mask_f_prob", "random_erasing"):
        if not 0 <= a[field] < 1:
            fail(f"augment.{field}", "a value in [0, 1)", a[field])
    for field in ("freq_mask", "time_mask", "randaugment_ops", "epoch_len"):
        if not is_int(a[field]) or a[field] < 0:
            fail(f"augment.{field}", "an int >= 0", a[field])
    if c.modality != "audio":
        for field in ("freq_mask", "time_mask", "mask_t_prob", "mask_f_prob"):
            if a[field]:
                fail(f"augment.{field}", "0 for image and video (an audio augmentation)", a[field])
    if a.weighted_sampler and not c.multi_label:
        fail("augment.weighted_sampler", "False unless config.multi_label (AST's sampler weights multi-hot labels)", 1)
    if c.multi_label and c.modality != "audio":
        fail("multi_label", "False for image and video (only the AudioSet recipe is multi-label)", True)
    folds = tuple(c.cv_folds)
    if folds:
        if c.modality != "audio" or c.data.name not in ("esc50", "sounds"):
            fail("cv_folds", "() unless config.data.name is 'esc50' or 'sounds' (fold-split datasets)", folds)
        if len(set(folds)) != len(folds) or len(folds) < 2 or not all(is_int(f) and f >= 1 for f in folds):
            fail("cv_folds", "at least 2 distinct fold numbers >= 1", folds)
    for axis in ("data", "fsdp"):
        if c.mesh[axis] == 0 or c.mesh[axis] < -1:
            fail(f"mesh.{axis}", "a positive size or -1 (the remaining devices)", c.mesh[axis])
    if not is_int(c.checkpoint.every_steps) or c.checkpoint.every_steps < 1:
        fail("checkpoint.every_steps", "an int >= 1", c.checkpoint.every_steps)


# ================================================================================================ the model


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


def _pretrained_iteration(workdir: str, wanted: int | None) -> int:
    """The encoder iteration to start from, with errors that name the path and what exists."""
    available = encoder_store.saved_iterations(workdir)
    finished = [i for i in available if i >= 1]
    root = paths.workdir_path(workdir) / encoder_store.ENCODERS_DIR
    if wanted == 0:
        return 0
    if wanted is None:
        if not finished:
            raise FileNotFoundError(
                f"config.init_from={workdir!r}: no finished encoder in {root} (found iterations {available or 'none'}"
                "; an encoder is kept when an encoder phase ends): let the pretraining run reach the end of its first "
                "encoder phase, or set config.init_iteration=0 for a random-init baseline"
            )
        return finished[-1]
    if wanted not in available:
        raise ValueError(
            f"config.init_iteration={wanted}: {root} has no encoder for that iteration; available: {available}"
        )
    return wanted


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
    iteration = _pretrained_iteration(workdir, c.init_iteration)
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


# ================================================================================================ state and step


@struct.dataclass
class FinetuneState:
    step: jax.Array  # int32: completed fine-tuning steps
    params: dict  # trained: {"encoder", "fc_norm", "head"} (finetune) or {"fc_norm", "head"} (linear_probe)
    frozen: dict  # not trained: {"encoder"} (linear_probe) or {} (finetune)
    opt_state: Any
    rng: jax.Array


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
        step=jnp.zeros((), jnp.int32), params=trained, frozen=frozen, opt_state=tx.init(trained), rng=k_run
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
    key = jax.random.fold_in(state.rng, state.step)
    k_mix, k_spec, k_mask, k_drop = jax.random.split(key, 4)
    inputs, lengths, targets = batch["input"], batch["length"], batch["target"]
    if a.mixup > 0:
        inputs, targets, _ = augment.mixup(
            k_mix, inputs, lengths if c.modality == "audio" else None, targets, rate=a.mixup, alpha=int(a.mixup_alpha)
        )
    x, valid = models.model_input({"input": inputs, "length": lengths})
    if c.modality == "audio" and (a.freq_mask or a.time_mask):
        spec = models.frontend_spec
        fill = -spec.mean / (2.0 * spec.std)  # a raw 0 after normalisation (AudioMAE masks before normalising)
        x = augment.spec_augment(k_spec, x[..., 0], freq_mask=a.freq_mask, time_mask=a.time_mask, fill=fill)[..., None]
    keep_idx = None
    if c.modality == "audio" and (a.mask_t_prob or a.mask_f_prob):
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
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(operands):
        grads, params, opt_state = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(ok, update, lambda o: (o[1], o[2]), (grads, state.params, state.opt_state))
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": schedule(state.step),
        "train/nonfinite": 1 - ok.astype(jnp.int32),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def predict(s: Setup, params: dict, batch: dict):
    """Eval logits: no augmentation, every patch, no drop-path."""
    x, valid = s.models.model_input(batch)
    return s.classifier.apply({"params": params}, x, valid, None, deterministic=True)


def eval_logits(s: Setup, params: dict, split: str, mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels) of the whole eval `split`, streamed batch by batch from `pipeline.eval_batches` (one
    batch decoded at a time: Kinetics-400's ~20k validation clips would be ~190 GB as arrays) and sharded over the
    mesh; the last batch is padded (one compiled shape). Each batch's labels are checked against
    `config.num_classes`, so splits whose labels only decoding tells (TFDS, ImageNet) are checked too."""
    c = s.config
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(shards, batch_size // shards * shards)
    fn = _jit_predict(s, mesh)
    where = f"config.data.name={c.data.name!r} split {split!r}"
    logits, labels = [], []
    for chunk in pipeline.eval_batches(c.data, split, None, batch_size):
        targets_from_labels(chunk["label"], c.num_classes, c.multi_label, where)
        n = len(chunk["input"])
        x = {"input": np.asarray(chunk["input"], np.float32), "length": np.asarray(chunk["length"], np.int32)}
        if n < batch_size:
            x = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in x.items()}
        logits.append(np.asarray(fn(params, jax.device_put(x, sharding.batch_sharding(mesh))))[:n])
        labels.append(np.asarray(chunk["label"]))
    return np.concatenate(logits), np.concatenate(labels)


def _jit_predict(s: Setup, mesh):
    return jax.jit(
        functools.partial(predict, s),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


# ================================================================================================ labels and data


def targets_from_labels(labels, num_classes: int, multi_label: bool, where: str) -> np.ndarray:
    """Pipeline labels (int [B], or multi-hot [B, C]) -> float32 targets [B, num_classes]; a label set that does not
    match `config.num_classes` is an error naming both."""
    labels = np.asarray(labels)
    if multi_label:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise ValueError(
                f"{where}: expected multi-hot labels [N, config.num_classes={num_classes}] (config.multi_label=True), "
                f"got shape {labels.shape}"
            )
        return labels.astype(np.float32)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: expected integer class labels [N] (config.multi_label=False), got {labels.dtype} {labels.shape}"
        )
    bad = (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{where}: label {int(labels[np.argmax(bad)])} is outside 0..{num_classes - 1}: config.num_classes="
            f"{num_classes} does not match the data"
        )
    return np.eye(num_classes, dtype=np.float32)[labels]


def train_iterator(c, *, local_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """The checkpointable train iterator of this process: the pipeline's fine-tune stream (`augment=config.augment`:
    see `pipeline` for the record contract and what each modality applies)."""
    return pipeline.train_iterator(
        c.data,
        local_batch_size=local_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        augment=c.augment,
    )


# ================================================================================================ evaluation


def score(logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> dict:
    """{"mAP"} (multi-label) or {"top1", "top5"}: the eval metrics of one evaluation."""
    if multi_label:
        return {"mAP": scoring.mean_average_precision(logits, labels)["mAP"]}
    return scoring.topk_accuracy(logits, labels, (1, 5))


def primary_metric(c) -> str:
    return "mAP" if c.multi_label else "top1"


def summarize(history: list[dict], metric: str) -> dict:
    """{"best": the eval with the highest `metric` (the authors' number), "last": the final eval} (A12)."""
    if not history:
        return {"best": None, "last": None}
    best = max(history, key=lambda h: (h[metric], -h["step"]))  # the earliest of equal bests
    return {"best": dict(best), "last": dict(history[-1])}


def _write_json(workdir: str, payload: dict) -> None:
    if jax.process_index() == 0:
        root = paths.workdir_path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(root / RESULT_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_result(workdir: str) -> dict | None:
    path = paths.workdir_path(workdir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ================================================================================================ one run


def schedule_record(c: ml_collections.ConfigDict) -> dict:
    """The resolved step counts and lr a checkpoint records: a resume under other ones would not continue the run."""
    return {k: c[k] for k in ("num_steps", "warmup_steps", "eval_every_steps", "batch_size")} | {"lr": c.optim.lr}


def _check_same_schedule(recorded: dict | None, current: dict, workdir: str) -> None:
    if recorded is None:  # a checkpoint from before the record
        return
    differences = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in current.items() if recorded.get(k) != v]
    if differences:
        raise ValueError(
            f"{workdir}: its checkpoint was made with another schedule ({'; '.join(differences)}), e.g. epochs "
            "resolved at another batch size or train split size; resuming would not continue that run, so nothing "
            "was changed. Resume with the same settings or use a new workdir."
        )


_count_refused = jax.jit(steps.count_nonfinite)  # (refused since this start, in a row), as pretraining counts


def _check_refused(counters, c, step: int, ckpt) -> dict:
    """Stops the fine-tune after `optim.max_consecutive_nonfinite` refused steps in a row, as pretraining does
    (`train._check_nonfinite`), without saving; returns the counters for the log."""
    from bridle_jax import train  # pylint: disable=import-outside-toplevel  (its error type; train imports heavier)

    total, in_a_row = (int(v) for v in np.asarray(counters))
    limit = int(c.optim.get("max_consecutive_nonfinite", 5))
    if in_a_row >= limit:
        ckpt.wait()
        newest = ckpt.latest_step()
        kept = "there is no checkpoint yet" if newest is None else f"the newest checkpoint, step {newest}, is kept"
        raise train.NonFiniteError(
            f"fine-tuning step {step}: {in_a_row} consecutive steps had a non-finite loss or gradient and were "
            f"skipped ({total} since this start); stopping without saving ({kept}): lower config.optim.lr or use "
            "config.model.dtype=float32, and re-run."
        )
    return {"train/nonfinite_skipped_total": total, "train/nonfinite_skipped_in_a_row": in_a_row}


def run_single(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tunes (or probes) once on `c.data`'s train split and scores its eval split; resumable; returns the
    result written to `<workdir>/finetune.json`."""
    c, notes = resolve.finetuning(c, lambda: len(pipeline.train_source(c.data)))
    for line in notes:
        reporting.log_line(line)
    s = setup(c)
    workdir = paths.resolve_workdir(workdir)
    done = read_result(workdir)
    if done is not None and done.get("done"):
        reporting.log_line(f"{workdir}: already finished ({RESULT_FILE}); reporting it")
        return done
    mesh = sharding.make_mesh(c.mesh)
    metric = primary_metric(c)
    eval_split = pipeline.eval_split(c.data)
    eval_labels = pipeline.eval_labels(c.data, eval_split)  # None: checked batch by batch at each evaluation
    if eval_labels is not None:  # the label set checked before compiling
        where = f"config.data.name={c.data.name!r} split {eval_split!r}"
        targets_from_labels(eval_labels, c.num_classes, c.multi_label, where)
    declared = pipeline.num_classes(c.data)
    if declared is not None and declared != c.num_classes:
        raise ValueError(
            f"config.num_classes={c.num_classes} does not match the data: config.data.name={c.data.name!r} has "
            f"{declared} classes"
        )

    depth = s.classifier.encoder.depth
    schedule = lr_schedule(c)
    tx_holder = {}

    def tx_for(trained):
        tx_holder["tx"] = make_optimizer(c, trained, depth)
        return tx_holder["tx"]

    state = init_state(s, tx_for)
    tx = tx_holder["tx"]
    replicated = sharding.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    state = jax.device_put(state, state_sharding)
    data_iter = train_iterator(
        c,
        local_batch_size=sharding.local_batch_size(c.batch_size, mesh),
        seed=c.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=c.checkpoint.max_to_keep, async_save=c.checkpoint.async_save)
    writer = reporting.MetricWriter(workdir)
    watch = preemption.PreemptionWatch(ckpt)  # SIGTERM/SIGINT: checkpoint this step and return; re-running resumes
    preempted = False
    history: list[dict] = []
    base = {
        "mode": c.mode,
        "init_from": paths.resolve_workdir(c.init_from),
        "init_iteration": s.iteration,
        "dataset": c.data.name,
        "eval_split": eval_split,
        "num_eval_examples": pipeline.eval_size(c.data, eval_split).examples,
        "metric": metric,
        "num_steps": int(c.num_steps),
        "batch_size": int(c.batch_size),
    }
    if c.data.get("test_folds") is not None and c.data.name in ("esc50", "sounds"):
        base["test_folds"] = list(c.data.test_folds)
    try:
        abstract = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, state_sharding
        )
        plan = schedule_record(c)
        restored = ckpt.restore_latest(lambda step: abstract, data_iter)
        if restored is not None:
            state, meta = restored
            history = list(meta.get("history", []))
            _check_same_schedule(meta.get("schedule"), plan, workdir)
            reporting.log_line(f"Resumed fine-tuning at step {int(state.step)} from {ckpt.directory}")

        step_fn = jax.jit(
            functools.partial(train_step, s=s, tx=tx, schedule=schedule),
            in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        )
        step = int(state.step)
        refused = jax.device_put(np.zeros(2, np.int32), replicated)  # counted since this start (not checkpointed)
        progress = reporting.Progress(int(c.num_steps))
        progress.start(step)
        name = f"{c.mode}[{c.data.name}]"
        while step < c.num_steps:
            if watch.should_stop(step):
                if step not in ckpt.all_steps():
                    ckpt.save(step, state, data_iter, {"step": step, "history": history, "schedule": plan})
                reporting.log_line(f"Preempted at step {step}: checkpoint saved; re-run the same command to resume")
                preempted = True
                break
            local = next(data_iter)
            target = targets_from_labels(
                local["label"], c.num_classes, c.multi_label, f"config.data.name={c.data.name!r} train batch"
            )
            batch = sharding.global_batch(mesh, {"input": local["input"], "length": local["length"], "target": target})
            state, m = step_fn(state, batch)
            refused = _count_refused(refused, m["train/nonfinite"] == 0)  # on device: no wait for the step
            step += 1
            progress.after_step(step, state)  # the rate starts after the first (compiling) step
            last = step == c.num_steps
            if step % c.log_every_steps == 0 or last:
                rate, line = progress.update(step, int(c.num_steps), name)
                values = {**jax.device_get(m), **_check_refused(refused, c, step, ckpt)}
                if rate is not None:  # not yet measured after compilation
                    values["perf/steps_per_sec"] = rate
                writer.write(step, values, phase=c.mode)
                reporting.log_line(f"{line}  loss {float(values['train/loss']):.4f}")
            if step % c.eval_every_steps == 0 or last:
                logits, labels = eval_logits(s, {**state.frozen, **state.params}, eval_split, mesh, c.eval_batch_size)
                base["num_eval_examples"] = len(labels)  # those scored (unreadable images or clips dropped)
                result = {"step": step, **score(logits, labels, c.multi_label)}
                history.append(result)
                writer.write(step, {f"eval/{k}": v for k, v in result.items() if k != "step"}, phase=c.mode)
                reporting.log_line(
                    f"Eval at step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")
                )
                _write_json(workdir, {**base, **summarize(history, metric), "history": history, "done": False})
            if step % c.checkpoint.every_steps == 0 or last:
                if _check_refused(refused, c, step, ckpt)["train/nonfinite_skipped_in_a_row"]:
                    reporting.log_line(f"Step {step}: not saving a checkpoint: the last step(s) were skipped")
                else:
                    ckpt.save(step, state, data_iter, {"step": step, "history": history, "schedule": plan})
        ckpt.wait()
    finally:
        try:
            ckpt.close()
            writer.close()
        finally:
            watch.close()
    result = {**base, **summarize(history, metric), "history": history, "done": not preempted}
    _write_json(workdir, result)
    return {**result, "preempted": preempted, "final_state": state}


# ================================================================================================ cross-validation


def fold_config(c: ml_collections.ConfigDict, test_fold: int) -> ml_collections.ConfigDict:
    """`c` with the data split of one fold: train on every other fold of `c.cv_folds`, test on `test_fold`."""
    pairs = {test: train for train, test in scoring.esc50_folds(tuple(c.cv_folds))}
    if test_fold not in pairs:
        raise ValueError(f"test fold {test_fold} is not in config.cv_folds={tuple(c.cv_folds)}")
    out = ml_collections.ConfigDict(c.to_dict())
    out.data.train_folds = tuple(pairs[test_fold])
    out.data.test_folds = (int(test_fold),)
    out.cv_folds = ()
    return out


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole recipe: one run, or one per fold of `config.cv_folds` (then the mean +- std over folds)."""
    validate(c)
    workdir = paths.resolve_workdir(workdir)
    if not tuple(c.cv_folds):
        out = run_single(c, workdir)
        out.pop("final_state", None)
        return out
    metric = primary_metric(c)
    folds = {}
    for k in c.cv_folds:
        fold_dir = str(paths.workdir_path(workdir) / f"fold_{k}")
        reporting.log_line(f"Cross-validation: test fold {k} of {tuple(c.cv_folds)} -> {fold_dir}")
        r = run_single(fold_config(c, k), fold_dir)
        r.pop("final_state", None)
        folds[str(k)] = r
        _write_json(workdir, _cv_summary(c, folds, metric, done=False))
        if r.get("preempted"):
            return {**_cv_summary(c, folds, metric, done=False), "preempted": True}
    result = _cv_summary(c, folds, metric, done=True)
    _write_json(workdir, result)
    return result


def _cv_summary(c, folds: dict, metric: str, done: bool) -> dict:
    summary = {}
    for which in ("best", "last"):
        values = [f[which][metric] for f in folds.values() if f.get(which)]
        if values:
            summary[which] = scoring.summarize_folds(values)
    return {
        "mode": c.mode,
        "init_from": paths.resolve_workdir(c.init_from),
        "dataset": c.data.name,
        "metric": metric,
        "cv_folds": list(c.cv_folds),
        "folds": {
            k: {key: v[key] for key in ("best", "last", "init_iteration", "test_folds") if key in v}
            for k, v in folds.items()
        },
        "summary": summary,
        "done": done,
    }


def format_result(result: dict) -> str:
    """A short human-readable report of a `run` result."""
    metric = result["metric"]
    if "summary" in result:
        lines = [f"{result['mode']} on {result['dataset']}, {len(result['folds'])}-fold cross-validation ({metric}):"]
        for which in ("best", "last"):
            s = result["summary"].get(which)
            if s:
                std = "n/a" if s["std"] is None else f"{s['std']:.4f}"
                folds = ", ".join(f"{v:.4f}" for v in s["values"])
                lines.append(f"  {which:<4} eval: {s['mean']:.4f} +- {std}  (folds: {folds})")
        return "\n".join(lines)
    best, last = result.get("best") or {}, result.get("last") or {}
    return (
        f"{result['mode']} on {result['dataset']} ({result['eval_split']}, {result['num_eval_examples']} examples), "
        f"from iteration {result['init_iteration']}:\n"
        f"  best eval: {metric} {best.get(metric, math.nan):.4f} at step {best.get('step')}\n"
        f"  last eval: {metric} {last.get(metric, math.nan):.4f} at step {last.get('step')}"
    )
