"""bridle_jax: BRIDLE self-supervised pretraining (residual-quantised targets, interleaved loop) in JAX/Flax."""


def load_encoder(workdir, iteration=None):
    """See `bridle_jax.features.load_encoder` (imported lazily so `import bridle_jax` stays light)."""
    from bridle_jax.features import load_encoder as _load

    return _load(workdir, iteration)
