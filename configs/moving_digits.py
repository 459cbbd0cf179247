"""The embedded video demo: BRIDLE on clips of moving handwritten digits, rendered to real mp4 files, on CPU.

    python -m bridle_jax.main --config=configs/moving_digits.py --workdir=workdirs/moving_digits

600 clips of 16 frames at 32x32 (a scikit-learn digit of 18-24 px bouncing across the frame; label = the digit) are
rendered and encoded to mp4 once at run time into ~/.cache/bridle_jax (`BRIDLE_JAX_CACHE` overrides), then decoded
with PyAV like any video dataset: 8 frames at sampling rate 2, multi-scale crop (scales 1 and .875), tubelets 2x8x8
(4 x 4 x 4 = 64 tokens), no cls token, tube masking, and the VideoMAE-style 2-block predictor and estimator.
Deviation from the video recipe, for a 4x4 spatial grid: tube mask 0.75 (0.9 would keep 2 of the 16 patches per frame
slot).
Measured numbers are in the README. The plan is in steps, as the demo's budget is CPU minutes: at batch 32 over the
480 train clips (15 steps per epoch) it is 33 / 13 / 33 epochs.
"""

from bridle_jax import config as common
from bridle_jax.data import video_pipeline


def get_config(arg=None):
    del arg
    c = common.base_config()
    c.modality = "video"
    c.data = video_pipeline.default_data_config()
    c.data.name = "moving_digits"
    c.data.num_frames, c.data.sampling_rate, c.data.image_size = 8, 2, 32
    c.data.crop_scales = (1.0, 0.875)  # the demo's digits fill most of the frame: milder crops keep them whole
    c.data.num_threads = 2
    c.data.prefetch_buffer_size = 2
    c.model.variant = "mu/8"
    c.model.tubelet_size = 2
    c.model.cls_token = False
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 64, 2, 4
    c.model.estimator_width, c.model.estimator_depth, c.model.estimator_heads = 64, 2, 4
    c.masking.kind, c.masking.ratio = "tube", 0.75
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 4, 64, 32
    c.batch_size = 32
    c.schedule.phases = ("encoder_cold_start:500", "tokenizer:200", "encoder:500")
    c.optim.encoder.lr, c.optim.encoder.warmup_fraction = 1e-3, 0.05
    c.optim.tokenizer.lr, c.optim.tokenizer.warmup_fraction = 1e-3, 0.05
    c.evals.linear_probe.steps = 1000
    c.evals.linear_probe.lr = 1e-2
    c.evals.linear_probe.batch_size = 128
    c.checkpoint.every_steps = 200
    c.log_every_steps = 50
    return c
