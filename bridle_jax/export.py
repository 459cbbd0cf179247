"""A pretrained encoder E out to PyTorch, as a timm `VisionTransformer` state_dict (README "Parity").

    python -m bridle_jax.export --workdir=W [--iteration=k] --format=timm --out=encoder.safetensors
    python -m bridle_jax.export --workdir=W --format=npz --out=encoder.npz      # the same names, without safetensors

Beside the weights, `<out>.json` holds the constructor of the matching PyTorch model:

* image: `timm.models.vision_transformer.VisionTransformer(img_size, patch_size, in_chans=3, embed_dim, depth,
  num_heads, mlp_ratio, qkv_bias=True, class_token=True, global_pool='avg', num_classes=0)`;
* audio: the same with `img_size=(frames, mel bins)`, `in_chans=1` (AudioMAE's layout: a [B, 1, T, F] log-mel);
* video: no timm class has a tubelet stem: VideoMAE's `VisionTransformer` (`modeling_finetune.py`, `tubelet_size`,
  `all_frames`, `use_mean_pooling=True`, `num_classes=0`), whose blocks carry VideoMAE's `q_bias`/`v_bias`. The
  dropped k bias is exact (softmax ignores a per-row constant).

`global_pool='avg'` is the fine-tuning pool of this project and MAE (SPEC 4): the mean of the pre-norm patch tokens,
then `fc_norm`, which receives E's final LayerNorm (timm then has no `norm`). `pos_embed` is E's fixed sin-cos table
(cls slot zero). The head is not exported (`num_classes=0`).
"""

from __future__ import annotations

import json

import numpy as np

from bridle_jax.models import vit


def timm_args(config) -> dict:
    """{"class": ..., "kwargs": {...}} of the PyTorch model the export of `config`'s encoder loads into."""
    v = vit.decode_variant(config.model.variant)
    common = dict(
        patch_size=v["patch_size"],
        embed_dim=v["width"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        mlp_ratio=v["mlp_dim"] / v["width"],
        qkv_bias=True,
        num_classes=0,
    )
    if config.modality == "video":
        return {
            "class": "VideoMAE modeling_finetune.VisionTransformer (MCG-NJU/VideoMAE)",
            "kwargs": dict(
                img_size=config.data.image_size,
                in_chans=3,
                all_frames=config.data.num_frames,
                tubelet_size=config.model.tubelet_size,
                use_mean_pooling=True,
                **common,
            ),
        }
    if config.modality == "audio":
        size, chans = [config.data.target_frames, config.data.num_mel_bins], 1
    else:
        size, chans = config.data.image_size, 3
    return {
        "class": "timm.models.vision_transformer.VisionTransformer",
        "kwargs": dict(img_size=size, in_chans=chans, class_token=True, global_pool="avg", **common),
    }


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    n = k.ndim
    return np.transpose(k, (n - 1, n - 2) + tuple(range(n - 2)))


def to_timm(encoder_params, config, *, pos_embed: np.ndarray | None = None) -> dict:
    """E's params (the `encoders/iteration_k` tree) -> {timm name: float32 array}. `pos_embed` [1, c+N, W]
    overrides the fixed table (used to round-trip a timm model with a learned one)."""
    p = {k: v for k, v in encoder_params.items()}
    video = config.modality == "video"
    out = {}
    if "cls" in p:
        out["cls_token"] = np.asarray(p["cls"])
    if pos_embed is None and not video:  # VideoMAE keeps its (identical) sinusoid table out of the state_dict
        from bridle_jax.models.bridle import patch_grid

        table = vit.position_table(
            patch_grid(config), p["norm"]["scale"].shape[0], config.model.get("pos_layout", "grid")
        )
        pos_embed = np.concatenate([np.zeros((int("cls" in p), table.shape[1]), np.float32), table])[None]
    if pos_embed is not None:
        out["pos_embed"] = np.asarray(pos_embed, np.float32)
    out["patch_embed.proj.weight"] = _conv_to_torch(np.asarray(p["patch_embed"]["conv"]["kernel"]))
    out["patch_embed.proj.bias"] = np.asarray(p["patch_embed"]["conv"]["bias"])
    blocks = p["transformer"]
    for i in range(len(blocks)):
        b, t = blocks[f"block_{i}"], f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            out[f"{t}.{norm}.weight"] = np.asarray(b[norm]["scale"])
            out[f"{t}.{norm}.bias"] = np.asarray(b[norm]["bias"])
        qkv_b = np.asarray(b["attn"]["qkv"]["bias"])
        out[f"{t}.attn.qkv.weight"] = np.asarray(b["attn"]["qkv"]["kernel"]).T
        if video:
            w = qkv_b.shape[0] // 3
            out[f"{t}.attn.q_bias"], out[f"{t}.attn.v_bias"] = qkv_b[:w], qkv_b[2 * w :]
        else:
            out[f"{t}.attn.qkv.bias"] = qkv_b
        for ours, theirs in (("attn", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            d = b[ours]["proj"] if ours == "attn" else b[ours]
            out[f"{t}.{theirs}.weight"] = np.asarray(d["kernel"]).T
            out[f"{t}.{theirs}.bias"] = np.asarray(d["bias"])
    out["fc_norm.weight"] = np.asarray(p["norm"]["scale"])
    out["fc_norm.bias"] = np.asarray(p["norm"]["bias"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_timm(state_dict) -> tuple[dict, np.ndarray | None]:
    """A timm `VisionTransformer` state_dict (image layout, qkv bias, global_pool 'avg' or 'token') -> (E's params,
    its pos_embed). E's final LayerNorm takes `fc_norm` when present (global_pool 'avg'), else `norm`. The head is
    ignored. The position table is returned, not loaded: E's is fixed (compare it, or pass it to `to_timm`)."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    params: dict = {"patch_embed": {"conv": {}}, "transformer": {}}
    if "cls_token" in sd:
        params["cls"] = sd["cls_token"]
    w = sd["patch_embed.proj.weight"]
    params["patch_embed"]["conv"] = {
        "kernel": np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)),
        "bias": sd["patch_embed.proj.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        t = f"blocks.{i}"
        params["transformer"][f"block_{i}"] = {
            "norm1": {"scale": sd[f"{t}.norm1.weight"], "bias": sd[f"{t}.norm1.bias"]},
            "norm2": {"scale": sd[f"{t}.norm2.weight"], "bias": sd[f"{t}.norm2.bias"]},
            "attn": {
                "qkv": {"kernel": sd[f"{t}.attn.qkv.weight"].T, "bias": sd[f"{t}.attn.qkv.bias"]},
                "proj": {"kernel": sd[f"{t}.attn.proj.weight"].T, "bias": sd[f"{t}.attn.proj.bias"]},
            },
            "fc1": {"kernel": sd[f"{t}.mlp.fc1.weight"].T, "bias": sd[f"{t}.mlp.fc1.bias"]},
            "fc2": {"kernel": sd[f"{t}.mlp.fc2.weight"].T, "bias": sd[f"{t}.mlp.fc2.bias"]},
        }
    norm = "fc_norm" if "fc_norm.weight" in sd else "norm"
    params["norm"] = {"scale": sd[f"{norm}.weight"], "bias": sd[f"{norm}.bias"]}
    return params, sd.get("pos_embed")


def export_encoder(workdir: str, out: str, *, iteration: int | None = None, fmt: str = "timm") -> dict:
    """Writes the encoder of `workdir` (latest iteration by default) to `out` (safetensors for fmt "timm", .npz for
    "npz") and `<out without extension>.json` (timm_args + the iteration). Returns the state_dict written."""
    import jax
    import jax.numpy as jnp

    from bridle_jax import encoder_store
    from bridle_jax import workdir as workdir_lib
    from bridle_jax.models import bridle

    if fmt not in ("timm", "npz"):
        raise ValueError(f"--format: expected 'timm' (safetensors) or 'npz', got {fmt!r}")
    config = workdir_lib.read_config(workdir)
    available = encoder_store.saved_iterations(workdir)
    if not available:
        raise FileNotFoundError(f"{workdir}: no saved encoder (encoders/iteration_*)")
    iteration = available[-1] if iteration is None else iteration
    module = bridle.encoder_from_config(config)
    shape = (1,) + bridle.input_shape(config)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape))["params"])
    params = jax.tree.map(np.asarray, encoder_store.load_encoder_params(workdir, iteration, abstract))
    state = to_timm(params, config)
    if fmt == "timm":
        from safetensors.numpy import save_file  # the `export` extra

        save_file(state, out)
    else:
        np.savez(out, **state)
    meta = dict(timm_args(config), iteration=iteration, modality=config.modality, workdir=str(workdir))
    with open(out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return state


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A bridle_jax workdir (config.json and encoders/iteration_*).")
    flags.DEFINE_integer("iteration", None, "Encoder iteration (default: the latest).")
    flags.DEFINE_enum("format", "timm", ["timm", "npz"], "timm: safetensors; npz: the same names in a NumPy .npz.")
    flags.DEFINE_string("out", None, "Output file (.safetensors or .npz); the JSON goes beside it.")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(_):
        f = flags.FLAGS
        from bridle_jax import reporting

        reporting.quiet_library_logs(verbosity_given=f["verbosity"].present)  # Orbax's restore logs at INFO
        state = export_encoder(f.workdir, f.out, iteration=f.iteration, fmt=f.format)
        print(f"{f.out}: {len(state)} tensors; constructor in {f.out.rsplit('.', 1)[0]}.json")

    app.run(run, argv)


if __name__ == "__main__":
    main()
