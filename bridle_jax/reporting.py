"""Where training numbers go: one JSON line per logged step (`metrics.jsonl`), TensorBoard event files, and a
progress line with steps/s and ETA for the phase and the whole plan. Only process 0 writes.

The workdir may be a URL (gs://...): object stores cannot append, so there the JSONL object is rewritten whole at
most every `flush_secs` and on close (TensorBoard's gs:// writer, from tensorboardX, needs google-cloud-storage).
"""

import json
import math
import os
import time

import jax
import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """JSON lines + TensorBoard (tensorboardX: no TensorFlow needed). A no-op on every process but 0."""

    def __init__(self, workdir, enabled: bool | None = None, flush_secs: float = 30.0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._remote_lines: list[str] | None = None  # URL workdirs: every line, rewritten whole on flush
        self._flush_secs, self._flushed_at = flush_secs, time.monotonic()
        if self.enabled:
            url = "://" in os.fspath(workdir)
            root = epath.Path(os.fspath(workdir) if url else os.path.abspath(workdir))
            root.mkdir(parents=True, exist_ok=True)
            self._path = root / METRICS_FILE
            if url:
                self._remote_lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
            else:
                self._jsonl = self._path.open("a", encoding="utf-8")
            from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it

            self._tb = SummaryWriter(os.fspath(root / "tensorboard"))

    def write(self, step: int, scalars: dict, **fields) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        line = json.dumps({"step": int(step), **fields, **values}, sort_keys=True) + "\n"
        if self._remote_lines is not None:
            self._remote_lines.append(line)
            if time.monotonic() - self._flushed_at >= self._flush_secs:
                self.flush()
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if not self.enabled:
            return
        if self._remote_lines is not None:
            self._path.write_text("".join(self._remote_lines))
            self._flushed_at = time.monotonic()
        else:
            self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._remote_lines is not None:
                self._path.write_text("".join(self._remote_lines))
            else:
                self._jsonl.close()
            self._tb.close()
            self.enabled = False


def format_duration(seconds: float | None) -> str:
    """A duration for people: "1d 01h 00m" (90,000 s), "3h 05m", "4m 09s"; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


class Progress:
    """Steps/s over the last logging window, and the ETA of the phase and of the whole plan.

    The rate is measured after compilation: `start` (a phase begins, or a run resumes) forgets the last window, and
    `after_step` marks the end of the first step after it (waiting for that step's result), so the compile (and a
    phase's k-means) is never in the rate. Without `after_step` calls the first window after `start` reports no
    rate instead. `clock` is injectable for tests.
    """

    def __init__(self, total_steps: int, clock=time.perf_counter):
        self.total_steps = total_steps
        self._clock = clock
        self._time = None
        self._step = None

    def start(self, step: int) -> None:
        """A phase starts (or resumes) at `step`: its first step compiles, so the rate restarts after it."""
        self._time, self._step = None, step

    def after_step(self, step: int, result=None) -> None:
        """Called after every step (cheap); the first call after `start` blocks on `result` (the step's output, so
        its execution is over) and starts the rate's window there."""
        if self._time is None:
            if result is not None:
                jax.block_until_ready(result)
            self._time, self._step = self._clock(), step

    def rate(self, step: int) -> float | None:
        """Steps/s since the window's start, or None when no step completed after compilation yet."""
        if self._time is None or step <= self._step:
            return None
        return (step - self._step) / max(self._clock() - self._time, 1e-9)

    def update(self, step: int, phase_end: int, phase_name: str) -> tuple[float | None, str]:
        """The rate of the window that ends at `step` (None: not measured yet) and the progress line; starts the
        next window."""
        rate = self.rate(step)
        if self._time is None or step > self._step:  # (no `after_step` since `start`: the compile was in this one)
            self._time, self._step = self._clock(), step
        eta = lambda steps: format_duration(steps / rate) if rate else "?"
        shown = f"{rate:.2f}" if rate is not None else "-"
        line = (
            f"[{phase_name}] step {step}/{self.total_steps}  {shown} steps/s  "
            f"phase ETA {eta(phase_end - step)}  plan ETA {eta(self.total_steps - step)}"
        )
        return rate, line


# Model parts by their place in the parameter tree (bridle.BridleModels.init_params), named as the README names them.
PARAMETER_PARTS = (
    (("encoder", "encoder"), "encoder E"),
    (("encoder", "decoder"), "label predictor D"),
    (("tokenizer", "tokenizer"), "tokenizer T"),
    (("tokenizer", "estimator"), "estimator TE"),
    (("cold_start",), "cold-start tokenizer (random, frozen)"),
)


def _epochs(steps: int, batch_size: int, train_examples: int | None) -> str:
    if not train_examples:
        return "? epochs"
    epochs = steps * batch_size / train_examples
    return f"{epochs:,.1f} epochs" if epochs >= 10 else f"{epochs:,.2f} epochs"


def parameter_counts(params: dict) -> list[tuple[str, int]]:
    """(part, parameter count) per model part (`PARAMETER_PARTS`; any other subtree by its path), counted with
    clu.parameter_overview on arrays or abstract shapes alike."""
    from clu import parameter_overview

    out, known = [], set()
    for path, name in PARAMETER_PARTS:
        tree = params
        for key in path:
            tree = tree.get(key) if isinstance(tree, dict) else None
        if tree is not None:
            out.append((name, parameter_overview.count_parameters(tree)))
            known.add(path)
    for top, sub in params.items():
        children = sub.items() if isinstance(sub, dict) and (top,) not in known else ()
        for key, tree in children:
            if (top, key) not in known:
                out.append((f"{top}/{key}", parameter_overview.count_parameters(tree)))
    return out


def run_summary(
    *,
    config,
    plan,
    mesh,
    params: dict,
    workdir: str,
    start_step: int,
    train_examples: int | None,
    eval_split: str | None,
    eval_examples: int | None,
    eval_capped: bool = False,
) -> list[str]:
    """What is about to run, in lines for the user (printed before the first step, by process 0): devices and mesh,
    the batch per device, parameters per model part, dataset sizes, the plan in steps and epochs, and where the
    results go. `train_examples` / `eval_examples` None: unknown (a stream); `eval_capped`: the eval count is a cap
    that the split reached (it may hold more)."""
    devices = jax.devices()
    kind, platform = "/".join(sorted({d.device_kind for d in devices})), devices[0].platform
    kind += f" ({platform})" if platform.lower() not in kind.lower() else ""
    processes = jax.process_count()
    per_process = f" ({jax.local_device_count()} per process)" if processes > 1 else ""
    mesh_axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    batch = int(config.batch_size)
    per_device = batch / mesh.size
    accumulation = int(config.optim.get("accumulation_steps", 1) or 1)
    per_device_text = f"{per_device:g} per device"
    if accumulation > 1:
        per_device_text += f" ({accumulation} micro-batches of {per_device / accumulation:g} per device)"
    per_process_batch = f", {batch // processes} per process" if processes > 1 else ""
    q = config.quantizer
    counts = parameter_counts(params)
    parts = [f"{name} {n:,}" for name, n in counts]
    parts.append(
        f"codebooks {q.num_levels} x {q.codebook_size} x {q.dim} = {q.num_levels * q.codebook_size * q.dim:,} "
        "values (EMA, no gradients)"
    )
    trained = sum(n for name, n in counts if "frozen" not in name)
    train_text = f"{train_examples:,} examples" if train_examples else "unknown size (a stream)"
    if eval_split is None:
        eval_text = "none read (the linear probe is off)"
    elif eval_examples is None:
        eval_text = f"{eval_split!r}, unknown size"
    elif eval_capped:
        eval_text = f"{eval_split!r} >= {eval_examples:,} examples (the probe's cap)"
    else:
        eval_text = f"{eval_split!r} {eval_examples:,} examples"
    total = plan[-1].end_step
    remaining = f"; resuming at step {start_step:,}" if start_step else ""
    lines = [
        "What will run:",
        f"  devices     {len(devices)} x {kind}, {processes} process"
        f"{'es' if processes > 1 else ''}{per_process}; mesh {mesh_axes}",
        f"  batch       global {batch:,} = {per_device_text}{per_process_batch}",
        f"  parameters  {trained:,} trainable: " + "; ".join(parts[:2]),
    ]
    for i in range(2, len(parts), 2):
        lines.append("              " + "; ".join(parts[i : i + 2]))
    lines += [
        f"  data        {config.data.name}: train split {train_text}; eval split {eval_text}",
        f"  plan        {len(plan)} phase{'s' if len(plan) > 1 else ''}, {total:,} steps = "
        f"{_epochs(total, batch, train_examples)}{remaining}",
    ]
    width = max(len(p.name) for p in plan)
    spans = [f"{p.start_step:,}..{p.end_step:,}" for p in plan]
    span_width = max(len(x) for x in spans)
    for p, span in zip(plan, spans):
        where = "done" if start_step >= p.end_step else ("<- here" if start_step >= p.start_step else "")
        lines.append(
            f"    {p.index:>2} {p.name:<{width}}  {'cold start' if p.cold_start else '':<10}  "
            f"steps {span:<{span_width}}"
            f"  ({p.steps:,} steps, {_epochs(p.steps, batch, train_examples)})  {where}".rstrip()
        )
    lines += [
        f"  workdir     {workdir}  ({METRICS_FILE}, checkpoints/, encoders/)",
        f"  tensorboard tensorboard --logdir {os.path.join(os.fspath(workdir), 'tensorboard')}",
    ]
    return lines


def log_line(line: str) -> None:
    """A line for the user, printed once (stdout, process 0 only), whatever the logging verbosity."""
    if jax.process_index() == 0:
        print(line, flush=True)


def quiet_library_logs(verbosity_given: bool) -> None:
    """Command lines: library logging (Orbax's ~60 INFO lines per save, JAX's backend probing, absl) at WARNING,
    unless the user asked for a verbosity (absl's --verbosity / -v). Our own lines are printed (`log_line`), so
    they stay visible either way."""
    if not verbosity_given:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
