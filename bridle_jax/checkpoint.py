"""Orbax checkpoints of a run's whole state: the TrainState, the Grain iterator (so no batch is skipped or repeated
on resume) and a small JSON of metadata.

Orbax writes each step into a temporary folder and renames it when complete (on GCS: a commit file), so a save
killed half-way is never listed as a step; leftovers are cleaned up when the next run opens the manager. A listed
step that still fails to restore (e.g. a damaged disk) is moved aside with a warning and the previous one is used.
The workdir may be a local path or a URL (`bridle_jax.paths`).
"""

import logging

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bridle_jax.paths import workdir_path

CHECKPOINTS_DIR = "checkpoints"


class CheckpointMismatch(ValueError):
    """A readable checkpoint that another config wrote: never set aside, never resumed from."""


class Checkpointer:
    @staticmethod
    def has_checkpoints(workdir) -> bool:
        """Whether the workdir holds at least one (complete) checkpoint step, without opening a manager."""
        directory = workdir_path(workdir) / CHECKPOINTS_DIR
        return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())

    def __init__(self, workdir, *, max_to_keep: int = 1, async_save: bool = False, read_only: bool = False):
        """`read_only=True` is an evaluator's view of another run's checkpoints: nothing is created, cleaned up,
        saved or set aside (an unreadable step is only skipped)."""
        self.directory = workdir_path(workdir) / CHECKPOINTS_DIR
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # saves killed half-way: never listed, removed here
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Saved steps, including one whose async save is still in flight."""
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

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-process runs with the preemption service, e.g. TPU maintenance)."""
        return self._manager.reached_preemption(step)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores `step` into the abstract (sharded) state; the iterator (when given) is restored in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        r = self._manager.restore(step, args=ocp.args.Composite(**items))
        return r.state, r.meta

    def restore_latest(self, abstract_for_step, data_iterator, steps=None):
        """Newest restorable checkpoint (of `steps`, default all): (state, meta), or None when there is none.

        `abstract_for_step(step)` gives the restore target for a checkpoint taken after `step` steps (the optimizer
        state's structure depends on the phase). Unreadable steps are skipped, newest first, with a warning, and
        set aside unless read-only; a readable step that does not fit the target is an error (CheckpointMismatch).
        """
        for step in reversed(self.all_steps() if steps is None else sorted(steps)):
            abstract = abstract_for_step(step)
            try:
                return self.restore(step, abstract, data_iterator)
            except Exception as e:  # pylint: disable=broad-except
                mismatch = self._structure_mismatch(step, abstract)
                if mismatch:
                    raise CheckpointMismatch(
                        f"checkpoint {step} in {self.directory} is readable but does not fit this run's state "
                        f"({mismatch}); it was left in place. Resume with the config that wrote it."
                    ) from e
                logging.warning(
                    "checkpoint %d in %s cannot be restored (%s: %s); trying the previous one",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                if not self.read_only:
                    self._set_aside(step)
        return None

    def _structure_mismatch(self, step: int, abstract) -> str | None:
        """How a checkpoint whose metadata is readable differs from the restore target (leaf count or shapes), or
        None: it matches, or its metadata cannot be read either (then it is damaged, not another run's)."""
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved_shapes = sorted(tuple(m.shape) for m in jax.tree.leaves(saved))
        except Exception:  # pylint: disable=broad-except
            return None
        target_shapes = sorted(tuple(a.shape) for a in jax.tree.leaves(abstract))
        if not saved_shapes or saved_shapes == target_shapes:  # nothing listed: a damaged item, not another run's
            return None
        if len(saved_shapes) != len(target_shapes):
            return f"{len(saved_shapes)} arrays saved, {len(target_shapes)} expected"
        return (
            "array shapes differ: "
            + ", ".join(f"{a} saved vs {b} expected" for a, b in zip(saved_shapes, target_shapes) if a != b)[:300]
        )

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable step out of the way (kept for inspection, never deleted) so it can be re-saved."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            path = self.directory / str(step)
            aside = path.parent / f"{path.name}.unreadable"
            suffix = 1
            while aside.exists():
                aside, suffix = path.parent / f"{path.name}.unreadable{suffix}", suffix + 1
            path.rename(aside)
            logging.warning("moved the unreadable checkpoint to %s", aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"bridle_jax_set_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        if not self.read_only:
            self._manager.wait_until_finished()
        self._manager.close()
