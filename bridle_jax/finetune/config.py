"""The fine-tune config: the defaults every recipe starts from (docs/method.md §4 "common") and its checks."""

from __future__ import annotations

import ml_collections

from bridle_jax import config as config_lib
from bridle_jax.data import pipeline
from bridle_jax.validation import fail, is_int

MODES = ("finetune", "linear_probe")
_DTYPES = ("", "float32", "bfloat16")


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
    pipeline.validate_data_config(c.data)
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
