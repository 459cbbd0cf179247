"""bridle_jax: BRIDLE pretraining in JAX."""
