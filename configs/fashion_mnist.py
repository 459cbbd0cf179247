"""BRIDLE on Fashion-MNIST, the real-data study's recipe (README "Does it learn?"), on 2 CPU cores.

    apt-get install dataset-fashion-mnist          # the four official IDX files, in /usr/share/datasets/fashion-mnist
    python -m bridle_jax.main --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist

60,000 train / 10,000 test 28x28 grey images, 10 classes, cut into 4x4 patches (7x7 = 49, 9 visible at mask 0.8).
The authors' image recipe in shape, scaled down:
- a label predictor deeper than the encoder (5 blocks for a 4-block encoder; theirs 16 for 12), narrower (64 vs 128);
- the tokenizer lr in the authors' ratio to the encoder's (2e-4 : 5e-4 = 0.4);
- a tokenizer phase long enough for the EMA codebooks to settle: 300 steps = 3 time constants of decay 0.99;
- RQ 4 x 64 codes (the study's VQ baseline: 1 x 256, re-normalised EMA, the same code budget);
- augmentations for small, centred images: crops keep >= 70% of the area, horizontal flips, no centre crop at eval.
The probe (SPEC 4's linear probe: mean-pooled patch tokens -> LayerNorm -> linear head, AdamW) trains on the first
10,000 train images and tests on all 10,000 test images, after every encoder phase and on the initial encoder.
The plan is in steps, as the study's budget is CPU minutes and the tokenizer phase is sized in EMA time constants:
at batch 128 over 60,000 images (468 steps per epoch) it is 1.5 / 0.64 / 1.5 epochs.

`--config=configs/fashion_mnist.py:joint` is the study's joint row (README "Joint training"): one "joint" phase at
the same compute as the interleaved plan. Per step, XLA's cost analysis counts 19.09 GFLOP for a cold-start
encoder step, 20.22 for a warm one (T's ViT makes the targets), 18.98 for a tokenizer step; the plan is
700 x 19.09 + 300 x 18.98 + 700 x 20.22 = 33,211 GFLOP, and a joint step costs a warm encoder step plus a
tokenizer step every 4th step, 20.22 + 18.98 / 4 = 24.96 GFLOP, so 1,331 joint steps (`benchmarks/study.py`
recomputes both totals and records them). The joint lr is the encoder's (the authors' joint script uses their
encoder lr, 5e-4, for all four networks); tokenizer every 4th step, ratio 0.2, as theirs.
"""

from bridle_jax import config as common

JOINT_STEPS = 1331  # equal FLOPs to the interleaved plan (docstring)


def get_config(arg=None):
    if arg not in (None, "", "joint"):
        raise ValueError(f"configs/fashion_mnist.py: unknown variant {arg!r}; expected none or 'joint'")
    c = common.base_config()
    c.data.name = "fashion_mnist"
    c.data.image_size = 28
    c.data.crop_scale = (0.7, 1.0)
    c.data.eval_crop_fraction = 1.0
    c.data.mean, c.data.std = (0.286,) * 3, (0.353,) * 3  # Fashion-MNIST's train-set pixel statistics
    c.data.num_threads = 2
    c.data.prefetch_buffer_size = 2
    c.model.variant = "nano/4"
    c.model.tokenizer_variant = "mu/4"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 64, 5, 4
    c.model.estimator_depth = 2
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 4, 64, 32
    c.batch_size = 128
    c.schedule.phases = ("encoder_cold_start:700", "tokenizer:300", "encoder:700")
    c.optim.encoder.lr, c.optim.encoder.warmup_fraction = 1e-3, 0.05
    c.optim.tokenizer.lr, c.optim.tokenizer.warmup_fraction = 4e-4, 0.05
    c.evals.linear_probe.steps = 2000
    c.evals.linear_probe.lr = 1e-2
    c.evals.linear_probe.batch_size = 256
    c.evals.linear_probe.max_examples = 10_000
    c.evals.linear_probe.max_test_examples = 10_000
    c.checkpoint.every_steps = 500
    c.log_every_steps = 100
    if arg == "joint":
        c.schedule.phases = (f"joint:{JOINT_STEPS}",)
        c.optim.joint.lr, c.optim.joint.warmup_fraction = c.optim.encoder.lr, 0.05
        c.joint.tokenizer_every, c.joint.tokenizer_loss_ratio = 4, 0.2
    return c
