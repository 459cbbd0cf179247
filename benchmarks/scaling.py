"""Scaling benchmark: steps/s of a fixed global batch on 1, 2, 4, 8 (fake CPU) devices, and checkpoint save /
restore time against state size with async saving.

    python benchmarks/scaling.py                       # both parts, prints markdown tables
    python benchmarks/scaling.py --part steps --devices 1 2 4 8 --json /tmp/scaling.json
    python benchmarks/scaling.py --part steps --config configs/audioset.py --batch 8   # a recipe, no data needed

Part 1 (steps): each device count runs in its own subprocess (XLA_FLAGS fixes the device count per process) with
the same global batch and model (default: the digits demo recipe: micro ViT, 32x32, batch 64; --config: any
recipe as configured, at --batch) and synthetic batches of the recipe's modality (benchmarks/benchlib.py: 4
batches, cycled), a pure data-parallel mesh; it times encoder-phase and tokenizer-phase steps after compilation and
warm-up. On one CPU the fake devices
share the same cores, so the per-step time can only grow with the device count: what the table shows is the cost
of splitting the batch (smaller per-device matmuls) plus the collectives (gradient all-reduce, codebook psums).

Part 2 (checkpoints): the real `Checkpointer` (Orbax, async) on TrainStates of growing size (ViT variants mu, Ti,
S, B: params + two Adam moments + codebooks); per size: how long `save` blocks the training loop, the time until the
background write is done, and the restore time, in a temp dir on local disk.

A projection for a v5p-256 slice is derived in BENCHMARKS.md, stated as such (no TPU was available).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib

REPO = benchlib.REPO


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="both", choices=("steps", "checkpoint", "both"))
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--config", default=None, help="config file of part 1 (default: the digits demo recipe)")
    p.add_argument("--batch", type=int, default=64, help="global batch (divisible by every device count)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["mu/4", "Ti/16", "S/16", "B/16"])
    p.add_argument("--json", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(batch: int, path: str | None = None):
    c = benchlib.load_config(path or "digits")
    c.batch_size = batch
    c.evals.linear_probe.enabled = False
    return benchlib.without_data(c)


def steps_worker(args) -> dict:
    """Runs in a subprocess with `args.worker` fake devices."""
    import jax
    import numpy as np

    from bridle_jax import optim, schedule, sharding, steps
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models

    config = _config(args.batch, args.config)
    mesh = sharding.make_mesh(config.mesh)
    models = build_models(config)
    plan = schedule.parse_plan(config.schedule.phases)
    glob = [benchlib.global_batch(config, mesh, args.batch, seed) for seed in range(4)]
    out = {"devices": len(jax.devices())}
    state = None
    for phase in (plan[0], plan[1]):  # cold-start encoder, tokenizer
        tx, lr = optim.make_optimizer(config.optim, phase.kind, phase.steps)
        if state is None:
            state = state_lib.create_sharded(models, config, tx, phase, 0, mesh)
        else:
            state = state_lib.hand_over_sharded(state, models, config, tx, phase, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        kw = dict(models=models, config=config, state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
        step = steps.jit_step(phase, tx=tx, lr_schedule=lr, **kw)
        prepare = steps.jit_prepare_codebooks(phase, **kw)
        state = prepare(state, glob[0])
        for i in range(args.warmup):
            state, m = step(state, glob[i % 4])
        jax.block_until_ready(state)
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            state, m = step(state, glob[i % 4])
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t)
        out[phase.kind] = {"median_s": statistics.median(times), "steps_per_s": 1.0 / statistics.median(times)}
        assert np.isfinite(float(m["train/loss"]))
    return out


def run_steps(args) -> list[dict]:
    results = []
    for n in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            str(n),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            *(["--config", args.config] if args.config else []),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"worker with {n} devices failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def run_checkpoints(args) -> list[dict]:
    import jax
    import numpy as np

    from bridle_jax import checkpoint as ckpt_lib
    from bridle_jax import optim, schedule, sharding
    from bridle_jax import state as state_lib
    from bridle_jax.data import pipeline
    from bridle_jax.models.bridle import build_models

    results = []
    for variant in args.variants:
        config = _config(8)
        config.model.variant = variant
        config.data.image_size = 32 if variant.endswith("/4") else 64
        mesh = sharding.make_mesh(config.mesh)
        models = build_models(config)
        phase = schedule.parse_plan(config.schedule.phases)[0]
        tx, _ = optim.make_optimizer(config.optim, "encoder", phase.steps)
        state = state_lib.create_sharded(models, config, tx, phase, 0, mesh)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        it = pipeline.train_iterator(config.data, local_batch_size=8, seed=0)
        next(it)
        with tempfile.TemporaryDirectory() as d:
            ckpt = ckpt_lib.Checkpointer(d, max_to_keep=3, async_save=True)
            blocked, total = [], []
            for step in (1, 2, 3):
                t = time.perf_counter()
                ckpt.save(step, state, it, {"step": step, "phase": phase.name, "phase_index": 0})
                blocked.append(time.perf_counter() - t)
                ckpt.wait()
                total.append(time.perf_counter() - t)
            abstract = state_lib.abstract_for(models, config, tx, phase, 0, mesh)
            t = time.perf_counter()
            restored, _ = ckpt.restore(3, abstract, it)
            jax.block_until_ready(restored)
            restore_s = time.perf_counter() - t
            ckpt.close()
            np.testing.assert_array_equal(np.asarray(restored.step), np.asarray(state.step))
        results.append(
            {
                "variant": variant,
                "state_mb": nbytes / 2**20,
                "save_blocking_s": statistics.median(blocked),
                "save_total_s": statistics.median(total),
                "restore_s": restore_s,
            }
        )
    return results


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__}


def main():
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(steps_worker(args)))
        return
    report = {"machine": machine()}
    if args.part in ("steps", "both"):
        report["steps"] = run_steps(args)
        base = report["steps"][0]
        recipe = os.path.relpath(args.config, REPO) if args.config else "digits recipe (micro ViT, 32x32)"
        print(f"\nGlobal batch {args.batch}, {recipe}, synthetic batches, data-parallel, {args.steps} timed steps\n")
        print(
            "| devices | encoder step (ms) | encoder steps/s | vs 1 device "
            "| tokenizer step (ms) | tokenizer steps/s | vs 1 device |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in report["steps"]:
            e, t = r["encoder"], r["tokenizer"]
            print(
                f"| {r['devices']} | {1e3 * e['median_s']:.1f} | {e['steps_per_s']:.2f} | "
                f"{e['steps_per_s'] / base['encoder']['steps_per_s']:.2f}x | {1e3 * t['median_s']:.1f} | "
                f"{t['steps_per_s']:.2f} | {t['steps_per_s'] / base['tokenizer']['steps_per_s']:.2f}x |"
            )
    if args.part in ("checkpoint", "both"):
        report["checkpoint"] = run_checkpoints(args)
        print(
            "\n| variant | state (MiB) | save blocks the loop (s) | save until written (s) | restore (s) "
            "| MiB/s written |"
        )
        print("|---|---|---|---|---|---|")
        for r in report["checkpoint"]:
            print(
                f"| {r['variant']} | {r['state_mb']:.1f} | {r['save_blocking_s']:.3f} | {r['save_total_s']:.3f} | "
                f"{r['restore_s']:.3f} | {r['state_mb'] / r['save_total_s']:.0f} |"
            )
    print(f"\nmachine: {report['machine']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
