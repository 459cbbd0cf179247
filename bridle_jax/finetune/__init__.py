"""Fine-tuning and linear-probe recipes from a pretraining workdir (SPEC 4, A12-A14).

`run(config, workdir)` reads the encoder E of `config.init_from` (its architecture from that run's config.json; the
fine-tune config supplies the data and the optimisation), adds MAE's global-pool head -- the mean over the valid
patch tokens of the last block (before E's final LayerNorm, which MAE's global pool drops), `fc_norm` LayerNorm,
a linear layer initialised with std 2e-5 -- and trains:

  mode "finetune"      everything, AdamW with BEiT layer-wise lr decay (0.75), weight decay 5e-4 (none on 1-D
                       parameters, the cls token and position embeddings), drop-path 0.1, warm-up then cosine to
                       min_lr per step, BCE (multi-label) or soft-target CE
  mode "linear_probe"  only fc_norm and the head; E frozen (SPEC 4 LP rows: AdamW, the dataset augmentation on)

Augmentation: audio mixup (waveforms), SpecAugment and 2-D time/frequency patch masking run inside the jitted step
(`augment`); the input pipeline's fine-tune stream (`pipeline.train_iterator(..., augment=config.augment)`) gives
images RandAugment + random erasing, audio the class-balancing sampler where set, video clips the multi-scale crop
and flip (SPEC 4's K400 row; no RandAugment/erasing for clips here). Every `eval_every_steps` the eval split
(`pipeline.eval_batches`, streamed) is scored (mAP for multi-label, top-1/top-5 otherwise);
`<workdir>/finetune.json` (written atomically) keeps the whole history and BOTH the best-eval and the last-eval
numbers (A12: the authors report the best epoch). With
`config.cv_folds` (ESC-50, the sounds demo) one run per test fold goes to `<workdir>/fold_<k>`, and the summary has
the mean and std over folds. Runs checkpoint (Orbax: state + data iterator) and resume.
"""

# The public API, re-exported (the modules: config, model, augment, results, runner).
from bridle_jax.finetune import augment, config, model, results, runner
from bridle_jax.finetune.config import MODES, base_config, steps_for_epochs, validate
from bridle_jax.finetune.model import (
    Classifier,
    FinetuneState,
    Setup,
    init_state,
    loss_fn,
    lr_schedule,
    make_optimizer,
    predict,
    setup,
    train_step,
    weight_decay_mask,
)
from bridle_jax.finetune.results import (
    RESULT_FILE,
    format_result,
    primary_metric,
    read_result,
    score,
    summarize,
    targets_from_labels,
)
from bridle_jax.finetune.runner import eval_logits, fold_config, run, run_single, schedule_record, train_iterator
