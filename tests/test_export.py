"""Weights in and out (README "Parity with the authors' code"): the golden timm ViT imported into the project's ViT
(forward_features and pooled output), exported back key by key; the convert command's workdir exported with
`python -m bridle_jax.export` (safetensors and npz) against the official encoder's tensors; pickle refused by default.

Tolerances: features and pooled output atol 1e-5 (float32, two blocks, a different summation order); weights exact
(the conversions are transposes and copies)."""

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import convert, export
from bridle_jax.models import patch_embed, vit
from tests.test_parity import GOLDEN, official_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.fail(f"golden file missing: {GOLDEN} (shared/ must sit beside the repository checkout)")
    with np.load(GOLDEN, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


def timm_state(golden):
    return {k.split("/state/", 1)[1]: v for k, v in golden.items() if k.startswith("timm_vit/state/")}


class _TimmLike(nn.Module):
    """The project's ViT pieces (stem, Transformer, LayerNorm) with a given position table: timm's is learned."""

    @nn.compact
    def __call__(self, x, pos):
        patches, _ = patch_embed.make_stem("image", 64, 8, jnp.float32)(x)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, 64))
        tokens = jnp.concatenate([jnp.broadcast_to(cls + pos[:, :1], (x.shape[0], 1, 64)), patches + pos[:, 1:]], 1)
        feats = vit.Transformer(2, 64, 4, 256, name="transformer")(tokens)
        pooled = nn.LayerNorm(epsilon=1e-6, name="norm")(jnp.mean(feats[:, 1:], axis=1))
        return feats, pooled


def test_timm_import_forward_and_export_round_trip(golden):
    state = timm_state(golden)
    params, pos = export.from_timm(state)
    x = jnp.asarray(np.moveaxis(golden["timm_vit/x"], 1, -1))
    feats, pooled = _TimmLike().apply({"params": params}, x, jnp.asarray(pos))
    np.testing.assert_allclose(feats, golden["timm_vit/features"], atol=1e-5)
    np.testing.assert_allclose(pooled, golden["timm_vit/pooled"], atol=1e-5)
    out = export.to_timm(params, official_config("image"), pos_embed=pos)
    want = {k: v for k, v in state.items() if not k.startswith("head.")}  # the head is not exported
    assert sorted(out) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)


def test_convert_then_export_commands(golden, tmp_path):
    """The convert command on the official image model (.pth refused without --allow_pickle) -> a workdir with the
    training checkpoint main resumes (tests/test_convert_resume.py resumes one) -> the export command -> the official
    encoder's tensors under timm names (E's final norm as fc_norm), and the JSON of the timm constructor."""
    sd = {k.split("/model0/", 1)[1]: v for k, v in golden.items() if k.startswith("image/model0/")}
    src = tmp_path / "official.npz"
    np.savez(src, **sd)
    workdir = str(tmp_path / "wd")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(  # digits: training data readable here, so the command writes the resumable checkpoint too
        "from tests.test_parity import official_config\n\ndef get_config():\n    c = official_config('image')\n"
        "    c.data.name = 'digits'\n    c.batch_size = 64\n    return c\n"
    )
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin", "PYTHONPATH": str(ROOT)}
    convert_cmd = [sys.executable, "-m", "bridle_jax.convert", f"--config={recipe}", f"--workdir={workdir}"]
    pth = tmp_path / "official.pth"
    pth.write_bytes(b"never unpickled")
    refused = subprocess.run(convert_cmd + [f"--checkpoint={pth}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "--allow_pickle" in refused.stderr
    done = subprocess.run(convert_cmd + [f"--checkpoint={src}"], check=True, cwd=ROOT, capture_output=True, env=env)
    assert b"resume with python -m bridle_jax.main" in done.stdout
    assert [p.name for p in (tmp_path / "wd" / "checkpoints").iterdir()] == ["1000"]  # the cold start's last step
    from bridle_jax import features

    loaded = features.load_encoder(workdir)  # what fine-tuning and probes start from
    assert loaded.iteration == 1
    np.testing.assert_array_equal(loaded.params["norm"]["scale"], sd["encoder_decoder.norm.weight"])
    out = tmp_path / "encoder.safetensors"
    cmd = [sys.executable, "-m", "bridle_jax.export", f"--workdir={workdir}", "--format=timm", f"--out={out}"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=env)
    from safetensors.numpy import load_file

    got = load_file(str(out))
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["class"] == "timm.models.vision_transformer.VisionTransformer" and meta["iteration"] == 1
    assert meta["kwargs"]["embed_dim"] == 32 and meta["kwargs"]["global_pool"] == "avg"
    prefix = "encoder_decoder."
    want = {
        k[len(prefix) :].replace("norm.", "fc_norm.")
        if k == f"{prefix}norm.weight" or k == f"{prefix}norm.bias"
        else k[len(prefix) :]: v
        for k, v in sd.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(("decoder", "mask_token"))
    }
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=1e-7 if k == "pos_embed" else 0, err_msg=k)
    npz = export.export_encoder(workdir, str(tmp_path / "encoder.npz"), fmt="npz")
    with np.load(tmp_path / "encoder.npz") as f:
        assert sorted(f.files) == sorted(npz) == sorted(got)


def test_pth_needs_allow_pickle(tmp_path):
    path = tmp_path / "official.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="allow_pickle"):
        convert.load_state_dict(str(path))


@pytest.mark.parametrize("mod", ["audio", "video"])
def test_export_audio_video_encoders_match_official_tensors(golden, mod):
    """The official audio / video encoder, converted in and exported out, is the official tensors under timm (audio)
    or VideoMAE (video) names; audio's pos_embed is the checkpoint's (AudioMAE) table via config.model.pos_layout."""
    from bridle_jax.models.bridle import build_models

    cfg = official_config(mod)
    sd = {k.split("/model0/", 1)[1]: v for k, v in golden.items() if k.startswith(f"{mod}/model0/")}
    params, _, _ = convert.from_official(sd, build_models(cfg))
    got = export.to_timm(jax.tree.map(np.asarray, params["encoder"]["encoder"]), cfg)
    prefix = "encoder_decoder.encoder." if mod == "video" else "encoder_decoder."
    want = {}
    for k, v in sd.items():
        name = k[len(prefix) :]
        if not k.startswith(prefix) or name.startswith(("decoder", "mask_token", "encoder.", "encoder_to_decoder")):
            continue
        want["fc_norm." + name.split(".", 1)[1] if name.startswith("norm.") else name] = v
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=1e-7 if k == "pos_embed" else 0, err_msg=k)
    assert export.timm_args(cfg)["kwargs"]["embed_dim"] == 32


def test_from_official_errors_name_the_tensor(golden):
    """A transposed weight, an unknown tensor, a missing one and the wrong audio position table all fail loudly."""
    from bridle_jax.models.bridle import build_models

    m = build_models(official_config("image"))
    sd = {k.split("/model0/", 1)[1]: v for k, v in golden.items() if k.startswith("image/model0/")}
    bad = dict(sd, **{"encoder_decoder.decoder_embed.weight": sd["encoder_decoder.decoder_embed.weight"].T})
    with pytest.raises(ValueError, match="encoder_decoder.decoder_embed.weight"):
        convert.from_official(bad, m)
    with pytest.raises(ValueError, match="extra.weight"):
        convert.from_official(dict(sd, **{"extra.weight": np.zeros(3)}), m)
    with pytest.raises(KeyError, match="tokenizer.quantize_layer.0.bias"):
        convert.from_official({k: v for k, v in sd.items() if k != "tokenizer.quantize_layer.0.bias"}, m)
    audio = {k.split("/model0/", 1)[1]: v for k, v in golden.items() if k.startswith("audio/model0/")}
    cfg = official_config("audio")
    cfg.model.pos_layout = "grid"
    with pytest.raises(ValueError, match="pos_layout='transposed'"):
        convert.from_official(audio, build_models(cfg))
