"""Writes tests/golden/official_joint_tiny.npz: steps of the authors' `jointBRIDLE` (their experimental joint
variant) at the tiny image sizes of the project's other golden file, for `tests/test_joint_parity.py`.

    python tests/golden/make_official_joint.py --official DIR --golden ../shared/golden/official_bridle_tiny.npz

DIR is a checkout of HoangNguyenM/bridle at c83d1ac, imported as it is (no file edited, nothing copied here).
Needs torch and timm (the other golden file used torch 2.14.1 and timm 1.0.31), which the project itself does not
need: run it in a separate environment. It takes a few seconds; two runs give byte-identical files.

What it records. The image model is built exactly as the other golden file's image cases (the same classes and
constructor arguments, RQ 2 x 16 x 24, decoder_mode 0, estimator_mode 0, every dropout p = 0), then wrapped in
`jointBRIDLE(encoder_decoder, tokenizer, model_loss=CrossEntropyLoss(), codebook_type="rq",
tokenizer_loss_ratio=0.2)`. Its state is that file's `image/model0/*` with `img_tok/rq_state/*` substituted: k-means'd
codebooks, as in a run past its first step. The one-shot restart of unused codes is switched off
(`restart_unused_codes=False` on each level): it ran at the run's first forward, so a later step never restarts.
Two cases, each from that same state, each one forward + `loss.backward()` with no optimizer step (as the other
golden file):
- `joint_tok`: `model(x, mask_ratio=0.8, tokenizer_training=True)`, a step whose batch index in the epoch is a
  multiple of `tokenizer_train_step`: the encoder loss with the codebook EMA off, then the tokenizer loss with the EMA
  on, returned as L_enc + 0.2 L_tok;
- `joint_enc`: `model(x, mask_ratio=0.8, tokenizer_training=False)`, any other step: L_enc alone.
Keys: `image/x`, `model0/<name>` (the state dict at the start of both cases); per case `C/`: `mask`, `ids_restore`,
`ids_keep` (captured from `random_masking`), `loss` (what the forward returned), `loss_encoder`, `loss_tokenizer`
(`joint_tok` only; captured from `forward_encoder_training` / `forward_tokenizer_training`), `grad/<name>` for every
parameter that received a gradient, `grad_none` (the trainable ones that did not), `rq/codebook_after` [2,16,24] and
`rq/cluster_size_ema_after` [2,16]; `meta/json`: the commit, the sha256 of each official file imported, versions.
"""

import argparse
import hashlib
import json
import os
import sys
from functools import partial

import numpy as np

COMMIT = "c83d1acc37e77f3709e1a282e4686c0e1181c3bb"
OFFICIAL_FILES = (
    "model/bridle.py",
    "model/encoder_decoder.py",
    "model/tokenizer.py",
    "model/rq_quantizations.py",
    "model/quantizations.py",
    "model/swin_transformer.py",
    "util/pos_embed.py",
    "util/patch_embed.py",
)
SEEDS = {"joint_tok": 41, "joint_enc": 42}


def build(torch, nn):
    from model.bridle import jointBRIDLE  # pylint: disable=import-error
    from model.encoder_decoder import MaskedAutoencoderViT  # pylint: disable=import-error
    from model.tokenizer import BRIDLETokenizer  # pylint: disable=import-error

    ln = partial(nn.LayerNorm, eps=1e-6)
    torch.manual_seed(0)
    encoder_decoder = MaskedAutoencoderViT(
        img_size=32,
        patch_size=8,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_embed_dim=48,
        decoder_depth=2,
        decoder_num_heads=4,
        mlp_ratio=4,
        norm_layer=ln,
        audio_exp=False,
        decoder_mode=0,
        num_tokens=32,
        no_shift=False,
    )
    tokenizer = BRIDLETokenizer(
        img_size=32,
        patch_size=8,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=4,
        estimator_embed_dim=48,
        estimator_depth=2,
        estimator_num_heads=4,
        mlp_ratio=4,
        norm_layer=ln,
        audio_exp=False,
        estimator_mode=0,
        no_shift=False,
        codebook_type="rq",
        code_num=16,
        code_dim=24,
        codebook_set=2,
        commitment_loss_weight=0.25,
        ema=True,
        restart_unused_codes=True,
        init_weight_multiplier=1.0,
        kmeans_init=True,
        soft_code=1,
    )
    for module in list(encoder_decoder.modules()) + list(tokenizer.modules()):
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return jointBRIDLE(
        encoder_decoder=encoder_decoder,
        tokenizer=tokenizer,
        model_loss=nn.CrossEntropyLoss(),
        codebook_type="rq",
        tokenizer_loss_ratio=0.2,
    )


def run_case(torch, model, start: dict, x, case: str, tokenizer_training: bool) -> dict:
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.items()})
    levels = model.tokenizer.quantizer.codebooks
    for level in levels:
        level.kmeans_init = False  # initialised (initted = True in the state): no k-means
        level.restart_unused_codes = False  # the one-shot restart ran at the run's first forward
    for p in model.parameters():
        p.grad = None
    out = {}
    ed = model.encoder_decoder
    original_masking = ed.random_masking

    def masking(x_, mask_ratio):
        x_masked, mask, ids_restore = original_masking(x_, mask_ratio)
        out["mask"] = mask.detach().numpy().astype(bool)
        out["ids_restore"] = ids_restore.numpy().astype(np.int32)
        keep = int((mask[0] == 0).sum())
        out["ids_keep"] = torch.argsort(ids_restore, dim=1)[:, :keep].numpy().astype(np.int32)
        return x_masked, mask, ids_restore

    def captured(name, fn):
        def wrapper(*args, **kwargs):
            value = fn(*args, **kwargs)
            out[name] = np.asarray(value.detach().numpy(), np.float32)
            return value

        return wrapper

    ed.random_masking = masking
    model.forward_encoder_training = captured("loss_encoder", model.forward_encoder_training)
    model.forward_tokenizer_training = captured("loss_tokenizer", model.forward_tokenizer_training)
    try:
        torch.manual_seed(SEEDS[case])
        loss = model(torch.from_numpy(x), mask_ratio=0.8, tokenizer_training=tokenizer_training)
        loss.backward()
    finally:
        del ed.random_masking, model.forward_encoder_training, model.forward_tokenizer_training
    out["loss"] = np.asarray(loss.detach().numpy(), np.float32)
    grads, none = {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            none.append(name)
        else:
            grads[f"grad/{name}"] = p.grad.detach().numpy().astype(np.float32)
    out.update(grads)
    out["grad_none"] = np.asarray(sorted(none))
    out["rq/codebook_after"] = np.stack([lvl.weight[:-1].detach().numpy() for lvl in levels]).astype(np.float32)
    out["rq/cluster_size_ema_after"] = np.stack([lvl.cluster_size_ema.numpy() for lvl in levels]).astype(np.float32)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="a checkout of HoangNguyenM/bridle at c83d1ac")
    parser.add_argument("--golden", required=True, help="the project's official_bridle_tiny.npz (its image state)")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_joint_tiny.npz")
    )
    args = parser.parse_args(argv)

    np.float = float  # the official code uses the removed alias (environment shim, no change to the computation)
    sys.path.insert(0, os.path.abspath(args.official))
    import timm
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)  # the RQ calls all_reduce unconditionally

    with np.load(args.golden, allow_pickle=False) as g:
        golden = {k: g[k] for k in g.files}
    start = {k.split("image/model0/", 1)[1]: v for k, v in golden.items() if k.startswith("image/model0/")}
    start.update(
        {k.split("img_tok/rq_state/", 1)[1]: v for k, v in golden.items() if k.startswith("img_tok/rq_state/")}
    )
    x = golden["image/x"]

    model = build(torch, nn)
    built = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(built) == sorted(start), sorted(set(built) ^ set(start))
    same_init = all(np.array_equal(built[k], golden[f"image/model0/{k}"]) for k in built)

    record = {"image/x": x, **{f"model0/{k}": v for k, v in start.items()}}
    losses = {}
    for case, tokenizer_training in (("joint_tok", True), ("joint_enc", False)):
        out = run_case(torch, model, start, x, case, tokenizer_training)
        record.update({f"{case}/{k}": v for k, v in out.items()})
        losses[case] = float(out["loss"])
    digest = lambda path: hashlib.sha256(open(os.path.join(args.official, path), "rb").read()).hexdigest()
    meta = {
        "commit": COMMIT,
        "official_files_sha256": {path: digest(path) for path in OFFICIAL_FILES},
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "seeds": SEEDS,
        "losses": losses,
        "construction_matches_the_image_golden_state": same_init,
        "tokenizer_loss_ratio": 0.2,
    }
    record["meta/json"] = np.asarray(json.dumps(meta, sort_keys=True))
    np.savez_compressed(args.out, **record)
    print(json.dumps(meta, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
