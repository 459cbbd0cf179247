"""Orbax checkpoints of the whole run: the TrainState, the Grain iterator (so no batch is skipped or repeated on
resume) and a small JSON of metadata; plus the encoder kept at the end of every encoder phase.

Orbax writes each step into a temporary folder and renames it when complete, so a save killed half-way is never
listed as a step. A listed step that still fails to restore (e.g. a damaged disk) is skipped with a warning and the
previous one is used.
"""

import json
import logging
import os

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

ENCODERS_DIR = "encoders"


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
            ),
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores `step` into the abstract (sharded) state; the iterator is restored in place."""
        r = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return r.state, r.meta

    def restore_latest(self, abstract_for_step, data_iterator):
        """Newest restorable checkpoint: (state, meta), or None when there is none; unreadable steps are set aside.

        `abstract_for_step(step)` gives the restore target for a checkpoint taken after `step` steps (the optimizer
        state's structure depends on the phase). Unreadable steps are skipped, newest first, with a warning.
        """
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_for_step(step), data_iterator)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning(
                    "checkpoint %d in %s cannot be restored (%s: %s); trying the previous one",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable step out of the way (kept for inspection, never deleted) so it can be re-saved."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            aside = f"{path}.unreadable"
            suffix = 1
            while os.path.exists(aside):
                aside, suffix = f"{path}.unreadable{suffix}", suffix + 1
            os.rename(path, aside)
            logging.warning("moved the unreadable checkpoint to %s", aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bridle_jax_set_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def encoder_path(workdir: str, iteration: int) -> str:
    return os.path.join(os.path.abspath(workdir), ENCODERS_DIR, f"iteration_{iteration}")


def saved_iterations(workdir: str) -> list[int]:
    root = os.path.join(os.path.abspath(workdir), ENCODERS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(
        int(name.split("_")[1])
        for name in os.listdir(root)
        if name.startswith("iteration_") and name.split("_")[1].isdigit()
    )


def save_encoder(workdir: str, iteration: int, encoder_params) -> None:
    """Keeps E's parameters at the end of an encoder phase (iteration 0: as initialised). Idempotent on resume."""
    path = encoder_path(workdir, iteration)
    if os.path.exists(path):
        return
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, encoder_params)
    checkpointer.wait_until_finished()


def load_encoder_params(workdir: str, iteration: int, abstract=None):
    path = encoder_path(workdir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path}: no encoder saved for iteration {iteration}; saved iterations: "
            f"{saved_iterations(workdir) or 'none (is this a bridle_jax workdir?)'}"
        )
    return ocp.StandardCheckpointer().restore(path, abstract)


def write_config(workdir: str, config) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str):
    import ml_collections

    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a bridle_jax workdir (no config.json)")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))
