"""Benchmark: the train streams' host throughput (samples/s per core) on realistic files, and a torchvision peer.

Writes its own data into a temp folder (no download), then reads it through the real train streams
(`bridle_jax.data.pipeline.train_iterator`) with the recipes' data configs:
  image  configs/imagenet.py's image settings (224, RandomResizedCrop scale (0.2, 1) bicubic, flip, normalise) on
         ImageNet-like JPEGs (~500x375, smooth noise + shapes + grain, quality 90) in the `image_folder` layout
  audio  configs/audioset.py's audio settings (16 kHz, 1024 frames, roll_mag_aug) on 10 s 44.1 kHz 16-bit wav files
         (resampled to 16 kHz by the pipeline) in the `audio_folder` CSV layout
  video  configs/kinetics400.py's video settings (16 frames x 4, 224, multi-scale crop) on 10 s 30 fps h264 mp4
         clips at 320p (568x320, PyAV libx264) in the `video_folder` CSV layout
each with (a) Grain threads in this process (`config.data.num_threads` = 1, 2) and (b) Grain worker processes
(`config.data.worker_count` = 1, 2, each worker with one thread). Cores used are measured, not assumed: the busy
CPU-seconds of the whole machine (/proc/stat) over the timed batches, divided by their wall time, so the machine must
be otherwise idle (each case waits for the CPUs to go quiet first and records the load it saw).

Also: the log-mel front-end on the host (NumPy single-clip loop; `jax.jit(bridle_jax.fbank.log_mel)` on the CPU over
the batch) next to the model's own front-end (`models.model_input` jitted, on the CPU here; on a chip it costs the
host nothing), per 10 s clip; and a per-stage profile of one image (read, PIL decode, crop+resize, flip, normalise,
batching) for both sides.

The peer runs in a subprocess of `--peer-python` (an interpreter with torch + torchvision, never a dependency):
torchvision's ImageFolder with RandomResizedCrop(224, scale (0.2, 1), bicubic) + RandomHorizontalFlip + ToTensor +
Normalize through a `torch.utils.data.DataLoader` (num_workers 0, 1, 2), on the same JPEG folder and batch.

    python benchmarks/input_pipeline.py --out /tmp/input_pipeline.json --peer-python /tmp/golden_venv/bin/python
    python benchmarks/input_pipeline.py --quick --out /tmp/quick.json      # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SIZES = {  # full / --quick
    "images": (2000, 256),
    "image_batch": (64, 32),
    "image_batches": (16, 4),
    "audio_clips": (96, 16),
    "audio_batch": (16, 8),
    "audio_batches": (8, 2),
    "video_clips": (24, 6),
    "video_batch": (4, 2),
    "video_batches": (6, 2),
    "profile_images": (200, 40),
}


# ------------------------------------------------------------------------------------------- CPU accounting


def machine_busy_seconds() -> float:
    """Busy CPU-seconds of the whole machine since boot (all but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        vals = list(map(int, f.readline().split()[1:]))
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def cpu_busy(dt: float = 0.5) -> float:
    """Cores busy over the next ``dt`` seconds (0..nproc)."""
    a = machine_busy_seconds()
    time.sleep(dt)
    return (machine_busy_seconds() - a) / dt


def wait_quiet(threshold: float = 0.15, max_wait: float = 60.0) -> float:
    """Waits until fewer than ``threshold`` cores are busy (at most ``max_wait`` s); returns the last reading."""
    start = time.time()
    busy = cpu_busy()
    while busy > threshold and time.time() - start < max_wait:
        busy = cpu_busy()
    return busy


def time_batches(iterator, batch_size: int, warmup: int, batches: int, close=None, quiet=None) -> dict:
    """Consumes ``warmup`` batches (start-up, worker spawn, first decodes: not timed), then times ``batches`` more.
    Returns samples/s, the cores the whole machine kept busy meanwhile, and samples per busy CPU-second."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    startup = time.perf_counter() - t0
    busy0, own0, t1 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    wall = time.perf_counter() - t1
    busy, own = machine_busy_seconds() - busy0, time.process_time() - own0
    if close is not None:
        close()
    samples = batches * batch_size
    return {
        "samples": samples,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "cores_busy": busy / wall,
        "samples_per_cpu_s": samples / max(busy, 1e-9),
        "main_process_cores": own / wall,
        "startup_s": startup,
        "cores_busy_before": quiet,
    }


# ------------------------------------------------------------------------------------------- the data


def write_images(root: str, n: int, seed: int = 0, classes: int = 10) -> dict:
    """``n`` ImageNet-like JPEGs in root/train/<class>/ (3/4 landscape 500x375, 1/4 portrait 375x500, quality 90):
    a smooth colour field, 3-8 filled shapes, some blurred, mid-frequency texture and pixel grain."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        field = rng.integers(0, 256, (rng.integers(3, 8), rng.integers(3, 8), 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 9)):
            x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon(
                    [(x0, y0), (x1, y0 + int(rng.integers(0, 40))), (int(rng.integers(x0, x1 + 1)), y1)], colour
                )
        if rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
        texture = rng.normal(0, 1, (h // 6 + 1, w // 6 + 1, 3)).astype(np.float32)
        texture = np.asarray(Image.fromarray(np.uint8(np.clip(128 + 40 * texture, 0, 255))).resize((w, h)))
        pixels = np.asarray(image, np.float32) + 0.35 * (texture.astype(np.float32) - 128)
        pixels += rng.normal(0, 4, pixels.shape).astype(np.float32)
        folder = os.path.join(root, "train", f"class{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img{i:05d}.jpg")
        Image.fromarray(np.uint8(np.clip(pixels, 0, 255))).save(path, quality=90)
        sizes.append(os.path.getsize(path))
    return {"files": n, "mean_kb": float(np.mean(sizes)) / 1024, "sizes": "500x375 (3/4), 375x500 (1/4)"}


def write_audio(root: str, n: int, seed: int = 0, sample_rate: int = 44100, seconds: float = 10.0) -> dict:
    """``n`` 10 s mono 16-bit wav files at 44.1 kHz (coloured noise + tones under envelopes) + train.csv/test.csv."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    rows = []
    for i in range(n):
        spectrum = np.fft.rfft(rng.standard_normal(t.size))
        spectrum /= np.maximum(np.arange(spectrum.size), 1) ** rng.uniform(0.2, 0.8)
        x = np.fft.irfft(spectrum, t.size)
        x /= np.abs(x).max()
        for _ in range(rng.integers(1, 4)):
            f0 = rng.uniform(100, 4000)
            env = np.exp(-(((t - rng.uniform(0, seconds)) / rng.uniform(0.2, 2.0)) ** 2))
            x += rng.uniform(0.2, 1.0) * env * np.sin(2 * np.pi * f0 * t)
        x = 0.5 * x / np.abs(x).max()
        name = f"clips/clip{i:04d}.wav"
        sf.write(os.path.join(root, name), x.astype(np.float32), sample_rate, subtype="PCM_16")
        rows.append(f"{name},{i % 10}")
    for split in ("train", "test"):
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("path,label\n" + "\n".join(rows) + "\n")
    return {"files": n, "seconds": seconds, "sample_rate": sample_rate, "format": "wav PCM_16 mono"}


def write_video(root: str, n: int, seed: int = 0, width: int = 568, height: int = 320, seconds: int = 10, fps=30):
    """``n`` 10 s h264 mp4 clips (yuv420p, libx264 crf 23 preset veryfast, 30 fps) at 568x320: a slowly panning
    smooth texture with moving ellipses and light grain; + train.csv."""
    import av
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    rows, sizes = [], []
    frames = seconds * fps
    for i in range(n):
        field = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
        background = np.asarray(Image.fromarray(field).resize((width + 200, height + 100), Image.Resampling.BICUBIC))
        blobs = [
            (rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-3, 3), rng.uniform(-2, 2), rng.uniform(20, 90))
            for _ in range(rng.integers(2, 5))
        ]
        colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in blobs]
        name = f"clips/clip{i:04d}.mp4"
        path = os.path.join(root, name)
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast"}
            for k in range(frames):
                dx, dy = int(100 + 90 * np.sin(k / 60)), int(50 + 40 * np.cos(k / 80))
                image = Image.fromarray(np.ascontiguousarray(background[dy : dy + height, dx : dx + width]))
                draw = ImageDraw.Draw(image)
                for (x, y, vx, vy, r), colour in zip(blobs, colours):
                    cx, cy = (x + vx * k) % width, (y + vy * k) % height
                    draw.ellipse((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=colour)
                pixels = np.asarray(image, np.int16) + rng.integers(-3, 4, (height, width, 1), dtype=np.int16)
                frame = av.VideoFrame.from_ndarray(np.uint8(np.clip(pixels, 0, 255)), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        sizes.append(os.path.getsize(path))
        rows.append(f"{name},{i % 4}")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("path,label\n" + "\n".join(rows) + "\n")
    mean_kbps = float(np.mean(sizes)) * 8 / 1000 / seconds
    return {"files": n, "size": f"{width}x{height}", "fps": fps, "seconds": seconds, "mean_kbit_per_s": mean_kbps}


# ------------------------------------------------------------------------------------------- our streams


def load_recipe(name: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchlib

    return benchlib.load_config(name)


def data_configs(roots: dict) -> dict:
    """The recipes' data configs pointed at the generated folders."""
    image = load_recipe("imagenet").data
    image.name, image.data_dir, image.image_size = "image_folder", roots["image"], 224
    audio = load_recipe("audioset").data
    audio.name, audio.data_dir = "audio_folder", roots["audio"]
    audio.csv_files = {"train": "train.csv", "test": "test.csv"}
    video = load_recipe("kinetics400").data
    video.name, video.data_dir, video.train_csv, video.eval_csv = (
        "video_folder",
        roots["video"],
        "train.csv",
        "train.csv",
    )
    return {"image": image, "audio": audio, "video": video}


LOADERS = [("threads", 1), ("threads", 2), ("workers", 1), ("workers", 2)]


def run_stream(data_config, kind: str, n: int, batch: int, batches: int) -> dict:
    from bridle_jax.data import pipeline

    d = data_config.copy_and_resolve_references()
    if kind == "threads":
        d.num_threads, d.worker_count = n, 0
    else:  # n processes of one thread each: n decoding threads in all, as the peer's num_workers
        d.num_threads, d.worker_count = 1, n
    pipeline.validate_data_config(d)
    quiet = wait_quiet()  # before the iterator starts: its prefetch must not fill up while we wait
    iterator = pipeline.train_iterator(d, local_batch_size=batch, seed=0)
    first = next(iterator)
    shape = list(first["input"].shape)
    result = time_batches(iterator, batch, 1, batches, getattr(iterator, "close", None), quiet)
    del iterator
    gc.collect()
    return {"loader": kind, "n": n, "batch": batch, "shape": shape, **result}


def run_ours(roots: dict, args) -> list[dict]:
    configs = data_configs(roots)
    rows = []
    for modality in ("image", "audio", "video"):
        batch, batches = args.sizes[f"{modality}_batch"], args.sizes[f"{modality}_batches"]
        for kind, n in LOADERS:
            r = run_stream(configs[modality], kind, n, batch, batches)
            r["modality"] = modality
            print(
                f"  ours {modality:5s} {kind} {n}: {r['samples_per_s']:.1f} samples/s, {r['cores_busy']:.2f} cores "
                f"busy, {r['samples_per_cpu_s']:.1f} samples/CPU-s",
                flush=True,
            )
            rows.append(r)
    return rows


def profile_ours(root: str, count: int) -> dict:
    """Per-image milliseconds of each stage of our image train stream, called directly in one thread (the decode
    split into PIL's decode and the copy into a NumPy array, as `image_folder.decode_image` does both)."""
    import numpy as np
    from PIL import Image

    from bridle_jax.data import transforms

    paths = sorted(
        os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, "train")) for f in fs if f.endswith(".jpg")
    )
    paths = paths[:: max(1, len(paths) // count)][:count]
    rng = np.random.default_rng(0)
    crop = transforms.RandomResizedCrop(224, (0.2, 1.0), (3 / 4, 4 / 3))
    flip = transforms.RandomFlip(0.5)
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    names = ["read file", "PIL decode", "to NumPy uint8", "crop + bicubic resize", "flip", "normalise (float32)"]
    stages = dict.fromkeys(names, 0.0)
    outs = []
    for p in paths:
        t = time.perf_counter()
        with open(p, "rb") as f:
            f.read()
        t1 = time.perf_counter()
        with Image.open(p) as image:
            image.load()
            t2 = time.perf_counter()
            pixels = np.asarray(image, dtype=np.uint8)
        t3 = time.perf_counter()
        rec = crop.random_map({"image": pixels, "label": 0}, rng)
        t4 = time.perf_counter()
        rec = flip.random_map(rec, rng)
        t5 = time.perf_counter()
        rec = norm.map(rec)
        t6 = time.perf_counter()
        outs.append(rec["image"])
        for name, dt in zip(names, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            stages[name] += dt
    t = time.perf_counter()
    for i in range(0, len(outs), 32):
        np.stack(outs[i : i + 32])
    stages["batch stack"] = time.perf_counter() - t
    return {k: 1e3 * v / len(paths) for k, v in stages.items()}


def run_fbank(audio_config, batch: int) -> dict:
    """Per-clip cost of the log-mel front-end on the host vs the model's own (jitted `model_input`), on one batch of
    the audio train stream (10 s clips, 16 kHz, padded to the recipe's 1024 frames)."""
    import functools

    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchlib
    from fbank import numpy_fbank  # benchmarks/fbank.py: the NumPy single-clip loop a loader worker would run

    from bridle_jax import fbank as fb
    from bridle_jax.data import pipeline
    from bridle_jax.models.bridle import build_models

    d = audio_config.copy_and_resolve_references()
    d.num_threads = 2
    it = pipeline.train_iterator(d, local_batch_size=batch, seed=0)
    clips = next(it)
    it.close() if hasattr(it, "close") else None
    x, length = np.asarray(clips["input"]), np.asarray(clips["length"])
    config = benchlib.without_data(load_recipe("audioset"))
    models = build_models(config)
    spec = models.frontend_spec

    host_jax = jax.jit(functools.partial(fb.log_mel, spec=spec))
    model = jax.jit(models.model_input)
    batch_in = {"input": x, "length": length}
    jax.block_until_ready(host_jax(x, length))
    jax.block_until_ready(model(batch_in))
    window = fb._window("hanning", 400, 0.42)
    banks = fb._mel_banks(spec.num_mel_bins, 512, float(spec.sample_rate), 20.0, 0.0)

    def host_numpy():
        for row in x:
            numpy_fbank(row - row.mean(), window, banks)

    out = {"clips": int(len(x)), "samples_per_clip": int(x.shape[1]), "jax_devices": str(jax.devices()[0])}
    for name, fn in (
        ("host NumPy single-clip loop (fbank only)", host_numpy),
        ("host jax.jit(fbank.log_mel) over the batch, CPU", lambda: jax.block_until_ready(host_jax(x, length))),
        ("model: jax.jit(models.model_input), CPU here", lambda: jax.block_until_ready(model(batch_in))),
    ):
        wait_quiet()
        walls, busy0 = [], machine_busy_seconds()
        for _ in range(3):
            t = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t)
        busy = machine_busy_seconds() - busy0
        out[name] = {
            "ms_per_clip": 1e3 * statistics.median(walls) / len(x),
            "cpu_ms_per_clip": 1e3 * busy / (3 * len(x)),
        }
        print(f"  fbank {name}: {out[name]['ms_per_clip']:.2f} ms/clip", flush=True)
    return out


def step_flops(batch: int) -> dict:
    """XLA's FLOPs per sample of the recipes' warm encoder steps (benchmarks/accelerator.py's cases image_encoder,
    audio_encoder, video_encoder: bf16, built as train.py builds them), compiled on this CPU at `batch` per step
    and divided by it (the optimizer update's share, ~1 % at batch 8, is included). Nothing is run."""
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import accelerator
    import benchlib

    from bridle_jax import config_checks, optim, schedule, sharding, steps
    from bridle_jax import state as state_lib
    from bridle_jax.models.bridle import build_models

    out = {}
    for name in ("image_encoder", "audio_encoder", "video_encoder"):
        t = time.perf_counter()
        case_args = argparse.Namespace(toy=False, batch={name: batch}, devices=1)
        config, _ = accelerator.case_config(name, case_args)
        config_checks.validate(config)
        phase = schedule.parse_plan(config.schedule.phases)[2]  # the warm encoder phase
        mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
        models = build_models(config)
        tx, lr_schedule = optim.make_optimizer(config.optim, phase.kind, phase.steps)
        state = state_lib.create_sharded(models, config, tx, phase, config.seed, mesh)
        data = benchlib.global_batch(config, mesh, config.batch_size)
        step = steps.jit_step(
            phase,
            tx=tx,
            lr_schedule=lr_schedule,
            models=models,
            config=config,
            state_shardings=jax.tree.map(lambda x: x.sharding, state),
            batch_sharding=sharding.batch_sharding(mesh),
        )
        flops = benchlib.cost_flops(step.lower(state, data).compile())["flops"]
        out[name] = {"batch": batch, "flops_per_step": flops, "gflop_per_sample": flops / batch / 1e9}
        out[name]["compile_s"] = time.perf_counter() - t
        print(f"  {name}: {out[name]['gflop_per_sample']:.1f} GFLOP per sample (XLA, batch {batch})", flush=True)
        del state, data, step
        gc.collect()
    return out


# ------------------------------------------------------------------------------------------- the peer


def peer_main(root: str, batch: int, batches: int, profile_count: int) -> None:
    """Runs in the peer's interpreter: torchvision ImageFolder + DataLoader; prints one JSON object."""
    import numpy as np
    import torch
    import torchvision
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(os.path.join(root, "train"), transform=tf)
    out = {"torch": torch.__version__, "torchvision": torchvision.__version__, "torch_threads": torch.get_num_threads()}
    rows = []
    for workers in (0, 1, 2):
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
            persistent_workers=workers > 0,
        )  # fmt: skip
        quiet = wait_quiet()
        iterator = iter(loader)
        r = time_batches(iterator, batch, 1, batches, quiet=quiet)
        del iterator, loader
        gc.collect()
        rows.append({"loader": "DataLoader num_workers", "n": workers, "batch": batch, **r})
    out["rows"] = rows

    # per-stage profile, one image at a time in this thread
    from PIL import Image

    paths = sorted(p for p, _ in dataset.samples)
    paths = paths[:: max(1, len(paths) // profile_count)][:profile_count]
    wait_quiet()
    crop, flip = tf.transforms[0], tf.transforms[1]
    to_tensor, norm = tf.transforms[2], tf.transforms[3]
    stages = dict.fromkeys(["read file", "PIL decode", "to NumPy uint8", "crop + bicubic resize", "flip"], 0.0)
    stages.update({"normalise (float32)": 0.0, "batch stack": 0.0})
    outs = []
    torch.manual_seed(0)
    for p in paths:
        t = time.perf_counter()
        with open(p, "rb") as f:
            f.read()
        t1 = time.perf_counter()
        with open(p, "rb") as f:
            image = Image.open(f).convert("RGB")  # torchvision's pil_loader
        t2 = time.perf_counter()
        image = crop(image)
        t3 = time.perf_counter()
        image = flip(image)
        t4 = time.perf_counter()
        x = norm(to_tensor(image))
        t5 = time.perf_counter()
        outs.append(x)
        stages["read file"] += t1 - t
        stages["PIL decode"] += t2 - t1  # (+ RGB copy: convert)
        stages["crop + bicubic resize"] += t3 - t2
        stages["flip"] += t4 - t3
        stages["normalise (float32)"] += t5 - t4
    t = time.perf_counter()
    for i in range(0, len(outs), 32):
        torch.utils.data.default_collate(outs[i : i + 32])
    stages["batch stack"] = time.perf_counter() - t
    out["profile_ms"] = {k: 1e3 * v / len(paths) for k, v in stages.items()}
    out["profile_note"] = "normalise = ToTensor + Normalize"
    out["numpy"] = np.__version__
    print("PEER_JSON " + json.dumps(out))


def run_peer(python: str, root: str, args) -> dict:
    cmd = [
        python,
        os.path.abspath(__file__),
        "--peer-part",
        root,
        "--peer-batch",
        str(args.sizes["image_batch"]),
        "--peer-batches",
        str(args.sizes["image_batches"]),
        "--peer-profile",
        str(args.sizes["profile_images"]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_JSON "):
            return json.loads(line[len("PEER_JSON ") :])
    return {"error": f"exit status {proc.returncode}: {proc.stderr[-2000:]}"}


# ------------------------------------------------------------------------------------------- report


def table(ours: list[dict], peer: dict | None) -> str:
    lines = [
        "| modality | loader | batch | samples/s | cores busy (measured) | samples/s per core used |",
        "|---|---|---|---|---|---|",
    ]
    names = {"threads": "Grain threads", "workers": "Grain worker processes (1 thread each)"}
    for r in ours:
        lines.append(
            f"| {r['modality']} | {names[r['loader']]} = {r['n']} | {r['batch']} | {r['samples_per_s']:.1f} | "
            f"{r['cores_busy']:.2f} | {r['samples_per_cpu_s']:.1f} |"
        )
    for r in (peer or {}).get("rows", []):
        lines.append(
            f"| image (peer) | torchvision DataLoader num_workers = {r['n']} | {r['batch']} | {r['samples_per_s']:.1f} "
            f"| {r['cores_busy']:.2f} | {r['samples_per_cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def peer_ratios(ours: list[dict], peer: dict | None) -> dict:
    if not peer or "rows" not in peer:
        return {}
    img = {(r["loader"], r["n"]): r for r in ours if r["modality"] == "image"}
    theirs = {r["n"]: r for r in peer["rows"]}
    pairs = {
        "threads 1 vs num_workers 0 (one process)": (img[("threads", 1)], theirs[0]),
        "workers 1 vs num_workers 1": (img[("workers", 1)], theirs[1]),
        "workers 2 vs num_workers 2": (img[("workers", 2)], theirs[2]),
        "threads 2 vs num_workers 2": (img[("threads", 2)], theirs[2]),
    }
    out = {
        k: {
            "per_core": a["samples_per_cpu_s"] / b["samples_per_cpu_s"],
            "samples_per_s": a["samples_per_s"] / b["samples_per_s"],
        }
        for k, (a, b) in pairs.items()
    }
    best_ours = max(r["samples_per_cpu_s"] for r in img.values())
    best_theirs = max(r["samples_per_cpu_s"] for r in theirs.values())
    out["best per core, ours / peer"] = {"per_core": best_ours / best_theirs}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--peer-python", help="an interpreter with torch + torchvision (the peer; optional)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--keep", help="write the data into this folder (kept, reused if present) instead of a temp")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="parts: streams fbank profile peer (the default: all four); flops: XLA's FLOPs per sample of the "
        "recipes' encoder steps, compiled on the CPU (~5 min, for the core-count table)",
    )
    parser.add_argument("--flops-batch", type=int, default=8, help="per-step batch the flops part compiles")
    parser.add_argument("--peer-part", help=argparse.SUPPRESS)
    parser.add_argument("--peer-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peer-batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peer-profile", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_part:
        peer_main(args.peer_part, args.peer_batch, args.peer_batches, args.peer_profile)
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.sizes = {k: v[1 if args.quick else 0] for k, v in SIZES.items()}
    parts = set(args.only or ("streams", "fbank", "profile", "peer"))
    t_start = time.perf_counter()

    tmp = None
    if args.keep:
        base = args.keep
        os.makedirs(base, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bridle_input_bench_")
        base = tmp.name
    roots = {m: os.path.join(base, m) for m in ("image", "audio", "video")}
    data = {}
    writers = {
        "image": lambda r: write_images(r, args.sizes["images"]),
        "audio": lambda r: write_audio(r, args.sizes["audio_clips"]),
        "video": lambda r: write_video(r, args.sizes["video_clips"]),
    }
    for m, root in roots.items():
        if not parts & {"streams", "fbank", "profile", "peer"}:
            break
        marker = os.path.join(root, "done.json")
        if os.path.exists(marker):
            data[m] = json.load(open(marker))
            continue
        t = time.perf_counter()
        data[m] = writers[m](root)
        data[m]["write_s"] = time.perf_counter() - t
        json.dump(data[m], open(marker, "w"))
        print(f"wrote {m}: {data[m]}", flush=True)

    import grain
    import jax
    import numpy as np
    import PIL

    result = {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": benchlib.cpu_model(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "grain": getattr(grain, "__version__", None) or _dist_version("grain"),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "av": _dist_version("av"),
            "soundfile": _dist_version("soundfile"),
            "scipy": _dist_version("scipy"),
        },
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "quick": args.quick,
        "sizes": args.sizes,
        "data": data,
    }
    ours, peer = [], None
    if "streams" in parts:
        ours = run_ours(roots, args)
        result["streams"] = ours
    if "flops" in parts:
        result["step_flops"] = step_flops(args.flops_batch)
    if "fbank" in parts:
        result["fbank"] = run_fbank(data_configs(roots)["audio"], args.sizes["audio_batch"])
    if "profile" in parts:
        wait_quiet()
        result["profile_ours_ms"] = profile_ours(roots["image"], args.sizes["profile_images"])
    if "peer" in parts and args.peer_python:
        print("peer ...", flush=True)
        peer = run_peer(args.peer_python, roots["image"], args)
        result["peer"] = peer
        result["peer_ratios"] = peer_ratios(ours, peer) if ours else {}
    result["total_s"] = time.perf_counter() - t_start

    print(f"\nmachine: {result['machine']}\n")
    print(table(ours, peer))
    if result.get("peer_ratios"):
        print("\nours / peer (image):")
        for k, v in result["peer_ratios"].items():
            print(f"  {k}: " + ", ".join(f"{a} {b:.2f}" for a, b in v.items()))
    if peer and "error" in peer:
        print(f"\npeer failed: {peer['error']}")
    if "fbank" in result:
        print("\n| log-mel front-end, 10 s clips | ms per clip (wall) | CPU-ms per clip |\n|---|---|---|")
        for k, v in result["fbank"].items():
            if isinstance(v, dict):
                print(f"| {k} | {v['ms_per_clip']:.2f} | {v['cpu_ms_per_clip']:.2f} |")
    if "profile_ours_ms" in result:
        theirs = (peer or {}).get("profile_ms", {})
        print("\n| image stage (one thread) | ours, ms/image | peer, ms/image |\n|---|---|---|")
        for k, v in result["profile_ours_ms"].items():
            print(f"| {k} | {v:.2f} | {theirs.get(k, float('nan')):.2f} |")
    if "profile_ours_ms" in result and ours:
        one = next(r for r in ours if (r["modality"], r["loader"], r["n"]) == ("image", "threads", 1))
        stream_ms = 1e3 / one["samples_per_cpu_s"]
        result["image_stream_ms_per_cpu"] = stream_ms
        staged = sum(result["profile_ours_ms"].values())
        print(f"| Grain stream, 1 thread (CPU-ms per image) | {stream_ms:.2f} | |")
        print(f"| stream minus the stages (Grain, shuffle, copies) | {stream_ms - staged:.2f} | |")
    print(f"\ntotal {result['total_s']:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
