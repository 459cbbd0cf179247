"""The embedded audio demo: BRIDLE on synthesised sound classes (real wav files in the ESC-50 layout), on CPU.

    python -m bridle_jax.main --config=configs/sounds.py --workdir=workdirs/sounds

The data (10 classes x 40 clips of 1.28 s: tones, chirps, AM/FM tones, noise colours, click trains, harmonic
stacks, with random parameters and background noise) are written once at run time into ~/.cache/bridle_jax
(`BRIDLE_JAX_CACHE` overrides) and then read through the real decode path (soundfile, resampling, roll_mag_aug) and
the on-device Kaldi log-mel front-end of the BRIDLE preset, shrunk to 32 mel bins x 128 frames (126 real frames
are padded to 128: the padded patches take no part in the losses). Folds 1-4 train, fold 5 is the probe's test
split. The local-window (AudioMAE) decoder predicts the codes, as in the AudioSet recipe. Measured numbers are in
the README.
"""

from bridle_jax import config as common
from bridle_jax.data import audio_pipeline


def get_config(arg=None):
    del arg
    c = common.base_config()
    c.modality = "audio"
    c.data = audio_pipeline.default_data_config()
    c.data.name = "sounds"
    c.data.num_mel_bins = 32
    c.data.target_frames = 128
    # Mean / std of the demo's log-mels over the real frames of the 320 train clips (no roll_mag_aug), measured once
    # as the AudioSet/ESC-50 constants were: log_mel with mean 0, std 0.5, then the moments of the valid frames.
    c.data.norm_mean, c.data.norm_std = -1.0957489, 2.796263
    c.data.num_threads = 2
    c.data.prefetch_buffer_size = 2
    c.model.variant = "mu/8"  # 16 x 4 = 64 patches of 8 frames x 8 mel bins
    c.model.decoder_kind = "local"
    c.model.decoder_window, c.model.decoder_shift = (4, 4), (2, 0)
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 64, 2, 4
    c.model.estimator_depth = 2
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 4, 64, 32
    c.batch_size = 64
    # in epochs, as the real recipes: 320 train clips // batch 64 = 5 steps per epoch, so 600 / 200 / 600 steps
    c.schedule.phases = ("encoder_cold_start:120ep", "tokenizer:40ep", "encoder:120ep")
    c.optim.encoder.lr, c.optim.encoder.warmup_fraction = 1e-3, 0.05
    c.optim.tokenizer.lr, c.optim.tokenizer.warmup_fraction = 1e-3, 0.05
    c.evals.linear_probe.steps = 1000
    c.evals.linear_probe.lr = 1e-2
    c.evals.linear_probe.batch_size = 256
    c.checkpoint.every_steps = 200
    c.log_every_steps = 50
    return c
