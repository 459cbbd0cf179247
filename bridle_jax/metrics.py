"""Where training numbers go: one JSON line per logged step (`metrics.jsonl`), TensorBoard event files, and a
progress line with steps/s and ETA for the phase and the whole plan. Only process 0 writes.

The workdir may be a URL (gs://...): object stores cannot append, so there the JSONL object is rewritten whole at
most every `flush_secs` and on close (TensorBoard's gs:// writer, from tensorboardX, needs google-cloud-storage).
"""

import json
import logging
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


class Progress:
    """Steps/s over the last logging window, and the ETA of the phase and of the whole plan."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._time = None
        self._step = None

    def start(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def update(self, step: int, phase_end: int, phase_name: str) -> tuple[float, str]:
        now = time.perf_counter()
        rate = (step - self._step) / max(now - self._time, 1e-9) if self._time is not None else 0.0
        self._time, self._step = now, step
        fmt = lambda s: time.strftime("%H:%M:%S", time.gmtime(s)) if rate > 0 else "?"
        line = (
            f"[{phase_name}] step {step}/{self.total_steps}  {rate:.2f} steps/s  "
            f"phase ETA {fmt((phase_end - step) / max(rate, 1e-9))}  "
            f"plan ETA {fmt((self.total_steps - step) / max(rate, 1e-9))}"
        )
        return rate, line


def log_line(line: str) -> None:
    if jax.process_index() == 0:
        logging.info(line)
        print(line, flush=True)
