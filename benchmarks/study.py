"""The real-data study: does BRIDLE pretraining learn? Fashion-MNIST, RQ vs VQ vs baselines, several seeds.

    apt-get install dataset-fashion-mnist      # the data (nothing is downloaded)
    python benchmarks/study.py                 # or `make study`; about 150 minutes on 2 CPU cores
    python benchmarks/study.py --seeds 0 --variants rq --out /tmp/study   # one row, one seed

Rows, each over the same seeds and the same linear probe (the recipe's: SPEC 4's protocol, mean-pooled patch tokens
-> LayerNorm -> linear head, AdamW, trained on the first `evals.linear_probe.max_examples` train images, top-1 on the
whole 10,000-image test set):
- raw pixels: the probe on the normalised 784 pixels (and, as an independent check, scikit-learn's logistic
  regression on the same images);
- random init: the encoder as initialised (iteration 0) of each BRIDLE-RQ seed;
- BRIDLE-RQ: `configs/fashion_mnist.py` (RQ M x K), after every iteration;
- BRIDLE-VQ: the BEATs-style baseline with the same code budget: 1 x M*K codes, re-normalised EMA (SPEC 2.7);
- BRIDLE-JOINT: the authors' joint variant (`<recipe>:joint`, one "joint" phase) at the interleaved plan's compute:
  the FLOPs of both plans, from XLA's cost analysis of each phase kind's step, are recorded next to the row.
An MAE-style pixel-target baseline is not offered: the framework has no pixel-regression head.

Codebook usage: at the end of every tokenizer (or joint) phase the run stops (a planned stop, resumed bit-identically),
and
`evaluators.codebook.codebook_health` counts, per level, the codes the tokenizer uses over the whole test set.

Each (variant, seed) runs in its own subprocess and workdir under `--out`, and writes `<variant>_seed<s>.json`;
a rerun skips what is done, so an interrupted study continues. The aggregate is `study.json` and `study.png`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runs from a checkout without an install
VARIANTS = ("rq", "vq", "joint")


def load_recipe(path: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def variant_config(args, variant: str, seed: int):
    c = load_recipe(args.config, "joint" if variant == "joint" else None)
    c.seed = seed
    if args.data_dir:
        c.data.data_dir = args.data_dir
    if variant == "vq":  # one codebook of the same budget, BEATs' re-normalised EMA (SPEC 2.7)
        c.quantizer.codebook_size = c.quantizer.num_levels * c.quantizer.codebook_size
        c.quantizer.num_levels = 1
        c.quantizer.renormalize = True
    return c


# ------------------------------------------------------------------------------------------- one run (subprocess)


def run_one(args, variant: str, seed: int) -> dict:
    from bridle_jax import resolve, schedule, train
    from bridle_jax.data import pipeline
    from bridle_jax.evaluators import codebook

    # a plan in epochs in steps, as the run resolves it (the run finds it resolved and leaves it)
    c = variant_config(args, variant, seed)
    c, _ = resolve.pretraining(c, lambda: len(pipeline.train_source(c.data)))
    workdir = os.path.join(args.out, f"{variant}_seed{seed}")
    plan = schedule.parse_plan(c.schedule.phases)
    tokenizer_ends = [p.end_step for p in plan if p.kind in ("tokenizer", "joint")]
    usage, health_seconds = {}, 0.0
    start = time.time()
    for end in tokenizer_ends:
        train.train_and_evaluate(c, workdir, stop_at_step=end)
        t = time.time()
        report = codebook.codebook_health(workdir, step=end, max_examples=args.usage_examples, plots=False)
        usage[f"iteration_{report['iteration']}"] = [level["utilisation"] for level in report["levels"]]
        health_seconds += time.time() - t
    result = train.train_and_evaluate(c, workdir)
    wall = time.time() - start - health_seconds
    probes = {k: v["top1_test"] for k, v in sorted(result["linear_probe"].items())}
    return {
        "variant": variant,
        "seed": seed,
        "probe_top1": probes,
        "usage": usage,
        "train_seconds": wall,
        "config": {
            "num_levels": c.quantizer.num_levels,
            "codebook_size": c.quantizer.codebook_size,
            "phases": list(c.schedule.phases),
        },
    }


def plan_gflops(c) -> dict:
    """XLA's cost analysis of one step of each phase kind of `c`'s plan (GFLOP, one global batch) and the plan's
    total: what "equal compute" between the interleaved and joint plans means. A joint step's analysis counts both
    branches of its `lax.cond` (a warm encoder step + a tokenizer step): the plan total counts that for the steps
    that train the tokenizer and a warm encoder step for the others."""
    import jax
    import numpy as np

    from bridle_jax import optim, schedule, sharding, steps
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models

    models, mesh = build_models(c), sharding.make_mesh(c.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    local = {k: np.asarray(v[:1]) for k, v in pipeline_example(c).items()}
    batch = {
        k: jax.ShapeDtypeStruct((c.batch_size, *v.shape[1:]), v.dtype, sharding=batch_sharding)
        for k, v in local.items()
    }

    def gflop(kind, cold_start):
        phase = schedule.Phase(index=0, kind=kind, cold_start=cold_start, steps=100, iteration=1, start_step=0)
        tx, lr = optim.make_optimizer(c.optim, phase.kind, phase.steps)
        abstract = state_lib.abstract_for(models, c, tx, phase, 0, mesh)
        fn = steps.jit_step(
            phase,
            models=models,
            config=c,
            tx=tx,
            lr_schedule=lr,
            state_shardings=jax.tree.map(lambda x: x.sharding, abstract),
            batch_sharding=batch_sharding,
        )
        analysis = fn.lower(abstract, batch).compile().cost_analysis()
        return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"]) / 1e9

    per_step = {
        "encoder_cold_start": gflop("encoder", True),
        "encoder": gflop("encoder", False),
        "tokenizer": gflop("tokenizer", False),
    }
    total = 0.0
    for phase in schedule.parse_plan(c.schedule.phases):
        if phase.kind == "joint":
            with_tokenizer = sum(
                bool(steps.joint_trains_tokenizer(phase, s, c)) for s in range(phase.start_step, phase.end_step)
            )
            total += phase.steps * per_step["encoder"] + with_tokenizer * per_step["tokenizer"]
        else:
            total += phase.steps * per_step["encoder_cold_start" if phase.cold_start else phase.kind]
    return {"per_step_gflop": per_step, "plan_gflop": total}


def pipeline_example(c) -> dict:
    """One example of the train split as the step sees it ({"input", "length"})."""
    from bridle_jax.data import pipeline

    it = pipeline.train_iterator(c.data, local_batch_size=1, seed=0)
    example = next(it)
    return {k: example[k] for k in ("input", "length")}


# ------------------------------------------------------------------------------------------- raw-pixel baselines


def raw_input_features(c, arrays: dict):
    """The model's input, flattened: normalised pixels (one channel of a grey image, whose 3 channels are the same
    values under each channel's normalisation), the normalised log-mels of audio (the front-end the encoder sees),
    normalised video frames."""
    import numpy as np

    from bridle_jax.models.bridle import build_models

    x, _ = build_models(c).model_input({k: arrays[k] for k in ("input", "length") if k in arrays})
    x = np.asarray(x)
    if c.modality == "image":
        z = lambda v: (v - v.mean()) / v.std()
        if all(np.allclose(z(x[..., 0]), z(x[..., k]), atol=1e-4) for k in (1, 2)):
            x = x[..., 0]
    return x.reshape(len(x), -1)


def raw_pixel_rows(args) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from bridle_jax.evaluators import linear_probe, loop_probe

    c = variant_config(args, "rq", 0)
    p = c.evals.linear_probe
    data = loop_probe.ProbeData(c)  # the very splits the in-loop probe reads
    train, test = data.train, data.test
    flat = lambda a: raw_input_features(c, a)
    probe = [
        linear_probe.linear_probe(
            flat(train),
            train["label"],
            flat(test),
            test["label"],
            steps=p.steps,
            lr=p.lr,
            batch_size=p.batch_size,
            seed=s,
        )["top1_test"]
        for s in args.seeds
    ]
    t = time.time()
    logreg = LogisticRegression(max_iter=1000).fit(flat(train), train["label"])
    sk = float(np.mean(logreg.predict(flat(test)) == test["label"]))
    return {
        "probe": probe,
        "sklearn_logreg": sk,
        "sklearn_seconds": time.time() - t,
        "num_train": int(len(train["label"])),
        "num_test": int(len(test["label"])),
    }


# ------------------------------------------------------------------------------------------- aggregate


def mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def aggregate(runs: list[dict], raw: dict) -> dict:
    rows = {"raw pixels (probe)": mean_std(raw["probe"])}
    rq = [r for r in runs if r["variant"] == "rq"]
    if rq:
        rows["random init (iteration 0)"] = mean_std(r["probe_top1"]["iteration_0"] for r in rq)
    usage = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        iterations = sorted({k for r in mine for k in r["probe_top1"] if k != "iteration_0"})
        for it in iterations:
            rows[f"BRIDLE-{variant.upper()} {it.replace('_', ' ')}"] = mean_std(r["probe_top1"][it] for r in mine)
        for it in sorted({k for r in mine for k in r["usage"]}):
            levels = list(zip(*(r["usage"][it] for r in mine)))
            usage[f"{variant} {it}"] = [mean_std(level) for level in levels]
    return {
        "rows": rows,
        "usage": usage,
        "sklearn_logreg": raw["sklearn_logreg"],
        "train_seconds": {
            v: mean_std(r["train_seconds"] for r in runs if r["variant"] == v)
            for v in VARIANTS
            if any(r["variant"] == v for r in runs)
        },
    }


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(rows)
    ax.barh(
        range(len(names)),
        [100 * rows[n]["mean"] for n in names],
        xerr=[100 * rows[n]["std"] for n in names],
        color="tab:blue",
        alpha=0.8,
    )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    lo = min(100 * rows[n]["mean"] for n in names)
    ax.set_xlim(max(0.0, lo - 5), 100)
    ax.set_xlabel(f"linear-probe top-1 on the {summary['raw']['num_test']:,} test examples (%), mean ± std over seeds")
    for name, u in summary["usage"].items():
        bx.errorbar(range(len(u)), [x["mean"] for x in u], yerr=[x["std"] for x in u], marker="o", label=name)
    bx.axhline(0.9, color="grey", ls="--", lw=0.8)
    bx.set_xlabel("RQ level")
    bx.set_ylabel("codebook usage over the test set")
    bx.set_ylim(0, 1.05)
    bx.legend(fontsize=8)
    fig.suptitle(f"BRIDLE, {summary['recipe']} (benchmarks/study.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(summary: dict) -> str:
    lines = ["| row | probe top-1 (%) | seeds |", "|---|---|---|"]
    for name, r in summary["rows"].items():
        lines.append(f"| {name} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {r['n']} |")
    lines.append(f"| raw pixels, scikit-learn logistic regression | {100 * summary['sklearn_logreg']:.2f} | - |")
    lines += ["", "| codebook usage at the end of the tokenizer phase | per level (mean ± std) |", "|---|---|"]
    for name, u in summary["usage"].items():
        lines.append(f"| {name} | " + ", ".join(f"{x['mean']:.3f} ± {x['std']:.3f}" for x in u) + " |")
    lines += ["", "| training wall time per run | seconds (mean ± std) |", "|---|---|"]
    for name, t in summary["train_seconds"].items():
        lines.append(f"| {name} | {t['mean']:.0f} ± {t['std']:.0f} |")
    if "compute" in summary:
        lines += [
            "",
            "| plan | GFLOP per step (cold-start encoder / encoder / tokenizer) | plan GFLOP |",
            "|---|---|---|",
        ]
        for name, g in summary["compute"].items():
            per = g["per_step_gflop"]
            lines.append(
                f"| {name} | {per['encoder_cold_start']:.2f} / {per['encoder']:.2f} / {per['tokenizer']:.2f} "
                f"| {g['plan_gflop']:,.0f} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- driver


def write_json(path: str, value) -> None:
    """Written whole or not at all (a rerun skips the files that exist, so a half-written one must never be)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "fashion_mnist.py"))
    p.add_argument("--data_dir", default=None, help="the IDX files' folder (default: the recipe's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--usage_examples", type=int, default=10_000, help="test images the usage is counted over")
    p.add_argument("--out", default=os.path.join(REPO, "workdirs", "study"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "variant:seed", the subprocess's job
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        variant, seed = args.one.split(":")
        write_json(os.path.join(args.out, f"{variant}_seed{seed}.json"), run_one(args, variant, int(seed)))
        return None
    raw_path = os.path.join(args.out, "raw_pixels.json")
    if not os.path.exists(raw_path):
        write_json(raw_path, raw_pixel_rows(args))
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            path = os.path.join(args.out, f"{variant}_seed{seed}.json")
            if not os.path.exists(path):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    f"--one={variant}:{seed}",
                    f"--out={args.out}",
                    f"--config={args.config}",
                    f"--usage_examples={args.usage_examples}",
                ]
                if args.data_dir:
                    cmd.append(f"--data_dir={args.data_dir}")
                print(f"[study] {variant} seed {seed} ...", flush=True)
                subprocess.run(cmd, check=True, cwd=REPO)
            with open(path) as f:
                runs.append(json.load(f))
    with open(raw_path) as f:
        raw = json.load(f)
    summary = aggregate(runs, raw)
    summary["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
    summary["raw"] = raw
    summary["recipe"] = os.path.relpath(os.path.abspath(args.config), REPO)
    if "joint" in args.variants:  # equal compute, checked: both plans' FLOPs
        summary["compute"] = {v: plan_gflops(variant_config(args, v, 0)) for v in ("rq", "joint")}
    write_json(os.path.join(args.out, "study.json"), summary)
    plot(summary, os.path.join(args.out, "study.png"))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
