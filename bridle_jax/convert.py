"""Weights from the authors' PyTorch BRIDLE into this project's parameters and codebooks, and the name map back.

`from_official(state_dict, models)` takes an official `BRIDLE` / `BRIDLE3D` state_dict (a mapping of PyTorch names to
NumPy arrays, no torch needed) and returns `(params, codebooks, extras)` in the layout of `BridleModels.init_params`
and `quantizer.CodebookState`, for every modality and both phases (README "Parity with the authors' code"):

* image/audio (`model/encoder_decoder.py`, `model/tokenizer.py`): `encoder_decoder.{patch_embed, cls_token, blocks,
  norm}` -> E; `encoder_decoder.{decoder_embed, mask_token, decoder_blocks, decoder_norm, decoder_pred}` -> D (global
  blocks, or the Swin-style local blocks with their position-bias MLP `attn.meta_mlp`); `tokenizer.{patch_embed,
  cls_token, blocks, norm, quantize_layer}` -> T; `tokenizer.estimator_*` -> TE; `tokenizer.patch_embed` +
  `tokenizer.cold_start_encoder` -> the cold-start tokenizer (it shares T's patch embedding there);
* video (`model_video/*`): the same under `encoder_decoder.encoder.*`, `encoder_decoder.{encoder_to_decoder,
  mask_token, decoder.*}`, `tokenizer.encoder.*`, `tokenizer.{encoder_to_decoder, decoder.*}`; VideoMAE's separate
  `q_bias`/`v_bias` become the fused qkv bias with a zero k part;
* codebooks (`…quantizer.codebooks.{m}`): `weight` without its padding row (index K, always zero and never used),
  `cluster_size_ema` -> `cluster_size`, `initted` -> `initialized`; video's `embed_ema` accumulator is returned in
  `extras["embed_ema"]` (it feeds `quantizer.ema_update_vqvae`, the authors' video EMA).

The fixed sin-cos tables (`pos_embed`, `decoder_pos_embed`, `estimator_pos_embed`) are not parameters here; they are
checked against the tables the models build, so a checkpoint made with AudioMAE's transposed audio grid fails with a
pointer to `config.model.pos_layout`. `to_official(tree, models)` maps a params-shaped tree (e.g. gradients) back to
PyTorch names. The command `python -m bridle_jax.convert` (see `main`) turns an official checkpoint into a workdir
that fine-tuning reads and `python -m bridle_jax.main` resumes (`convert_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax import quantizer
from bridle_jax.models import local_decoder as local_lib
from bridle_jax.models import vit
from bridle_jax.models.bridle import BridleModels

# Buffers of the official state_dict that are not parameters here (checked or returned separately).
_POS_TABLES = ("pos_embed", "decoder_pos_embed", "estimator_pos_embed")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One official tensor <-> one leaf of the params tree. kind: "id" | "linear" (W -> Wᵀ) | "conv" (OIHW(T) ->
    (T)HWIO) | "q_bias" / "v_bias" (a slice of the fused qkv bias) | "alias" (a copy: filled, never mapped back)."""

    torch: str
    path: tuple[str, ...]
    kind: str = "id"


def _linear(out: list, torch: str, path: tuple, bias: bool = True, kind: str = "linear") -> None:
    out.append(Entry(f"{torch}.weight", path + ("kernel",), kind))
    if bias:
        out.append(Entry(f"{torch}.bias", path + ("bias",), "alias" if kind == "alias" else "id"))


def _norm(out: list, torch: str, path: tuple) -> None:
    out.append(Entry(f"{torch}.weight", path + ("scale",)))
    out.append(Entry(f"{torch}.bias", path + ("bias",)))


def _vit_blocks(out: list, torch: str, path: tuple, depth: int, video: bool) -> None:
    for i in range(depth):
        t, p = f"{torch}.{i}", path + (f"block_{i}",)
        _norm(out, f"{t}.norm1", p + ("norm1",))
        if video:  # VideoMAE: bias-free qkv Linear plus q_bias / v_bias
            out.append(Entry(f"{t}.attn.qkv.weight", p + ("attn", "qkv", "kernel"), "linear"))
            out.append(Entry(f"{t}.attn.q_bias", p + ("attn", "qkv", "bias"), "q_bias"))
            out.append(Entry(f"{t}.attn.v_bias", p + ("attn", "qkv", "bias"), "v_bias"))
        else:
            _linear(out, f"{t}.attn.qkv", p + ("attn", "qkv"))
        _linear(out, f"{t}.attn.proj", p + ("attn", "proj"))
        _norm(out, f"{t}.norm2", p + ("norm2",))
        _linear(out, f"{t}.mlp.fc1", p + ("fc1",))
        _linear(out, f"{t}.mlp.fc2", p + ("fc2",))


def _swin_blocks(out: list, torch: str, path: tuple, depth: int) -> None:
    """The Swin-style blocks of the audio decoder (timm v2_cr as patched by AudioMAE, local_decoder.py)."""
    for i in range(depth):
        t, p = f"{torch}.{i}", path + (f"block_{i}",)
        out.append(Entry(f"{t}.attn.tau", p + ("attn", "tau")))
        _linear(out, f"{t}.attn.qkv", p + ("attn", "qkv"))
        _linear(out, f"{t}.attn.proj", p + ("attn", "proj"))
        _linear(out, f"{t}.attn.meta_mlp.model.0", p + ("attn", "cpb_fc1"))
        _linear(out, f"{t}.attn.meta_mlp.model.3", p + ("attn", "cpb_fc2"))
        _norm(out, f"{t}.norm1", p + ("norm1",))
        _linear(out, f"{t}.mlp.model.0", p + ("fc1",))
        _linear(out, f"{t}.mlp.model.2", p + ("fc2",))
        _norm(out, f"{t}.norm2", p + ("norm2",))


def entries(models: BridleModels) -> list[Entry]:
    """The full name map of `models` (sizes from the models, layout from the modality and decoder kind)."""
    out: list[Entry] = []
    video = models.modality == "video"
    enc, dec, tok, est = models.encoder, models.decoder, models.tokenizer, models.estimator
    E, D = ("encoder", "encoder"), ("encoder", "decoder")
    T, TE, C = ("tokenizer", "tokenizer"), ("tokenizer", "estimator"), ("cold_start",)
    if video:
        e, t = "encoder_decoder.encoder", "tokenizer.encoder"
        out.append(Entry(f"{e}.patch_embed.proj.weight", E + ("patch_embed", "conv", "kernel"), "conv"))
        out.append(Entry(f"{e}.patch_embed.proj.bias", E + ("patch_embed", "conv", "bias")))
        _vit_blocks(out, f"{e}.blocks", E + ("transformer",), enc.depth, True)
        _norm(out, f"{e}.norm", E + ("norm",))
        _linear(out, "encoder_decoder.encoder_to_decoder", D + ("embed",), bias=dec.embed_bias)
        out.append(Entry("encoder_decoder.mask_token", D + ("mask_token",)))
        _vit_blocks(out, "encoder_decoder.decoder.blocks", D + ("transformer",), dec.depth, True)
        _norm(out, "encoder_decoder.decoder.norm", D + ("norm",))
        _linear(out, "encoder_decoder.decoder.head", D + ("head",))
        out.append(Entry(f"{t}.patch_embed.proj.weight", T + ("vit", "patch_embed", "conv", "kernel"), "conv"))
        out.append(Entry(f"{t}.patch_embed.proj.bias", T + ("vit", "patch_embed", "conv", "bias")))
        _vit_blocks(out, f"{t}.blocks", T + ("vit", "transformer"), tok.depth, True)
        _norm(out, f"{t}.norm", T + ("vit", "norm"))
        _linear(out, f"{t}.quantize_layer.0", T + ("head_in",))
        _linear(out, f"{t}.quantize_layer.2", T + ("head_out",))
        _linear(out, "tokenizer.encoder_to_decoder", TE + ("embed",), bias=est.embed_bias)
        _vit_blocks(out, "tokenizer.decoder.blocks", TE + ("transformer",), est.depth, True)
        _norm(out, "tokenizer.decoder.norm", TE + ("norm",))
        _linear(out, "tokenizer.decoder.head", TE + ("head",))
        cold = t
    else:
        e = "encoder_decoder"
        out.append(Entry(f"{e}.cls_token", E + ("cls",)))
        out.append(Entry(f"{e}.patch_embed.proj.weight", E + ("patch_embed", "conv", "kernel"), "conv"))
        out.append(Entry(f"{e}.patch_embed.proj.bias", E + ("patch_embed", "conv", "bias")))
        _vit_blocks(out, f"{e}.blocks", E + ("transformer",), enc.depth, False)
        _norm(out, f"{e}.norm", E + ("norm",))
        _linear(out, f"{e}.decoder_embed", D + ("embed",))
        out.append(Entry(f"{e}.mask_token", D + ("mask_token",)))
        if isinstance(dec, local_lib.LocalLabelPredictor):
            _swin_blocks(out, f"{e}.decoder_blocks", D, dec.depth)
        else:
            _vit_blocks(out, f"{e}.decoder_blocks", D + ("transformer",), dec.depth, False)
        _norm(out, f"{e}.decoder_norm", D + ("norm",))
        _linear(out, f"{e}.decoder_pred", D + ("head",))
        out.append(Entry("tokenizer.cls_token", T + ("vit", "cls")))
        out.append(Entry("tokenizer.patch_embed.proj.weight", T + ("vit", "patch_embed", "conv", "kernel"), "conv"))
        out.append(Entry("tokenizer.patch_embed.proj.bias", T + ("vit", "patch_embed", "conv", "bias")))
        _vit_blocks(out, "tokenizer.blocks", T + ("vit", "transformer"), tok.depth, False)
        _norm(out, "tokenizer.norm", T + ("vit", "norm"))
        _linear(out, "tokenizer.quantize_layer.0", T + ("head_in",))
        _linear(out, "tokenizer.quantize_layer.2", T + ("head_out",))
        _linear(out, "tokenizer.estimator_embed", TE + ("embed",))
        _vit_blocks(out, "tokenizer.estimator_blocks", TE + ("transformer",), est.depth, False)
        _norm(out, "tokenizer.estimator_norm", TE + ("norm",))
        _linear(out, "tokenizer.estimator_pred", TE + ("head",))
        cold = "tokenizer"
    # the cold-start tokenizer: the tokenizer's own patch embedding (a copy here) and `cold_start_encoder`
    out.append(Entry(f"{cold}.patch_embed.proj.weight", C + ("patch_embed", "conv", "kernel"), "alias"))
    out.append(Entry(f"{cold}.patch_embed.proj.bias", C + ("patch_embed", "conv", "bias"), "alias"))
    out.append(Entry(f"{cold}.cold_start_encoder.weight", C + ("proj", "kernel"), "linear"))
    return out


def quantizer_prefix(models: BridleModels) -> str:
    return "tokenizer.encoder.quantizer" if models.modality == "video" else "tokenizer.quantizer"


def _to_jax(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear" or (kind == "alias" and x.ndim == 2):
        return x.T
    if kind == "conv" or (kind == "alias" and x.ndim >= 4):
        return np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))
    return x


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        n = x.ndim
        return np.transpose(x, (n - 1, n - 2) + tuple(range(n - 2)))
    return x


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _strip(state_dict: Mapping) -> dict:
    """A checkpoint dict -> its state_dict (`{"model": ...}` as main_pretrain saves it), without a DDP `module.`."""
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    return {(k.removeprefix("module.")): np.asarray(v) for k, v in state_dict.items()}


def _check_tables(sd: dict, models: BridleModels) -> None:
    """The official fixed sin-cos tables must equal the ones the models build (else a layout switch is wrong)."""
    if models.modality == "video":
        return  # VideoMAE's tables are plain tensors, not in the state_dict
    grid, layout = models.patch_grid, models.encoder.pos_layout
    want = {
        "encoder_decoder.pos_embed": (models.encoder.width, True),
        "encoder_decoder.decoder_pos_embed": (models.decoder.width, True),
        "tokenizer.pos_embed": (models.tokenizer.width, True),
        "tokenizer.estimator_pos_embed": (models.estimator.width, False),
    }
    for name, (width, cls) in want.items():
        if name not in sd:
            continue
        table = sd[name].reshape(-1, sd[name].shape[-1])[int(cls) :]
        ours = vit.position_table(grid, width, layout)
        if table.shape != ours.shape or not np.allclose(table, ours, atol=1e-5):
            other = "grid" if layout == "transposed" else "transposed"
            hint = ""
            if table.shape == ours.shape and np.allclose(table, vit.position_table(grid, width, other), atol=1e-5):
                hint = f" It is the {other!r} table: set config.model.pos_layout={other!r}."
            raise ValueError(f"{name}: the checkpoint's fixed position table is not this config's.{hint}")


def from_official(state_dict: Mapping, models: BridleModels, *, strict: bool = True):
    """An official BRIDLE state_dict (PyTorch names -> arrays) -> `(params, codebooks, extras)`.

    Shapes are checked against `models` (a transposed or wrongly sized weight fails naming the tensor); with
    `strict`, official tensors that map nowhere are an error too. `extras`: {"embed_ema": [M, K, D] or None}.
    """
    sd = _strip(state_dict)
    _check_tables(sd, models)
    template = jax.eval_shape(lambda: models.init_params(jax.random.key(0)))
    params: dict = {}
    biases: dict = {}
    used = set()
    for entry in entries(models):
        if entry.torch not in sd:
            raise KeyError(f"official state_dict: missing {entry.torch!r} (needed for params{list(entry.path)})")
        used.add(entry.torch)
        value = np.asarray(sd[entry.torch], np.float32)
        if entry.kind in ("q_bias", "v_bias"):
            biases.setdefault(entry.path, {})[entry.kind] = value
            continue
        value = _to_jax(entry.kind, value)
        want = _get(template, entry.path).shape
        if value.shape != tuple(want):
            raise ValueError(
                f"{entry.torch}: shape {value.shape} after conversion, params{list(entry.path)} wants {want}"
            )
        _set(params, entry.path, value)
    for path, qv in biases.items():
        q, v = qv["q_bias"], qv["v_bias"]
        _set(params, path, np.concatenate([q, np.zeros_like(q), v]))
    missing = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(template)]
    filled = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    if [m for m in missing if m not in filled]:
        raise ValueError(f"no official tensor for params {[m for m in missing if m not in filled]}")

    prefix = quantizer_prefix(models)
    levels = models.decoder.num_levels
    books, sizes, emas, init = [], [], [], []
    for m in range(levels):
        p = f"{prefix}.codebooks.{m}"
        w = np.asarray(sd[f"{p}.weight"], np.float32)
        k = models.decoder.codebook_size
        if w.shape != (k + 1, models.tokenizer.code_dim):
            raise ValueError(
                f"{p}.weight: shape {w.shape}, expected {(k + 1, models.tokenizer.code_dim)} (K + padding)"
            )
        books.append(w[:k])  # row K is the padding row: zero, never a code
        sizes.append(np.asarray(sd[f"{p}.cluster_size_ema"], np.float32))
        emas.append(np.asarray(sd[f"{p}.embed_ema"], np.float32) if f"{p}.embed_ema" in sd else None)
        init.append(bool(np.all(np.asarray(sd.get(f"{p}.initted", [1.0])) != 0)))
        used.update(n for n in (f"{p}.weight", f"{p}.cluster_size_ema", f"{p}.embed_ema", f"{p}.initted"))
    codebooks = quantizer.CodebookState(
        codes=jnp.asarray(np.stack(books)),
        cluster_size=jnp.asarray(np.stack(sizes)),
        initialized=jnp.asarray(all(init)),
    )
    extras = {"embed_ema": None if any(e is None for e in emas) else np.stack(emas)}
    if strict:
        left = sorted(
            n
            for n in sd
            if n not in used
            and n.rsplit(".", 1)[-1] not in _POS_TABLES
            and not n.endswith(("relative_coordinates_log", "attn_mask"))
        )
        if left:
            raise ValueError(f"official tensors that map to no parameter here (strict=False ignores them): {left}")
    return jax.tree.map(jnp.asarray, params), codebooks, extras


def to_official(tree: dict, models: BridleModels) -> dict:
    """A params-shaped tree (all of it, or some of "encoder" / "tokenizer" / "cold_start") -> {PyTorch name: array}.

    Copies ("alias") are not mapped back: the official cold-start path reads the tokenizer's own patch embedding."""
    out: dict = {}
    for entry in entries(models):
        if entry.kind == "alias":
            continue
        try:
            value = np.asarray(_get(tree, entry.path))
        except (KeyError, TypeError):
            continue
        if entry.kind in ("q_bias", "v_bias"):
            w = value.shape[0] // 3
            value = value[:w] if entry.kind == "q_bias" else value[2 * w :]
        out[entry.torch] = _to_torch(entry.kind, value)
    return out


def _num_values(tree) -> int:
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------ the command


def load_state_dict(path: str, *, allow_pickle: bool = False) -> dict:
    """An official checkpoint file -> {PyTorch name: array}. `.npz` and `.safetensors` load without pickle. A `.pth`
    (torch.save) is a pickle: it is read only with `allow_pickle` (it can run code: only for files you trust), and
    needs torch (`pip install bridle_jax[convert]`)."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if not allow_pickle:
        raise ValueError(
            f"{path}: a PyTorch checkpoint is a pickle, which can run code when loaded; pass --allow_pickle to load "
            "it (only for files you trust), or convert it to .safetensors / .npz first"
        )
    import torch  # the optional `convert` extra; only this command imports it

    print(f"WARNING: {path}: loading a pickle with torch.load (--allow_pickle): only do this for files you trust")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    obj = obj.get("model", obj) if isinstance(obj, dict) else obj
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def _data_state_for(data_dir, num_processes: int) -> None:
    """Grain stores one iterator state per process (`process_{i}-of-{n}.json`) and a restore on n processes reads
    only those, so the resuming run's count needs its own files. The stream's start is the same state for every
    process and count (the process's slice is part of the dataset, not of the state: README "Multi-host data
    order"), so this process's file is copied."""
    if jax.process_index() != 0:
        return
    text = (data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json").read_text()
    for i in range(num_processes):
        target = data_dir / f"process_{i}-of-{num_processes}.json"
        if not target.exists():
            target.write_text(text)


def import_phase(plan, *, iteration: int | None = None, phase_end: int | None = None):
    """The plan phase at whose end an official checkpoint stands, and the encoder iteration it holds.

    The authors save one checkpoint per phase (SPEC 3.1): after an encoder phase it holds that phase's E and D with
    the tokenizer and codebooks of the tokenizer phase before it (iteration 1: the cold-start tokenizer); after a
    tokenizer phase, the new T, TE and codebooks with the previous iteration's frozen E and D. `phase_end` names the
    plan phase; without it, the end of iteration `iteration`'s encoder phase (default 1, the cold start).
    Returns (phase, encoder iteration)."""
    if phase_end is None:
        iteration = 1 if iteration is None else iteration
        found = [p for p in plan if p.kind == "encoder" and p.iteration == iteration]
        if not found:
            raise ValueError(
                f"--iteration={iteration}: the recipe's plan (config.schedule.phases) has no encoder phase of that "
                f"iteration; its phases: {[p.name for p in plan]}"
            )
        return found[0], iteration
    if not 0 <= phase_end < len(plan):
        raise ValueError(f"--phase_end={phase_end}: expected a phase index of the plan, 0..{len(plan) - 1}")
    phase = plan[phase_end]
    held = phase.iteration if phase.kind == "encoder" else phase.iteration - 1  # a tokenizer phase's teacher E
    if iteration is not None and iteration != held:
        raise ValueError(
            f"--iteration={iteration} and --phase_end={phase_end} disagree: the end of {phase.name} holds the "
            f"encoder of iteration {held}"
        )
    return phase, held


def convert_checkpoint(
    config,
    state_dict: Mapping,
    workdir: str,
    *,
    iteration: int | None = None,
    phase_end: int | None = None,
    resumable: bool = True,
    num_processes: int = 1,
) -> dict:
    """Writes `workdir` from an official state_dict, as a run of `config` would stand at the end of the plan phase
    the checkpoint ends (`import_phase`):

    * `config.json` (+ `config_history/`), through the workdir's own `record_start`: resuming is accepted only
      under exactly this config (the recipe and its overrides);
    * `encoders/iteration_k`, the checkpoint's encoder (what fine-tuning, probes, `features.load_encoder` and
      `bridle_jax.export` read), and `official_import/`: all parameters and the codebooks (Orbax);
    * with `resumable`: a training checkpoint at the phase's last step (`checkpoints/<step>`): the parameters, the
      codebooks, a fresh optimizer state, the seed's rng, and the data iterator at the start of the dataset order
      (not carried over: the official run's data position, which has no meaning here, and its optimizer moments,
      which the next phase would restart anyway, SPEC 3.1). `python -m
      bridle_jax.main` with the same config then restores it, hands over to the next phase and continues; and
      `encoders/iteration_0` is this config's initial encoder for its seed (the official run's own initial weights
      are not in its checkpoint). Building the data iterator needs the recipe's training data to be readable.
      `num_processes`: the processes of the run that will resume it (the data item is stored per process count).

    Refused (nothing written) into a workdir that holds checkpoints or another config. Returns {"params",
    "codebooks", "extras", "phase", "iteration" (the encoder's), "step"} (step: the checkpoint's, or None)."""
    import orbax.checkpoint as ocp

    from bridle_jax import checkpoint as ckpt_lib
    from bridle_jax import encoder_store, optim, paths, resolve, schedule, sharding
    from bridle_jax import state as state_lib
    from bridle_jax import workdir as workdir_lib
    from bridle_jax.config_checks import validate
    from bridle_jax.data import pipeline
    from bridle_jax.models.bridle import build_models

    validate(config)
    # as the run will resolve it, so that its config.json matches the run's (a plan in epochs needs the train split)
    config, _ = resolve.pretraining(config, lambda: len(pipeline.train_source(config.data)))
    plan = schedule.parse_plan(config.schedule.phases)
    phase, enc_iteration = import_phase(plan, iteration=iteration, phase_end=phase_end)
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes: expected a positive int, got {num_processes!r}")
    models = build_models(config)
    params, codebooks, extras = from_official(state_dict, models)
    codebooks = codebooks.replace(initialized=jnp.asarray(True))  # trained or k-means'd: never re-initialised (A3b)
    workdir = paths.resolve_workdir(workdir)
    workdir_lib.workdir_exists_or_make(workdir)
    lock = workdir_lib.lock_for_run(workdir)  # no run may start in it while it is written
    try:
        workdir_lib.check_resume(workdir, config)  # a config.json of another config: refused
        if ckpt_lib.Checkpointer.has_checkpoints(workdir):
            raise ValueError(f"workdir {workdir} already holds training checkpoints; convert into a new workdir")
        state = data_iter = None
        if resumable:
            mesh = sharding.make_mesh(config.mesh)
            tx = optim.make_optimizer(config.optim, phase.kind, phase.steps)[0]
            template = jax.eval_shape(lambda: models.init_params(jax.random.key(0)))
            params = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), params, template)
            state = state_lib.imported_sharded(models, config, tx, phase, config.seed, mesh, params, codebooks)
            fresh = lambda: state_lib.create(models, config, tx, phase, config.seed)
            initial = jax.jit(lambda: fresh().params["encoder"]["encoder"])()  # iteration 0: this seed's init
            try:
                data_iter = pipeline.train_iterator(
                    config.data,
                    local_batch_size=sharding.local_batch_size(config.batch_size, mesh),
                    seed=config.seed,
                    process_index=jax.process_index(),
                    process_count=jax.process_count(),
                )
            except Exception as e:  # pylint: disable=broad-except
                raise ValueError(
                    f"the recipe's training data (config.data.name={config.data.name!r}) cannot be read here "
                    f"({type(e).__name__}: {e}); a resumable workdir records the data stream's start: convert where "
                    "the data is readable, or pass --noresumable for a workdir to fine-tune from only"
                ) from e
        workdir_lib.record_start(workdir, config, {})
        encoder_store.save_encoder(workdir, enc_iteration, params["encoder"]["encoder"])
        path = paths.workdir_path(workdir) / "official_import"
        if not path.exists():
            saver = ocp.StandardCheckpointer()
            saver.save(path, {"params": params, "codebooks": codebooks})
            saver.wait_until_finished()
        if resumable:
            encoder_store.save_encoder(workdir, 0, initial)
            ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=False)
            try:
                meta = {"step": phase.end_step, "phase": phase.name, "phase_index": phase.index}
                ckpt.save(phase.end_step, state, data_iter, meta)
            finally:
                ckpt.close()
            _data_state_for(ckpt.directory / str(phase.end_step) / "data", num_processes)
    finally:
        if lock is not None:
            lock.release()
    return {
        "params": params,
        "codebooks": codebooks,
        "extras": extras,
        "phase": phase,
        "iteration": enc_iteration,
        "step": phase.end_step if resumable else None,
    }


def main(argv=None) -> None:
    """python -m bridle_jax.convert --config=RECIPE.py [--config.x=v ...] --checkpoint=official.pth --workdir=W
    [--iteration=k | --phase_end=K] [--num_processes=n] [--allow_pickle] [--noresumable]: an official BRIDLE
    checkpoint -> a workdir that `python -m bridle_jax.main` with the same --config and overrides resumes
    (`convert_checkpoint`). The recipe must describe the checkpoint's sizes and the authors'-behaviour switches it
    needs (README "Parity")."""
    from absl import app, flags

    from bridle_jax import recipes, reporting

    recipes.DEFINE_config_flag("config", "The recipe (sizes) of the official checkpoint: a name or a path.")
    flags.DEFINE_string("checkpoint", None, "Official checkpoint: .pth (needs --allow_pickle), .safetensors or .npz.")
    flags.DEFINE_string("workdir", None, "The workdir to write.")
    flags.DEFINE_integer(
        "iteration", None, "The checkpoint is the end of this iteration's encoder phase (default 1: the cold start)."
    )
    flags.DEFINE_integer(
        "phase_end", None, "Or: the checkpoint is the end of this plan phase (index into config.schedule.phases)."
    )
    flags.DEFINE_bool("allow_pickle", False, "Allow torch.load (pickle: it can run code) for a .pth checkpoint.")
    flags.DEFINE_bool(
        "resumable", True, "Write the training checkpoint that bridle_jax.main resumes (needs the training data)."
    )
    flags.DEFINE_integer("num_processes", 1, "The processes (hosts) of the run that will resume the workdir.")
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])

    def run(_):
        f = flags.FLAGS
        reporting.quiet_library_logs(verbosity_given=f["verbosity"].present)
        sd = load_state_dict(f.checkpoint, allow_pickle=f.allow_pickle)
        out = convert_checkpoint(
            f.config,
            sd,
            f.workdir,
            iteration=f.iteration,
            phase_end=f.phase_end,
            resumable=f.resumable,
            num_processes=f.num_processes,
        )
        phase = out["phase"]
        print(
            f"{f.workdir}: the end of phase {phase.index} ({phase.name}): encoders/iteration_{out['iteration']} and "
            f"official_import/ ({_num_values(out['params'])} values)"
        )
        if out["step"] is not None:
            print(
                f"checkpoints/{out['step']}: resume with python -m bridle_jax.main --workdir={f.workdir} and the same "
                "--config and overrides; it continues with the next phase (the data stream restarts at its beginning)"
            )

    app.run(run, argv)


if __name__ == "__main__":
    main()
