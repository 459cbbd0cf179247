"""Train-step benchmark: steps/s, XLA FLOPs, achieved FLOP/s, MFU against a measured matmul peak, peak memory.

    python benchmarks/train_step.py                          # the issue's reference point, both phases
    python benchmarks/train_step.py --phase encoder --steps 20 --json /tmp/bench.json

The default is `configs/imagenet.py` shaped to the reference point of the issue: encoder ViT-S/16 at 224x224,
batch 8, mask 0.8, label predictor 16 blocks x 512 wide, cold-start tokenizer, float32; the tokenizer phase at the
same size (tokenizer ViT-S/16, estimator 3 blocks). Each phase runs in its own subprocess on one device (a 1-device
mesh from `sharding.make_mesh`) so its peak RSS is its own; it builds the state with the package's pieces
(`build_models`, `create_sharded`, `steps.jit_step`), runs the phase's codebook preparation once (k-means, as the
loop does at a phase's first step; not timed), compiles the step ahead of time (FLOPs from XLA's cost analysis of
that executable), warms up, then times every step separately (median reported).

Next to it, in the same process, the dense float32 matmul rate (2048^3 `jnp.dot`, median of several) measured before
and after the steps: MFU = achieved FLOP/s / that measured peak. Two FLOP counts are reported: XLA's `flops` (every
HLO op, elementwise included) and the dot/convolution FLOPs alone, read from the optimised HLO (the conventional
"model FLOPs"); MFU is computed for both.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The issue's reference point: the authors' PyTorch code on a 2-core AVX-512 machine (JAX float32 2048^3 matmul there:
# 209 GFLOP/s).
REFERENCE = {"encoder_s_per_step": 3.89, "tokenizer_s_per_step": 2.40, "peak_rss_gb": 2.9, "matmul_gflops": 209.0}
REFERENCE_POINT = {
    "variant": "S/16",
    "tokenizer_variant": "S/16",
    "image_size": 224,
    "batch": 8,
    "dtype": "float32",
    "mask_ratio": 0.8,
    "decoder_depth": 16,
    "decoder_width": 512,
    "estimator_depth": 3,
}
MFU_TARGET = 0.75
SPEEDUP_TARGET = 1.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "imagenet.py"), help="config file (get_config)")
    p.add_argument("--variant", default="S/16", help="encoder variant, e.g. S/16")
    p.add_argument("--tokenizer-variant", default=None, help="tokenizer ViT variant (default: --variant)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mask-ratio", type=float, default=0.8)
    p.add_argument("--decoder-depth", type=int, default=16)
    p.add_argument("--decoder-width", type=int, default=512)
    p.add_argument("--estimator-depth", type=int, default=3)
    p.add_argument("--remat", action="store_true", help="rematerialise transformer blocks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase (>= 10 recommended)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--phase", default="both", choices=("encoder", "tokenizer", "both"))
    p.add_argument("--repeat", type=int, default=1, help="run each phase's subprocess this many times")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--dump-hlo", default=None, help="write each phase's optimised HLO to DIR/<phase>.hlo.txt")
    p.add_argument("--worker", default=None, choices=("encoder", "tokenizer"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokenizer_variant is None:
        args.tokenizer_variant = args.variant
    return args


def make_config(args):
    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.variant = args.variant
    c.model.tokenizer_variant = args.tokenizer_variant
    c.model.dtype = args.dtype
    c.model.remat = args.remat
    c.model.decoder_depth = args.decoder_depth
    c.model.decoder_width = args.decoder_width
    c.model.estimator_depth = args.estimator_depth
    c.masking.ratio = args.mask_ratio
    c.data.image_size = args.image_size
    c.batch_size = args.batch
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.schedule.phases = ("encoder_cold_start:1000", "tokenizer:1000")  # budgets only shape the lr schedules
    return c


def is_reference_point(args) -> bool:
    got = {
        "variant": args.variant,
        "tokenizer_variant": args.tokenizer_variant,
        "image_size": args.image_size,
        "batch": args.batch,
        "dtype": args.dtype,
        "mask_ratio": args.mask_ratio,
        "decoder_depth": args.decoder_depth,
        "decoder_width": args.decoder_width,
        "estimator_depth": args.estimator_depth,
    }
    return got == REFERENCE_POINT


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------- FLOPs from the HLO
_SHAPE = re.compile(r"^(?:\(|)([a-z0-9]+)\[([0-9,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def dot_conv_flops(hlo_text: str) -> dict:
    """2*M*N*K of every `dot` and every `convolution` in the optimised HLO (fusions included), by op kind."""
    shapes = {}  # instruction name -> dims, per computation (names are unique module-wide in XLA)
    out = {"dot": 0.0, "convolution": 0.0}
    lines = hlo_text.splitlines()
    inst = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+([\w\-]+)\((.*)$")
    for line in lines:
        m = inst.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(3))
    for line in lines:
        m = inst.match(line)
        if not m or m.group(4) not in ("dot", "convolution"):
            continue
        out_dims = _dims(m.group(3))
        operands = re.findall(r"%?([\w.\-]+)", m.group(5).split(")")[0])
        # operand names may be prefixed with their shape (`f32[8,40,384]{2,1,0} %x`): keep instruction names only
        operands = [o for o in operands if o in shapes]
        if not operands:
            continue
        lhs = shapes[operands[0]]
        size_out = 1
        for d in out_dims:
            size_out *= d
        if m.group(4) == "dot":
            cm = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
            k = 1
            for d in _dims(cm.group(1)) if cm else []:
                k *= lhs[d]
            out["dot"] += 2.0 * size_out * k
        else:
            rhs = shapes[operands[1]] if len(operands) > 1 else []
            lm = re.search(r"dim_labels=([a-z0-9]+)_([a-z0-9]+)->", line)
            k = 1
            if lm and rhs:
                kernel = lm.group(2)  # e.g. 01io: spatial dims and i (input features) contract
                for pos, ch in enumerate(kernel):
                    if ch != "o":
                        k *= rhs[pos]
            out["convolution"] += 2.0 * size_out * k
    out["total"] = out["dot"] + out["convolution"]
    return out


def cost_flops(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "transcendentals": float(cost.get("transcendentals", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    }


# --------------------------------------------------------------------------------------------- the worker
def measure_matmul(n: int, reps: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    for _ in range(2):
        dot(a, b).block_until_ready()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        rates.append(2.0 * n**3 / (time.perf_counter() - t0))
    del a, b
    return rates


def run_worker(args) -> dict:
    import jax
    import numpy as np

    from bridle_jax import config_checks, optim, schedule, sharding, steps
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models

    t_start = time.perf_counter()
    rss_after_import = current_rss_bytes()
    config = make_config(args)
    config_checks.validate(config)
    plan = schedule.parse_plan(config.schedule.phases)
    phase = plan[0] if args.worker == "encoder" else plan[1]
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    models = build_models(config)
    tx, lr_schedule = optim.make_optimizer(config.optim, phase.kind, phase.steps)

    matmul_before = measure_matmul(args.matmul_size, args.matmul_reps)

    state = state_lib.create_sharded(models, config, tx, phase, config.seed, mesh)
    rng = np.random.default_rng(0)
    pixels = rng.random((args.batch, args.image_size, args.image_size, 3), dtype=np.float32)
    image = (pixels - np.asarray(config.data.mean, np.float32)) / np.asarray(config.data.std, np.float32)
    batch = sharding.global_batch(mesh, {"input": image.astype(np.float32)})

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    kw = dict(
        models=models, config=config, state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh)
    )
    t0 = time.perf_counter()
    state = steps.jit_prepare_codebooks(phase, **kw)(state, batch)  # k-means on the first batch (+ restart)
    jax.block_until_ready(state)
    prepare_s = time.perf_counter() - t0

    step = steps.jit_step(phase, tx=tx, lr_schedule=lr_schedule, **kw)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    peak_rss_compile = peak_rss_bytes()
    xla_cost = cost_flops(compiled)
    hlo_text = compiled.as_text()
    hlo_flops = dot_conv_flops(hlo_text)
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        with open(os.path.join(args.dump_hlo, f"{args.worker}.hlo.txt"), "w") as f:
            f.write(hlo_text)
    rss_before_steps = current_rss_bytes()

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    loss = float(metrics["train/loss"])
    peak_rss = peak_rss_bytes()  # before the second matmul measurement (its buffers are small anyway)
    rss_after_steps = current_rss_bytes()

    matmul_after = measure_matmul(args.matmul_size, args.matmul_reps)
    med = statistics.median(times)
    peak = statistics.median(matmul_before + matmul_after)
    result = {
        "phase": args.worker,
        "step_s": {"median": med, "min": min(times), "max": max(times), "mean": statistics.fmean(times), "all": times},
        "steps_per_s": 1.0 / med,
        "compile_s": compile_s,
        "prepare_codebooks_s_incl_compile": prepare_s,
        "xla_cost": xla_cost,
        "hlo_dot_conv_flops": hlo_flops,
        "achieved_flops_per_s_xla": xla_cost["flops"] / med,
        "achieved_flops_per_s_dot_conv": hlo_flops["total"] / med,
        "matmul_flops_per_s": {
            "median": peak,
            "median_before": statistics.median(matmul_before),
            "median_after": statistics.median(matmul_after),
            "max": max(matmul_before + matmul_after),
        },
        "mfu_xla": xla_cost["flops"] / med / peak,
        "mfu_dot_conv": hlo_flops["total"] / med / peak,
        "peak_rss_bytes": peak_rss,
        "rss_after_import_bytes": rss_after_import,
        "peak_rss_through_compile_bytes": peak_rss_compile,
        "rss_before_steps_bytes": rss_before_steps,
        "rss_after_steps_bytes": rss_after_steps,
        "loss_last": loss,
        "wall_s": time.perf_counter() - t_start,
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
    }
    return result


# --------------------------------------------------------------------------------------------- the driver
def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "loadavg_start": os.getloadavg()}


def spawn(args, phase: str) -> dict:
    argv = [a for a in sys.argv[1:]]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", phase]
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:  # one real CPU device, never fake ones
        env["XLA_FLAGS"] = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{phase} worker failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(r: dict, reference: bool) -> str:
    g = 1e9
    ref_s = REFERENCE[f"{r['phase']}_s_per_step"]
    lines = [
        f"[{r['phase']}] step {r['step_s']['median']:.3f} s median (min {r['step_s']['min']:.3f}, "
        f"max {r['step_s']['max']:.3f}) = {r['steps_per_s']:.3f} steps/s; compile {r['compile_s']:.1f} s",
        f"  FLOPs/step: XLA {r['xla_cost']['flops'] / g:.1f} GFLOP, dot+conv {r['hlo_dot_conv_flops']['total'] / g:.1f}"
        f" GFLOP; achieved {r['achieved_flops_per_s_xla'] / g:.1f} (XLA) / "
        f"{r['achieved_flops_per_s_dot_conv'] / g:.1f} (dot+conv) GFLOP/s",
        f"  matmul {r['matmul_flops_per_s']['median'] / g:.1f} GFLOP/s "
        f"(before {r['matmul_flops_per_s']['median_before'] / g:.1f},"
        f" after {r['matmul_flops_per_s']['median_after'] / g:.1f}) -> MFU {r['mfu_xla']:.3f} (XLA flops), "
        f"{r['mfu_dot_conv']:.3f} (dot+conv); target {MFU_TARGET}",
        f"  peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB (after import {r['rss_after_import_bytes'] / 1e9:.2f} GB, "
        f"peak through compile {r['peak_rss_through_compile_bytes'] / 1e9:.2f} GB, "
        f"steady {r['rss_after_steps_bytes'] / 1e9:.2f} GB); "
        f"reference peak {REFERENCE['peak_rss_gb']} GB",
    ]
    if reference:
        lines.append(
            f"  vs reference {ref_s} s/step: {ref_s / r['step_s']['median']:.2f}x faster (target >= {SPEEDUP_TARGET}x)"
        )
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    phases = ["encoder", "tokenizer"] if args.phase == "both" else [args.phase]
    reference = is_reference_point(args)
    out = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), REPO), *sys.argv[1:]]),
        "reference_point": reference,
        "reference": REFERENCE,
        "runs": [],
    }
    print(
        f"machine: {out['machine']['nproc']} CPUs, {out['machine']['cpu_model']}, "
        f"load avg {out['machine']['loadavg_start'][0]:.2f}"
    )
    if not reference:
        print("note: not the issue's reference point; the ratios against the reference times are not comparable")
    for rep in range(args.repeat):
        for phase in phases:
            r = spawn(args, phase)
            r["repeat"] = rep
            r["loadavg_end"] = os.getloadavg()
            if reference:
                r["speedup_vs_reference"] = REFERENCE[f"{phase}_s_per_step"] / r["step_s"]["median"]
            out["runs"].append(r)
            print(summarise(r, reference), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
