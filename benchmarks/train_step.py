"""Train-step benchmark: steps/s, XLA FLOPs, achieved FLOP/s, MFU against a measured matmul peak, peak memory.

    python benchmarks/train_step.py                          # the issue's reference point, both phases
    python benchmarks/train_step.py --phase encoder --steps 20 --json /tmp/bench.json
    python benchmarks/train_step.py --config configs/audioset.py --variant S/16 --batch 2   # any recipe, no data

Without --config: `configs/imagenet.py` shaped to the reference point of the issue: encoder ViT-S/16 at 224x224,
batch 8, mask 0.8, label predictor 16 blocks x 512 wide, cold-start tokenizer, float32; the tokenizer phase at the
same size (tokenizer ViT-S/16, estimator 3 blocks). With --config, every size option left unset keeps the config's
value, except the batch (default 8: a config's batch_size is global). Batches are synthetic, of the recipe's
modality (benchmarks/benchlib.py: images, audio waveforms, video clips), so no dataset is needed. Each phase runs in
its own subprocess on one device (a 1-device mesh from `sharding.make_mesh`) so its peak RSS is its own; it builds
the state with the package's pieces (`build_models`, `create_sharded`, `steps.jit_step`), runs the phase's codebook
preparation once (k-means, as the loop does at a phase's first step; not timed), compiles the step ahead of time
(FLOPs from XLA's cost analysis of that executable), warms up, then times every step separately (median reported).

Next to it, in the same process, the dense float32 matmul rate (2048^3 `jnp.dot`, median of several) measured before
and after the steps: MFU = achieved FLOP/s / that measured peak. Two FLOP counts are reported: XLA's `flops` (every
HLO op, elementwise included) and the dot/convolution FLOPs alone, read from the optimised HLO (the conventional
"model FLOPs"); MFU is computed for both. Only this run's numbers are reported: the issue's reference times were
measured on another machine, so no speed ratio against them is printed (a ratio needs a peer timed in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import benchlib

REPO = benchlib.REPO
DEFAULT_CONFIG = os.path.join(REPO, "configs", "imagenet.py")

# The reference point: the sizes its reference times were taken at (the defaults without --config).
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config file (get_config); default: the reference point")
    unset = " (default: the reference point's without --config, else the config's)"
    p.add_argument("--variant", default=None, help="encoder variant, e.g. S/16" + unset)
    p.add_argument("--tokenizer-variant", default=None, help="tokenizer ViT variant (default: --variant)")
    p.add_argument("--batch", type=int, default=8, help="batch on the one device (a config's batch_size is global)")
    p.add_argument("--image-size", type=int, default=None, help="image/video frame size" + unset)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype" + unset)
    p.add_argument("--mask-ratio", type=float, default=None, help=unset.strip(" ()"))
    p.add_argument("--decoder-depth", type=int, default=None, help=unset.strip(" ()"))
    p.add_argument("--decoder-width", type=int, default=None, help=unset.strip(" ()"))
    p.add_argument("--estimator-depth", type=int, default=None, help=unset.strip(" ()"))
    p.add_argument("--remat", action="store_true", help="rematerialise transformer blocks (default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase (>= 10 recommended)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--phase", default="both", choices=("encoder", "tokenizer", "both"))
    p.add_argument("--repeat", type=int, default=1, help="run each phase's subprocess this many times")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--dump-hlo", default=None, help="write each phase's optimised HLO to DIR/<phase>.hlo.txt")
    p.add_argument("--peer-python", default=None, help="a Python with torch + timm: time the authors' step too")
    p.add_argument("--official", default=None, help="with --peer-python: a checkout of github.com/HoangNguyenM/bridle")
    p.add_argument("--worker", default=None, choices=("encoder", "tokenizer"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config is None:  # the reference point: its sizes wherever an option is not given
        args.config = DEFAULT_CONFIG
        for field, value in REFERENCE_POINT.items():
            if getattr(args, field) is None and field != "tokenizer_variant":
                setattr(args, field, value)
    if args.tokenizer_variant is None:
        args.tokenizer_variant = args.variant
    if bool(args.peer_python) != bool(args.official):
        p.error("--peer-python and --official go together (the peer is the authors' code run by that interpreter)")
    return args


_OVERRIDES = {  # option -> config field
    "variant": ("model", "variant"),
    "tokenizer_variant": ("model", "tokenizer_variant"),
    "dtype": ("model", "dtype"),
    "decoder_depth": ("model", "decoder_depth"),
    "decoder_width": ("model", "decoder_width"),
    "estimator_depth": ("model", "estimator_depth"),
    "mask_ratio": ("masking", "ratio"),
    "image_size": ("data", "image_size"),
    "batch": (None, "batch_size"),
}


def make_config(args):
    """The config of --config with the given options applied, runnable without its dataset (benchlib)."""
    c = benchlib.load_config(args.config)
    if args.image_size is not None and c.modality == "audio":
        raise SystemExit("--image-size: an audio config has no image size (its input is data.target_frames x mels)")
    for option, (group, field) in _OVERRIDES.items():
        value = getattr(args, option)
        if value is not None:
            (c[group] if group else c)[field] = value
    if args.remat:
        c.model.remat = True
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.schedule.phases = ("encoder_cold_start:1000", "tokenizer:1000")  # budgets only shape the lr schedules
    return benchlib.without_data(c)


# The recipe points the peer (official_step.py) builds, as this script's config fields: the authors' `vit_s` image
# model at the reference point, and their `vit_b` audio model on AudioSet's 1024 x 128 fbank (512 patches).
PEER_POINTS = {
    "image": {
        "model.variant": "S/16",
        "model.tokenizer_variant": "S/16",
        "data.image_size": 224,
        "model.decoder_kind": "global",
        "model.decoder_depth": 16,
        "model.decoder_width": 512,
        "model.estimator_depth": 3,
    },
    "audio": {
        "model.variant": "B/16",
        "model.tokenizer_variant": "B/16",
        "data.target_frames": 1024,
        "data.num_mel_bins": 128,
        "model.decoder_kind": "local",
        "model.decoder_depth": 16,
        "model.decoder_width": 512,
        "model.estimator_depth": 3,
    },
}
PEER_COMMON = {
    "model.dtype": "float32",
    "masking.ratio": 0.8,
    "quantizer.num_levels": 4,
    "quantizer.codebook_size": 256,
    "quantizer.dim": 256,
}


def check_peer_point(config):
    """Refuse a peer comparison at sizes the peer does not build (the two sides must do the same work)."""
    point = PEER_POINTS.get(config.modality)
    if point is None:
        raise SystemExit(f"--peer-python: the authors' step is built for image and audio, not {config.modality!r}")
    wrong = []
    for field, want in {**point, **PEER_COMMON}.items():
        group, name = field.split(".")
        got = config[group][name]
        if name == "tokenizer_variant" and not got:  # empty: the encoder's variant
            got = config.model.variant
        if got != want:
            wrong.append(f"{field}={got!r} (the peer's is {want!r})")
    if wrong:
        raise SystemExit("--peer-python: these sizes differ from the peer's recipe point: " + "; ".join(wrong))


def is_reference_point(args) -> bool:
    got = {field: getattr(args, field) for field in REFERENCE_POINT}
    return os.path.abspath(args.config) == DEFAULT_CONFIG and got == REFERENCE_POINT and not args.remat


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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

    from bridle_jax import config_checks, host_memory, optim, schedule, sharding, steps
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
    batch = benchlib.global_batch(config, mesh, config.batch_size)  # synthetic, of the config's modality

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    kw = dict(
        models=models, config=config, state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh)
    )
    t0 = time.perf_counter()
    host_memory.release_freed()  # as train.py does before a phase's first step
    state = steps.jit_prepare_codebooks(phase, **kw)(state, batch)  # k-means on the first batch (+ restart)
    jax.block_until_ready(state)
    prepare_s = time.perf_counter() - t0

    step = steps.jit_step(phase, tx=tx, lr_schedule=lr_schedule, **kw)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    peak_rss_compile = peak_rss_bytes()
    host_memory.release_freed()  # as train.py does after a phase's first step (its compilation)
    xla_cost = benchlib.cost_flops(compiled)
    hlo_text = compiled.as_text()
    hlo_flops = benchlib.dot_conv_flops(hlo_text)
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
    return {"nproc": os.cpu_count(), "cpu_model": benchlib.cpu_model(), "loadavg_start": os.getloadavg()}


def run_json_line(cmd: list[str], what: str, env=None) -> dict:
    """Runs `cmd` (a worker that prints its result as a JSON last line) and returns that result."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{what} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn(args, phase: str) -> dict:
    argv = [a for a in sys.argv[1:]]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", phase]
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:  # one real CPU device, never fake ones
        env["XLA_FLAGS"] = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return run_json_line(cmd, f"{phase} worker", env)


def spawn_peer(args, config, phase: str) -> dict:
    """The authors' step for `phase`, at this run's modality and batch, in its own process (official_step.py)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_step.py")
    cmd = [args.peer_python, script, "--official", args.official, "--modality", config.modality, "--phase", phase]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--matmul-size", str(args.matmul_size), "--matmul-reps", str(args.matmul_reps)]
    return run_json_line(cmd, f"official {phase} step")


def summarise_peer(r: dict, ours: dict) -> str:
    g = 1e9
    return (
        f"[{r['phase']}, official] step {r['step_s']['median']:.3f} s median (min {r['step_s']['min']:.3f}, max "
        f"{r['step_s']['max']:.3f}); dot+conv+attention {r['flops'] / g:.1f} GFLOP; torch matmul "
        f"{r['matmul_flops_per_s']['median'] / g:.1f} GFLOP/s -> MFU {r['mfu']:.3f}; peak RSS "
        f"{r['peak_rss_bytes'] / 1e9:.2f} GB\n"
        f"  official / bridle_jax step time: {r['official_over_ours']:.2f}x; "
        f"peak RSS official / ours {r['peak_rss_bytes'] / 1e9:.2f} / {ours['peak_rss_bytes'] / 1e9:.2f} GB"
    )


def summarise(r: dict) -> str:
    g = 1e9
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
        f"steady {r['rss_after_steps_bytes'] / 1e9:.2f} GB)",
    ]
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
        "config": os.path.relpath(os.path.abspath(args.config), REPO),
        "runs": [],
    }
    print(
        f"machine: {out['machine']['nproc']} CPUs, {out['machine']['cpu_model']}, "
        f"load avg {out['machine']['loadavg_start'][0]:.2f}"
    )
    config = make_config(args) if args.peer_python else None
    if config is not None:
        check_peer_point(config)
        out["peer"] = []
    for rep in range(args.repeat):  # the two sides alternate, phase by phase, in one run
        for phase in phases:
            r = spawn(args, phase)
            r["repeat"] = rep
            r["loadavg_end"] = os.getloadavg()
            out["runs"].append(r)
            print(summarise(r), flush=True)
            if config is not None:
                peer = spawn_peer(args, config, phase)
                peer["repeat"] = rep
                peer["official_over_ours"] = peer["step_s"]["median"] / r["step_s"]["median"]
                out["peer"].append(peer)
                print(summarise_peer(peer, r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
