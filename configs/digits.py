"""The embedded demo: BRIDLE on scikit-learn's bundled handwritten digits (real data, no download), on CPU.

    python -m bridle_jax.main --config=configs/digits.py --workdir=workdirs/digits

The 8x8 digits are upsampled to 32x32 and cut into 4x4 patches (8x8 = 64 patches, 12 visible at mask 0.8). The full
plan (cold-start encoder -> tokenizer -> encoder) and a linear probe after every encoder phase run in a few minutes
on 2 CPU cores (4 min 41 s measured); the run prints the probe's test top-1 for the encoder as initialised (iteration
0) and after each
encoder phase. Measured numbers are in the README. The plan is in steps, as the demo's budget is CPU minutes: at
batch 64 over the 1,438 train images (22 steps per epoch) it is 36 / 14 / 36 epochs.
"""

from bridle_jax import config as common


def get_config(arg=None):
    del arg
    c = common.base_config()
    c.data.name = "digits"
    c.data.image_size = 32
    c.data.num_threads = 2
    c.data.prefetch_buffer_size = 2
    c.model.variant = "mu/4"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 64, 2, 4
    c.model.estimator_depth = 2
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 4, 64, 32
    c.batch_size = 64
    c.schedule.phases = ("encoder_cold_start:800", "tokenizer:300", "encoder:800")
    c.optim.encoder.lr, c.optim.encoder.warmup_fraction = 1e-3, 0.05
    c.optim.tokenizer.lr, c.optim.tokenizer.warmup_fraction = 1e-3, 0.05
    c.evals.linear_probe.steps = 1000
    c.evals.linear_probe.lr = 1e-2
    c.evals.linear_probe.batch_size = 256
    c.checkpoint.every_steps = 200
    c.log_every_steps = 50
    return c
