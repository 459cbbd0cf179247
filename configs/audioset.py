"""BRIDLE on AudioSet-2M (SPEC 3.3 audio recipe): ViT-B/16 on 1024x128 log-mels, RQ 4x256x256, mask 0.8, batch 1024.

    python -m bridle_jax.main --config=configs/audioset.py --workdir=DIR --config.data.data_dir=AUDIOSET_DIR

Plan: cold-start encoder 140 epochs (lr 5e-4, warm-up 10), tokenizer 31 epochs (lr 2e-4, warm-up 2), encoder 140
epochs (warm-started), with ~1.757M available clips (SPEC 3.3: ~1716 steps per epoch at batch 1024). The plan is
in epochs: the run turns them into steps from the clips your copy holds and the batch, and says so; the lrs were
tuned at batch 1024 and are kept as they are at another batch unless `--config.optim.lr_scaling=linear`. Front-end:
the BRIDLE/AudioMAE preset (htk_compat, hanning, no x2^15, 128 mel, 25/10 ms, pad/crop to 1024 frames,
(x + 4.4446096) / (2 * 3.3216383)), roll_mag_aug on; the label predictor is the 16-block local-window decoder
(window 4x4, shift (2, 0)). The quantizer is float32 (always); the model runs in float32 as the authors' script.
AudioSet is multi-label: the in-loop top-1 probe is off; evaluate with mAP (see README, evaluation).
Preparation (README "AudioSet"): 16 kHz mono clips under data_dir/unbalanced_train (+ balanced_train) and
data_dir/eval, the official segment CSVs and class_labels_indices.csv in data_dir. The paper-side numbers of this
recipe could not be retrieved (SPEC 5.2); BEATs iter3 for reference: AS-2M 48.0 mAP fine-tuned.

    --config=configs/audioset.py:joint         the authors' experimental joint variant (submit_pt_dual.sh)

One "joint" phase of 200 epochs (warm-up 10) at lr 5e-4 for E, D, T and TE under one AdamW, batch 1024, mask 0.8,
RQ 4x256 k-means'd on the first batch: every step trains E+D on T's codes, every 4th step (counted within the
epoch) also adds 0.2 x the tokenizer loss, the only sub-step with the codebook EMA on (README "Joint training").
"""

from bridle_jax import config as common
from bridle_jax.data import audio_pipeline


def get_config(arg=None):
    if arg not in (None, "", "joint"):
        raise ValueError(f"configs/audioset.py: unknown variant {arg!r}; expected none or 'joint'")
    c = common.base_config()
    c.modality = "audio"
    c.data = audio_pipeline.default_data_config()  # the AudioSet front-end preset
    c.data.name = "audioset"
    c.data.audioset_train_csv = "unbalanced_train_segments.csv"
    c.data.audioset_train_audio_dir = "unbalanced_train"
    c.model.variant = "B/16"
    c.model.decoder_kind = "local"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 512, 16, 16
    c.model.estimator_depth = 3
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 4, 256, 256
    c.masking.kind, c.masking.ratio = "random", 0.8
    c.batch_size = 1024
    c.optim.tuned_batch_size = 1024
    c.schedule.phases = ("encoder_cold_start:140ep", "tokenizer:31ep", "encoder:140ep")
    c.optim.encoder.lr, c.optim.encoder.warmup_fraction = 5e-4, 10 / 140
    c.optim.tokenizer.lr, c.optim.tokenizer.warmup_fraction = 2e-4, 2 / 31
    c.evals.linear_probe.enabled = False  # multi-label: top-1 does not apply
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 100
    if arg == "joint":
        c.schedule.phases = ("joint:200ep",)
        c.optim.joint.lr, c.optim.joint.warmup_fraction, c.optim.joint.weight_decay = 5e-4, 10 / 200, 1e-4
        c.joint.tokenizer_every, c.joint.tokenizer_loss_ratio = 4, 0.2
    return c
