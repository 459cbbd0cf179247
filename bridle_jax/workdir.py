"""The workdir's guards: one run at a time, and a resume that is refused or exact, never lossy.

- `WorkdirLock`: a lock held for the run's lifetime, taken by process 0 before anything in the workdir is touched
  (Orbax's start-up clean-up would otherwise delete another run's in-progress save). On a local path it is an OS
  file lock (`fcntl.flock`), which the OS releases when its holder dies, however it dies; on a URL (gs://) it is an
  object holding a lease that a heartbeat thread renews, and that expires `lease_s` after the holder stops renewing
  it. A second start is refused with the holder's host, PID and start time; a stale lock (dead holder, expired
  lease) is taken over with a warning.
- `check_resume`: the workdir's `config.json` (the config it was started with, never overwritten) against the new
  config, field by field, before anything is restored or moved. Every field shapes the state or the data stream
  except `FREE_FIELDS` (logging, checkpointing, evaluation, the mesh, data locations and loader threads); a
  difference is refused with the fields named unless `config.resume.allow_changes` allows it, and only the
  `ALLOWABLE` changes can be allowed: the optimiser's settings, and a plan whose phases up to the newest
  checkpoint's phase are unchanged (so every kept checkpoint and encoder was made by the new plan too).
- `record_start`: writes `config.json` once, and one entry per start under `config_history/` (when, where, which
  allowed fields changed, the whole config), so a workdir says which configs it has run under.
"""

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import paths, schedule

LOCK_FILE = "LOCK"
CONFIG_FILE = "config.json"
DONE_FILE = "DONE"
HISTORY_DIR = "config_history"
LEASE_S = 300.0  # a gs:// lock not renewed for this long is stale (the heartbeat renews it every lease_s / 4)

# Fields that neither shape the checkpointed state nor the stream of training batches: free to change on resume.
FREE_FIELDS = (
    "checkpoint",
    "log_every_steps",
    "evals",
    "mesh",  # the state is restored onto any mesh (float summation order aside)
    "resume",
    "optim.max_consecutive_nonfinite",
    "optim.max_update_ratio",
    "optim.accumulation_steps",  # the same update as the whole batch (tests/test_grad_accum.py)
    "data.data_dir",  # the data may move (a local copy, a bucket, a mount)
    "data.num_threads",
    "data.prefetch_buffer_size",
    "data.worker_count",  # the same batches in the same order (data/pipeline.py)
    "data.max_eval_examples",
    "data.max_skipped",
)
# Changes a user may allow explicitly (config.resume.allow_changes), with the fields each covers; everything else
# that differs is refused. A plan in epochs records its resolution beside the steps (bridle_jax/resolve.py).
ALLOWABLE = ("optim", "schedule.phases")
_COVERS = {
    "optim": ("optim",),
    "schedule.phases": ("schedule.phases", "schedule.given_phases", "schedule.steps_per_epoch"),
}


class ResumeRefused(ValueError):
    """The workdir holds a run whose config differs from this one in a way that would lose or corrupt it."""


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _under(field: str, prefixes) -> bool:
    return any(field == p or field.startswith(p + ".") for p in prefixes)


def check_allowed_changes(value) -> tuple[str, ...]:
    """`config.resume.allow_changes` ("optim,schedule.phases") as a tuple; errors name what can be allowed."""
    if not isinstance(value, str):
        raise ValueError(f"config.resume.allow_changes: expected a comma-separated string, got {value!r}")
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for name in names:
        if name not in ALLOWABLE:
            raise ValueError(
                f"config.resume.allow_changes: expected a comma-separated subset of {ALLOWABLE}, got {name!r} (the "
                "other fields shape the checkpointed state or the data stream: use a new workdir to change them)"
            )
    return names


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def config_differences(previous: dict, current: dict) -> dict[str, tuple]:
    """{field: (old, new)} for every differing field outside `FREE_FIELDS` (missing fields read as None)."""
    old, new = _flatten(previous), _flatten(current)
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not _under(k, FREE_FIELDS)
    }


def newest_checkpoint_step(workdir) -> int | None:
    """The newest complete checkpoint step, from the folder listing (no manager: nothing is cleaned up or moved)."""
    directory = paths.workdir_path(workdir) / ckpt_lib.CHECKPOINTS_DIR
    if not directory.exists():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def _plan_change_problem(old_phases, new_phases, newest_step: int | None) -> str | None:
    """Why the new plan cannot continue this workdir, or None: the phases up to the newest checkpoint's phase (the
    ones whose steps made the kept checkpoints and encoders) must be unchanged; later phases are free."""
    if newest_step is None:
        return None
    old_plan, new_plan = schedule.parse_plan(old_phases), schedule.parse_plan(new_phases)
    ran = schedule.phase_of_checkpoint(old_plan, newest_step).index
    as_tuple = lambda p: (p.kind, p.cold_start, p.steps)
    if len(new_plan) <= ran or [as_tuple(p) for p in new_plan[: ran + 1]] != [as_tuple(p) for p in old_plan[: ran + 1]]:
        return (
            f"the newest checkpoint (step {newest_step}) was made in phase {ran} of {list(old_phases)}; the new plan "
            f"must keep phases 0..{ran} unchanged (only later phases may be added or changed)"
        )
    return None


def read_started_config(workdir) -> dict | None:
    """The config the workdir was started with (`config.json`), or None for a new workdir."""
    path = paths.workdir_path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeRefused(f"{path}: the workdir's config.json cannot be read ({e}); use a new workdir") from e


def check_resume(workdir, config) -> dict[str, tuple]:
    """Compares `config` with the workdir's config.json before anything is restored or moved; returns the allowed
    differences ({field: (old, new)}, empty for a new workdir or an identical config) or raises ResumeRefused
    naming every refused field."""
    previous = read_started_config(workdir)
    if previous is None:
        return {}
    current = json.loads(config.to_json_best_effort())
    differences = config_differences(previous, current)
    allowed = check_allowed_changes(config.resume.allow_changes)
    covered = tuple(field for name in allowed for field in _COVERS[name])
    refused = {k: v for k, v in differences.items() if not _under(k, covered)}
    problems = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items()]
    if "schedule.phases" in differences and "schedule.phases" not in refused:
        problem = _plan_change_problem(*differences["schedule.phases"], newest_checkpoint_step(workdir))
        if problem:
            problems.append(f"schedule.phases: {problem}")
    if problems:
        needed = [a for a in ALLOWABLE if any(_under(k, _COVERS[a]) for k in refused)]
        hint = (
            f" To allow {' and '.join(needed)}, add --config.resume.allow_changes={','.join(needed)} (see the README's "
            "reliability section)."
            if needed
            else ""
        )
        raise ResumeRefused(
            f"workdir {workdir} holds a run started with another config (its {CONFIG_FILE}); resuming it under this "
            f"config would not continue that run exactly, so nothing was changed. Differences: {'; '.join(problems)}."
            f"{hint} Otherwise resume with the run's own config or use a new workdir."
        )
    return differences


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def record_start(workdir, config, changes: dict[str, tuple]) -> None:
    """Process 0: `config.json` is written once (the config the run started with); every start adds an entry to
    `config_history/` with the allowed changes it made."""
    if jax.process_index() != 0:
        return
    root = paths.workdir_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if not (root / CONFIG_FILE).exists():
        paths.write_text_atomic(root / CONFIG_FILE, text)
    history = root / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    number = 1 + sum(1 for p in history.iterdir() if p.name.endswith(".json"))
    entry = {
        "started": _now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "changes": {k: [old, new] for k, (old, new) in changes.items()},
        "config": json.loads(text),
    }
    paths.write_text_atomic(history / f"{number:04d}.json", json.dumps(entry, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------- the lock


@dataclasses.dataclass
class _Holder:
    host: str
    pid: int
    started: str
    token: str
    heartbeat: float = 0.0

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    @staticmethod
    def parse(text: str) -> "_Holder | None":
        try:
            return _Holder(**json.loads(text))
        except (ValueError, TypeError):
            return None


class WorkdirLock:
    """One run per workdir (see the module docstring). `acquire()` raises WorkdirLocked naming the holder;
    `release()` frees it. `lost` turns True when a lease lock was taken over by another run (a heartbeat that came
    too late): the run must then stop writing."""

    def __init__(self, workdir, *, lease_s: float = LEASE_S, use_lease: bool | None = None):
        self.path = paths.workdir_path(workdir) / LOCK_FILE
        self.lease_s = lease_s
        self.use_lease = paths.is_url(workdir) if use_lease is None else use_lease
        self.me = _Holder(socket.gethostname(), os.getpid(), _now(), uuid.uuid4().hex)
        self.lost = False
        self._fd = None
        self._stop = threading.Event()
        self._thread = None

    def _refuse(self, holder: "_Holder | None") -> None:
        who = holder.describe() if holder else "a run that has not written its details yet"
        raise WorkdirLocked(
            f"workdir {self.path.parent} is in use by another run ({who}; lock file {self.path}). Wait for it to "
            "finish or stop it, or use another workdir."
        )

    def acquire(self) -> None:
        (self._acquire_lease if self.use_lease else self._acquire_flock)()

    def _acquire_flock(self) -> None:
        import fcntl

        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _Holder.parse(self.path.read_text())
            os.close(fd)
            self._refuse(holder)
        previous = _Holder.parse(self.path.read_text())
        if previous is not None:  # the OS freed the lock of a holder that died without releasing it
            logging.warning("took over the lock of a run that ended without releasing it (%s)", previous.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dataclasses.asdict(self.me)).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _read_lease(self) -> "_Holder | None":
        try:
            return _Holder.parse(self.path.read_text()) if self.path.exists() else None
        except OSError:
            return None

    def _write_lease(self) -> None:
        self.me.heartbeat = time.time()
        paths.write_text_atomic(self.path, json.dumps(dataclasses.asdict(self.me)))

    def _acquire_lease(self) -> None:
        holder = self._read_lease()
        if holder is not None and holder.token != self.me.token:
            if time.time() - holder.heartbeat < self.lease_s:
                self._refuse(holder)
            logging.warning(
                "took over a stale lock (%s; no heartbeat for %.0f s)",
                holder.describe(),
                time.time() - holder.heartbeat,
            )
        self._write_lease()
        time.sleep(min(1.0, self.lease_s / 100))  # two starts racing: the later write wins, the other one sees it
        holder = self._read_lease()
        if holder is None or holder.token != self.me.token:
            self._refuse(holder)
        self._thread = threading.Thread(target=self._heartbeat, name="bridle_jax_workdir_lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            holder = self._read_lease()
            if holder is not None and holder.token != self.me.token:
                self.lost = True
                logging.error("the workdir lock %s was taken over by %s", self.path, holder.describe())
                return
            try:
                self._write_lease()
            except OSError as e:  # a transient store error: the next beat tries again (the lease is 4 beats long)
                logging.warning("could not renew the workdir lock %s: %s", self.path, e)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly, nothing to take over
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            holder = self._read_lease()
            if holder is not None and holder.token == self.me.token:
                self.path.unlink()


def lock_for_run(workdir, **kwargs) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock; on several processes all of them learn whether it did, so a refused
    start stops every process (each raises WorkdirLocked). Returns the lock on process 0, None elsewhere."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, **kwargs)
        try:
            lock.acquire()
        except Exception as e:  # pylint: disable=broad-except  (every process must learn of it, then raise)
            lock, error = None, e
    if jax.process_count() > 1:
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirLocked(f"workdir {workdir} is in use by another run (process 0 could not lock it)")
    if error is not None:
        raise error
    return lock


def workdir_exists_or_make(workdir) -> epath.Path:
    """Creates the workdir and checks that it can be written; errors name it."""
    root = paths.workdir_path(workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0 and not paths.is_url(workdir):
            probe = root / f".write_test_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
    except OSError as e:
        raise ValueError(f"workdir {workdir}: cannot create or write there ({type(e).__name__}: {e})") from e
    return root


def read_done(workdir) -> dict | None:
    """The `DONE` marker's content ({"step", "time", ...}) once the whole plan has finished, else None. A damaged
    marker (empty, not JSON, no step) is reported with a warning naming it and read as "not done": the run then
    resumes from its checkpoints, and writes a sound marker when it finishes."""
    path = paths.workdir_path(workdir) / DONE_FILE
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
        paths.write_text_atomic(
            paths.workdir_path(workdir) / DONE_FILE, json.dumps(done, indent=2, sort_keys=True) + "\n"
        )
    return done


def clear_done(workdir) -> None:
    """Removes a `DONE` marker (process 0): the plan grew since it was written, so the workdir is not done."""
    path = paths.workdir_path(workdir) / DONE_FILE
    if jax.process_index() == 0 and path.exists():
        if read_done(workdir) is not None:  # (a damaged marker is reported by read_done)
            logging.warning("%s marks a finished plan, but this plan has more steps: removing it", path)
        path.unlink()


def read_config(workdir):
    import ml_collections

    path = paths.workdir_path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a bridle_jax workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
