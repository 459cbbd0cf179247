"""The linear probe's host memory and time: the old preload path against the streaming one (issue 14, item 4).

Writes a synthetic ImageNet-like `image_folder` (JPEGs of 300x400 RGB, ~45 kB each, 10 classes, smooth shapes plus
noise; ImageNet's average ~400x350, ~110 kB), read at the recipe's 224^2 eval preprocessing, then probes a tiny encoder
(the `mu/16` ViT: 64 wide, 2 blocks, 196 patches, so the cost measured is the input path) on it, every path and size
(a quarter, half, all and twice the images written, the last by hard links) in a fresh subprocess:

  preload  what `loop_probe.ProbeData` did before: both splits decoded into float32 arrays (`pipeline.eval_arrays`),
  held,
           then pooled (`linear_probe.pooled_features` over the arrays) and the head fitted
  stream   what the training loop does now: `loop_probe.ProbeData` (sizes only) + `loop_probe.run_linear_probe`, i.e.
           `linear_probe.split_features` over `pipeline.eval_batches`, one batch of decoded inputs at a time

For each child, after imports, model init and one compile of the feature extractor (a warm-up on 8 images): RSS
before the probe, the peak RSS during it (VmHWM, reset through /proc/self/clear_refs just before), the probe's wall
time and its result (both paths must give the same numbers). The line through the two largest of the four sizes
gives the per-image slope, extrapolated linearly to the ImageNet recipe's probe (`--recipe_images`, default 100,000:
50,000
train + 50,000 validation images). The streaming path's features grow as N x width x 4 bytes; at ViT-B width (768)
that is added analytically (the tiny encoder's are 64 wide).

    python benchmarks/probe_memory.py --images 3200 --json benchmarks/results/probe_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = 10
BATCH = 256


def write_folder(root: pathlib.Path, split: str, count: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float32)
    for i in range(count):
        label = i % CLASSES
        folder = root / split / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        cy, cx, r = rng.uniform(60, 240), rng.uniform(60, 340), rng.uniform(30, 110)
        base = np.stack([np.sin(xx / (20 + 5 * label) + c) * 60 + 120 for c in range(3)], -1)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)[..., None] * rng.uniform(-90, 90, 3)
        image = np.clip(base + disc + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since start, or since the last reset) of this process."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Linux >= 4.0: the peak RSS (VmHWM) restarts from the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def child(path: str, data_dir: str, threads: int) -> dict:
    """One probe in this (fresh) process; prints a JSON line."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    sys.path.insert(0, str(ROOT))
    from bridle_jax import sharding
    from bridle_jax.data import pipeline
    from bridle_jax.evaluators import linear_probe, loop_probe
    from bridle_jax.models import bridle
    from tests.tiny import load_config

    c = load_config("digits")
    c.data.name, c.data.data_dir, c.data.image_size = "image_folder", data_dir, 224
    c.data.num_threads, c.data.prefetch_buffer_size = threads, 2 * threads
    c.model.variant = "mu/16"
    p = c.evals.linear_probe
    p.train_split, p.test_split, p.max_examples, p.batch_size, p.steps = "train", "test", None, BATCH, 200
    models = bridle.build_models(c)
    params = bridle.encoder_from_config(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    sizes = {s: pipeline.eval_size(c.data, s).examples for s in ("train", "test")}
    # compile the feature extractor first (one jitted function per models and mesh, shared by both paths), so that
    # the peak measured below is the probe's own memory, not XLA's compilation
    linear_probe.pooled_features(models, params, pipeline.eval_arrays(c.data, "test", 8), mesh=mesh, batch_size=BATCH)
    _reset_peak()
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if path == "preload":  # what ProbeData did before streaming: both splits decoded and held, then pooled
        train_arrays = pipeline.eval_arrays(c.data, "train", None)
        test_arrays = pipeline.eval_arrays(c.data, "test", None)
        feats = lambda a: linear_probe.pooled_features(models, params, a, mesh=mesh, batch_size=BATCH)
        result = linear_probe.linear_probe(
            feats(train_arrays),
            train_arrays["label"],
            feats(test_arrays),
            test_arrays["label"],
            steps=p.steps,
            lr=p.lr,
            batch_size=p.batch_size,
            seed=c.seed,
        )
    else:
        result = loop_probe.run_linear_probe(models, params, loop_probe.ProbeData(c), c, mesh)  # pylint: disable=protected-access
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {
        "path": path,
        "images": sizes["train"] + sizes["test"],
        "rss_before": before,
        "peak_rss": peak,
        "probe_bytes": peak - before,
        "seconds": seconds,
        "result": result,
        "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_child(path: str, data_dir: pathlib.Path, threads: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device
    cmd = [sys.executable, __file__, "--child", path, "--data", str(data_dir), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3200, help="train images of the largest size (test: a quarter)")
    ap.add_argument("--threads", type=int, default=2, help="config.data.num_threads (Grain's decoding threads)")
    ap.add_argument("--recipe_images", type=int, default=100_000, help="extrapolate to this many probe images")
    ap.add_argument("--recipe_width", type=int, default=768, help="the recipe encoder's feature width (ViT-B)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=("preload", "stream"), default=None)
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.threads)))
        return

    rows = []
    # train images per size (test: a quarter of that): a quarter, half, all and twice the unique images written; the
    # larger sizes hard-link every file under a second name (decoded again, as a new image would be)
    sizes = [args.images // 4, args.images // 2, args.images, 2 * args.images]
    with tempfile.TemporaryDirectory(prefix="probe_memory_") as tmp:
        full = pathlib.Path(tmp) / "unique"
        t = time.perf_counter()
        write_folder(full, "train", args.images, seed=0)
        write_folder(full, "test", args.images // 4, seed=1)
        jpegs = sorted(full.rglob("*.jpg"))
        size = sum(f.stat().st_size for f in jpegs)
        print(f"wrote {len(jpegs)} JPEGs ({size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s", flush=True)
        for n in sizes:
            root = pathlib.Path(tmp) / f"n{n}"
            for f in jpegs:
                split, index, rel = f.parts[-3], int(f.stem), f.relative_to(full)
                keep, unique = (n, args.images) if split == "train" else (n // 4, args.images // 4)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                if index < keep:
                    os.link(f, root / rel)
                if unique + index < keep:  # the second copy (sizes above the unique images)
                    os.link(f, root / rel.parent / f"copy_{rel.name}")
            for path in ("preload", "stream"):
                row = run_child(path, root, args.threads)
                rows.append(row)
                print(
                    f"{path:>8} {row['images']:>6} images: peak RSS {row['peak_rss'] / 2**20:7.0f} MiB, probe +"
                    f"{row['probe_bytes'] / 2**20:6.0f} MiB, {row['seconds']:6.1f} s "
                    f"({row['images'] / row['seconds']:.0f} images/s), top-1 {row['result']['top1_test']:.4f}",
                    flush=True,
                )

    fits = {}
    for path in ("preload", "stream"):
        mine = sorted((r for r in rows if r["path"] == path), key=lambda r: r["images"])
        # the line through the two largest sizes: the streaming path's memory levels off (allocator and runtime
        # pools fill up over the first batches), so a fit over the small sizes would overstate its slope
        (n1, b1, s1), (n2, b2, s2) = ((r["images"], r["probe_bytes"], r["seconds"]) for r in mine[-2:])
        slope, sec = (b2 - b1) / (n2 - n1), (s2 - s1) / (n2 - n1)
        intercept, sec0 = b2 - slope * n2, s2 - sec * n2
        # Both paths hold the features: 64 x 4 bytes per image here, recipe_width x 4 in the recipe. A fitted slope
        # below the features' own bytes is allocator noise (the streaming path's is ~0), so that is the floor.
        features_here, feature_extra = 64 * 4, (args.recipe_width - 64) * 4
        n = args.recipe_images
        fits[path] = {
            "bytes_per_image": float(slope),
            "bytes_at_zero": float(intercept),
            "seconds_per_image": float(sec),
            "recipe_images": n,
            "recipe_probe_bytes": float(b2 + max(slope, features_here) * (n - n2) + feature_extra * n),
            "recipe_seconds": float(sec0 + sec * n),
        }
        print(
            f"{path:>8}: {slope / 1024:.0f} KiB and {sec * 1e3:.1f} ms per image (+{intercept / 2**20:.0f} MiB, "
            f"{sec0:.1f} s) -> {n:,} images: probe +{fits[path]['recipe_probe_bytes'] / 2**30:.2f} GiB, "
            f"{fits[path]['recipe_seconds'] / 60:.0f} min (this machine)"
        )
    for a, b in zip(
        sorted((r for r in rows if r["path"] == "preload"), key=lambda r: r["images"]),
        sorted((r for r in rows if r["path"] == "stream"), key=lambda r: r["images"]),
    ):
        assert a["result"] == b["result"], (a["result"], b["result"])
    print("both paths give the same probe result at every size")
    if args.json:
        import jax

        cpu = next(
            (x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo", encoding="utf-8") if "model name" in x), ""
        )
        info = {"nproc": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0], "jax": jax.__version__}
        pathlib.Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "fits": fits}, indent=2) + "\n")


if __name__ == "__main__":
    main()
