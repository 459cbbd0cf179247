"""The whole-config checks run before anything is compiled: `validate(config)`.

They read the models (variants, patch sizes), the data pipelines (each modality checks its own `config.data`), the
masking, the schedule, the sharding rules and the workdir's resume rules, so this module sits above all of them; the
defaults it checks are `bridle_jax.config`, which imports none of them. Every error names the field and what was
expected (`bridle_jax.validation`).
"""

import math

import ml_collections

from bridle_jax import config as config_lib
from bridle_jax import masking, schedule, sharding, workdir
from bridle_jax.data import pipeline
from bridle_jax.models import attention, vit
from bridle_jax.validation import fail, is_int

_DTYPES = ("float32", "bfloat16")


def _check_finite_numbers(tree, prefix: str = "") -> None:
    """Every float field (at any depth, in tuples too) is finite: a NaN or inf lr, decay or crop scale passes every
    ordered comparison check below (`nan <= 0` is False) and then silently breaks the run."""
    for key, value in tree.items():
        field = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite_numbers(value, f"{field}.")
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                fail(field, "a finite number", value)


def _patch_grid(c, patch: int) -> tuple[int, ...]:
    """The encoder's patch grid for this config (rows, cols) or (time, rows, cols), from the data sizes."""
    if c.modality == "audio":
        return (c.data.target_frames // patch, c.data.num_mel_bins // patch)
    side = c.data.image_size // patch
    if c.modality == "video":
        return (c.data.num_frames // c.model.tubelet_size, side, side)
    return (side, side)


def _check_masking_trains(c, patch: int, masking) -> None:
    """An encoder phase needs at least one masked patch (its prediction targets) and one visible patch per sample:
    `masking.ratio=0` would train nothing (loss and gradients 0 at every step) and still finish "DONE"."""
    grid = _patch_grid(c, patch)
    n = grid[1] * grid[2] if c.masking.kind == "tube" else math.prod(grid)
    kept = (masking.tube_num_kept if c.masking.kind == "tube" else masking.num_kept)(n, c.masking.ratio)
    if kept >= n:
        fail(
            "masking.ratio",
            f"a ratio that masks at least one of the {n} patches{' per frame slot' if c.masking.kind == 'tube' else ''}"
            f" (it keeps {kept}: the encoder phases would have no prediction targets)",
            c.masking.ratio,
        )


def _check_joint(c: ml_collections.ConfigDict) -> None:
    """The settings a plan with a "joint" phase needs (configs written before that kind existed lack them)."""
    if "joint" not in c.optim:
        fail("optim.joint", "the joint phase's {lr, warmup_fraction, weight_decay} (base_config has them)", None)
    j = c.get("joint")
    if j is None:
        fail("joint", "{tokenizer_every, tokenizer_loss_ratio} (base_config has them)", None)
    every = j.get("tokenizer_every")
    if not is_int(every) or every < 1:
        fail("joint.tokenizer_every", "an int >= 1 (the tokenizer trains every that many steps)", every)
    if not j.get("tokenizer_loss_ratio", -1) > 0:
        fail("joint.tokenizer_loss_ratio", "> 0 (the weight of the tokenizer loss)", j.get("tokenizer_loss_ratio"))


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks a config before anything is compiled; every error names the field and what was expected."""
    _check_finite_numbers(c)
    if c.modality not in config_lib.MODALITIES:
        fail("modality", f"one of {config_lib.MODALITIES}", c.modality)
    if c.data.name not in pipeline.DATASETS:
        fail("data.name", f"one of {sorted(pipeline.DATASETS)}", c.data.name)
    if pipeline.DATASETS[c.data.name] != c.modality:
        fail("data.name", f"a dataset of modality {c.modality!r} (config.modality)", c.data.name)
    pipeline.validate_data_config(c.data)
    for field in ("variant", "tokenizer_variant"):
        value = c.model[field]
        if field == "tokenizer_variant" and not value:
            continue
        try:
            vit.decode_variant(value)
        except ValueError as e:
            fail(f"model.{field}", f"a variant like 'B/16' ({e})", value)
    if c.model.dtype not in _DTYPES:
        fail("model.dtype", f"one of {_DTYPES}", c.model.dtype)
    backend = c.model.get("attention", "auto")
    if backend not in attention.BACKENDS:
        fail("model.attention", f"one of {attention.BACKENDS}", backend)
    reason = attention.unsupported_reason(backend, dtype=c.model.dtype)
    if reason is not None:
        fail("model.attention", f"a backend this platform runs ({reason}; 'auto' picks one)", backend)
    for field in ("decoder_width", "decoder_depth", "decoder_heads", "estimator_depth"):
        if int(c.model[field]) < 1:
            fail(f"model.{field}", "a positive integer", c.model[field])
    if c.model.decoder_width % c.model.decoder_heads:
        fail("model.decoder_width", f"a multiple of model.decoder_heads={c.model.decoder_heads}", c.model.decoder_width)
    patch = vit.decode_variant(c.model.variant)["patch_size"]
    if c.modality == "audio":
        if c.data.target_frames is None:
            fail("data.target_frames", "a frame count (pretraining pads/crops every clip to it)", None)
        sizes = {"data.target_frames": c.data.target_frames, "data.num_mel_bins": c.data.num_mel_bins}
    else:
        sizes = {"data.image_size": c.data.image_size}
    for field, size in sizes.items():
        if size < patch or size % patch:
            fail(field, f"a positive multiple of the patch size {patch} of model.variant", size)
    if c.modality == "video":
        t = c.model.tubelet_size
        if t < 1 or c.data.num_frames < t or c.data.num_frames % t:
            fail("data.num_frames", f"a positive multiple of model.tubelet_size={t}", c.data.num_frames)
    if c.model.decoder_kind not in ("global", "local"):
        fail("model.decoder_kind", "'global' or 'local'", c.model.decoder_kind)
    if c.model.decoder_kind == "local":
        if c.modality == "video":
            fail("model.decoder_kind", "'global' for video (the local-window decoder works on 2-D grids)", "local")
        rows = (c.data.target_frames if c.modality == "audio" else c.data.image_size) // patch
        cols = (c.data.num_mel_bins if c.modality == "audio" else c.data.image_size) // patch
        win = tuple(c.model.decoder_window)
        if len(win) != 2 or rows % win[0] or cols % win[1]:
            fail("model.decoder_window", f"(rows, cols) that tile the {rows}x{cols} patch grid", win)
    if c.masking.kind not in masking.MASKS:
        fail("masking.kind", f"one of {sorted(masking.MASKS)}", c.masking.kind)
    if c.masking.kind == "tube" and c.modality != "video":
        fail("masking.kind", "'random' for image and audio (tube masking needs a time x space grid)", "tube")
    if c.model.tokenizer_variant and vit.decode_variant(c.model.tokenizer_variant)["patch_size"] != patch:
        fail(
            "model.tokenizer_variant",
            f"the encoder's patch size {patch} (targets are per encoder patch)",
            c.model.tokenizer_variant,
        )

    q = c.quantizer
    if q.num_levels < 1:
        fail("quantizer.num_levels", ">= 1", q.num_levels)
    if q.codebook_size < 2:
        fail("quantizer.codebook_size", ">= 2", q.codebook_size)
    if q.dim < 1:
        fail("quantizer.dim", ">= 1", q.dim)
    if not 0.0 < q.decay < 1.0:
        fail("quantizer.decay", "a value in (0, 1)", q.decay)
    if q.get("ema_kind", "normalized") not in ("normalized", "vqvae"):
        fail("quantizer.ema_kind", "'normalized' or 'vqvae'", q.ema_kind)
    if q.kmeans_iters < 1:
        fail("quantizer.kmeans_iters", ">= 1", q.kmeans_iters)
    if q.commitment_weight < 0:
        fail("quantizer.commitment_weight", ">= 0", q.commitment_weight)
    if not 0.0 <= c.masking.ratio < 1.0:
        fail("masking.ratio", "a value in [0, 1)", c.masking.ratio)
    _check_masking_trains(c, patch, masking)

    try:
        schedule.check_plan(c.schedule.phases)  # in steps or epochs (resolved at run time)
    except ValueError as e:
        fail(
            "schedule.phases",
            f"a tuple of 'kind:steps' or 'kind:<epochs>ep' starting with encoder_cold_start or joint ({e})",
            c.schedule.phases,
        )

    if c.batch_size < 1:
        fail("batch_size", ">= 1", c.batch_size)
    joint = schedule.has_kind(c.schedule.phases, "joint")
    if joint:
        _check_joint(c)
    for side in ("encoder", "tokenizer") + (("joint",) if joint else ()):
        o = c.optim[side]
        if o.lr <= 0:
            fail(f"optim.{side}.lr", "> 0", o.lr)
        if not 0.0 <= o.warmup_fraction < 1.0:
            fail(f"optim.{side}.warmup_fraction", "a value in [0, 1)", o.warmup_fraction)
        if o.weight_decay < 0:
            fail(f"optim.{side}.weight_decay", ">= 0", o.weight_decay)
    if c.optim.max_update_ratio <= 0:
        fail("optim.max_update_ratio", "> 0", c.optim.max_update_ratio)
    if c.optim.b1 < 0 or c.optim.b1 >= 1 or c.optim.b2 < 0 or c.optim.b2 >= 1:
        fail("optim.b1/b2", "values in [0, 1)", (c.optim.b1, c.optim.b2))
    if c.optim.eps <= 0:
        fail("optim.eps", "> 0", c.optim.eps)
    if c.optim.max_consecutive_nonfinite < 1:
        fail("optim.max_consecutive_nonfinite", ">= 1", c.optim.max_consecutive_nonfinite)
    tuned = c.optim.get("tuned_batch_size", None)
    if tuned is not None and (not isinstance(tuned, int) or isinstance(tuned, bool) or tuned < 1):
        fail("optim.tuned_batch_size", "None or the global batch the lrs were tuned for (an int >= 1)", tuned)
    if c.optim.get("lr_scaling", "none") not in config_lib.LR_SCALINGS:
        fail("optim.lr_scaling", f"one of {config_lib.LR_SCALINGS}", c.optim.lr_scaling)
    acc = c.optim.get("accumulation_steps", 1)
    if not isinstance(acc, int) or isinstance(acc, bool) or acc < 1:
        fail("optim.accumulation_steps", "an integer >= 1", acc)
    for axis in ("data", "fsdp"):
        if c.mesh[axis] == 0 or c.mesh[axis] < -1:
            fail(f"mesh.{axis}", "a positive size or -1 (the remaining devices)", c.mesh[axis])
    shards = math.prod(s for s in (c.mesh.data, c.mesh.fsdp) if s != -1)  # a -1 axis is checked at run time
    if c.batch_size % (acc * shards):
        fail(
            "batch_size",
            f"a multiple of optim.accumulation_steps={acc} x {shards} batch shards (the fixed mesh data x fsdp)",
            c.batch_size,
        )
    sharding.logical_rules(c.mesh)  # errors name the rule
    if c.checkpoint.every_steps < 1:
        fail("checkpoint.every_steps", ">= 1", c.checkpoint.every_steps)
    if c.checkpoint.max_to_keep < 1:
        fail("checkpoint.max_to_keep", ">= 1", c.checkpoint.max_to_keep)
    if c.log_every_steps < 1:
        fail("log_every_steps", ">= 1", c.log_every_steps)
    workdir.check_allowed_changes(c.resume.allow_changes)
