"""The peer of `train_step.py`: one training step of the authors' released PyTorch BRIDLE, timed on the CPU.

    <torch python> benchmarks/official_step.py --official ~/bridle --modality image --phase encoder --batch 8
    python benchmarks/train_step.py --peer-python <torch python> --official ~/bridle   # both sides, one run

It imports the authors' code from a checkout (github HoangNguyenM/bridle; nothing of it is copied here) and builds
the model their `main_pretrain.py` builds for the same recipe point as `train_step.py`:
  image  `vit_s` encoder-decoder (224², 16-block 512-wide global decoder) and `vit_s` tokenizer (3-block estimator)
  audio  `vit_b` on 1024 x 128 fbank frames (512 patches), `decoder_mode=1` (their Swin decoder, 16 x 512),
         `estimator_mode=2`
with the RQ codebooks of every recipe (4 levels x 256 codes x 256, EMA, k-means init, dead-code restart) and their
optimizer (AdamW, betas 0.9/0.95, timm's weight-decay groups). The encoder phase is `BRIDLE(cold_start=True,
train_encoder=True)`, the tokenizer phase `BRIDLE(train_encoder=False)`; a step is their loop's: forward, backward,
`optimizer.step()`, `zero_grad()`, in float32 (no autocast: the CPU has no fp16 path and the comparison is fp32).
The first forward runs their k-means and restart; it is a warm-up step and is not timed (as `train_step.py` does not
time its codebook preparation).

The inputs are what their data loaders hand the model: images `[b, 3, 224, 224]`, fbank frames `[b, 1, 1024, 128]`
(their loader computes the fbank; our audio step computes it from the waveform inside the step, which this side
does not pay for). Environment shims only, none changes the computation: `np.float = float` (a removed NumPy alias
their code uses), a one-process gloo group (their RQ calls `dist.all_reduce` unconditionally), and their Swin
decoder's dropout left as released. FLOPs of one step come from `torch.utils.flop_counter.FlopCounterMode`: matmuls
and convolutions (the "dot+conv" count `train_step.py` reads from XLA's HLO), plus attention, which the counter has
no formula for on the CPU (its fused `_scaled_dot_product_flash_attention_for_cpu` counts 0), so it is counted with
torch's own SDPA formulas (their backward includes the recomputed scores: 2.5x the forward, XLA's is 2x). The
matmul rate is torch's dense float32 2048³ `mm` in the same process. Prints one JSON line on stdout (their own
prints go to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

RQ = dict(
    codebook_type="rq",
    code_num=256,
    code_dim=256,
    codebook_set=4,
    commitment_loss_weight=0.25,
    ema=True,
    restart_unused_codes=True,
    init_weight_multiplier=1.0,
    kmeans_init=True,
    soft_code=1,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="a checkout of github.com/HoangNguyenM/bridle")
    p.add_argument("--modality", default="image", choices=("image", "audio"))
    p.add_argument("--phase", default="encoder", choices=("encoder", "tokenizer"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps; the first runs their k-means")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def import_official(path: str):
    """The authors' modules, imported from their checkout with the environment shims of the module docstring."""
    np.float = float  # noqa: NPY001 -- their code uses the alias removed in NumPy 1.24
    sys.path.insert(0, os.path.abspath(path))
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    import model.bridle as bridle
    import model.encoder_decoder as encoder_decoder
    import model.tokenizer as tokenizer

    return bridle, encoder_decoder, tokenizer


def build(args):
    """(model, input batch, optimizer) as their main_pretrain.py builds them for this recipe point."""
    import torch
    from timm.optim import optim_factory

    bridle, encoder_decoder, tokenizer = import_official(args.official)
    torch.manual_seed(args.seed)
    num_tokens = RQ["code_num"] * RQ["codebook_set"] * RQ["soft_code"]
    if args.modality == "image":
        ed = encoder_decoder.vit_s(num_tokens=num_tokens, no_shift=False)
        tok = tokenizer.vit_s(no_shift=False, **RQ)
        x = torch.randn(args.batch, 3, 224, 224)
    else:
        audio = dict(in_chans=1, audio_exp=True, img_size=(1024, 128), mode=0, pos_trainable=False, no_shift=False)
        ed = encoder_decoder.vit_b(decoder_mode=1, mask_2d=False, num_tokens=num_tokens, **audio)
        tok = tokenizer.vit_b(estimator_mode=2, **audio, **RQ)
        x = torch.randn(args.batch, 1, 1024, 128)
    model = bridle.BRIDLE(
        encoder_decoder=ed,
        tokenizer=tok,
        model_loss=torch.nn.CrossEntropyLoss(),
        cold_start=args.phase == "encoder",
        train_encoder=args.phase == "encoder",
        codebook_type="rq",
    )
    groups = optim_factory.param_groups_weight_decay(model, 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    return model, x, optimizer


def flop_counter():
    """torch's FlopCounterMode, with the CPU flash-attention kernels counted (see the module docstring)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, q, k, v, *a, **kw: fc.sdpa_backward_flop_count(grad, q, k, v)
        ),
    }
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def matmul_rates(n: int, reps: int) -> list[float]:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2.0 * n**3 / (time.perf_counter() - t0))
    return rates


def main():
    args = parse_args()
    import timm
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # their k-means prints
        model, x, optimizer = build(args)

    def step():
        loss = model(x, mask_ratio=0.8)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    matmul_before = matmul_rates(args.matmul_size, args.matmul_reps)
    with contextlib.redirect_stdout(sys.stderr):
        for _ in range(args.warmup):
            step()
        counter = flop_counter()
        with counter:
            step()  # untimed: the counter's dispatch hooks slow it down
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    matmul_after = matmul_rates(args.matmul_size, args.matmul_reps)
    med = statistics.median(times)
    peak = statistics.median(matmul_before + matmul_after)
    flops = counter.get_total_flops()
    print(
        json.dumps(
            {
                "side": "official",
                "modality": args.modality,
                "phase": args.phase,
                "batch": args.batch,
                "step_s": {"median": med, "min": min(times), "max": max(times), "all": times},
                "flops": flops,
                "achieved_flops_per_s": flops / med,
                "matmul_flops_per_s": {"median": peak},
                "mfu": flops / med / peak,
                "peak_rss_bytes": peak_rss,
                "loss_last": loss,
                "threads": args.threads,
                "torch": torch.__version__,
                "timm": timm.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
