"""Benchmark: one RQ training step (quantize + EMA update) in bridle_jax vs vector-quantize-pytorch's ResidualVQ.

Both run in the same invocation on the same machine: the JAX part in this interpreter, the peer in a subprocess
started with ``--peer-python`` (a venv with torch 2.13.0 CPU and vector-quantize-pytorch, kept outside the repo,
never a dependency of the package).  The two are timed one after the other, never concurrently.  Also reported: the
floor set by the distance matmuls alone (M dependent N×D×K matmuls in JAX) and JAX's GFLOP/s on a 2048³ matmul.

    python benchmarks/quantizer.py --peer-python /work/venvs/bench/bin/python

The machine must be otherwise idle: ``--wait-quiet`` waits until the CPUs are idle before each part, and the CPU
load seen just before each part is printed so that contaminated numbers can be spotted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def cpu_busy(dt: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``dt`` seconds (from /proc/stat; 0.0 where unavailable)."""
    try:

        def read():
            vals = list(map(int, open("/proc/stat").readline().split()[1:]))
            return sum(vals), vals[3] + vals[4]

        a = read()
        time.sleep(dt)
        b = read()
        return 1.0 - (b[1] - a[1]) / max(b[0] - a[0], 1)
    except OSError:
        return 0.0


def wait_quiet(enabled: bool, threshold: float = 0.15, max_wait: float = 600.0) -> float:
    start = time.time()
    busy = cpu_busy()
    while enabled and busy > threshold and time.time() - start < max_wait:
        busy = cpu_busy()
    return busy


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine so far, CPU-seconds of this process so far)."""
    try:
        vals = list(map(int, open("/proc/stat").readline().split()[1:]))
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = 0.0
    return busy, time.process_time()


def timeit_many(fns: dict, runs: int, warmup: int) -> dict:
    """Median wall time of each function, timed round-robin so that load from elsewhere hits all alike; also the
    average number of CPUs that *other* processes kept busy meanwhile (``other_cpus``: 0 on a quiet machine)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    busy0, own0, t0 = *_cpu_seconds(), time.perf_counter()
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    busy1, own1, t1 = *_cpu_seconds(), time.perf_counter()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
    out = {
        name: {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "runs": runs}
        for name, ts in times.items()
    }
    out["other_cpus"] = other
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, nproc={os.cpu_count()}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


# ------------------------------------------------------------------------------------------------ JAX


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from bridle_jax import quantizer as Q

    n, d, m, k = args.n, args.dim, args.levels, args.codebook_size
    z = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    state = Q.init_codebooks(jax.random.key(0), m, k, d)
    state = jax.jit(Q.kmeans_init)(state, z, jax.random.key(2))  # realistic code usage, as after init

    @jax.jit
    def train_step(st, x):
        out = Q.quantize(st, x)
        return Q.ema_update(st, out.stage_inputs, out.codes, decay=0.99), out.z_q, out.loss, out.codes

    @jax.jit
    def lookup(st, x):
        out = Q.quantize(st, x)
        return out.z_q, out.loss, out.codes

    @jax.jit
    def matmul_floor(x, books):  # the M distance matmuls, dependent like the levels (K == D keeps the shape)
        for i in range(m):
            x = jnp.dot(x, books[i].T, precision=jax.lax.Precision.HIGHEST)
        return x

    a = jax.random.normal(jax.random.key(3), (2048, 2048), jnp.float32)
    square = jax.jit(lambda x: x @ x)
    res = {"jax": jax.__version__, "backend": jax.default_backend()}
    res["cpu_busy_before"] = wait_quiet(args.wait_quiet)
    fns = {
        "train_step": lambda: jax.block_until_ready(train_step(state, z)),
        "quantize": lambda: jax.block_until_ready(lookup(state, z)),
        "square_2048": lambda: jax.block_until_ready(square(a)),
    }
    if k == d:
        fns["matmul_floor"] = lambda: jax.block_until_ready(matmul_floor(z, state.codes))
    res.update(timeit_many(fns, args.runs, args.warmup))
    res["gflops_2048"] = 2 * 2048**3 / (res["square_2048"]["median_ms"] * 1e-3) / 1e9
    res["distance_gflop"] = 2 * n * d * k * m / 1e9
    return res


# ------------------------------------------------------------------------------------------------ peer


def run_peer(args) -> dict:
    """Runs inside the peer's interpreter (torch + vector-quantize-pytorch)."""
    import torch
    import vector_quantize_pytorch
    from vector_quantize_pytorch import ResidualVQ

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=args.dim, num_quantizers=args.levels, codebook_size=args.codebook_size, kmeans_init=False, decay=0.99
    ).train()
    x = torch.randn(1, args.n, args.dim)
    res = {
        "torch": torch.__version__,
        "vqp": getattr(vector_quantize_pytorch, "__version__", "?"),
        "threads": torch.get_num_threads(),
    }

    def fwd_no_grad():
        with torch.no_grad():
            rvq(x)

    xg = x.clone().requires_grad_(True)

    def fwd_autograd():
        rvq(xg)

    res["cpu_busy_before"] = wait_quiet(args.wait_quiet)
    res.update(
        timeit_many(
            {"train_forward_no_grad": fwd_no_grad, "train_forward_autograd": fwd_autograd}, args.runs, args.warmup
        )
    )
    return res


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192, help="vectors per step")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--runs", type=int, default=30, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peer-python", default="", help="interpreter with torch + vector-quantize-pytorch; empty: skip")
    p.add_argument("--wait-quiet", action="store_true", help="wait for idle CPUs before each part")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.peer_worker:
        print(json.dumps(run_peer(args)))
        return

    results = {"machine": machine(), "argv": sys.argv, "jax": run_jax(args)}
    if args.peer_python:
        cmd = [
            args.peer_python,
            os.path.abspath(__file__),
            "--peer-worker",
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--levels",
            str(args.levels),
            "--codebook-size",
            str(args.codebook_size),
            "--runs",
            str(args.runs),
            "--warmup",
            str(args.warmup),
        ] + (["--wait-quiet"] if args.wait_quiet else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results["peer"] = json.loads(out.stdout.strip().splitlines()[-1])

    j = results["jax"]
    rows = [
        ("bridle_jax quantize + ema_update (jit)", j["train_step"]["median_ms"]),
        ("bridle_jax quantize only (jit)", j["quantize"]["median_ms"]),
    ]
    if "matmul_floor" in j:
        rows.append(
            (
                f"distance matmuls alone ({args.levels} × {args.n}×{args.dim}×{args.codebook_size}, JAX)",
                j["matmul_floor"]["median_ms"],
            )
        )
    if "peer" in results:
        rows.append(
            (
                "vector-quantize-pytorch ResidualVQ train fwd, no_grad",
                results["peer"]["train_forward_no_grad"]["median_ms"],
            )
        )
        rows.append(
            (
                "vector-quantize-pytorch ResidualVQ train fwd, autograd on",
                results["peer"]["train_forward_autograd"]["median_ms"],
            )
        )
    step = j["train_step"]["median_ms"]
    print(f"machine: {results['machine']}")
    print(
        f"JAX {j['jax']} ({j['backend']}): 2048³ f32 matmul {j['gflops_2048']:.0f} GFLOP/s; "
        f"CPUs kept busy by other processes while timing: JAX part {j['other_cpus']:.2f}"
        + (f", peer part {results['peer']['other_cpus']:.2f}" if "peer" in results else "")
    )
    print(
        f"median of {args.runs} runs after {args.warmup} warm-up, N={args.n} D={args.dim} M={args.levels} "
        f"K={args.codebook_size}\n"
    )
    print("| what | median ms | vs ours |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / step:.2f}× |")
    if "matmul_floor" in j:
        print(f"\nours / matmul floor = {step / j['matmul_floor']['median_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
