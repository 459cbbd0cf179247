"""bridle_jax: BRIDLE self-supervised pretraining (residual-quantised targets, interleaved loop) in JAX/Flax.

The layers, each importing only from those below it (tests/test_layers.py: no import cycle):
  entry points   main, finetune_main, convert, export, evaluators.codebook (CLI)
  run users      train (pretraining: the plan's phases), finetune (fine-tuning and linear-probe recipes)
  run layer      run (a workdir's lifecycle and the step loop), evaluators (plug-ins from config.evals)
  training core  steps, state, schedule, resolve, optim, losses, masking, quantizer
  models, data   models (E, D, T, TE and the front-end), data (one pipeline contract for every modality)
  foundation     config (defaults only), config_checks, fbank, sharding, checkpoint, workdir, paths, preemption,
                 reporting, encoder_store, validation
A batch flows one way: data source -> the modality's pipeline (decode, augment, batch per process) ->
sharding.global_batch -> the jitted step (the model's front-end, then the modules) -> metrics -> run.Run.
"""


def load_encoder(workdir, iteration=None):
    """See `bridle_jax.features.load_encoder` (imported lazily so `import bridle_jax` stays light)."""
    from bridle_jax.features import load_encoder as _load

    return _load(workdir, iteration)
