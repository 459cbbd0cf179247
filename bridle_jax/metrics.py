"""Where training numbers go: one JSON line per logged step (`metrics.jsonl`), TensorBoard event files, and a
progress line with steps/s and ETA for the phase and the whole plan. Only process 0 writes."""

import json
import logging
import os
import time

import jax
import numpy as np


class MetricWriter:
    """JSON lines + TensorBoard (tensorboardX: no TensorFlow needed). A no-op on every process but 0."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            from tensorboardX import SummaryWriter  # imported lazily: only the writing process needs it

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict, **fields) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **fields, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


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
