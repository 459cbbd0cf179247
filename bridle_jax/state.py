"""The whole training state of the interleaved loop, its sharded creation, and the hand-over between phases.

Everything that decides what happens next lives in `TrainState`, so a checkpoint of it (plus the data iterator)
resumes a run exactly. The codebooks are state, not parameters: the optimizer never sees them.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from bridle_jax import quantizer, sharding
from bridle_jax.models.bridle import BridleModels
from bridle_jax.schedule import Phase


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: completed steps over the whole plan
    params: dict  # {"encoder": {encoder, decoder}, "tokenizer": {tokenizer, estimator}, "cold_start": ...}
    codebooks: quantizer.CodebookState
    opt_state: Any  # optimizer state of what the current phase trains (fresh every phase, SPEC 3.1)
    rng: jax.Array  # uint32[2]; every step folds in its step number
    nonfinite: jax.Array  # int32[2]: (refused steps in the run, refused steps in a row), across phases


JOINT_PARTS = ("encoder", "tokenizer")  # what a joint phase trains: E+D and T+TE, under one optimizer


def trained_params(params: dict, side: str):
    """The parameters `side` trains: params[side], or {"encoder", "tokenizer"} for a joint phase (the cold-start
    projection is never trained)."""
    return {k: params[k] for k in JOINT_PARTS} if side == "joint" else params[side]


def with_trained(params: dict, side: str, trained) -> dict:
    """`params` with the trained part replaced (the inverse of `trained_params`)."""
    params = dict(params)
    params.update(trained if side == "joint" else {side: trained})
    return params


def _fresh_codebooks(config: ml_collections.ConfigDict, key) -> quantizer.CodebookState:
    q = config.quantizer
    return quantizer.init_codebooks(key, q.num_levels, q.codebook_size, q.dim)


def _create(models: BridleModels, config, tx, phase: Phase, seed: int, *, boxed: bool) -> TrainState:
    key = jax.random.PRNGKey(seed)
    k_params, k_codebooks, k_run = jax.random.split(key, 3)
    params = models.init_params(k_params, boxed=boxed)
    return TrainState(
        step=jnp.asarray(phase.start_step, jnp.int32),
        params=params,
        codebooks=_fresh_codebooks(config, k_codebooks),
        opt_state=tx.init(trained_params(params, phase.kind)),  # boxed params -> boxed Adam moments
        rng=k_run,
        nonfinite=jnp.zeros((2,), jnp.int32),
    )


def create(
    models: BridleModels, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, phase: Phase, seed: int
) -> TrainState:
    """A new state at the start of `phase` (traceable: call under jit, or through `create_sharded`)."""
    return _create(models, config, tx, phase, seed, boxed=False)


def logical_abstract(models, config, tx, phase: Phase) -> TrainState:
    """The abstract state of `phase` (ShapeDtypeStructs, nothing allocated) with the annotated parameters and Adam
    moments boxed as `nn.LogicallyPartitioned`, i.e. carrying their logical axis names."""
    return jax.eval_shape(lambda: _create(models, config, tx, phase, 0, boxed=True))


def shardings_for(models, config, tx, phase: Phase, mesh) -> TrainState:
    """The NamedShardings of the state during `phase` (a TrainState of shardings).

    Parameters and their Adam moments follow the kernels' logical axis names through `config.mesh.rules` (FSDP by
    default); everything else (biases, LayerNorms, tokens, codebooks, counters, rng) is replicated. Derived from
    the boxed abstract state (`jax.eval_shape`, nothing is materialised). Every state of a phase has this layout:
    the one `create` makes and the one `hand_over` hands to it.
    """
    boxed = logical_abstract(models, config, tx, phase)
    return sharding.logical_shardings(mesh, boxed, sharding.logical_rules(config.mesh))


def create_sharded(models, config, tx, phase, seed, mesh) -> TrainState:
    """Creates the state already sharded over the mesh: shardings from the abstract state, then a jitted init, so
    no device ever holds a whole unsharded copy."""
    init = lambda: create(models, config, tx, phase, seed)
    return jax.jit(init, out_shardings=shardings_for(models, config, tx, phase, mesh))()


def imported_sharded(models, config, tx, phase, seed, mesh, params, codebooks) -> TrainState:
    """The state a run checkpoints at the end of `phase`, made of given parameters and codebooks (an imported
    official checkpoint, `bridle_jax.convert`): `create`'s rng for `seed` (so the next hand-over and steps draw
    what a run of this seed draws), a fresh optimizer state of the phase's side (the next phase replaces it anyway,
    SPEC 3.1), no refused steps, and the codebooks marked initialised (never k-means'd again, A3b)."""

    def build(params, codebooks):
        fresh = create(models, config, tx, phase, seed)  # only its rng and counters are kept (the rest is dead code)
        return fresh.replace(
            step=jnp.asarray(phase.end_step, jnp.int32),
            params=params,
            codebooks=codebooks.replace(initialized=jnp.asarray(True)),
            opt_state=tx.init(trained_params(params, phase.kind)),
        )

    return jax.jit(build, out_shardings=shardings_for(models, config, tx, phase, mesh))(params, codebooks)


def abstract_for(models, config, tx, phase, seed, mesh):
    """Shape/dtype/sharding tree of the state during `phase` (the restore target of its checkpoints)."""
    abstract = jax.eval_shape(lambda: create(models, config, tx, phase, seed))
    shardings = shardings_for(models, config, tx, phase, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def hand_over(
    state: TrainState,
    models: BridleModels,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    phase: Phase,
) -> TrainState:
    """Prepares `state` (the end of the previous phase) for `phase`, following SPEC 3.1 (A3b, A7):

    - every phase gets a fresh optimizer state (and its own schedule, built by the caller);
    - a tokenizer or joint phase re-initialises the codebooks (`initialized=False`: k-means runs on its first
        batch, then the one-shot dead-code restart); the tokenizer's ViT continues from its previous weights (the
        authors' prev_phase loading drops only the codebook keys);
    - an encoder phase keeps the codebooks the tokenizer phase trained (they are never k-means'd again) and
        warm-starts E and D from the previous encoder unless `config.schedule.encoder_warm_start` is False.
    Deterministic in (state.rng, phase.index), so a resumed run hands over identically.
    """
    key = jax.random.fold_in(state.rng, 1_000_003 + phase.index)
    params = dict(state.params)
    codebooks = state.codebooks
    if phase.fresh_codebooks:
        codebooks = _fresh_codebooks(config, key)
    elif not config.schedule.encoder_warm_start:
        params["encoder"] = models.init_params(key)["encoder"]
    return state.replace(
        params=params,
        codebooks=codebooks,
        opt_state=tx.init(trained_params(params, phase.kind)),
    )  # `nonfinite` carries over: refused steps in a row are counted across the hand-over too


def hand_over_sharded(state, models, config, tx, phase, mesh) -> TrainState:
    fn = lambda s: hand_over(s, models, config, tx, phase)
    return jax.jit(fn, out_shardings=shardings_for(models, config, tx, phase, mesh))(state)
