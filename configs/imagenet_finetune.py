"""ImageNet-1K fine-tuning and linear probe (SPEC 4: IN-1K FT and IN-1K LP rows), from a BRIDLE pretraining workdir.

    python -m bridle_jax.finetune_main --config=configs/imagenet_finetune.py --workdir=OUT \
        --config.init_from=PRETRAIN_WORKDIR --config.data.data_dir=TFDS_DIR
    ... --config=configs/imagenet_finetune.py:linear_probe ...

Fine-tune: 200 epochs (warm-up 5) at lr 5e-4, batch 1024, timm's train transform (RandomResizedCrop 0.08-1 bicubic,
flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25), layer decay 0.75, weight decay 5e-4 (the authors'
code value for every modality, A13; MAE uses 0.05), drop-path 0.1, cosine to 1e-6, CE, no mixup/cutmix (A14: the
authors' loop never applies it); eval: resize 256, centre crop 224, top-1/top-5 on validation every epoch. Linear
probe: 200 epochs (warm-up 10) at lr 8e-3, batch 256, AdamW on fc_norm + head only (not MAE's LARS + BatchNorm),
RandomResizedCrop + flip (MAE's probe transform; the authors' LP transform was not verified). No target is claimed:
the paper's numbers could not be retrieved (SPEC 5.2), and A13 marks this recipe as uncertain.
"""

from bridle_jax import finetune


def get_config(arg=None):
    c = finetune.base_config("image")
    c.data.name = "imagenet2012"
    c.data.image_size = 224
    c.data.max_eval_examples = None  # all 50k validation images (about 30 GB as float32 arrays: see README)
    c.num_classes = 1000
    if arg == "linear_probe":
        c.mode = "linear_probe"
        c.batch_size = 256
        c.epochs, c.warmup_epochs, c.optim.lr = 200, 10, 8e-3
        c.model.drop_path = 0.0
        c.augment.randaugment_ops, c.augment.random_erasing = 0, 0.0
    elif not arg:
        c.batch_size = 1024
        c.epochs, c.warmup_epochs, c.optim.lr = 200, 5, 5e-4
        c.model.drop_path = 0.1
        c.augment.randaugment_ops = 2
        c.augment.randaugment_magnitude, c.augment.randaugment_magnitude_std = 9.0, 0.5
        c.augment.random_erasing = 0.25
    else:
        raise ValueError(f"configs/imagenet_finetune.py: unknown argument {arg!r}; expected none or 'linear_probe'")
    c.eval_every_epochs = 1  # the epochs become steps at run time: 1,281,167 // batch (1,251 at 1024)
    c.optim.tuned_batch_size = c.batch_size
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 100
    return c
