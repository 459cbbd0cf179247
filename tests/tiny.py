"""What the end-to-end tests share: the tiny BRIDLE config (seconds per phase on 2 CPU cores) and a poisoned
iterator."""

import importlib.util
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config():
    c = load_config("digits")
    c.data.image_size = 16
    c.model.variant = "mu/4"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
    c.model.estimator_depth = 1
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 2, 16, 8
    c.batch_size = 16
    c.schedule.phases = ("encoder_cold_start:6", "tokenizer:4", "encoder:6")
    c.log_every_steps = 2
    c.checkpoint.every_steps = 4
    c.checkpoint.async_save = True
    c.evals.linear_probe.steps = 50
    c.evals.linear_probe.max_examples = 128
    c.evals.linear_probe.batch_size = 64
    return c


class PoisonedIterator:
    """A real train iterator, with NaN inputs from batch `start` on (a data or numerics failure); checkpointable like
    the real one (Grain's checkpoint handler takes bytes from iterators that are not its own)."""

    def __init__(self, inner, start: int):
        self._inner, self._start, self._count = inner, start, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self._inner))
        self._count += 1
        if self._count > self._start:
            batch["input"] = np.full_like(batch["input"], np.nan)
        return batch

    def get_state(self) -> bytes:
        return json.dumps(self._inner.get_state()).encode()

    def set_state(self, state: bytes):
        self._inner.set_state(json.loads(state))
