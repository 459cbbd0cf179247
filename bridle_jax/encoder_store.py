"""The encoders a run keeps: `<workdir>/encoders/iteration_k`, E's parameters at the end of each encoder phase
(iteration 0: as initialised), what fine-tuning, feature extraction and the probes load."""

import orbax.checkpoint as ocp
from etils import epath

from bridle_jax.paths import workdir_path

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
