"""The config schema: the defaults every recipe starts from (`base_config`) and the constants they name.

Recipes in configs/ call `base_config()` and change what differs. The checks run before compiling are
`bridle_jax.config_checks.validate`: they need the models and the data pipelines, and this module stays below both
(it imports nothing of bridle_jax), so every layer may read the defaults.

Field names follow the API they feed (`quantizer.num_levels` -> `init_codebooks(num_levels=...)`), so
`--config.quantizer.num_levels=1 --config.quantizer.codebook_size=1024` is the VQ baseline.
"""

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_SKIPPED = 1000  # unreadable images tolerated per process (config.data.max_skipped; audio's ceiling)
# config.mesh.rules: the models' logical axis names onto the mesh axes, in order of precedence (bridle_jax/sharding.py).
# FSDP splits kernels along "embed"; batches go over both axes.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("length", None),
    ("features", None),
    ("mlp", None),
    ("qkv", None),
    ("heads", None),
    ("vocab", None),
    ("code", None),
)
MODALITIES = ("image", "audio", "video")
LR_SCALINGS = ("none", "linear")  # at a batch other than optim.tuned_batch_size: the same lr, or lr x batch / tuned


def image_data_config() -> ml_collections.ConfigDict:
    """Every ``config.data`` field the image pipeline reads (the ImageNet recipe's values): what
    ``image_pipeline.default_data_config()`` returns, kept here so ``base_config`` needs no data module."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        dict(
            name="imagenet2012",
            data_dir=placeholder(str),
            image_size=224,
            crop_scale=(0.2, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            eval_crop_fraction=0.875,
            num_threads=8,
            prefetch_buffer_size=4,
            worker_count=0,  # Grain worker processes for the train stream (0: threads only; data/pipeline.py)
            max_eval_examples=placeholder(int),
            # Splits: None = "train" / the dataset's eval split (sources.EVAL_SPLIT: "test" for image_folder and
            # tfds:*). image_folder: folder names under data_dir; tfds:*: TFDS split names, slicing allowed
            # ("train[:90%]").
            train_split=placeholder(str),
            eval_split=placeholder(str),
            # image_folder's CSV variant: "path,label" CSVs (relative to data_dir) for the train and eval splits;
            # unset = the folder layout data_dir/<split>/<class>/<image>.
            train_csv=placeholder(str),
            eval_csv=placeholder(str),
            # tfds:*: the features holding the image and the label (None = "image" / "label").
            image_key=placeholder(str),
            label_key=placeholder(str),
            max_skipped=DEFAULT_MAX_SKIPPED,  # undecodable images tolerated per process before the run stops
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.modality = "image"

    # The image pipeline's fields; audio and video recipes replace c.data with their pipeline's
    # default_data_config() (see bridle_jax/data/pipeline.py).
    c.data = image_data_config()

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
            # attention kernel of E, T, D and TE (bridle_jax/models/attention.py): "auto" (xla on CPU, cudnn on GPU
            # when it supports the dtype, else xla, pallas on TPU) | "xla" | "cudnn" (GPU, bf16) | "pallas" (TPU)
            attention="auto",
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

    # -1: all remaining devices. `rules` maps the models' logical axis names onto the mesh axes (DEFAULT_RULES).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=DEFAULT_RULES))

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
            # codebook health at the end of every phase that (re)fits codebooks (bridle_jax/evaluators/codebook.py)
            codebook=ml_collections.ConfigDict(
                dict(
                    enabled=False,
                    split=ml_collections.config_dict.placeholder(str),  # None: the labelled eval split
                    max_examples=1000,
                    batch_size=256,
                    plots=False,
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
