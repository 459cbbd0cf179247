"""The pure, jittable steps of the two phases (SPEC 2.1, 2.2, 2.8).

`encoder_step`: the tokenizer is frozen; its codes (under stop_gradient) are the targets of E+D on the masked
patches. `tokenizer_step`: E is frozen as the teacher; T+TE learn to reproduce E's last-layer features through the
RQ bottleneck, then the codebooks take one EMA step. `prepare_codebooks` runs once, at the first step of a phase
whose codebooks are fresh: k-means on that batch, then (tokenizer and joint phases) the one-shot dead-code restart.
`joint_step`: the authors' joint variant, both in one step (the encoder pass and, every k-th step, the tokenizer
pass, under one optimizer).

Every step maps (state, batch) -> (state, metrics) and folds its step number into the state's rng, so a resumed
run draws the same masks. A step whose loss, gradients or update are not finite, or whose update is out of all
proportion to the weights (`config.optim.max_update_ratio`), changes nothing but the step counter and the non-finite
counters (the caller stops the run after too many in a row).

Gradient accumulation (`config.optim.accumulation_steps` = A > 1) splits the global batch into A micro-batches inside
the jitted step and sums their gradients in a `lax.scan`: only one micro-batch's activations are alive at a time.
Everything drawn or counted per batch is drawn or counted for the *whole* batch first (the mask, the number of
loss targets), then split, so a step computes the full-batch update up to float summation order: each micro-batch's
loss is weighted by its share of the batch's targets, and the codebook EMA runs once on the concatenated stage
inputs of all micro-batches.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bridle_jax import losses, masking, quantizer, schedule, sharding
from bridle_jax import state as state_lib
from bridle_jax.models.bridle import BridleModels
from bridle_jax.state import TrainState


def tokenizer_features(models: BridleModels, params, x, *, cold_start: bool, token_idx=None):
    """z [B, N, D] of the current tokenizer: the cold-start projection (iteration 1) or T's ViT + head; with
    `token_idx` [B, n], T's ViT sees only those tokens and z is [B, n, D] (the cold start is per token: no effect)."""
    if cold_start:
        z = models.cold_start.apply({"params": params["cold_start"]}, x)
        return z if token_idx is None else jnp.take_along_axis(z, token_idx[..., None], axis=1)
    return models.tokenizer.apply({"params": params["tokenizer"]["tokenizer"]}, x, token_idx)


def _masked_only_codes(models, params, codebooks, x, keep_idx, q, cold_start: bool):
    """config.model.video_tokenizer_masked_only: the authors' video tokenizer, in the encoder phase, runs on the
    masked tokens only (in increasing index order); their codes are scattered back to [B, N, M] (0 at visible
    tokens, which are never targets)."""
    b, n = x.shape[0], models.num_patches
    visible = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], keep_idx].set(True)
    idx = jnp.argsort(visible, axis=1, stable=True)[:, : n - keep_idx.shape[1]].astype(jnp.int32)
    z = jax.lax.stop_gradient(tokenizer_features(models, params, x, cold_start=cold_start, token_idx=idx))
    codes = _quantize(codebooks, z, q).codes
    full = jnp.zeros((b, n, codes.shape[-1]), codes.dtype)
    return full.at[jnp.arange(b)[:, None], idx].set(codes)


def teacher_features(models: BridleModels, params, x):
    """E's last-layer patch tokens (after the final LayerNorm) on the unmasked input, cls removed (A15)."""
    _, inter = models.encoder.apply({"params": params["encoder"]["encoder"]}, x)
    return inter["patches"]


def _quantize(codebooks, z, q: ml_collections.ConfigDict, valid=None, *, after_ema: bool = False):
    if after_ema:  # config.quantizer.lookup_after_ema: the authors' order; the EMA itself is applied by the step
        return quantizer.quantize_with_ema(
            codebooks,
            z,
            decay=q.decay,
            normalize_stage_inputs=q.normalize_stage_inputs,
            commitment_weight=q.commitment_weight,
            mask=valid,
            embed_ema=quantizer.vqvae_accumulator(codebooks) if q.get("ema_kind", "normalized") == "vqvae" else None,
        )[0]
    return quantizer.quantize(
        codebooks,
        z,
        normalize_stage_inputs=q.normalize_stage_inputs,
        commitment_weight=q.commitment_weight,
        mask=valid,
    )


def accumulation_steps(config: ml_collections.ConfigDict) -> int:
    return int(config.optim.get("accumulation_steps", 1))


def _split(x: jax.Array, acc: int) -> jax.Array:
    """[B, ...] -> [A, B/A, ...], micro-batch i = examples i, i+A, i+2A, ...

    Strided, not contiguous: the batch is sharded in contiguous blocks over the devices, so example j*A+i lives on
    the same device as the rest of its block and every micro-batch is spread over all devices exactly like the
    whole batch (a contiguous split would put micro-batch i on 1/A of them). The reshape is device-local.
    """
    if x.shape[0] % acc:
        raise ValueError(
            f"a batch of {x.shape[0]} examples does not split into config.optim.accumulation_steps={acc} micro-batches"
        )
    y = jnp.swapaxes(x.reshape(x.shape[0] // acc, acc, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))


def _merge(y: jax.Array) -> jax.Array:
    """Inverse of `_split`: [A, B/A, ...] -> [B, ...] in the batch's order."""
    return jnp.swapaxes(y, 0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])


def _accumulate(micro_fn, inputs: dict, acc: int):
    """Runs `micro_fn(micro_inputs) -> (summed, per_example)` on the `acc` micro-batches of `inputs` ({name: [B, ...]}
    arrays, None entries passed through) and returns (the sum of `summed` over micro-batches, `per_example`
    concatenated back into batch order). With acc == 1 it is `micro_fn(inputs)`, the plain full-batch step."""
    if acc == 1:
        return micro_fn(inputs)
    micro = {k: None if v is None else _split(v, acc) for k, v in inputs.items()}
    summed_shape, _ = jax.eval_shape(micro_fn, {k: None if v is None else v[0] for k, v in micro.items()})
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), summed_shape)

    def body(total, mb):
        summed, per_example = micro_fn(mb)
        return jax.tree.map(jnp.add, total, summed), per_example

    summed, per_example = jax.lax.scan(body, init, micro)
    return summed, jax.tree.map(_merge, per_example)


def _share(weights, total):
    """A micro-batch's share of a batch mean: (its count of loss terms) / (the batch's). The losses are means over
    their micro-batch's terms (max(count, 1) in the denominator, 0 when there are none), so these shares make the
    sum over micro-batches the whole batch's mean exactly."""
    return jnp.maximum(jnp.sum(weights, dtype=jnp.float32), 1.0) / total


def encoder_loss(params, models: BridleModels, mb: dict, codes):
    """E+D's masked code cross-entropy on one (micro-)batch `mb` = {"x", "keep_idx", "restore_idx", "targets"}: the
    function the encoder step differentiates in `params` (= params["encoder"]). Returns (loss, (per level, accuracy)).
    """
    encoded, _ = models.encoder.apply({"params": params["encoder"]}, mb["x"], keep_idx=mb["keep_idx"])
    logits = models.decoder.apply({"params": params["decoder"]}, encoded, mb["restore_idx"], models.patch_grid)
    loss, per_level, accuracy = losses.masked_code_cross_entropy(logits, codes, mb["targets"])
    return loss, (per_level, accuracy)


def tokenizer_loss(params, models: BridleModels, codebooks, q: ml_collections.ConfigDict, mb: dict, target):
    """T+TE's distillation loss through the RQ bottleneck on one (micro-)batch `mb` = {"x", "valid"}; the function
    the tokenizer step differentiates in `params` (= params["tokenizer"]). Returns (loss, (cos, quantizer output))."""
    z = models.tokenizer.apply({"params": params["tokenizer"]}, mb["x"])
    out = _quantize(codebooks, z, q, mb["valid"], after_ema=q.get("lookup_after_ema", False))
    pred = models.estimator.apply({"params": params["estimator"]}, out.z_q, models.patch_grid)
    cos = losses.cosine_distance(pred, target, valid=mb["valid"])
    return cos + out.loss, (cos, out)


def _guarded(ok, new, old):
    """`new` where the step was finite, `old` otherwise (static shapes, no host round trip)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def count_nonfinite(nonfinite, ok):
    """(refused steps, refused steps in a row) after one step that was applied (`ok`) or refused."""
    bad = jnp.logical_not(ok).astype(jnp.int32)
    return jnp.stack([nonfinite[0] + bad, (nonfinite[1] + bad) * bad])


def _next_state(state: TrainState, ok, params, opt_state, codebooks) -> TrainState:
    """The state after one step: the step counted, its params / optimizer state / codebooks (the old ones where the
    step was refused: the caller guards them), the refusal counters moved on."""
    return state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        codebooks=codebooks,
        nonfinite=count_nonfinite(state.nonfinite, ok),
    )


def _codebook_metrics(codes, codebook_size, valid):
    stats = quantizer.usage_stats(codes, codebook_size, mask=valid)
    out = {}
    for m in range(codes.shape[-1]):
        out[f"codebook/level{m}/usage"] = stats["usage"][m]
        out[f"codebook/level{m}/perplexity"] = stats["perplexity"][m]
    return out


def _common_metrics(state, loss, grad_norm, ok, lr_schedule, codes, codebook_size, valid) -> dict:
    """What both phases log: loss, gradient norm, the applied lr, the skip flag and the codebook usage."""
    return {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/lr": _applied_lr(state, lr_schedule),
        "train/nonfinite": 1 - ok.astype(jnp.int32),
        **_codebook_metrics(codes, codebook_size, valid),
    }


def _applied_lr(state: TrainState, lr_schedule):
    """The learning rate this step applies: the schedule at the optimizer's own count, which skipped (non-finite)
    steps do not advance."""
    (_, count), *_ = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
    return lr_schedule(count)


def _apply_update(state: TrainState, side: str, grads, tx, loss, max_update_ratio: float):
    """Optimizer step on what `side` trains (`state.trained_params`), guarded twice; returns (ok, grad_norm,
    update_norm, params, opt_state).

    1. The loss and gradients are finite. One scalar decides: the global gradient norm is finite iff every gradient
       is (a norm that overflows counts as non-finite too). A per-leaf `all(isfinite)` chain instead gets copied by
       XLA into every update fusion, which made the compiled step ~100x larger.
    2. The *update* is sane: finite, and its norm at most `max_update_ratio` x the parameters' norm. A step can have
       a finite loss and gradients and still break the weights (a learning rate of 1e30, or one that overflows to
       inf): that update is refused here, so exploding or non-finite weights never reach the state, hence never a
       checkpoint. Adam's updates are ~lr per weight, a few orders of magnitude below the weights' own norm.
    A refused step changes neither the params nor the optimizer state (its count too, so the lr schedule does not
    advance); the caller counts it as non-finite. See `guarded_update` for how the guards avoid copies of the state.
    """
    trained = state_lib.trained_params(state.params, side)
    ok, grad_norm, update_norm, new_trained, opt_state = guarded_update(
        tx, grads, trained, state.opt_state, loss, max_update_ratio
    )
    return ok, grad_norm, update_norm, state_lib.with_trained(state.params, side, new_trained), opt_state


def guarded_update(tx, grads, params, opt_state, loss, max_update_ratio: float = float("inf")):
    """The optimizer step on `params` under both guards of `_apply_update` (pretraining and fine-tuning share it):
    (ok, grad_norm, update_norm, params, opt_state), the old params and optimizer state where refused.

    The update is computed twice, so that the new state is written only once, in place. First only its norms are
    taken (the update's and the new params'): XLA fuses that elementwise math into the two reductions, so nothing of
    parameter size is stored. Then, under a `lax.cond` on both guards, the update is recomputed and applied over the
    donated params and moments. Judging a materialised update instead kept the new params and both new moments next
    to the old ones: three extra copies of the trained side (1.6 GB of the audio encoder step's 2.7 GB XLA temp).
    The cond (not a `where(ok, new, old)` per leaf) matters too: with the `where`s, XLA recomputed the new moments
    inside each parameter's update fusion after another fusion had overwritten the moment buffer in place, so it
    copied every moment first.
    """
    grad_norm = optax.tree.norm(grads)
    grads_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, _ = tx.update(grads, opt_state, params)
    update_norm = optax.tree.norm(updates)
    sane = jnp.isfinite(update_norm) & jnp.isfinite(optax.tree.norm(optax.apply_updates(params, updates)))
    if max_update_ratio != float("inf"):  # (inf x a zero norm would be NaN)
        sane &= update_norm <= max_update_ratio * optax.tree.norm(params)
    ok = grads_ok & sane

    def update(operands):
        grads, params, opt_state = operands
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    def keep(operands):
        return operands[1], operands[2]

    params, opt_state = jax.lax.cond(ok, update, keep, (grads, params, opt_state))
    update_norm = jnp.where(grads_ok, update_norm, jnp.nan)
    return ok, grad_norm, update_norm, params, opt_state


def prepare_codebooks(
    state: TrainState,
    batch,
    *,
    models: BridleModels,
    config: ml_collections.ConfigDict,
    cold_start: bool,
    restart: bool,
) -> TrainState:
    """k-means-initialises fresh codebooks on this batch's tokenizer features (a no-op on initialised ones, A3b),
    then, in a tokenizer phase, restarts the codes this batch leaves unused (A4)."""
    q = config.quantizer
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 7)
    k_means, k_restart = jax.random.split(key)
    x, valid = models.model_input(batch)
    z = tokenizer_features(models, state.params, x, cold_start=cold_start)
    codebooks = quantizer.kmeans_init(
        state.codebooks, z, k_means, iters=q.kmeans_iters, normalize_stage_inputs=q.normalize_stage_inputs, mask=valid
    )
    if restart:
        out = _quantize(codebooks, z, q)
        codebooks = quantizer.restart_unused(
            codebooks, out.stage_inputs, out.codes, k_restart, min_count=q.restart_min_count, mask=valid
        )
    return state.replace(codebooks=codebooks)


class _EncoderPass(NamedTuple):
    loss: jax.Array  # the masked code cross-entropy (batch mean)
    per_level: jax.Array  # [M] its value per level
    accuracy: jax.Array  # [M] masked-prediction accuracy per level
    grads: dict  # d loss / d params["encoder"]
    codes: jax.Array  # [B, N, M] the frozen tokenizer's codes (the targets where masked)
    mask: masking.Mask
    targets: jax.Array  # [B, N] the loss's tokens: masked (and valid)


def _encoder_pass(state: TrainState, x, valid, *, models, config, cold_start: bool) -> _EncoderPass:
    """E+D's loss and gradients against the codes of the tokenizer in `state` (under stop_gradient), with the mask
    drawn from the state's rng at its step."""
    acc = accumulation_steps(config)
    key = jax.random.fold_in(state.rng, state.step)
    # the masks of the whole batch, drawn once (micro-batches get their rows: same masks as without accumulation)
    mask = masking.make_mask(config.masking.kind, key, x.shape[0], models.patch_grid, config.masking.ratio)
    targets = mask.masked if valid is None else mask.masked & valid
    total = jnp.maximum(jnp.sum(targets, dtype=jnp.float32), 1.0)

    def micro_fn(mb):
        if _masked_only(models, config):
            codes = jax.lax.stop_gradient(
                _masked_only_codes(
                    models, state.params, state.codebooks, mb["x"], mb["keep_idx"], config.quantizer, cold_start
                )
            )
        else:
            z = tokenizer_features(models, state.params, mb["x"], cold_start=cold_start)
            codes = jax.lax.stop_gradient(_quantize(state.codebooks, jax.lax.stop_gradient(z), config.quantizer).codes)
        share = 1.0 if acc == 1 else _share(mb["targets"], total)

        def loss_fn(params):
            loss, (per_level, accuracy) = encoder_loss(params, models, mb, codes)
            return loss * share, (per_level * share, accuracy * share)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["encoder"])
        return (loss, aux, grads), codes

    inputs = {"x": x, "keep_idx": mask.keep_idx, "restore_idx": mask.restore_idx, "targets": targets}
    (loss, (per_level, accuracy), grads), codes = _accumulate(micro_fn, inputs, acc)
    return _EncoderPass(loss, per_level, accuracy, grads, codes, mask, targets)


def _masked_only(models, config) -> bool:
    return config.model.get("video_tokenizer_masked_only", False) and models.modality == "video"


def _encoder_metrics(enc: _EncoderPass, codebook_size: int) -> dict:
    """The masked-prediction cross-entropy and accuracy per level, next to their baseline: the most frequent code
    per (position, level) over the same targets of the whole batch (`codes` and `targets` are full-batch here,
    also under gradient accumulation)."""
    position_only = losses.position_only_accuracy(enc.codes, enc.targets, codebook_size)
    metrics = {}
    for m in range(enc.per_level.shape[0]):
        metrics[f"train/encoder/ce_level{m}"] = enc.per_level[m]
        metrics[f"train/encoder/accuracy_level{m}"] = enc.accuracy[m]
        metrics[f"train/encoder/position_only_accuracy_level{m}"] = position_only[m]
    return metrics


def _cluster_sizes_seen(codebooks, enc: _EncoderPass, valid, models, config):
    """config.quantizer.encoder_cluster_size_ema: the authors' frozen codebooks still count their codes in the
    eval-mode forward that makes the targets (a statistic only: codes and targets are unchanged)."""
    q = config.quantizer
    seen = valid  # the tokens the tokenizer quantised: all valid ones, or the masked ones (video switch)
    if _masked_only(models, config):
        seen = enc.mask.masked if valid is None else enc.mask.masked & valid
    counts = quantizer.usage_stats(enc.codes, q.codebook_size, mask=seen)["counts"]
    return codebooks.replace(cluster_size=q.decay * codebooks.cluster_size + (1.0 - q.decay) * counts)


def encoder_step(
    state: TrainState,
    batch,
    *,
    models: BridleModels,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    lr_schedule,
    cold_start: bool,
):
    """One step of E and D against the frozen tokenizer's codes (masked code prediction, SPEC 2.1)."""
    q = config.quantizer
    x, valid = models.model_input(batch)
    enc = _encoder_pass(state, x, valid, models=models, config=config, cold_start=cold_start)
    ok, grad_norm, update_norm, params, opt_state = _apply_update(
        state, "encoder", enc.grads, tx, enc.loss, config.optim.max_update_ratio
    )
    metrics = _common_metrics(state, enc.loss, grad_norm, ok, lr_schedule, enc.codes, q.codebook_size, valid)
    metrics["train/update_norm"] = update_norm
    metrics.update(_encoder_metrics(enc, q.codebook_size))
    codebooks = state.codebooks
    if q.get("encoder_cluster_size_ema", False):
        codebooks = _guarded(ok, _cluster_sizes_seen(codebooks, enc, valid, models, config), codebooks)
    return _next_state(state, ok, params, opt_state, codebooks), metrics


class _TokenizerPass(NamedTuple):
    loss: jax.Array  # cosine distance + codebook loss (batch mean)
    cos: jax.Array
    codebook_loss: jax.Array
    grads: dict  # d loss / d params["tokenizer"]
    stage_inputs: jax.Array  # the quantizer's per-level inputs, for the EMA
    codes: jax.Array  # [B, N, M]


def _tokenizer_pass(state: TrainState, codebooks, x, valid, *, models, config) -> _TokenizerPass:
    """T+TE's distillation loss and gradients against the features of the encoder in `state` (the teacher, under
    stop_gradient), through `codebooks`."""
    q = config.quantizer
    acc = accumulation_steps(config)
    total = None if valid is None else jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)

    def micro_fn(mb):
        target = jax.lax.stop_gradient(teacher_features(models, state.params, mb["x"]))
        if acc == 1:
            share = 1.0
        else:  # both terms are means over the (valid) patches of the micro-batch
            share = 1.0 / acc if total is None else _share(mb["valid"], total)

        def loss_fn(params):
            loss, (cos, out) = tokenizer_loss(params, models, codebooks, q, mb, target)
            return loss * share, (cos * share, out.loss * share, out.stage_inputs, out.codes)

        (loss, (cos, cb_loss, stage_inputs, codes)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params["tokenizer"]
        )
        return (loss, cos, cb_loss, grads), (stage_inputs, codes)

    (loss, cos, cb_loss, grads), (stage_inputs, codes) = _accumulate(micro_fn, {"x": x, "valid": valid}, acc)
    return _TokenizerPass(loss, cos, cb_loss, grads, stage_inputs, codes)


def _ema_step(codebooks, tok: _TokenizerPass, q: ml_collections.ConfigDict, valid):
    """One EMA step of the codebooks on the statistics of the whole batch (all micro-batches' stage inputs)."""
    if q.get("ema_kind", "normalized") == "vqvae":  # the authors' video EMA (README "Parity")
        return quantizer.ema_update_vqvae(codebooks, None, tok.stage_inputs, tok.codes, decay=q.decay, mask=valid)[0]
    return quantizer.ema_update(
        codebooks, tok.stage_inputs, tok.codes, decay=q.decay, renormalize=q.renormalize, mask=valid
    )


def tokenizer_step(
    state: TrainState,
    batch,
    *,
    models: BridleModels,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    lr_schedule,
):
    """One step of T and TE distilling the frozen E, then one EMA step of the codebooks (SPEC 2.2, 2.4)."""
    q = config.quantizer
    x, valid = models.model_input(batch)
    tok = _tokenizer_pass(state, state.codebooks, x, valid, models=models, config=config)
    ok, grad_norm, update_norm, params, opt_state = _apply_update(
        state, "tokenizer", tok.grads, tx, tok.loss, config.optim.max_update_ratio
    )
    codebooks = _guarded(ok, _ema_step(state.codebooks, tok, q, valid), state.codebooks)
    metrics = _common_metrics(state, tok.loss, grad_norm, ok, lr_schedule, tok.codes, q.codebook_size, valid)
    metrics.update(
        {
            "train/tokenizer/cos": tok.cos,
            "train/tokenizer/codebook_loss": tok.codebook_loss,
            "train/update_norm": update_norm,
        }
    )
    return _next_state(state, ok, params, opt_state, codebooks), metrics


def joint_trains_tokenizer(phase: schedule.Phase, step, config: ml_collections.ConfigDict):
    """Whether the joint phase's step after `step` completed steps (an int, or the traced `state.step`) also trains
    the tokenizer, by `config.joint.tokenizer_every` and the epoch length of a plan in epochs
    (`schedule.joint_tokenizer_step`): what `joint_step` decides, for the loop and the benchmarks too."""
    every, per_epoch = int(config.joint.tokenizer_every), config.schedule.get("steps_per_epoch", None)
    return schedule.joint_tokenizer_step(phase, step, every, per_epoch)


# The tokenizer's metrics of a joint step: NaN on the steps that do not train the tokenizer (the training loop logs
# the last computed values instead, `train.py`).
JOINT_TOKENIZER_METRICS = ("train/tokenizer/loss", "train/tokenizer/cos", "train/tokenizer/codebook_loss")


def joint_step(
    state: TrainState,
    batch,
    *,
    models: BridleModels,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    lr_schedule,
    phase: schedule.Phase,
):
    """One step of the authors' joint variant (jointBRIDLE, SPEC 3.5): E, D, T and TE under one optimizer.

    In the authors' order, all on the parameters the step starts from:
    1. the codebook EMA off: T's codes for the batch (no gradient; the eval-mode cluster-size count where
       `quantizer.encoder_cluster_size_ema`), and E+D's masked code cross-entropy L_enc on them;
    2. only every `joint.tokenizer_every`-th step (`joint_trains_tokenizer`): the EMA on, E's features of the
       unmasked batch (no gradient), and T+TE's loss L_tok through the codebooks, whose EMA step this is (with
       `quantizer.lookup_after_ema` the look-up uses the updated codes, as in the tokenizer phase);
    3. one AdamW step on L_enc + `joint.tokenizer_loss_ratio` x L_tok (L_enc alone on the other steps).
    No loss reaches across: the codes carry no gradient into T, the teacher features none into E. On the steps
    without L_tok the tokenizer's gradients are zeros, not absent: the authors' environment (PyTorch 1.7, whose
    `zero_grad` keeps zero tensors) still applies AdamW to them, so their moments decay, their weight decay applies
    and momentum keeps moving them; one optimizer state over both parts does exactly that. A refused (non-finite)
    step changes nothing, the codebooks included.
    """
    q, j = config.quantizer, config.joint
    x, valid = models.model_input(batch)
    enc = _encoder_pass(state, x, valid, models=models, config=config, cold_start=False)
    codebooks = state.codebooks
    if q.get("encoder_cluster_size_ema", False):
        codebooks = _cluster_sizes_seen(codebooks, enc, valid, models, config)
    trains_tokenizer = joint_trains_tokenizer(phase, state.step, config)
    ratio = float(j.tokenizer_loss_ratio)

    def with_tokenizer(codebooks):
        tok = _tokenizer_pass(state, codebooks, x, valid, models=models, config=config)
        grads = jax.tree.map(lambda g: ratio * g, tok.grads)
        return grads, _ema_step(codebooks, tok, q, valid), jnp.stack([tok.loss, tok.cos, tok.codebook_loss])

    def without_tokenizer(codebooks):
        zeros = jax.tree.map(jnp.zeros_like, state.params["tokenizer"])
        return zeros, codebooks, jnp.full((3,), jnp.nan, jnp.float32)

    tok_grads, new_codebooks, tok_values = jax.lax.cond(trains_tokenizer, with_tokenizer, without_tokenizer, codebooks)
    loss = enc.loss + jnp.where(trains_tokenizer, ratio * tok_values[0], 0.0)
    grads = {"encoder": enc.grads, "tokenizer": tok_grads}
    ok, grad_norm, update_norm, params, opt_state = _apply_update(
        state, "joint", grads, tx, loss, config.optim.max_update_ratio
    )
    metrics = _common_metrics(state, loss, grad_norm, ok, lr_schedule, enc.codes, q.codebook_size, valid)
    metrics["train/update_norm"] = update_norm
    metrics["train/encoder/loss"] = enc.loss
    metrics["train/joint/tokenizer_step"] = trains_tokenizer.astype(jnp.int32)
    metrics.update(dict(zip(JOINT_TOKENIZER_METRICS, tok_values)))
    metrics.update(_encoder_metrics(enc, q.codebook_size))
    return _next_state(state, ok, params, opt_state, _guarded(ok, new_codebooks, state.codebooks)), metrics


def _under_rules(fn, config, batch_sharding):
    """`fn` traced with the config's logical axis rules on the batch's mesh, so the models' activation constraints
    (residual stream split by example) apply; checks that the batch splits into micro-batches x shards."""
    mesh, rules, acc = batch_sharding.mesh, sharding.logical_rules(config.mesh), accumulation_steps(config)

    def traced(state, batch):
        sharding.check_batch_split(jax.tree.leaves(batch)[0].shape[0], mesh, acc)
        with sharding.activation_rules(mesh, rules):
            return fn(state, batch)

    return traced


def jit_step(phase, *, models, config, tx, lr_schedule, state_shardings, batch_sharding):
    """The jitted step of `phase` with explicit input/output shardings (the state is donated)."""
    sharding.check_batch_split(config.batch_size, batch_sharding.mesh, accumulation_steps(config))
    common = dict(models=models, config=config, tx=tx, lr_schedule=lr_schedule)
    if phase.kind == "encoder":
        fn = functools.partial(encoder_step, cold_start=phase.cold_start, **common)
    elif phase.kind == "joint":
        fn = functools.partial(joint_step, phase=phase, **common)
    else:
        fn = functools.partial(tokenizer_step, **common)
    return jax.jit(
        _under_rules(fn, config, batch_sharding),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def jit_prepare_codebooks(phase, *, models, config, state_shardings, batch_sharding):
    fn = functools.partial(
        prepare_codebooks, models=models, config=config, cold_start=phase.cold_start, restart=phase.restarts_codes
    )
    return jax.jit(
        _under_rules(fn, config, batch_sharding),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=state_shardings,
        donate_argnums=(0,),  # the state changes only in its codebooks: no second copy of the rest, even briefly
    )
