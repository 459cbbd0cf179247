"""What the benchmark scripts share: a recipe's config made runnable without its dataset, a synthetic global batch of
the recipe's modality (images, audio waveforms, video clips), and XLA's FLOP counts of a compiled step.

    import benchlib                                   # the scripts in benchmarks/ find it next to them
    config = benchlib.without_data(benchlib.load_config("configs/audioset.py"))
    batch = benchlib.numpy_batch(config, 8)           # {"input": float32 [8, S], "length": int32 [8]}

A batch is what the train pipeline of the recipe's modality yields and what `bridle_jax/train.py` hands the jitted
step (`{"input", "length"}`; the labels are never used by a pretraining step):
  image  float32 [b, S, S, 3], normalised with config.data.mean/std; length = S (unused by the models)
  audio  float32 [b, samples] waveforms of `audio_pipeline.num_samples(config.data)` samples (the log-mel front-end
         runs inside the step); length = that many samples (no padding)
  video  float32 [b, T, S, S, 3], normalised; length = T frames (no padding)
Only shapes and dtypes matter for timing; the values are seeded noise so the losses stay finite.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import re
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the checkout's package, installed or not (and before any other installed copy)
    sys.path.insert(0, REPO)
# Set as config.data.data_dir when a recipe leaves it unset: the data checks of the recipe datasets (AudioSet,
# Kinetics) want a folder, and nothing here ever reads one.
NO_DATA_DIR = "/nonexistent/bridle_jax-synthetic-batches"
STEPS_PER_EPOCH = 1000  # a plan in epochs is resolved at this many steps per epoch (it only shapes the lr schedule)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a benchmark's report."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_config(path_or_name: str, arg=None):
    """`get_config(arg)` of a config file ("configs/audioset.py", a path) or a recipe name ("audioset")."""
    path = path_or_name
    if not path.endswith(".py"):
        path = os.path.join(REPO, "configs", f"{path_or_name}.py")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"bench_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def without_data(config, steps_per_epoch: int = STEPS_PER_EPOCH):
    """A copy of `config` that builds and validates without its dataset: an unset data_dir that the recipe's data
    checks refuse (AudioSet, Kinetics: they want the folder) becomes `NO_DATA_DIR`, never read (the generated demos
    keep theirs unset), and a plan in epochs is resolved at `steps_per_epoch` (the train split is never listed)."""
    from bridle_jax import schedule
    from bridle_jax.data import pipeline

    config = config.copy_and_resolve_references()
    if config.data.get("data_dir") is None:
        try:
            pipeline.module_for(config.data).validate_data_config(config.data)
        except ValueError as e:
            if "data_dir" not in str(e):
                raise
            config.data.data_dir = NO_DATA_DIR
    if schedule.in_epochs(config.schedule.phases):
        config.schedule.phases = schedule.resolve_epochs(config.schedule.phases, steps_per_epoch)
    return config


def example_shape(config) -> tuple:
    """One example's "input" as the pipeline yields it (audio: the waveform, before the on-device log-mel)."""
    d = config.data
    if config.modality == "audio":
        from bridle_jax.data import audio_pipeline

        return (audio_pipeline.num_samples(d),)
    if config.modality == "video":
        return (d.num_frames, d.image_size, d.image_size, 3)
    return (d.image_size, d.image_size, 3)


def full_length(config) -> int:
    """The "length" of an unpadded example: samples (audio), frames (video), the image size (image)."""
    if config.modality == "audio":
        return example_shape(config)[0]
    if config.modality == "video":
        return config.data.num_frames
    return config.data.image_size


def numpy_batch(config, batch: int, seed: int = 0) -> dict:
    """A synthetic batch of `batch` examples of the recipe's modality (see the module docstring)."""
    rng = np.random.default_rng(seed)
    shape = (batch, *example_shape(config))
    if config.modality == "audio":
        x = (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)  # a quiet noise waveform
    else:
        pixels = rng.random(shape, dtype=np.float32)
        mean, std = np.asarray(config.data.mean, np.float32), np.asarray(config.data.std, np.float32)
        x = ((pixels - mean) / std).astype(np.float32)
    return {"input": x, "length": np.full((batch,), full_length(config), np.int32)}


def global_batch(config, mesh, batch: int, seed: int = 0) -> dict:
    """`numpy_batch` as global arrays sharded over the mesh's batch axes (one process: its batch is the global one)."""
    from bridle_jax import sharding

    return sharding.global_batch(mesh, numpy_batch(config, batch, seed))


def abstract_batch(config, batch: int, sharding_=None) -> dict:
    """ShapeDtypeStructs of `numpy_batch(config, batch)` (nothing allocated), optionally with a sharding."""
    import jax

    return {
        "input": jax.ShapeDtypeStruct((batch, *example_shape(config)), np.float32, sharding=sharding_),
        "length": jax.ShapeDtypeStruct((batch,), np.int32, sharding=sharding_),
    }


def batch_bytes(config, batch: int) -> int:
    return batch * (math.prod(example_shape(config)) * 4 + 4)


# --------------------------------------------------------------------------------------------- FLOPs of a step
def cost_flops(compiled) -> dict:
    """XLA's cost analysis of a compiled executable: flops (every HLO op, elementwise included), transcendentals,
    bytes accessed (NaN where the backend does not report one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "transcendentals": float(cost.get("transcendentals", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    }


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+([\w\-]+)\((.*)$")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def dot_conv_flops(hlo_text: str) -> dict:
    """2*M*N*K of every `dot` and every `convolution` in an optimised HLO text (fusions included), by op kind. On
    GPU, dots lowered to library calls (cuBLAS custom-calls) are not counted: use it on CPU/TPU HLO."""
    shapes = {}  # instruction name -> dims (names are unique module-wide in XLA)
    out = {"dot": 0.0, "convolution": 0.0}
    lines = hlo_text.splitlines()
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(3))
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m or m.group(4) not in ("dot", "convolution"):
            continue
        out_dims = _dims(m.group(3))
        operands = re.findall(r"%?([\w.\-]+)", m.group(5).split(")")[0])
        # operand names may be prefixed with their shape (`f32[8,40,384]{2,1,0} %x`): keep instruction names only
        operands = [o for o in operands if o in shapes]
        if not operands:
            continue
        lhs = shapes[operands[0]]
        size_out = math.prod(out_dims)
        if m.group(4) == "dot":
            cm = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
            k = math.prod(lhs[d] for d in (_dims(cm.group(1)) if cm else []))
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
