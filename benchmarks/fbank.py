"""Benchmark: Kaldi log-mel front-end throughput, jitted batched JAX ``fbank`` vs a NumPy single-clip loop.

Both use the BRIDLE preset's Kaldi options (hanning, 128 bins, 25/10 ms, pre-emphasis, DC removal) on 10 s, 16 kHz
clips of random noise, in the same process one after the other. The NumPy side is a straightforward vectorised
float32 implementation of the same algorithm (strided frames, one rfft and one matmul per clip), the shape a data
loader worker would run per clip; its output is checked against the JAX one before timing.

    python benchmarks/fbank.py               # CPU (JAX_PLATFORMS=cpu)
    python benchmarks/fbank.py --device      # JAX on the default accelerator, NumPy on the host

"Per core" divides clips/s by ``os.cpu_count()``; "per CPU-second" divides the clips by the process CPU time
(user + system) the timed loop consumed, which is what a shared machine's other load does not inflate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import benchlib


def numpy_fbank(x, window, banks, size=400, shift=160, padded=512, preemph=0.97):
    """Kaldi fbank of one clip in float32 NumPy (snip_edges, DC removal, raw energy unused, log)."""
    import numpy as np

    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::shift]
    frames = frames - frames.mean(axis=1, keepdims=True, dtype=np.float32)
    frames[:, 1:] -= preemph * frames[:, :-1].copy()
    frames[:, 0] -= preemph * frames[:, 0]
    frames *= window
    spectrum = np.fft.rfft(frames, n=padded, axis=1)[:, : padded // 2]
    power = spectrum.real**2 + spectrum.imag**2
    return np.log(np.maximum(power @ banks, np.finfo(np.float32).eps))


def timed(fn, reps):
    """Median wall seconds of ``reps`` calls, and the process CPU seconds they used in total."""
    walls = []
    cpu0 = time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), min(walls), max(walls), time.process_time() - cpu0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="store_true", help="run JAX on the default backend (accelerator)")
    parser.add_argument("--batch", type=int, default=64, help="clips per jitted batch")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--reps", type=int, default=5, help="timed JAX batches")
    parser.add_argument("--numpy-clips", type=int, default=64, help="clips in one NumPy loop pass")
    parser.add_argument("--numpy-reps", type=int, default=3, help="timed NumPy loop passes")
    args = parser.parse_args(argv)
    if not args.device:
        os.environ["JAX_PLATFORMS"] = "cpu"

    import functools

    import jax
    import numpy as np

    from bridle_jax import fbank as fb

    spec = fb.preset("audioset")
    options = fb.kaldi_options(spec)
    n = int(args.seconds * spec.sample_rate)
    rng = np.random.default_rng(0)
    clips = (0.1 * rng.standard_normal((args.batch, n))).astype(np.float32)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    # JAX: one jitted call per batch, input already on the device.
    f = jax.jit(functools.partial(fb.fbank, **options))
    x = jax.device_put(clips)
    t0 = time.perf_counter()
    out = f(x).block_until_ready()
    compile_s = time.perf_counter() - t0
    jax_med, jax_min, jax_max, jax_cpu = timed(lambda: f(x).block_until_ready(), args.reps)

    # NumPy: single-clip loop over the same clips (cycled if fewer than --numpy-clips).
    window = fb._window("hanning", 400, 0.42)
    banks = fb._mel_banks(spec.num_mel_bins, 512, float(spec.sample_rate), 20.0, 0.0)
    check = np.abs(numpy_fbank(clips[0], window, banks) - np.asarray(out[0])).max()
    order = [i % args.batch for i in range(args.numpy_clips)]
    np_med, np_min, np_max, np_cpu = timed(
        lambda: [numpy_fbank(clips[i], window, banks) for i in order], args.numpy_reps
    )

    cores = os.cpu_count()
    rows = [
        (
            f"JAX `jit(fbank)`, batch {args.batch}",
            args.batch,
            jax_med,
            jax_min,
            jax_max,
            args.batch * args.reps / jax_cpu,
        ),
        (
            "NumPy float32, single-clip loop",
            args.numpy_clips,
            np_med,
            np_min,
            np_max,
            args.numpy_clips * args.numpy_reps / np_cpu,
        ),
    ]
    device = jax.devices()[0]
    print(f"machine: os.cpu_count()={cores}, CPU {benchlib.cpu_model()!r}, load average at start {load:.2f}")
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}); numpy {np.__version__}; "
        f"python {sys.version.split()[0]}"
    )
    print(
        f"clips: {args.seconds:g} s at {spec.sample_rate} Hz -> {out.shape[1]} frames x {out.shape[2]} mel bins; "
        f"BRIDLE options {options}"
    )
    print(f"JAX compile + first call {compile_s:.2f} s; NumPy vs JAX max |diff| on clip 0: {check:.2e}\n")
    print(
        "| implementation | clips per timed call | wall per call, median (min-max) | clips/s | clips/s per core "
        "| clips per CPU-second |"
    )
    print("|---|---|---|---|---|---|")
    for name, per_call, med, lo, hi, per_cpu in rows:
        rate = per_call / med
        print(
            f"| {name} | {per_call} | {med * 1e3:.0f} ms ({lo * 1e3:.0f}-{hi * 1e3:.0f}) | {rate:.1f} "
            f"| {rate / cores:.1f} | {per_cpu:.1f} |"
        )
    print(f"\nJAX / NumPy speed-up (clips/s): {(args.batch / jax_med) / (args.numpy_clips / np_med):.2f}x")


if __name__ == "__main__":
    main()
