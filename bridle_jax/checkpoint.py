"""Everything that makes a run survive preemption: Orbax checkpoints of the TrainState, the Grain iterator (so no
batch is skipped or repeated on resume) and a small JSON of metadata; the encoder kept at the end of every encoder
phase; the SIGTERM/SIGINT watch that saves and stops cleanly; the `DONE` marker of a finished plan.

Orbax writes each step into a temporary folder and renames it when complete (on GCS: a commit file), so a save
killed half-way is never listed as a step; leftovers are cleaned up when the next run opens the manager. A listed
step that still fails to restore (e.g. a damaged disk) is moved aside with a warning and the previous one is used.

The workdir may be a local path or a URL such as `gs://bucket/runs/x` (Cloud TPU VMs): every file access here goes
through `etils.epath`, and URLs are kept as they are (`workdir_path`). GCS needs `gcsfs` (or TensorFlow) installed.
"""

import datetime
import hashlib
import json
import logging
import os
import signal
import threading
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

ENCODERS_DIR = "encoders"
CHECKPOINTS_DIR = "checkpoints"
DONE_FILE = "DONE"
DATA_LOG_FILE = "data_log.jsonl"
DATA_LOG_ENV = "BRIDLE_JAX_DATA_LOG"  # "1": record every trained batch's fingerprint (tests of exact resume)


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def resolve_workdir(workdir) -> str:
    """The workdir as a string: URLs (gs://...) unchanged, local paths made absolute."""
    path = os.fspath(workdir)
    return path if is_url(path) else os.path.abspath(path)


def workdir_path(workdir) -> epath.Path:
    return epath.Path(resolve_workdir(workdir))


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Readers never see a half-written file: local files go through a temporary file and a rename; an object
    store (gs://) publishes an object only once its upload completes."""
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


class CheckpointMismatch(ValueError):
    """A readable checkpoint that another config wrote: never set aside, never resumed from."""


class Checkpointer:
    @staticmethod
    def has_checkpoints(workdir) -> bool:
        """Whether the workdir holds at least one (complete) checkpoint step, without opening a manager."""
        directory = workdir_path(workdir) / CHECKPOINTS_DIR
        return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())

    def __init__(self, workdir, *, max_to_keep: int, async_save: bool):
        self.directory = workdir_path(workdir) / CHECKPOINTS_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # saves killed half-way: never listed, removed here
            ),
            item_names=("state", "data", "meta"),
        )

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
        return "array shapes differ: " + ", ".join(
            f"{a} saved vs {b} expected" for a, b in zip(saved_shapes, target_shapes) if a != b
        )[:300]

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
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionWatch:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) become a flag that the training loop polls at safe points,
    so the run can checkpoint the current step and return instead of dying mid-step.

    Installed on creation, restored by `close()` (handlers not installed from Python, e.g. JAX's own C++ SIGTERM
    notifier, come back as the default action). `should_stop(step)` is a collective: on several processes every
    one calls it at the same points, and all get the same answer (the local flags are all-gathered, and JAX's
    preemption sync point, which Orbax reports and TPU maintenance events trigger, counts too). A second Ctrl-C
    aborts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: Checkpointer | None = None):
        self._checkpointer = checkpointer
        self._previous = {}
        self._flag = False
        self.reason: str | None = None
        self._checked_step, self._checked_result = None, False
        if threading.current_thread() is not threading.main_thread():
            logging.warning("train_and_evaluate runs outside the main thread: SIGTERM/SIGINT are not handled")
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self._flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self._flag = True  # only a flag: a signal handler must not log or print (re-entrant I/O)
        self.reason = signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        if step == self._checked_step and self._checked_result:
            return True
        stop = self._flag
        if jax.process_count() > 1:
            stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
            if stop and not self._flag:
                self.reason = "another process was signalled"
        if not stop and self._checkpointer is not None and step != self._checked_step:
            stop = self._checkpointer.reached_preemption(step)
            if stop:
                self.reason = "JAX preemption sync point"
        self._checked_step, self._checked_result = step, stop
        return stop

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


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


def read_done(workdir) -> dict | None:
    """The `DONE` marker's content ({"step", "time", ...}) once the whole plan has finished, else None. A damaged
    marker (empty, not JSON, no step) is reported with a warning naming it and read as "not done": the run then
    resumes from its checkpoints, and writes a sound marker when it finishes."""
    path = workdir_path(workdir) / DONE_FILE
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
        if not isinstance(done, dict) or not isinstance(done.get("step"), int):
            raise ValueError("expected a JSON object with an integer 'step'")
    except (OSError, ValueError) as e:
        logging.warning("%s is damaged (%s); treating the run as not done and resuming from its checkpoints", path, e)
        return None
    return done


def write_done(workdir, step: int) -> dict:
    """Marks the workdir finished (process 0; launch/watch.sh polls for it). A marker of this step is kept as is."""
    done = read_done(workdir)
    if done is not None and done.get("step") == step:
        return done
    now = time.time()
    done = {
        "step": int(step),
        "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="seconds"),
        "unix_time": now,
    }
    if jax.process_index() == 0:
        write_text_atomic(workdir_path(workdir) / DONE_FILE, json.dumps(done, indent=2, sort_keys=True) + "\n")
    return done


def clear_done(workdir) -> None:
    """Removes a `DONE` marker (process 0): the plan grew since it was written, so the workdir is not done."""
    path = workdir_path(workdir) / DONE_FILE
    if jax.process_index() == 0 and path.exists():
        if read_done(workdir) is not None:  # (a damaged marker is reported by read_done)
            logging.warning("%s marks a finished plan, but this plan has more steps: removing it", path)
        path.unlink()


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


def read_config(workdir):
    import ml_collections

    path = workdir_path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a bridle_jax workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
