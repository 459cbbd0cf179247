"""The five BRIDLE modules built from a config (SPEC 1.1): encoder E, label predictor D, tokenizer T, its estimator
TE, and the cold-start tokenizer of iteration 1. Each keeps its own parameter tree so a phase can freeze a side by
simply not updating it."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from bridle_jax.models import decoder as decoder_lib
from bridle_jax.models import tokenizer as tokenizer_lib
from bridle_jax.models import vit

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BridleModels:
    encoder: vit.ViTEncoder
    decoder: decoder_lib.LabelPredictor
    tokenizer: tokenizer_lib.Tokenizer
    estimator: tokenizer_lib.Estimator
    cold_start: tokenizer_lib.ColdStartTokenizer
    input_shape: tuple  # one example, e.g. (H, W, C)
    patch_grid: tuple  # (h, w) patches

    @property
    def num_patches(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]

    def init_params(self, key):
        """All parameters, grouped by the side that trains them: {"encoder", "tokenizer", "cold_start"}."""
        k = jax.random.split(key, 5)
        x = jnp.zeros((1,) + tuple(self.input_shape), jnp.float32)
        n = self.num_patches
        encoded = jnp.zeros((1, 1 + n, self.encoder.width), jnp.float32)
        restore = jnp.arange(n, dtype=jnp.int32)[None]
        z = jnp.zeros((1, n, self.tokenizer.code_dim), jnp.float32)
        return {
            "encoder": {
                "encoder": self.encoder.init(k[0], x)["params"],
                "decoder": self.decoder.init(k[1], encoded, restore, self.patch_grid)["params"],
            },
            "tokenizer": {
                "tokenizer": self.tokenizer.init(k[2], x)["params"],
                "estimator": self.estimator.init(k[3], z, self.patch_grid)["params"],
            },
            "cold_start": self.cold_start.init(k[4], x)["params"],
        }


def encoder_from_config(config: ml_collections.ConfigDict) -> vit.ViTEncoder:
    v = vit.decode_variant(config.model.variant)
    return vit.ViTEncoder(
        width=v["width"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_dim=v["mlp_dim"],
        patch_size=v["patch_size"],
        stem=config.modality,
        dtype=_DTYPES[config.model.dtype],
        remat=config.model.remat,
    )


def input_shape(config: ml_collections.ConfigDict) -> tuple:
    return (config.data.image_size, config.data.image_size, 3)


def build_models(config: ml_collections.ConfigDict) -> BridleModels:
    dtype, remat, q = _DTYPES[config.model.dtype], config.model.remat, config.quantizer
    encoder = encoder_from_config(config)
    t = vit.decode_variant(config.model.tokenizer_variant or config.model.variant)
    size = config.data.image_size
    grid = (size // encoder.patch_size, size // encoder.patch_size)
    if t["patch_size"] != encoder.patch_size:
        raise ValueError(
            f"config.model.tokenizer_variant: its patch size {t['patch_size']} must equal the encoder's "
            f"{encoder.patch_size} (targets are per encoder patch)"
        )
    return BridleModels(
        encoder=encoder,
        decoder=decoder_lib.LabelPredictor(
            width=config.model.decoder_width,
            depth=config.model.decoder_depth,
            num_heads=config.model.decoder_heads,
            mlp_dim=4 * config.model.decoder_width,
            num_levels=q.num_levels,
            codebook_size=q.codebook_size,
            dtype=dtype,
            remat=remat,
        ),
        tokenizer=tokenizer_lib.Tokenizer(
            width=t["width"],
            depth=t["depth"],
            num_heads=t["num_heads"],
            mlp_dim=t["mlp_dim"],
            patch_size=t["patch_size"],
            code_dim=q.dim,
            stem=config.modality,
            dtype=dtype,
            remat=remat,
        ),
        estimator=tokenizer_lib.Estimator(
            width=t["width"],
            depth=config.model.estimator_depth,
            num_heads=t["num_heads"],
            mlp_dim=t["mlp_dim"],
            out_dim=encoder.width,
            dtype=dtype,
            remat=remat,
        ),
        cold_start=tokenizer_lib.ColdStartTokenizer(
            width=encoder.width, patch_size=encoder.patch_size, code_dim=q.dim, stem=config.modality
        ),
        input_shape=input_shape(config),
        patch_grid=grid,
    )
