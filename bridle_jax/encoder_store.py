"""The encoders a run keeps: `<workdir>/encoders/iteration_k`, E's parameters at the end of each encoder phase
(iteration 0: as initialised), what fine-tuning, feature extraction and the probes load."""

import orbax.checkpoint as ocp
from etils import epath

from bridle_jax.paths import workdir_path
from bridle_jax.validation import is_int

ENCODERS_DIR = "encoders"


def encoder_path(workdir, iteration: int) -> epath.Path:
    return workdir_path(workdir) / ENCODERS_DIR / f"iteration_{iteration}"


def saved_iterations(workdir) -> list[int]:
    root = workdir_path(workdir) / ENCODERS_DIR
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir()]
    return sorted(
        int(name.split("_")[1]) for name in names if name.startswith("iteration_") and name.split("_")[1].isdigit()
    )


def save_encoder(workdir, iteration: int, encoder_params) -> None:
    """Keeps E's parameters at the end of an encoder phase (iteration 0: as initialised). Idempotent on resume."""
    path = encoder_path(workdir, iteration)
    if path.exists():
        return
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, encoder_params)
    checkpointer.wait_until_finished()


def load_encoder_params(workdir, iteration: int, abstract=None):
    path = encoder_path(workdir, iteration)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no encoder saved for iteration {iteration}; saved iterations: "
            f"{saved_iterations(workdir) or 'none (is this a bridle_jax workdir?)'}"
        )
    return ocp.StandardCheckpointer().restore(path, abstract)


def pick_iteration(workdir, wanted, *, field: str = "iteration", finished: bool = False) -> int:
    """The kept encoder to load: `wanted`, or (None) the latest kept one; `finished=True`: the latest one an encoder
    phase finished (iteration >= 1, not the encoder as initialised). Errors name the field, the folder and what it
    holds. bool is an int subclass and 1.0 == 1: both would silently pick an iteration, so only true ints pass."""
    available = saved_iterations(workdir)
    root = workdir_path(workdir) / ENCODERS_DIR
    if wanted is not None and not is_int(wanted):
        raise ValueError(
            f"{field}: expected an int (an encoder iteration saved in {workdir}: {available}) or None (the latest), "
            f"got {wanted!r}"
        )
    if wanted is None:
        candidates = [i for i in available if i >= 1] if finished else available
        if not candidates:
            kind = "finished encoder" if finished else "saved encoder"
            raise FileNotFoundError(
                f"{field}: no {kind} in {root} (found iterations {available or 'none'}; an encoder is kept when an "
                "encoder phase ends, and iteration 0 when training starts)"
            )
        return candidates[-1]
    if wanted not in available:
        raise ValueError(f"{field}={wanted}: {root} has no encoder for iteration {wanted}; available: {available}")
    return int(wanted)
