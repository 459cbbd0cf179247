"""ESC-50 fine-tuning with 5-fold cross-validation (SPEC 4, ESC-50 FT row), from a BRIDLE pretraining workdir.

    python -m bridle_jax.finetune_main --config=configs/esc50_finetune.py --workdir=OUT \
        --config.init_from=PRETRAIN_WORKDIR --config.data.data_dir=ESC50_DIR

One fine-tune per test fold (train on the other four, as `submit_ft_esc.sh` runs one job per fold), then the mean
+- std over the five folds of both the best-epoch and the last-epoch accuracy (OUT/finetune.json; per fold in
OUT/fold_<k>/). Recipe: from the SSL (not fine-tuned) encoder, 300 epochs (warm-up 20) at lr 2e-3, batch 64,
layer decay 0.75, weight decay 5e-4, drop-path 0.1, cosine to 1e-6; 5 s clips at 512 frames (32 x 8 patches) with
the ESC-50 log-mel statistics; roll_mag_aug, waveform mixup 0.5 (Beta(10, 10)), SpecAugment F48/T192 (the AudioSet
scripts' values: SPEC 4 lists none of its own for ESC-50) and 2-D patch masking 0.2/0.2 (A12), CE; eval every
epoch. Deviation: the position embedding is the 2-D sin-cos of the 32 x 8 grid, not rows 16..47 of AudioSet's
64-row table (SPEC 4); both are fixed. Target (BEATs iter3, SPEC 5.1): 95.6 % mean accuracy; the BRIDLE paper's
number could not be retrieved (SPEC 5.2). `get_config("linear_probe")`: head + fc_norm only, same data.
"""

from bridle_jax import finetune


def get_config(arg=None):
    c = finetune.base_config("audio")
    c.data.name = "esc50"
    c.data.target_frames = 512
    c.data.norm_mean, c.data.norm_std = -6.6268077, 5.358466  # ESC-50 statistics (SPEC 1.2)
    c.data.roll_mag_aug = True
    c.num_classes = 50
    c.cv_folds = (1, 2, 3, 4, 5)
    c.batch_size = 64
    c.epochs, c.warmup_epochs, c.eval_every_epochs = 300, 20, 1  # 1,600 train clips // 64 = 25 steps per epoch
    c.optim.lr, c.optim.tuned_batch_size = 2e-3, 64
    c.model.drop_path = 0.1
    c.augment.mixup, c.augment.mixup_alpha = 0.5, 10
    c.augment.freq_mask, c.augment.time_mask = 48, 192
    c.augment.mask_t_prob, c.augment.mask_f_prob = 0.2, 0.2
    c.checkpoint.every_steps = 250
    c.log_every_steps = 25
    if arg == "linear_probe":
        c.mode = "linear_probe"
        c.model.drop_path = 0.0
    elif arg:
        raise ValueError(f"configs/esc50_finetune.py: unknown argument {arg!r}; expected none or 'linear_probe'")
    return c
