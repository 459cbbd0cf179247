"""A record of the batches a run trained, for the tests of exact resume (off unless BRIDLE_JAX_DATA_LOG=1)."""

import hashlib
import json
import os

import jax
import numpy as np

from bridle_jax.paths import workdir_path

DATA_LOG_FILE = "data_log.jsonl"
DATA_LOG_ENV = "BRIDLE_JAX_DATA_LOG"  # "1": record every trained batch's fingerprint (tests of exact resume)


class DataLog:
    """With BRIDLE_JAX_DATA_LOG=1, process 0 appends one JSON line per trained batch to `<workdir>/data_log.jsonl`:
    {"step": the step it trains, "sha1": a fingerprint of the batch}, plus {"start": step} whenever a run starts
    (0, or the step it resumed from), which rolls back every later line: the sequence actually trained is then
    recoverable and comparable with an uninterrupted run's (tests/test_preemption.py). Off by default (a hash per
    step); local workdirs only (it appends)."""

    def __init__(self, workdir, enabled: bool | None = None):
        if enabled is None:
            enabled = os.environ.get(DATA_LOG_ENV, "") not in ("", "0")
        self.enabled = enabled and jax.process_index() == 0
        self._file = (workdir_path(workdir) / DATA_LOG_FILE).open("a") if self.enabled else None

    @staticmethod
    def fingerprint(batch: dict) -> str:
        h = hashlib.sha1()
        for key in sorted(batch):
            value = np.ascontiguousarray(batch[key])
            h.update(f"{key}:{value.dtype}:{value.shape}".encode())
            h.update(value.tobytes())
        return h.hexdigest()[:20]

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def started(self, step: int) -> None:
        self._write({"start": int(step)})

    def batch(self, step: int, batch: dict) -> None:
        if self._file is not None:
            self._write({"step": int(step), "sha1": self.fingerprint(batch)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def trained_sequence(lines: list[dict]) -> list[tuple[int, str]]:
    """(step, fingerprint) of the batches the run kept, from data_log.jsonl's records: each start drops the
    records after the step it started from."""
    kept: list[tuple[int, str]] = []
    for record in lines:
        if "start" in record:
            kept = [(s, h) for s, h in kept if s <= record["start"]]
        else:
            kept.append((record["step"], record["sha1"]))
    return kept
