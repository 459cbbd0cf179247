"""The config schema: defaults every recipe starts from (`base_config`) and the checks run before compiling.

Recipes in configs/ call `base_config()` and change what differs.

Field names follow the API they feed (`quantizer.num_levels` -> `init_codebooks(num_levels=...)`), so
`--config.quantizer.num_levels=1 --config.quantizer.codebook_size=1024` is the VQ baseline.
"""

import math

import ml_collections

from bridle_jax.validation import fail, is_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES = ("image", "audio", "video")
LR_SCALINGS = ("none", "linear")  # at a batch other than optim.tuned_batch_size: the same lr, or lr x batch / tuned


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.modality = "image"

    # The image pipeline's fields; audio and video recipes replace c.data with their pipeline's
    # default_data_config() (see bridle_jax/data/pipeline.py).
    from bridle_jax.data import image_pipeline

    c.data = image_pipeline.default_data_config()

    c.model = ml_collections.ConfigDict(
        dict(
            variant="B/16",  # encoder E: width/depth/heads from one table, patch size after the slash
            tokenizer_variant="",  # tokenizer T's ViT; empty = the encoder's variant (SPEC 1.5)
            decoder_width=512,
            decoder_depth=16,
            decoder_heads=16,  # label predictor D (SPEC 1.4, image)
            decoder_kind="global",  # "global" (image, video) | "local": AudioMAE's shifted-window decoder (audio)
            decoder_window=(4, 4),  # local decoder: window in patches (time, freq)
            decoder_shift=(2, 0),  # local decoder: cyclic shift of the odd blocks
            estimator_depth=3,  # tokenizer estimator TE (SPEC 1.6): output = E's width
            estimator_width=0,  # 0 = T's width (image, audio); video: 384
            estimator_heads=0,  # 0 = T's heads; video: 6
            cls_token=True,  # VideoMAE has none (video recipes set False)
            tubelet_size=2,  # video: frames per tubelet (SPEC 1.8)
            dtype="float32",  # compute dtype: "float32" | "bfloat16"; params and optimizer stay float32
            remat=False,  # rematerialise each transformer block (saves activation memory)
            # Switches that reproduce the authors' released code where this project deliberately differs (README
            # "Parity with the authors' code"); the defaults are the project's behaviour.
            pos_layout="grid",  # "transposed": AudioMAE's (freq, time) sin-cos table for audio grids (SPEC A10)
            input_proj_bias=True,  # False: VideoMAE's bias-free encoder_to_decoder into D and TE (video)
            decoder_block_ln_eps=1e-6,  # local decoder blocks' norm1/norm2; the authors' Swin block uses 1e-5
            video_tokenizer_masked_only=False,  # encoder phase: T sees only the masked tokens (authors' video)
        )
    )

    c.quantizer = ml_collections.ConfigDict(
        dict(
            num_levels=4,
            codebook_size=256,
            dim=256,  # RQ M x K x D (SPEC 2.3)
            decay=0.99,
            commitment_weight=0.25,
            normalize_stage_inputs=True,  # A1: each stage normalises its own input (the authors' RQ)
            renormalize=False,  # A2: no re-normalisation after the EMA for RQ (True = VQ/BEATs)
            kmeans_iters=10,
            restart_min_count=1.0,  # one-shot dead-code restart at a tokenizer phase's first step (A4)
            # tokenizer phase: each level's EMA runs before its look-up, so q_m, z_q and the codebook loss use the
            # updated codes (the authors' train-mode order); False: look-up on the step's codebooks, EMA after
            lookup_after_ema=False,
            # "normalized": C <- λC + (1-λ)ℓ2(mean) for used codes (SPEC §2.4); "vqvae": the authors' video RQ, the
            # classic VQ-VAE EMA with Laplace-smoothed counts and no ℓ2 (its accumulator is recovered from C and
            # cluster_size, quantizer.vqvae_accumulator)
            ema_kind="normalized",
            # encoder phases: the frozen codebooks' cluster_size still takes an EMA of the code counts, as the authors'
            # eval-mode forward does (a statistic only: codes and targets are unchanged)
            encoder_cluster_size_ema=False,
        )
    )

    c.masking = ml_collections.ConfigDict(dict(kind="random", ratio=0.8))  # video: kind "tube", ratio 0.9

    # The interleaved plan, as data: "kind:steps" with kind in {encoder_cold_start, encoder, tokenizer, joint}.
    c.schedule = ml_collections.ConfigDict(
        dict(
            phases=("encoder_cold_start:1000", "tokenizer:250", "encoder:1000"),
            encoder_warm_start=True,  # A7: the next encoder phase starts from the previous encoder (and D)
            # Set by the run when `phases` is given in epochs ("kind:<X>ep"), never by hand (bridle_jax/resolve.py):
            # `phases` then holds the resolved steps, `given_phases` the plan as given, `steps_per_epoch` the
            # train split's size // batch_size. config.json records all three, so a resume whose epochs resolve to
            # other steps (another batch size, a train split of another size) is refused with the fields named.
            given_phases=ml_collections.config_dict.placeholder(tuple),
            steps_per_epoch=ml_collections.config_dict.placeholder(int),
        )
    )

    # A "joint" phase (the authors' jointBRIDLE, SPEC 3.5): every step trains E+D on the codes; every
    # `tokenizer_every`-th step (counted within the epoch, as their loop does) it also adds
    # `tokenizer_loss_ratio` x the tokenizer loss, the only sub-step with the codebook EMA on (submit_pt_dual.sh).
    c.joint = ml_collections.ConfigDict(dict(tokenizer_every=4, tokenizer_loss_ratio=0.2))

    c.batch_size = 1024  # global batch, split over the mesh's data axes and the hosts

    c.optim = ml_collections.ConfigDict(
        dict(
            encoder=ml_collections.ConfigDict(dict(lr=5e-4, warmup_fraction=0.05, weight_decay=1e-4)),
            tokenizer=ml_collections.ConfigDict(dict(lr=2e-4, warmup_fraction=0.04, weight_decay=1e-4)),
            # a "joint" phase: one AdamW over E, D, T and TE (submit_pt_dual.sh: lr 5e-4, 10 of 200 epochs warm-up)
            joint=ml_collections.ConfigDict(dict(lr=5e-4, warmup_fraction=0.05, weight_decay=1e-4)),
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            max_consecutive_nonfinite=5,  # non-finite steps are skipped; this many in a row stop the run
            # a step whose update norm exceeds this x the weights' norm is refused like a non-finite one (an
            # exploding lr); Adam's updates are ~lr per weight, orders of magnitude below this
            max_update_ratio=1.0,
            # micro-batches per step: gradients summed over them inside the jitted step (same update as the whole
            # batch at once, activation memory of one micro-batch); batch_size must divide by it x batch shards
            accumulation_steps=1,
            # The global batch the recipe's learning rates were tuned for (None: not stated). At another batch_size
            # the run says which lr it uses: the same absolute lr ("none", the authors' practice) or, with
            # lr_scaling="linear", lr x batch_size / tuned_batch_size (bridle_jax/resolve.py).
            tuned_batch_size=ml_collections.config_dict.placeholder(int),
            lr_scaling="none",
        )
    )

    # -1: all remaining devices. `rules` maps the models' logical axis names onto the mesh axes, in order of
    # precedence (see bridle_jax/sharding.py): FSDP splits kernels along "embed", batches over both axes.
    from bridle_jax import sharding

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=sharding.DEFAULT_RULES))

    c.evals = ml_collections.ConfigDict(
        dict(
            linear_probe=ml_collections.ConfigDict(
                dict(
                    enabled=True,
                    train_split="train",
                    test_split="test",
                    steps=500,
                    lr=1e-2,
                    batch_size=256,
                    max_examples=ml_collections.config_dict.placeholder(int),  # the first N of each split
                    max_test_examples=ml_collections.config_dict.placeholder(int),  # the test split's N, if other
                )
            ),
        )
    )

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, max_to_keep=2, async_save=True))

    # Resuming a workdir under a config that differs from its config.json in a field that shapes the state or the
    # data stream is refused (bridle_jax/workdir.py). `allow_changes` names, comma-separated, the changes the user
    # explicitly allows: "optim" (learning rates, weight decay, Adam's betas...) and "schedule.phases" (a plan
    # whose phases up to the newest checkpoint's are unchanged: more phases, or a longer later phase).
    c.resume = ml_collections.ConfigDict(dict(allow_changes=""))
    c.log_every_steps = 50
    return c


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
    # Imported here: the config module must stay importable without the models (configs import it).
    from bridle_jax import masking, schedule, sharding
    from bridle_jax.data import pipeline
    from bridle_jax.models import vit

    _check_finite_numbers(c)
    if c.modality not in MODALITIES:
        fail("modality", f"one of {MODALITIES}", c.modality)
    if c.data.name not in pipeline.DATASETS:
        fail("data.name", f"one of {sorted(pipeline.DATASETS)}", c.data.name)
    if pipeline.DATASETS[c.data.name] != c.modality:
        fail("data.name", f"a dataset of modality {c.modality!r} (config.modality)", c.data.name)
    pipeline.module_for(c.data).validate_data_config(c.data)
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
    if c.optim.get("lr_scaling", "none") not in LR_SCALINGS:
        fail("optim.lr_scaling", f"one of {LR_SCALINGS}", c.optim.lr_scaling)
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
    from bridle_jax import workdir

    workdir.check_allowed_changes(c.resume.allow_changes)
