"""The audio demo's fine-tune: the `configs/sounds.py` encoder, 5-fold cross-validated on the same synthetic sounds.

    python -m bridle_jax.main --config=configs/sounds.py --workdir=workdirs/sounds          # pretrain first
    python -m bridle_jax.finetune_main --config=configs/sounds_finetune.py --workdir=workdirs/sounds_ft \
        --config.init_from=workdirs/sounds
    ... --config=configs/sounds_finetune.py:linear_probe ...                                 # the probe, same budget

The ESC-50 recipe shrunk to the demo (CPU-friendly): 10 classes, 5 folds of 80 clips; per test fold 600 steps
(60 epochs of the 320 train clips at batch 32, warm-up 2 epochs), lr 2e-3, layer decay 0.75, drop-path 0.1, weight
decay 5e-4; 32 mel x 128 frames; roll_mag_aug, mixup 0.5, SpecAugment scaled to the demo's size (F48/T192 of
128 mel x 1024 frames -> F12/T24) and 2-D patch masking 0.2/0.2 on the 16 x 4 patch grid. Eval every 6 epochs.
Prints the mean +- std over folds of the best and the last eval accuracy (sample std over the 5 folds).

Measured (2 shared CPU cores, from the configs/sounds.py workdir, 460 s to pretrain; top-1 over 80 clips per fold):
  fine-tune, pretrained encoder (iteration 2)   best 0.613 +- 0.050, last 0.605 +- 0.051    157 s for 5 folds
  fine-tune, random init (init_iteration=0)     best 0.553 +- 0.047, last 0.540 +- 0.048
  linear probe (:linear_probe), pretrained      best 0.408 +- 0.037, last 0.385 +- 0.041
"""

from bridle_jax import finetune


def get_config(arg=None):
    c = finetune.base_config("audio")
    c.data.name = "sounds"
    c.data.num_mel_bins, c.data.target_frames = 32, 128
    c.data.norm_mean, c.data.norm_std = -1.0957489, 2.796263  # as configs/sounds.py
    c.data.num_threads, c.data.prefetch_buffer_size = 2, 2
    c.num_classes = 10
    c.cv_folds = (1, 2, 3, 4, 5)
    c.batch_size = 32
    c.epochs, c.warmup_epochs, c.eval_every_epochs = 60, 2, 6  # 320 train clips // 32 = 10 steps per epoch
    c.optim.tuned_batch_size = 32
    c.eval_batch_size = 80
    c.optim.lr = 2e-3
    c.model.drop_path = 0.1
    c.augment.mixup, c.augment.mixup_alpha = 0.5, 10
    c.augment.freq_mask, c.augment.time_mask = 12, 24
    c.augment.mask_t_prob, c.augment.mask_f_prob = 0.2, 0.2
    c.checkpoint.every_steps = 100
    c.log_every_steps = 50
    if arg == "linear_probe":
        c.mode = "linear_probe"
        c.model.drop_path = 0.0
        c.optim.lr = 1e-2
    elif arg:
        raise ValueError(f"configs/sounds_finetune.py: unknown argument {arg!r}; expected none or 'linear_probe'")
    return c
