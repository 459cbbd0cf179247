"""Accelerator benchmark: the recipes' ViT-B train steps on one GPU or TPU chip, bf16, synthetic batches, <= 8 min.

    python benchmarks/accelerator.py --out benchmarks/results/accelerator.json     # or: make bench-accelerator
    python benchmarks/accelerator.py --toy --out /tmp/toy.json     # the same code paths at toy sizes (CPU, < 1 min)
    python benchmarks/accelerator.py --only image_encoder --batch image_encoder=256 --steps 30

Four steps, each built as `bridle_jax/train.py` builds it (`build_models`, `state.create_sharded`,
`optim.make_optimizer(config.optim, phase.kind, phase.steps)`, `steps.jit_prepare_codebooks`, `steps.jit_step`) on
a data-parallel mesh of the first `--devices` chips (default 1), with `config.model.dtype=bfloat16` and synthetic
batches of the recipe's modality (benchmarks/benchlib.py: no dataset needed):

  image_encoder    configs/imagenet.py     warm encoder step (iteration >= 2: the tokenizer's ViT-B/16 gives the
                                            targets), ViT-B/16 at 224x224, mask 0.8, D 16 x 512; 128 per chip
  image_tokenizer  configs/imagenet.py     tokenizer step (frozen E as teacher, T + TE trained, codebook EMA); 128
  audio_encoder    configs/audioset.py     warm encoder step, ViT-B/16 on 1024 x 128 log-mels (512 patches, the
                                            log-mel inside the step), 16-block local-window decoder; 128 per chip
  video_encoder    configs/kinetics400.py  warm encoder step, 16 x 224 x 224 clips (1568 tokens, tube mask 0.9),
                                            remat per block (the recipe's); 64 per chip

Each runs in its own subprocess (its peak device memory is its own, and the driver never initialises a backend):
the codebooks are k-means'd once on the batch (not timed), the step is compiled ahead of time (FLOPs per step from
XLA's `compiled.cost_analysis()`, per chip), then `--warmup` untimed and `--steps` timed calls of the jitted step,
each blocked on. Reported per step: median step time, samples/s, achieved TFLOP/s, MFU against the chip's dense bf16
peak (`PEAK_BF16_TFLOPS`, chip from `jax.devices()[0].device_kind`; unknown chip or CPU: null), peak device memory
(`memory_stats()["peak_bytes_in_use"]`, null where the backend has none) and the compilations seen during warm-up
and during the timed steps (`jax_log_compiles` records plus the jitted step's cache size): a timed step that compiles
fails the benchmark (exit status 1, the JSON still written, with "recompiled": true).

XLA's FLOPs count every HLO op of the executable, remat's recomputed forward included (the video step): for a
remat'd step the MFU is a hardware-FLOPs utilisation, above the model-FLOPs one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time

import benchlib

REPO = benchlib.REPO
BUDGET_S = 480  # the whole benchmark, every case's start-up, compilation and steps included

# Dense (no sparsity) bf16 peak per chip, TFLOP/s, from the vendors' data sheets; matched on device_kind, lower case,
# in this order (the first pattern that matches). H100 PCIe (756) and NVL (835) are other parts: no match, MFU null.
PEAK_BF16_TFLOPS = (
    (r"h200", "H200", 989.0),
    (r"h100.*(sxm|hbm3)", "H100 SXM", 989.0),
    (r"a100", "A100", 312.0),
    (r"tpu v4", "TPU v4", 275.0),
    (r"tpu v5 ?(lite|e)", "TPU v5e", 197.0),
    (r"tpu v5", "TPU v5p", 459.0),
    (r"tpu v6 ?(lite|e)", "TPU v6e", 918.0),
)

CASES = {
    "image_encoder": dict(recipe="imagenet", phase="encoder", batch=128),
    "image_tokenizer": dict(recipe="imagenet", phase="tokenizer", batch=128),
    "audio_encoder": dict(recipe="audioset", phase="encoder", batch=128),
    "video_encoder": dict(recipe="kinetics400", phase="encoder", batch=64),
}
TOY_BATCH = 4


def chip_peak(device_kind: str) -> tuple[str | None, float | None]:
    """(chip name, dense bf16 peak TFLOP/s) of a `device_kind`, (None, None) when it is not in the table."""
    kind = device_kind.lower()
    for pattern, name, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, kind):
            return name, tflops
    return None, None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    p.add_argument("--toy", action="store_true", help="toy sizes and 1 + 2 steps: a smoke test of the code paths")
    p.add_argument("--only", nargs="+", default=None, choices=sorted(CASES), help="run these steps only")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; --toy 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 3; --toy 1)")
    p.add_argument("--devices", type=int, default=1, help="chips of the data-parallel mesh (the first N)")
    p.add_argument("--batch", nargs="+", default=[], metavar="CASE=N", help="per-chip batch of a case")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting cases after this long")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="case workers at a time (default 1; --toy: 2). On a device keep 1: parallel cases share its chips",
    )
    p.add_argument("--worker", default=None, choices=sorted(CASES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.toy else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.toy else 3)
    args.jobs = args.jobs if args.jobs is not None else (2 if args.toy else 1)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    batches = {}
    for item in args.batch:
        name, sep, value = item.partition("=")
        if not sep or name not in CASES or not value.isdigit() or int(value) < 1:
            p.error(f"--batch {item!r}: expected CASE=N with CASE in {sorted(CASES)} and N >= 1")
        batches[name] = int(value)
    args.batch = batches
    return args


# --------------------------------------------------------------------------------------------- one case (worker)
def toy(config):
    """The recipe at toy sizes: the same modality, front-end, decoder kind, masking and remat, tiny widths."""
    m = config.model
    m.variant = "mu/8"
    m.decoder_width, m.decoder_depth, m.decoder_heads = 32, 1, 2
    m.estimator_depth = 1
    if m.estimator_width:
        m.estimator_width, m.estimator_heads = 32, 2
    q = config.quantizer
    q.num_levels, q.codebook_size, q.dim = 2, 16, 8
    q.kmeans_iters = 2
    if config.modality == "audio":
        config.data.target_frames, config.data.num_mel_bins = 64, 32  # 8 x 4 patches: the 4 x 4 window tiles it
        m.decoder_window = (4, 4)
    elif config.modality == "video":
        config.data.num_frames, config.data.image_size = 4, 32  # 2 x 4 x 4 tubelets
    else:
        config.data.image_size = 32
    return config


def case_config(name: str, args):
    case = CASES[name]
    config = benchlib.load_config(case["recipe"])
    config.model.dtype = "bfloat16"
    if args.toy:
        config = toy(config)
    per_chip = args.batch.get(name, TOY_BATCH if args.toy else case["batch"])
    config.batch_size = per_chip * args.devices
    config.mesh.data, config.mesh.fsdp = args.devices, 1
    return benchlib.without_data(config), per_chip


class CompileLog(logging.Handler):
    """Counts the compilations JAX logs while `jax_log_compiles` is on ("Compiling <fn> with global shapes ...")."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.compiled: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.compiled.append(message[:200])


def run_case(name: str, args) -> dict:
    import jax

    from bridle_jax import config_checks, optim, schedule, sharding, steps
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models, patch_grid

    t_start = time.perf_counter()
    config, per_chip = case_config(name, args)
    config_checks.validate(config)
    plan = schedule.parse_plan(config.schedule.phases)
    # the warm encoder phase (iteration 2: targets from the tokenizer's ViT) or the tokenizer phase
    phase = plan[2] if CASES[name]["phase"] == "encoder" else plan[1]
    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {len(devices)} devices")
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    models = build_models(config)
    tx, lr_schedule = optim.make_optimizer(config.optim, phase.kind, phase.steps)
    state = state_lib.create_sharded(models, config, tx, phase, config.seed, mesh)
    batch = benchlib.global_batch(config, mesh, config.batch_size)
    kw = dict(
        models=models,
        config=config,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
        batch_sharding=sharding.batch_sharding(mesh),
    )
    t0 = time.perf_counter()
    state = steps.jit_prepare_codebooks(phase, **kw)(state, batch)  # k-means on the batch (+ restart): not timed
    jax.block_until_ready(state)
    prepare_s = time.perf_counter() - t0

    step = steps.jit_step(phase, tx=tx, lr_schedule=lr_schedule, **kw)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()  # the jitted step's cache keeps it: its first call runs it
    compile_s = time.perf_counter() - t0
    cost = benchlib.cost_flops(compiled)
    del compiled

    log = CompileLog()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(log)
    jax.config.update("jax_log_compiles", True)
    try:
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        warmup_compiles = list(log.compiled)
        cache_before = step._cache_size()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        cache_after = step._cache_size()
        timed_compiles = log.compiled[len(warmup_compiles) :]
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(log)

    device = devices[0]
    chip, peak_tflops = chip_peak(device.device_kind)
    stats = {}
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics (some raise instead of returning None)
        stats = {}
    median = statistics.median(times)
    flops = cost["flops"]
    achieved = flops / median if flops == flops else None  # per chip (an SPMD program's cost is per device)
    recompiled = bool(timed_compiles) or cache_after != cache_before
    loss = float(metrics["train/loss"])
    return {
        "case": name,
        "recipe": f"configs/{CASES[name]['recipe']}.py",
        "phase": phase.name,
        "modality": config.modality,
        "variant": config.model.variant,
        "dtype": config.model.dtype,
        "remat": bool(config.model.remat),
        "attention": config.model.get("attention"),  # the attention backend setting, where the config has one
        "tokens": int(models.num_patches),
        "patch_grid": list(patch_grid(config)),
        "per_chip_batch": per_chip,
        "global_batch": config.batch_size,
        "devices": len(devices),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_s": {"median": median, "min": min(times), "max": max(times), "all": times},
        "samples_per_s": config.batch_size / median,
        "flops_per_step_per_chip": flops,
        "xla_cost": cost,
        "achieved_tflops_per_s_per_chip": None if achieved is None else achieved / 1e12,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "chip": chip,
        "peak_bf16_tflops": peak_tflops,
        "mfu": None if peak_tflops is None or achieved is None else achieved / (peak_tflops * 1e12),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "bytes_limit": stats.get("bytes_limit"),
        "compile_s": compile_s,
        "prepare_codebooks_s": prepare_s,
        "compilations": {
            "warmup": len(warmup_compiles),
            "timed": len(timed_compiles),
            "timed_messages": timed_compiles,
            "cache_size_before_timed": cache_before,
            "cache_size_after_timed": cache_after,
        },
        "recompiled": recompiled,
        "loss_last": loss,
        "loss_finite": loss == loss and abs(loss) != float("inf"),
        "worker_wall_s": time.perf_counter() - t_start,
        "jax": jax.__version__,
    }


# --------------------------------------------------------------------------------------------- the driver
def spawn(name: str, argv: list[str], timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"case": name, "error": f"timed out after {timeout_s:.0f} s (--budget-s)", "stderr_tail": tail}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {
            "case": name,
            "error": f"worker exit status {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:],
            "worker_wall_s": time.perf_counter() - t0,
        }
    return json.loads(lines[-1])


def summary_line(r: dict) -> str:
    if r.get("error"):
        return f"{r['case']:16s} FAILED: {r['error']}\n{r.get('stderr_tail', '')[-1500:]}"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / 1e9:.1f} GB"
    tf = r["achieved_tflops_per_s_per_chip"]
    return (
        f"{r['case']:16s} b={r['per_chip_batch']:<4d} {1e3 * r['step_s']['median']:9.1f} ms  "
        f"{r['samples_per_s']:8.1f} samples/s  {r['flops_per_step_per_chip'] / 1e9:9.1f} GFLOP/step  "
        f"{'n/a' if tf is None else f'{tf:.3f}'} TFLOP/s  MFU {mfu}  peak mem {mem}  "
        f"compile {r['compile_s']:.0f} s  compilations warm-up/timed {r['compilations']['warmup']}/"
        f"{r['compilations']['timed']}{'  RECOMPILED' if r['recompiled'] else ''}"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(args.worker, args)), flush=True)
        return 0
    t_start = time.perf_counter()
    names = args.only or list(CASES)

    def one(name):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left <= 0:
            return {"case": name, "error": f"not started: the {args.budget_s:.0f} s budget was spent"}
        return spawn(name, argv, left)

    results = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for name, result in zip(names, pool.map(one, names)):  # in order, each as soon as it (and those before) ends
            results[name] = result
            print(summary_line(result), flush=True)
    first = next((r for r in results.values() if not r.get("error")), {})
    failed = sorted(n for n, r in results.items() if r.get("error"))
    recompiled = sorted(n for n, r in results.items() if r.get("recompiled"))
    out = {
        "benchmark": "accelerator",
        "toy": args.toy,
        "command": " ".join(["python", "benchmarks/accelerator.py", *argv]),
        "device_kind": first.get("device_kind"),
        "platform": first.get("platform"),
        "chip": first.get("chip"),
        "peak_bf16_tflops": first.get("peak_bf16_tflops"),
        "jax": first.get("jax"),
        "budget_s": args.budget_s,
        "wall_s": time.perf_counter() - t_start,
        "steps": results,
        "failed": failed,
        "recompiled": recompiled,
        "ok": not failed and not recompiled,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    print(f"total {out['wall_s']:.0f} s on {out['device_kind']}; {'ok' if out['ok'] else 'FAILED'}", flush=True)
    if recompiled:
        print(f"ERROR: the timed steps recompiled: {', '.join(recompiled)}", file=sys.stderr)
    if failed:
        print(f"ERROR: failed: {', '.join(failed)}", file=sys.stderr)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
