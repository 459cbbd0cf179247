"""The five BRIDLE modules built from a config (SPEC 1.1): encoder E, label predictor D, tokenizer T, its estimator
TE, and the cold-start tokenizer of iteration 1, plus the modality's front-end. Each module keeps its own parameter
tree so a phase can freeze a side by simply not updating it.

Per modality (config.modality), only the stem, the position table, the front-end and the recipe's choices differ:
  image  [H, W, 3] crops;                     global D (16 blocks), random mask 0.8
  audio  waveforms -> Kaldi log-mel on device  local-window D (SPEC 1.4), random mask 0.8; padded frames masked out
  video  [T, H, W, 3] clips, tubelets 2x16x16  no cls token, D 4 x 384, TE 4 x 384, tube mask 0.9
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from bridle_jax import fbank, sharding
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
    input_shape: tuple  # one example as the encoder sees it, e.g. (H, W, C); audio (frames, mel bins, 1)
    patch_grid: tuple  # (h, w) or (t, h, w) patches
    modality: str = "image"
    time_patch: int = 1  # input steps (frames) per patch along the grid's first axis
    frontend_spec: object = None  # audio: the fbank.FrontendSpec the step applies to the waveforms

    @property
    def num_patches(self) -> int:
        return math.prod(self.patch_grid)

    def model_input(self, batch: dict):
        """A pipeline batch `{"input", "length"?}` -> (what E and T consume, patch validity `[B, N]` bool or None).

        Audio waveforms become normalised log-mels here, inside the jitted step, so the front-end runs on the
        accelerator. A patch is valid when its first frame is a real (not padded) frame; padded patches are never
        prediction targets, distillation targets, codebook statistics or pooled features. Images have no padding
        (None = all valid).
        """
        x = batch["input"]
        length = batch.get("length")
        if self.frontend_spec is not None:
            feats, length = fbank.log_mel(x, length, self.frontend_spec)
            x = feats[..., None]
        if self.modality == "image" or length is None:
            return x, None
        rows, per_row = self.patch_grid[0], math.prod(self.patch_grid[1:])
        row_valid = jnp.arange(rows, dtype=jnp.int32)[None, :] * self.time_patch < length[:, None]
        return x, jnp.repeat(row_valid, per_row, axis=1)  # row-major grid: index = row * per_row + rest

    def init_params(self, key, *, boxed: bool = False):
        """All parameters, grouped by the side that trains them: {"encoder", "tokenizer", "cold_start"}.

        `boxed`: annotated kernels come as `nn.LogicallyPartitioned` (their logical axis names, for the shardings);
        the values are the same either way.
        """
        if boxed:
            with sharding.logical_params():
                return self.init_params(key)
        k = jax.random.split(key, 5)
        x = jnp.zeros((1,) + tuple(self.input_shape), jnp.float32)
        n = self.num_patches
        encoded = jnp.zeros((1, int(self.encoder.cls_token) + n, self.encoder.width), jnp.float32)
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


def _vit_fields(config: ml_collections.ConfigDict, variant: str) -> dict:
    v = vit.decode_variant(variant)
    return dict(
        width=v["width"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_dim=v["mlp_dim"],
        patch_size=v["patch_size"],
        stem=config.modality,
        dtype=_DTYPES[config.model.dtype],
        remat=config.model.remat,
        cls_token=config.model.cls_token,
        tubelet_size=config.model.tubelet_size,
        pos_layout=config.model.get("pos_layout", "grid"),
        attention=attention_backend(config),
    )


def attention_backend(config: ml_collections.ConfigDict) -> str:
    """config.model.attention ("auto" for configs saved before it existed); see `bridle_jax.models.attention`."""
    return config.model.get("attention", "auto")


def _official_switches(config: ml_collections.ConfigDict) -> dict:
    """The model switches for the authors' behaviour (config.model, README "Parity"), with the project's defaults
    for configs saved before they existed."""
    m = config.model
    return dict(
        pos_layout=m.get("pos_layout", "grid"),
        input_proj_bias=m.get("input_proj_bias", True),
        decoder_block_ln_eps=m.get("decoder_block_ln_eps", 1e-6),
    )


def encoder_from_config(config: ml_collections.ConfigDict) -> vit.ViTEncoder:
    return vit.ViTEncoder(**_vit_fields(config, config.model.variant))


def input_shape(config: ml_collections.ConfigDict) -> tuple:
    """One example as the encoder consumes it."""
    d = config.data
    if config.modality == "audio":
        return (d.target_frames, d.num_mel_bins, 1)
    if config.modality == "video":
        return (d.num_frames, d.image_size, d.image_size, 3)
    return (d.image_size, d.image_size, 3)


def patch_grid(config: ml_collections.ConfigDict) -> tuple:
    p = vit.decode_variant(config.model.variant)["patch_size"]
    shape = input_shape(config)
    if config.modality == "video":
        return (shape[0] // config.model.tubelet_size, shape[1] // p, shape[2] // p)
    return (shape[0] // p, shape[1] // p)


def _label_predictor(config: ml_collections.ConfigDict):
    m, q = config.model, config.quantizer
    common = dict(
        width=m.decoder_width,
        depth=m.decoder_depth,
        num_heads=m.decoder_heads,
        mlp_dim=4 * m.decoder_width,
        num_levels=q.num_levels,
        codebook_size=q.codebook_size,
        dtype=_DTYPES[m.dtype],
        remat=m.remat,
        cls_token=m.cls_token,
    )
    sw = _official_switches(config)
    if m.decoder_kind != "local":  # the local decoder's windowed cosine attention is its own
        common["attention"] = attention_backend(config)
    if m.decoder_kind == "local":
        from bridle_jax.models import local_decoder

        return local_decoder.LocalLabelPredictor(
            **common,
            window=tuple(m.decoder_window),
            shift=tuple(m.decoder_shift),
            block_ln_eps=sw["decoder_block_ln_eps"],
            pos_layout=sw["pos_layout"],
        )
    return decoder_lib.LabelPredictor(**common, pos_layout=sw["pos_layout"], embed_bias=sw["input_proj_bias"])


def build_models(config: ml_collections.ConfigDict) -> BridleModels:
    dtype, remat, q = _DTYPES[config.model.dtype], config.model.remat, config.quantizer
    encoder = encoder_from_config(config)
    t_fields = _vit_fields(config, config.model.tokenizer_variant or config.model.variant)
    if t_fields["patch_size"] != encoder.patch_size:
        raise ValueError(
            f"config.model.tokenizer_variant: its patch size {t_fields['patch_size']} must equal the encoder's "
            f"{encoder.patch_size} (targets are per encoder patch)"
        )
    est_width = config.model.estimator_width or t_fields["width"]
    est_heads = config.model.estimator_heads or t_fields["num_heads"]
    return BridleModels(
        encoder=encoder,
        decoder=_label_predictor(config),
        tokenizer=tokenizer_lib.Tokenizer(**t_fields, code_dim=q.dim),
        estimator=tokenizer_lib.Estimator(
            width=est_width,
            depth=config.model.estimator_depth,
            num_heads=est_heads,
            mlp_dim=4 * est_width if config.model.estimator_width else t_fields["mlp_dim"],
            out_dim=encoder.width,
            dtype=dtype,
            remat=remat,
            pos_layout=_official_switches(config)["pos_layout"],
            embed_bias=_official_switches(config)["input_proj_bias"],
            attention=attention_backend(config),
        ),
        cold_start=tokenizer_lib.ColdStartTokenizer(
            width=encoder.width,
            patch_size=encoder.patch_size,
            code_dim=q.dim,
            stem=config.modality,
            tubelet_size=config.model.tubelet_size,
            pos_layout=_official_switches(config)["pos_layout"],
        ),
        input_shape=input_shape(config),
        patch_grid=patch_grid(config),
        modality=config.modality,
        time_patch=config.model.tubelet_size if config.modality == "video" else encoder.patch_size,
        frontend_spec=fbank.frontend_spec(config.data) if config.modality == "audio" else None,
    )
