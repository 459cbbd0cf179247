"""The modality-specific model pieces: tubelet stem, VideoMAE position table, cls-free encoder, the per-patch
validity of padded inputs, the dataset registry and the config checks that tie a modality to its recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import config_checks
from bridle_jax.data import pipeline
from bridle_jax.models import bridle, vit
from bridle_jax.models.patch_embed import TubeletEmbed
from tests.tiny import load_config


def test_tubelet_embed_is_a_conv3d_over_non_overlapping_tubelets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 8, 12, 3)).astype(np.float32)  # [B, T, H, W, C]
    stem = TubeletEmbed(width=5, patch_size=4, tubelet_size=2)
    params = stem.init(jax.random.PRNGKey(1), jnp.asarray(x))["params"]
    out, grid = stem.apply({"params": params}, jnp.asarray(x))
    assert grid == (2, 2, 3) and out.shape == (2, 12, 5)
    kernel = np.asarray(params["conv"]["kernel"], np.float64)  # [t, p, p, C, width]
    bias = np.asarray(params["conv"]["bias"], np.float64)
    # NumPy: cut [B, T/t, t, H/p, p, W/p, p, C] tubelets, flatten row-major over (time, row, col), project.
    tub = x.reshape(2, 2, 2, 2, 4, 3, 4, 3).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(2, 12, -1)
    ref = tub.astype(np.float64) @ kernel.reshape(-1, 5) + bias
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by the tubelet 2x4x4"):
        stem.apply({"params": params}, jnp.zeros((1, 3, 8, 12, 3)))


def test_video_position_table_is_videomae_sinusoid():
    n, d = 7, 6
    table = vit.position_table((1, 1, n), d)
    ref = np.array([[p / np.power(10000, 2 * (i // 2) / d) for i in range(d)] for p in range(n)])
    ref[:, 0::2], ref[:, 1::2] = np.sin(ref[:, 0::2]), np.cos(ref[:, 1::2])
    np.testing.assert_allclose(table, ref, atol=1e-6)
    np.testing.assert_array_equal(vit.position_table((2, 4), 8), vit.sincos_2d((2, 4), 8))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        vit.position_table((4,), 8)


def test_encoder_without_cls_token_returns_only_patches():
    enc = vit.ViTEncoder(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, stem="video", cls_token=False)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 8, 8, 3)), jnp.float32)
    params = enc.init(jax.random.PRNGKey(0), x)["params"]
    assert "cls" not in params
    tokens, inter = enc.apply({"params": params}, x)
    assert tokens.shape == (2, 8, 16) and inter["patch_grid"] == (2, 2, 2)
    np.testing.assert_array_equal(tokens, inter["patches"])
    keep = jnp.asarray([[0, 5], [7, 1]], jnp.int32)
    visible, _ = enc.apply({"params": params}, x, keep_idx=keep)
    assert visible.shape == (2, 2, 16)


def _models(name, **data):
    c = load_config(name)
    for k, v in data.items():
        c.data[k] = v
    return c, bridle.build_models(c)


def test_audio_model_input_runs_the_frontend_and_masks_padded_patch_rows():
    c, m = _models("sounds")
    spec = m.frontend_spec
    assert m.input_shape == (128, 32, 1) and m.patch_grid == (16, 4) and m.time_patch == 8
    from bridle_jax import fbank

    s = fbank.samples_for_frames(c.data.target_frames, spec)
    rng = np.random.default_rng(3)
    lengths = np.array([s, fbank.samples_for_frames(40, spec), fbank.samples_for_frames(41, spec)], np.int32)
    wave = rng.normal(scale=0.1, size=(3, s)).astype(np.float32)
    wave[np.arange(s)[None] >= lengths[:, None]] = 0.0
    x, valid = jax.jit(m.model_input)({"input": jnp.asarray(wave), "length": jnp.asarray(lengths)})
    feats, frames = fbank.log_mel(jnp.asarray(wave), jnp.asarray(lengths), spec)
    np.testing.assert_allclose(np.asarray(x)[..., 0], np.asarray(feats), atol=1e-5)  # jit vs eager rounding
    rows = np.asarray(valid).reshape(3, 16, 4)
    assert (rows == rows[:, :, :1]).all()  # validity is per time row
    # 128 frames -> 16 rows valid; 40 frames -> rows 0..4 (row 5 starts at frame 40); 41 frames -> row 5 too
    np.testing.assert_array_equal(rows[:, :, 0].sum(1), [16, 5, 6])
    assert list(np.asarray(frames)) == [128, 40, 41]


def test_video_model_input_masks_padded_tubelet_slots_and_images_have_no_mask():
    _, m = _models("moving_digits")
    assert m.patch_grid == (4, 4, 4) and m.time_patch == 2
    x = jnp.ones((2, 8, 32, 32, 3))
    _, valid = m.model_input({"input": x, "length": jnp.asarray([8, 3], jnp.int32)})
    slots = np.asarray(valid).reshape(2, 4, 16)
    np.testing.assert_array_equal(slots[:, :, 0], [[1, 1, 1, 1], [1, 1, 0, 0]])  # frames 0-2: slots 0 and 1
    _, im = _models("digits")
    assert im.model_input({"input": jnp.ones((2, 32, 32, 3)), "length": jnp.asarray([32, 32])})[1] is None


def test_dataset_registry_matches_every_pipeline_module():
    for modality in ("image", "audio", "video"):
        names = {n for n, m in pipeline.DATASETS.items() if m == modality}
        assert names == set(pipeline.module_for_modality(modality).DATASETS), modality


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("digits", {"modality": "audio"}, r"config.data.name: expected a dataset of modality .audio."),
        ("digits", {"modality": "sound"}, r"config.modality: expected one of"),
        (
            "sounds",
            {"data.target_frames": 100},
            r"config.data.target_frames: expected a positive multiple of the patch",
        ),
        ("sounds", {"data.num_mel_bins": 20}, r"config.data.num_mel_bins: expected a positive multiple"),
        ("sounds", {"model.decoder_window": (3, 4)}, r"config.model.decoder_window: expected \(rows, cols\) that tile"),
        ("sounds", {"model.decoder_kind": "swin"}, r"config.model.decoder_kind"),
        ("digits", {"masking.kind": "tube"}, r"config.masking.kind: expected 'random' for image and audio"),
        ("moving_digits", {"data.num_frames": 7}, r"config.data.num_frames: expected a positive multiple"),
        ("moving_digits", {"model.decoder_kind": "local"}, r"config.model.decoder_kind: expected 'global' for video"),
        ("moving_digits", {"masking.kind": "blocks"}, r"config.masking.kind: expected one of"),
    ],
)
def test_modality_config_errors_name_the_field(name, change, message):
    c = load_config(name)
    for key, value in change.items():
        node, _, leaf = key.rpartition(".")
        target = c
        for part in filter(None, node.split(".")):
            target = target[part]
        target[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_checks.validate(c)


def test_every_recipe_validates():
    for name in ("digits", "sounds", "moving_digits", "imagenet"):
        config_checks.validate(load_config(name))
    for name in ("audioset", "kinetics400"):  # need their data; everything else checks out
        c = load_config(name)
        with pytest.raises(ValueError, match="config.data.data_dir"):
            config_checks.validate(c)
        m = bridle.build_models(c)
        assert m.num_patches == (512 if name == "audioset" else 1568)
