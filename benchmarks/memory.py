"""Per-device memory of the big recipes' train steps, from XLA's buffer assignment: compiled, never run.

    python benchmarks/memory.py --json /tmp/memory.json           # kinetics400 + audioset, both steps, remat off/on
    python benchmarks/memory.py --recipes audioset --remat on --batches 1 2
    python benchmarks/memory.py --compiled-json /tmp/memory.json  # re-derive from an earlier run's compiled numbers

For each recipe (configs/<name>.py as is, except the batch and `model.remat`): the warm encoder step (iterations >= 2:
the tokenizer's ViT gives the targets, the bigger of the two encoder steps) and the tokenizer step, at per-device
batch b on a 1-device CPU mesh. Each step is lowered on abstract inputs (`state.abstract_for`: nothing is allocated)
and compiled; `memory_analysis()` gives the argument, output, alias (the donated state, written in place) and temp
bytes, and peak = argument + output - alias + temp. Two batch sizes split temp into a per-example part (activations)
and a batch-independent part (gradients, optimizer temporaries).

XLA:CPU's default (concurrency-optimised) scheduler hoists the recomputation of a remat'd block next to its first
forward pass, which keeps as much alive as no remat at all: on a bare 4-block ViT-B stack at 1568 tokens the temp
bytes were 2.11 GB without and 2.25 GB with remat (batch 2), although the compiled program does recompute.
TPU and GPU schedule for memory; so does XLA:CPU's memory-optimised scheduler (2.08 vs 1.07 GB on that stack),
which this script selects (`--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`, set before jax loads).

Then the recipe's global batch on a few clusters, per device, for pure data parallelism (fsdp=1) and FSDP over all
devices (fsdp = devices): state = params + Adam moments + codebooks at their sharded size (the logical rules of
config.mesh, `fit_spec` included), plus the batch, plus per-example temp x per-device batch, plus the
batch-independent temp divided by fsdp (gradients are reduce-scattered to the parameters' layout). When that exceeds
90% of a device's memory, the smallest `optim.accumulation_steps` that fits is reported (the activations then are
those of one micro-batch).

Caveat: XLA:CPU's buffer assignment is an estimate of a TPU/GPU one (different fusion and layouts; bf16 compute may
be kept in float32 on CPU, which overestimates the bf16 video recipe's activations). The FSDP derivation ignores the
transient all-gathered weights of one layer (<= 30 MB for ViT-B).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import benchlib

REPO = benchlib.REPO
GB = 1e9

# name: (devices, bytes per device); one JAX device per chip (v5p: megacore)
CLUSTERS = {
    "v5p-64 (32 chips x 95 GB)": (32, 95e9),
    "v4-64 (32 chips x 32 GB)": (32, 32e9),
    "8 x A100-80GB": (8, 80e9),
}
FIT = 0.9
MEMORY_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipes", nargs="+", default=["kinetics400", "audioset"], help="names in configs/ (imagenet works too)"
    )
    p.add_argument("--steps", nargs="+", default=["encoder", "tokenizer"], choices=["encoder", "tokenizer"])
    p.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=[1, 2],
        help="per-device batches to compile (>= 2 values give the per-example slope; the last is the one reported)",
    )
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument(
        "--compiled-json",
        default=None,
        help="take the compiled rows from this earlier --json output (no compilation); only re-derive the estimates",
    )
    return p.parse_args(argv)


def load_recipe(name):
    return benchlib.load_config(name)


def abstract_batch(config, batch, sharding_):
    """ShapeDtypeStructs of one pipeline batch ({"input", "length"}) of the recipe's modality (audio: waveforms, the
    log-mel runs inside the step)."""
    return benchlib.abstract_batch(config, batch, sharding_)


def tree_bytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def sharded_state_bytes(models, config, tx, phase, fsdp: int) -> dict:
    """Per-device bytes of the state's parts when the mesh has `fsdp` devices on the fsdp axis (the logical rules
    and the divisibility fallback of bridle_jax.sharding), without any device: an abstract mesh."""
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import AbstractMesh, AxisType

    from bridle_jax import sharding
    from bridle_jax import state as state_lib

    mesh = AbstractMesh((1, fsdp), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    boxed = state_lib.logical_abstract(models, config, tx, phase)
    shardings = sharding.logical_shardings(mesh, boxed, sharding.logical_rules(config.mesh))
    abstract = nn.meta.unbox(boxed)

    def per_device(x, s):
        shape = list(x.shape)
        for d, axes in enumerate(tuple(s.spec)):
            if axes is not None:
                names = (axes,) if isinstance(axes, str) else axes
                shape[d] //= math.prod(mesh.shape[a] for a in names)
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    sizes = jax.tree.map(per_device, abstract, shardings)
    return {
        "params": sum(jax.tree.leaves(sizes.params)),
        "opt_state": sum(jax.tree.leaves(sizes.opt_state)),
        "codebooks": sum(jax.tree.leaves(sizes.codebooks)),
        "total": sum(jax.tree.leaves(sizes)),
    }


def setup(recipe: str, step: str, remat: bool, batch: int):
    """The recipe at per-device batch `batch` on a 1-device mesh: (config, models, phase, tx, lr, abstract state,
    mesh)."""
    import jax

    from bridle_jax import config_checks, optim, schedule, sharding
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models

    config = load_recipe(recipe)
    config.model.remat = remat
    config.batch_size = batch
    config.mesh.data, config.mesh.fsdp = 1, 1
    # only the shapes are needed (no file is read); the plan's lengths shape the lr schedule alone
    config = benchlib.without_data(config)
    config_checks.validate(config)
    plan = schedule.parse_plan(config.schedule.phases)
    phase = plan[2] if step == "encoder" else plan[1]  # warm encoder phase: targets from the tokenizer's ViT
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    models = build_models(config)
    tx, lr = optim.make_optimizer(config.optim, phase.kind, phase.steps)
    abstract = state_lib.abstract_for(models, config, tx, phase, config.seed, mesh)
    return config, models, phase, tx, lr, abstract, mesh


def compile_one(recipe: str, step: str, remat: bool, batch: int) -> dict:
    import jax

    from bridle_jax import sharding, steps

    config, models, phase, tx, lr, abstract, mesh = setup(recipe, step, remat, batch)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sharding = sharding.batch_sharding(mesh)
    fn = steps.jit_step(
        phase,
        models=models,
        config=config,
        tx=tx,
        lr_schedule=lr,
        state_shardings=shardings,
        batch_sharding=batch_sharding,
    )
    t0 = time.perf_counter()
    compiled = fn.lower(abstract, abstract_batch(config, batch, batch_sharding)).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    out = {
        "recipe": recipe,
        "step": step,
        "remat": remat,
        "batch": batch,
        "dtype": config.model.dtype,
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "peak": m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes,
        "state": tree_bytes(abstract),
        "batch_bytes": tree_bytes(abstract_batch(config, batch, None)),
        "compile_s": compile_s,
        "global_batch": load_recipe(recipe).batch_size,
        "sharded_state": {
            f: sharded_state_bytes(models, config, tx, phase, f)
            for f in sorted({1, *(d for d, _ in CLUSTERS.values())})
        },
    }
    del compiled, fn
    jax.clear_caches()
    gc.collect()
    return out


def per_example(rows: list[dict]) -> dict:
    """{(recipe, step, remat): (temp per example, batch-independent temp)} from the two largest compiled batches of
    each case (one batch alone counts all of temp as per-example: an overestimate)."""
    out = {}
    for key in sorted({(r["recipe"], r["step"], r["remat"]) for r in rows}):
        rs = sorted((r for r in rows if (r["recipe"], r["step"], r["remat"]) == key), key=lambda r: r["batch"])
        last = rs[-1]
        if len(rs) >= 2:
            slope = (rs[-1]["temp"] - rs[-2]["temp"]) / (rs[-1]["batch"] - rs[-2]["batch"])
        else:
            slope = last["temp"] / last["batch"]
        out[key] = (slope, max(last["temp"] - slope * last["batch"], 0.0))
    return out


def derive(rows: list[dict]) -> list[dict]:
    """The recipe's global batch on each cluster, data parallel and FSDP (see the module docstring)."""
    out = []
    for (recipe, step, remat), (slope, fixed) in per_example(rows).items():
        last = max(
            (r for r in rows if (r["recipe"], r["step"], r["remat"]) == (recipe, step, remat)), key=lambda r: r["batch"]
        )
        per_example_in = last["batch_bytes"] / last["batch"]
        for cluster, (devices, hbm) in CLUSTERS.items():
            for layout, fsdp in (("data parallel", 1), ("FSDP", devices)):
                state = last["sharded_state"][fsdp]["total"]
                b = last["global_batch"] // devices
                base = state + per_example_in * b + fixed / fsdp
                acc = next((a for a in range(1, b + 1) if b % a == 0 and base + slope * (b // a) <= FIT * hbm), None)
                out.append(
                    {
                        "recipe": recipe,
                        "step": step,
                        "remat": remat,
                        "cluster": cluster,
                        "layout": layout,
                        "per_device_batch": b,
                        "state": state,
                        "temp_per_example": slope,
                        "fixed_temp": fixed / fsdp,
                        "estimate": base + slope * b,
                        "hbm": hbm,
                        "accumulation_steps_to_fit": acc,
                        "estimate_with_accumulation": None if acc is None else base + slope * (b // acc),
                    }
                )
    return out


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    if "xla_cpu_scheduler_type" not in os.environ.get("XLA_FLAGS", ""):  # before jax initialises its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER).strip()
    import jax

    if args.compiled_json:
        with open(args.compiled_json, encoding="utf-8") as f:
            rows = json.load(f)["compiled"]
        for r in rows:
            r["sharded_state"] = {int(k): v for k, v in r["sharded_state"].items()}
    else:
        rows = [
            compile_one(recipe, step, remat == "on", batch)
            for recipe in args.recipes
            for step in args.steps
            for remat in args.remat
            for batch in args.batches
        ]
    print("Compiled for one CPU device (GB):")
    for r in rows:
        print(
            f"{r['recipe']:12s} {r['step']:9s} remat={'on ' if r['remat'] else 'off'} b={r['batch']}: argument "
            f"{r['argument'] / GB:6.2f}  temp {r['temp'] / GB:6.2f}  peak {r['peak'] / GB:6.2f}  (state "
            f"{r['state'] / GB:.2f}, compile {r['compile_s']:.0f} s)",
            flush=True,
        )
    derived = derive(rows)
    print("\nPer device at the recipe's global batch (estimate; GB):")
    for d in derived:
        acc = d["accumulation_steps_to_fit"]
        fit = "fits" if acc == 1 else f"accumulation_steps={acc} -> {d['estimate_with_accumulation'] / GB:.1f}"
        print(
            f"{d['recipe']:12s} {d['step']:9s} remat={'on ' if d['remat'] else 'off'} {d['cluster']:26s} "
            f"{d['layout']:13s} b={d['per_device_batch']:4d}: state {d['state'] / GB:5.2f} + temp/example "
            f"{d['temp_per_example'] / GB:5.2f} x b + fixed {d['fixed_temp'] / GB:5.2f} = {d['estimate'] / GB:7.1f}  "
            f"{fit if acc else 'does not fit'}"
        )
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "argv": sys.argv,
        }
        for r in rows:
            r["sharded_state"] = {str(k): v for k, v in r["sharded_state"].items()}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "compiled": rows, "derived": derived}, f, indent=2)


if __name__ == "__main__":
    main()
