"""`load_encoder(workdir, iteration=None)`: a pretrained (or, with iteration=0, as-initialised) encoder as a
feature extractor on raw inputs, with the eval preprocessing of the run's saved config."""

import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax import encoder_store, sharding
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import pipeline
from bridle_jax.evaluators import linear_probe
from bridle_jax.models import bridle
from bridle_jax.validation import is_int


class Encoder:
    """A frozen encoder E; `embed` returns average-pooled patch features (cls excluded) as NumPy, `split_features`
    the same for a labelled split of the run's dataset, streamed.

    Attributes: `config` (the run's), `iteration`, `params` (E's), `models` (`bridle.build_models(config)`: the
    front-end and E for `linear_probe.pool`), `module` (E), `mesh` (every local device on the batch axis: what
    `linear_probe.pooled_features` shards over)."""

    def __init__(self, config, params, iteration: int):
        self.config = config
        self.iteration = iteration
        self.params = params
        self.models = bridle.build_models(config)
        self.module = self.models.encoder
        self.mesh = sharding.data_parallel_mesh()

    @property
    def _mesh(self):  # the name older callers used
        return self.mesh

    def split_features(
        self, split: str, max_examples: int | None = None, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features [N, width], labels [N]) of `split` of the run's dataset (`config.data`), after its eval
        preprocessing, in stored order: the first `max_examples` (else `config.data.max_eval_examples`) records,
        read batch by batch (`pipeline.eval_batches`), so only one batch of decoded inputs is held at a time; these
        are the features the training loop's linear probe trains on."""
        return linear_probe.split_features(
            self.models, self.params, self.config.data, split, max_examples, mesh=self.mesh, batch_size=batch_size
        )

    def embed(self, inputs, batch_size: int = 256, value_range=None) -> np.ndarray:
        """inputs: the dataset's natural form (images: uint8 or float [B, H, W, C]; audio and video: see the
        pipeline's `preprocess_eval`) -> features [B, width], pooled over the non-padded patches.

        Float pixels (images, video frames) are 0..1 unless ``value_range=(low, high)`` states their range, e.g.
        ``(0, 255)``: the scale is a rule of the call, never inferred from the batch, so an image's features do not
        depend on the others. Audio float waveforms are [-1, 1] (int16 arrays are scaled by 1/32768)."""
        arrays = pipeline.preprocess_eval(self.config.data, inputs, value_range=value_range)
        return linear_probe.pooled_features(self.models, self.params, arrays, mesh=self.mesh, batch_size=batch_size)


def load_encoder(workdir: str, iteration: int | None = None) -> Encoder:
    """The encoder kept at the end of encoder-phase `iteration` (default: the latest; 0: as initialised)."""
    if iteration is not None and not is_int(iteration):  # the type is wrong whatever the folder holds
        encoder_store.pick_iteration(workdir, iteration)
    config = workdir_lib.read_config(workdir)  # FileNotFoundError naming config.json when not a workdir
    iteration = encoder_store.pick_iteration(workdir, iteration)
    module = bridle.encoder_from_config(config)
    shape = (1,) + bridle.input_shape(config)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape))["params"])
    params = encoder_store.load_encoder_params(workdir, iteration, abstract)
    return Encoder(config, params, iteration)
