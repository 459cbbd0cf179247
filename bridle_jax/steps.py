"""The pure, jittable steps of the two phases (SPEC 2.1, 2.2, 2.8).

`encoder_step`: the tokenizer is frozen; its codes (under stop_gradient) are the targets of E+D on the masked
patches. `tokenizer_step`: E is frozen as the teacher; T+TE learn to reproduce E's last-layer features through the
RQ bottleneck, then the codebooks take one EMA step. `prepare_codebooks` runs once, at the first step of a phase
whose codebooks are fresh: k-means on that batch, then (tokenizer phases) the one-shot dead-code restart.

Every step maps (state, batch) -> (state, metrics) and folds its step number into the state's rng, so a resumed
run draws the same masks. A step whose loss or gradients are not finite changes nothing but the step counter and
the non-finite counters (the caller stops the run after too many in a row).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bridle_jax import losses
from bridle_jax import masking
from bridle_jax import quantizer
from bridle_jax.models.bridle import BridleModels
from bridle_jax.state import TrainState


def tokenizer_features(models: BridleModels, params, x, *, cold_start: bool):
    """z [B, N, D] of the current tokenizer: the cold-start projection (iteration 1) or T's ViT + head."""
    if cold_start:
        return models.cold_start.apply({"params": params["cold_start"]}, x)
    return models.tokenizer.apply({"params": params["tokenizer"]["tokenizer"]}, x)


def teacher_features(models: BridleModels, params, x):
    """E's last-layer patch tokens (after the final LayerNorm) on the unmasked input, cls removed (A15)."""
    _, inter = models.encoder.apply({"params": params["encoder"]["encoder"]}, x)
    return inter["patches"]


def _quantize(codebooks, z, q: ml_collections.ConfigDict, valid=None):
    return quantizer.quantize(
        codebooks,
        z,
        normalize_stage_inputs=q.normalize_stage_inputs,
        commitment_weight=q.commitment_weight,
        mask=valid,
    )


def _guarded(ok, new, old):
    """`new` where the step was finite, `old` otherwise (static shapes, no host round trip)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _count_nonfinite(nonfinite, ok):
    bad = jnp.logical_not(ok).astype(jnp.int32)
    return jnp.stack([nonfinite[0] + bad, (nonfinite[1] + bad) * bad])


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


def _apply_update(state: TrainState, side: str, grads, tx, loss):
    """Optimizer step on one side's params, guarded against non-finite loss/gradients.

    The guard is one scalar: the global gradient norm is finite iff every gradient is (a norm that overflows counts
    as non-finite too). A per-leaf `all(isfinite)` chain instead gets copied by XLA into every update fusion, which
    made the compiled step ~100x larger. The update itself runs under one `lax.cond` on that scalar rather than a
    `where(ok, new, old)` per leaf: with the `where`s, XLA recomputed the new Adam moments inside each parameter's
    update fusion while another fusion overwrote the (donated) moment buffers in place, so it copied every moment
    first (~0.6 GB per step for the encoder phase); under the `cond` both moments and parameters update in place.
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(operands):
        grads, side_params, opt_state = operands
        updates, opt_state = tx.update(grads, opt_state, side_params)
        return optax.apply_updates(side_params, updates), opt_state

    def skip(operands):
        _, side_params, opt_state = operands
        return side_params, opt_state

    new_side, opt_state = jax.lax.cond(ok, update, skip, (grads, state.params[side], state.opt_state))
    params = dict(state.params)
    params[side] = new_side
    return ok, grad_norm, params, opt_state


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
    x, valid = models.model_input(batch)
    key = jax.random.fold_in(state.rng, state.step)
    mask = masking.make_mask(config.masking.kind, key, x.shape[0], models.patch_grid, config.masking.ratio)
    targets = mask.masked if valid is None else mask.masked & valid
    z = tokenizer_features(models, state.params, x, cold_start=cold_start)
    codes = jax.lax.stop_gradient(_quantize(state.codebooks, jax.lax.stop_gradient(z), config.quantizer).codes)

    def loss_fn(params):
        encoded, _ = models.encoder.apply({"params": params["encoder"]}, x, keep_idx=mask.keep_idx)
        logits = models.decoder.apply({"params": params["decoder"]}, encoded, mask.restore_idx, models.patch_grid)
        loss, per_level, accuracy = losses.masked_code_cross_entropy(logits, codes, targets)
        return loss, (per_level, accuracy)

    (loss, (per_level, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["encoder"])
    ok, grad_norm, params, opt_state = _apply_update(state, "encoder", grads, tx, loss)
    metrics = _common_metrics(state, loss, grad_norm, ok, lr_schedule, codes, config.quantizer.codebook_size, valid)
    for m in range(per_level.shape[0]):
        metrics[f"train/encoder/ce_level{m}"] = per_level[m]
        metrics[f"train/encoder/accuracy_level{m}"] = accuracy[m]
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, nonfinite=_count_nonfinite(state.nonfinite, ok)
    )
    return new_state, metrics


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
    target = jax.lax.stop_gradient(teacher_features(models, state.params, x))

    def loss_fn(params):
        z = models.tokenizer.apply({"params": params["tokenizer"]}, x)
        out = _quantize(state.codebooks, z, q, valid)
        pred = models.estimator.apply({"params": params["estimator"]}, out.z_q, models.patch_grid)
        cos = losses.cosine_distance(pred, target, valid=valid)
        return cos + out.loss, (cos, out)

    (loss, (cos, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["tokenizer"])
    ok, grad_norm, params, opt_state = _apply_update(state, "tokenizer", grads, tx, loss)
    codebooks = quantizer.ema_update(
        state.codebooks, out.stage_inputs, out.codes, decay=q.decay, renormalize=q.renormalize, mask=valid
    )
    codebooks = _guarded(ok, codebooks, state.codebooks)
    metrics = _common_metrics(state, loss, grad_norm, ok, lr_schedule, out.codes, q.codebook_size, valid)
    metrics.update({"train/tokenizer/cos": cos, "train/tokenizer/codebook_loss": out.loss})
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        codebooks=codebooks,
        nonfinite=_count_nonfinite(state.nonfinite, ok),
    )
    return new_state, metrics


def jit_step(phase, *, models, config, tx, lr_schedule, state_shardings, batch_sharding):
    """The jitted step of `phase` with explicit input/output shardings (the state is donated)."""
    if phase.kind == "encoder":
        fn = functools.partial(
            encoder_step, models=models, config=config, tx=tx, lr_schedule=lr_schedule, cold_start=phase.cold_start
        )
    else:
        fn = functools.partial(tokenizer_step, models=models, config=config, tx=tx, lr_schedule=lr_schedule)
    return jax.jit(
        fn, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None), donate_argnums=(0,)
    )


def jit_prepare_codebooks(phase, *, models, config, state_shardings, batch_sharding):
    fn = functools.partial(
        prepare_codebooks, models=models, config=config, cold_start=phase.cold_start, restart=phase.kind == "tokenizer"
    )
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding), out_shardings=state_shardings)
