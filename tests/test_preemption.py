"""Preemption safety: SIGTERM saves the current step and exits 0; `kill -9` anywhere (mid-step, mid-checkpoint
write, at a phase boundary) followed by re-running the same command ends in the state of an uninterrupted run,
having trained the same batches in the same order; the DONE marker; gs:// workdir paths; checkpoint fallbacks.

The end-to-end tests run `python -m bridle_jax.main` on the tiny plan (6/4/6 steps, a checkpoint every 2 steps,
async saves) as subprocesses that share this session's compilation cache, with BRIDLE_JAX_DATA_LOG=1 so each run
records the (step, batch fingerprint) it trains. The reference is one uninterrupted in-process run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import data_log, encoder_store, paths, preemption, reporting, train
from bridle_jax import workdir as workdir_lib
from tests.tiny import ROOT, tiny_config

TOTAL_STEPS = 16  # 6 cold-start encoder + 4 tokenizer + 6 encoder
CHECKPOINT_EVERY = 2
RUN_TIMEOUT_S = 300
PREEMPTED_LINE = re.compile(r"Preempted at step (\d+): checkpoint saved; re-run the same command to resume")


def _config():
    """The tiny plan, a checkpoint every 2 steps; no linear probe (it never touches the state: time saved)."""
    c = tiny_config()
    c.checkpoint.every_steps = CHECKPOINT_EVERY
    c.evals.linear_probe.enabled = False
    return c


# ---------------------------------------------------------------------------------------------------- helpers


def _final_state(workdir) -> tuple[int, dict]:
    """The newest checkpoint's TrainState as NumPy leaves (restored without a target: the same for every run)."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
    try:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return step, jax.tree.map(np.asarray, restored.state)


def _assert_same_state(a: dict, b: dict) -> None:
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    assert len(flat_a) > 100  # params, codebooks, optimizer moments, rng, counters
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _data_records(workdir) -> list[dict]:
    path = os.path.join(workdir, data_log.DATA_LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # the line being written right now (the run is alive)
    return [json.loads(line) for line in lines]


def _began_next_phase(stdout: str) -> bool:
    """The run logged the last step of phase 0 or 1 and then the start of the next phase (hand-over under way)."""
    for end in (6, 10):
        at = stdout.find(f"step {end}/{TOTAL_STEPS} ")
        if at >= 0 and re.search(r"^Phase [12] ", stdout[at:], re.MULTILINE):
            return True
    return False


def _checkpoint_dirs(workdir) -> tuple[list[int], list[str]]:
    """(finalised steps, leftover temporary folders of unfinished saves)."""
    root = os.path.join(workdir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "orbax-checkpoint-tmp" in n)


class _Run:
    """`python -m bridle_jax.main` on the tiny plan, stdout/stderr in files (no pipe to fill up)."""

    def __init__(self, workdir, logs, index: int, extra: tuple = ()):
        self.stdout_path = os.path.join(logs, f"run{index}.out")
        self.stderr_path = os.path.join(logs, f"run{index}.err")
        env = dict(os.environ, BRIDLE_JAX_DATA_LOG="1", JAX_PLATFORMS="cpu")
        if "xla_force_host_platform_device_count=8" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "bridle_jax.main",
            f"--config={ROOT / 'tests' / 'tiny_digits_config.py'}",
            f"--workdir={workdir}",
            f"--config.checkpoint.every_steps={CHECKPOINT_EVERY}",
            "--config.evals.linear_probe.enabled=False",
            *extra,
        ]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        self.started = time.monotonic()

    def stdout(self) -> str:
        with open(self.stdout_path, encoding="utf-8") as f:
            return f.read()

    def poll_until(self, condition, poll_s: float = 0.05) -> bool:
        """Waits until `condition()` (True) or the process exits (False)."""
        while time.monotonic() - self.started < RUN_TIMEOUT_S:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(poll_s)
        self.proc.kill()
        raise AssertionError(f"run timed out after {RUN_TIMEOUT_S} s; see {self.stdout_path}")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def failure(self) -> str:
        with open(self.stderr_path, encoding="utf-8") as f:
            return f"exit {self.proc.returncode}; stdout:\n{self.stdout()}\nstderr tail:\n{f.read()[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in-process: it also fills the compilation cache the subprocesses share)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data_log.DATA_LOG_ENV, "1")
        summary = train.train_and_evaluate(_config(), workdir)
    assert summary["done"] and not summary["preempted"]
    step, state = _final_state(workdir)
    assert step == TOTAL_STEPS
    sequence = data_log.trained_sequence(_data_records(workdir))
    assert [s for s, _ in sequence] == list(range(1, TOTAL_STEPS + 1))
    assert len({h for _, h in sequence}) == TOTAL_STEPS  # every batch differs: a skip or repeat would show
    return {"workdir": workdir, "state": state, "sequence": sequence}


# ---------------------------------------------------------------------------------------------------- unit tests


def test_path_helpers_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    url = "gs://my-bucket/runs/in1k"
    assert paths.resolve_workdir(url) == url
    assert str(paths.workdir_path(url) / "checkpoints") == f"{url}/checkpoints"
    assert str(encoder_store.encoder_path(url, 2)) == f"{url}/encoders/iteration_2"
    assert paths.is_url(url) and not paths.is_url(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_workdir("rel/dir") == str(tmp_path / "rel" / "dir")
    assert str(paths.workdir_path("rel")) == str(tmp_path / "rel")


def test_metric_writer_rewrites_whole_objects_on_url_workdirs(tmp_path, monkeypatch):
    """Object stores cannot append: a URL workdir keeps every line and rewrites the object (here gs:// is mapped
    onto a local folder), including the lines of the run it resumes."""
    real_path = reporting.epath.Path
    mapped = lambda p: real_path(str(p).replace("gs://bucket", str(tmp_path / "bucket")))
    monkeypatch.setattr(reporting.epath, "Path", mapped)
    rng = np.random.default_rng(0)
    values = rng.normal(size=5)
    writer = reporting.MetricWriter("gs://bucket/run", enabled=True, flush_secs=3600)
    writer.write(1, {"train/loss": values[0]}, phase="p")
    writer.write(2, {"train/loss": values[1]}, phase="p")
    assert not (tmp_path / "bucket" / "run" / "metrics.jsonl").exists()  # buffered until flush_secs or close
    writer.close()
    writer = reporting.MetricWriter("gs://bucket/run", enabled=True, flush_secs=0.0)  # a resumed run
    writer.write(3, {"train/loss": values[2]}, phase="p")  # flush_secs elapsed: written at once
    lines = (tmp_path / "bucket" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    np.testing.assert_allclose([json.loads(line)["train/loss"] for line in lines], values[:3], rtol=1e-6)
    writer.close()
    assert os.listdir(tmp_path / "bucket" / "run" / "tensorboard")


def test_preemption_watch_turns_signals_into_a_flag_and_restores_handlers():
    before = {sig: signal.getsignal(sig) for sig in preemption.PreemptionWatch.SIGNALS}
    watch = preemption.PreemptionWatch()
    try:
        assert not watch.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would end pytest
        time.sleep(0.01)
        assert watch.should_stop(1) and watch.reason == "SIGTERM"
    finally:
        watch.close()
    assert {sig: signal.getsignal(sig) for sig in preemption.PreemptionWatch.SIGNALS} == before
    watch = preemption.PreemptionWatch()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert watch.should_stop(3) and watch.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C aborts without waiting for a checkpoint
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]


_TWO_PROCESS_WATCH = """
import os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid = int(sys.argv[1])
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=pid)
from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import data_log
from bridle_jax import encoder_store
from bridle_jax import paths
from bridle_jax import preemption
from bridle_jax import workdir as workdir_lib
ckpt = ckpt_lib.Checkpointer(sys.argv[3], max_to_keep=1, async_save=True)
watch = preemption.PreemptionWatch(ckpt)
for step in range(40):
    if pid == 1 and step == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is told
    if watch.should_stop(step):
        print(f"stop {step} {watch.reason}", flush=True)
        break
watch.close()
ckpt.close()
"""


def test_two_processes_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        address = f"localhost:{sock.getsockname()[1]}"
    signal_step = int(np.random.default_rng(2).integers(3, 20))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_WATCH, str(pid), address, str(tmp_path), str(signal_step)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"stop {signal_step} another process was signalled" in outs[0], outs
    assert f"stop {signal_step} SIGTERM" in outs[1], outs


def test_trained_sequence_drops_the_steps_a_restart_rolled_back():
    rng = np.random.default_rng(1)
    fp = {s: rng.bytes(4).hex() for s in range(1, 8)}
    records = [{"start": 0}] + [{"step": s, "sha1": fp[s]} for s in (1, 2, 3)]  # killed after step 3
    records += [{"start": 2}] + [{"step": s, "sha1": fp[s]} for s in (3, 4, 5)]  # resumed from checkpoint 2
    records += [{"start": 4}] + [{"step": s, "sha1": fp[s]} for s in (5, 6, 7)]
    assert data_log.trained_sequence(records) == [(s, fp[s]) for s in range(1, 8)]
    assert data_log.trained_sequence(records[:4] + [{"start": 0}]) == []  # killed before the first checkpoint


def test_done_marker_is_written_once_per_plan_and_cleared_for_a_longer_plan(tmp_path):
    assert workdir_lib.read_done(tmp_path) is None
    first = workdir_lib.write_done(tmp_path, 16)
    assert workdir_lib.read_done(tmp_path) == first and first["step"] == 16 and first["time"].endswith("+00:00")
    assert workdir_lib.write_done(tmp_path, 16) == first  # a re-run of a finished plan keeps the marker
    workdir_lib.clear_done(tmp_path)
    assert workdir_lib.read_done(tmp_path) is None and not (tmp_path / "DONE").exists()


def _tiny_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jax.numpy.asarray(rng.normal(size=(4, 3)), jax.numpy.float32), "step": jax.numpy.int32(seed)}


def test_half_written_checkpoints_are_ignored_and_unreadable_ones_fall_back(tmp_path, caplog):
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
    states = {}
    for step in (2, 4):
        for _ in range(2):
            next(data)
        states[step] = _tiny_state(step)
        ckpt.save(step, states[step], data, {"step": step})
    ckpt.close()
    ckdir = tmp_path / "checkpoints"
    (ckdir / "6.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)  # a save killed half-way
    for item in (ckdir / "4" / "state").iterdir():  # a damaged newest checkpoint
        if item.is_file():
            item.write_bytes(b"damaged")
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
    assert ckpt.all_steps() == [2, 4]
    deadline = time.monotonic() + 20  # unfinished saves are removed in the background once the manager opens
    while (ckdir / "6.orbax-checkpoint-tmp-1234").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (ckdir / "6.orbax-checkpoint-tmp-1234").exists()
    fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
    abstract = lambda step: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state(0))
    with caplog.at_level("WARNING"):
        state, meta = ckpt.restore_latest(abstract, fresh)
    ckpt.close()
    assert meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(states[2]["w"]))
    assert next(fresh) == 2  # the iterator resumes after the 2 elements of checkpoint 2
    assert "checkpoint 4" in caplog.text and "cannot be restored" in caplog.text
    assert (ckdir / "4.unreadable").is_dir() and not (ckdir / "4").exists()


# ---------------------------------------------------------------------------------------------------- end to end


def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(reference, tmp_path):
    workdir = str(tmp_path / "sigterm")
    run = _Run(workdir, tmp_path, 0)
    trained = lambda: [r["step"] for r in _data_records(workdir) if "step" in r]
    assert run.poll_until(lambda: len(trained()) >= 3), run.failure()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.failure()
    out = run.stdout()
    match = PREEMPTED_LINE.search(out)
    assert match, run.failure()
    step = int(match[1])
    assert step == trained()[-1] < TOTAL_STEPS  # the step under way when the signal came, nothing after it
    assert step in _checkpoint_dirs(workdir)[0]
    assert workdir_lib.read_done(workdir) is None and "Workdir:" not in out  # main returned before its summary

    run = _Run(workdir, tmp_path, 1)
    assert run.wait() == 0, run.failure()
    assert f"Resumed from step {step} " in run.stdout()
    assert workdir_lib.read_done(workdir)["step"] == TOTAL_STEPS
    final_step, state = _final_state(workdir)
    assert final_step == TOTAL_STEPS
    _assert_same_state(state, reference["state"])
    assert data_log.trained_sequence(_data_records(workdir)) == reference["sequence"]

    # A finished workdir: resumes at the end and only reports (no steps, no new metrics, the same marker).
    done = workdir_lib.read_done(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics_before = f.read()
    summary = train.train_and_evaluate(_config(), workdir)
    assert summary["done"] and not summary["preempted"] and int(summary["final_state"].step) == TOTAL_STEPS
    assert workdir_lib.read_done(workdir) == done
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        assert f.read() == metrics_before
    assert _checkpoint_dirs(workdir)[0][-1] == TOTAL_STEPS


def test_kill_9_anywhere_then_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    """kill -9 during a checkpoint write, right at a phase boundary and at random moments (seeded), re-running
    the same command after each until DONE appears. Statistics: printed and in <tmp>/kill_test_stats.json."""
    rng = np.random.default_rng(20261127)
    workdir = str(tmp_path / "killed")
    queue = ["during_save", "phase_boundary", "random", "random"]  # a missed during_save is retried
    kills, runs, t0 = [], [], time.monotonic()
    for index in range(len(queue) + 6):
        if workdir_lib.read_done(workdir) is not None:
            break
        wanted = queue[0] if queue else None
        tmp_before = set(_checkpoint_dirs(workdir)[1])
        run = _Run(workdir, tmp_path, index)
        runs.append(run)
        if wanted == "during_save":  # a new save in flight, with an older checkpoint to fall back to
            condition = lambda before=tmp_before: (
                _checkpoint_dirs(workdir)[0] and set(_checkpoint_dirs(workdir)[1]) - before
            )
            hit = run.poll_until(condition, poll_s=0.002)
        elif wanted == "phase_boundary":  # this run finished a phase and began the next one's hand-over
            hit = run.poll_until(lambda r=run: _began_next_phase(r.stdout()), poll_s=0.002)
        elif wanted == "random":
            delay = float(rng.uniform(0.2, 3.0))
            hit = run.poll_until(lambda r=run: "Phase " in r.stdout())
            deadline = time.monotonic() + delay
            hit = hit and run.poll_until(lambda t=deadline: time.monotonic() >= t)
        else:
            hit = False
        if not hit or run.proc.poll() is not None:  # the run finished before the kill point
            assert run.wait() == 0, run.failure()
            continue
        run.kill9()
        steps, tmp_dirs = _checkpoint_dirs(workdir)
        trained = [r["step"] for r in _data_records(workdir) if "step" in r]
        kill = {
            "kind": wanted,
            "run": index,
            "after_s": round(time.monotonic() - run.started, 2),
            "last_step_started": trained[-1] if trained else 0,
            "checkpoints": steps,
            "tmp_dirs": sorted(set(tmp_dirs) - tmp_before),
        }
        kills.append(kill)
        if wanted != "during_save" or kill["tmp_dirs"]:
            queue.pop(0)
    assert workdir_lib.read_done(workdir) is not None, [r.failure() for r in runs[-1:]]

    resumes = [int(m[1]) for r in runs for m in re.finditer(r"Resumed from step (\d+) ", r.stdout())]
    final_step, state = _final_state(workdir)
    sequence = data_log.trained_sequence(_data_records(workdir))
    trained_total = sum("step" in r for r in _data_records(workdir))
    identical_state = True
    try:
        _assert_same_state(state, reference["state"])
    except AssertionError:
        identical_state = False
    stats = {
        "kills": len(kills),
        "runs": len(runs),
        "resumes": len(resumes),
        "resumed_from_steps": resumes,
        "kill_points": kills,
        "steps_trained_in_total": trained_total,
        "steps_redone_after_rollback": trained_total - TOTAL_STEPS,
        "final_step": final_step,
        "identical_final_state": identical_state,
        "identical_batch_sequence": sequence == reference["sequence"],
        "leftover_tmp_dirs": _checkpoint_dirs(workdir)[1],
        "wall_s": round(time.monotonic() - t0, 1),
    }
    with open(tmp_path / "kill_test_stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    print("kill -9 test:", json.dumps(stats, indent=2))

    kinds = [k["kind"] for k in kills]
    assert kinds.count("random") >= 1 and "phase_boundary" in kinds, stats
    during_save = [k for k in kills if k["kind"] == "during_save" and k["tmp_dirs"]]
    assert during_save, stats  # a kill caught a checkpoint half-written ...
    save_step = int(during_save[0]["tmp_dirs"][0].split(".")[0])
    next_run = during_save[0]["run"] + 1
    resumed = re.search(r"Resumed from step (\d+) ", runs[next_run].stdout())
    assert resumed and int(resumed[1]) < save_step, stats  # ... and the next run resumed from an older one
    assert len(resumes) == len(runs) - 1  # the first kill came after a checkpoint: every restart resumed
    assert final_step == TOTAL_STEPS and identical_state, stats
    assert stats["identical_batch_sequence"], stats
    assert not stats["leftover_tmp_dirs"], stats


def _workdir_hash(workdir) -> str:
    """Every file of the workdir but the lock file and main's error logs (a refused start may add one there)."""
    import hashlib
    import pathlib

    h = hashlib.sha256()
    root = pathlib.Path(workdir)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.name != "LOCK" and rel.parts[0] != "logs":
            h.update(str(rel).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _stderr(run: "_Run") -> str:
    with open(run.stderr_path, encoding="utf-8") as f:
        return f.read()


def test_kill_9_during_a_lock_take_over_and_a_refused_resume_leaves_the_workdir_resumable(reference, tmp_path):
    """A run killed (its lock left behind) → a second run started meanwhile is refused while the first lives →
    a refused resume (another config) killed -9 while it takes the stale lock over → a resume killed -9 right after
    taking the lock over → the same command to the end: the state and batch sequence of an uninterrupted run."""
    workdir = str(tmp_path / "locked")
    first = _Run(workdir, tmp_path, 0)
    assert first.poll_until(lambda: len(_checkpoint_dirs(workdir)[0]) >= 1), first.failure()
    second = _Run(workdir, tmp_path, 1)  # a second start while the first one runs: refused, naming the holder
    assert second.wait() == 1
    assert f"in use by another run (host {os.uname().nodename}, pid {first.proc.pid}" in _stderr(second)
    first.kill9()
    assert json.loads(open(os.path.join(workdir, "LOCK"), encoding="utf-8").read())["pid"] == first.proc.pid
    before = _workdir_hash(workdir)

    refused = _Run(workdir, tmp_path, 2, extra=["--config.quantizer.codebook_size=32"])
    took_over = lambda r: "took over the lock of a run that ended without releasing it" in _stderr(r)
    if refused.poll_until(lambda: took_over(refused), poll_s=0.002) and refused.proc.poll() is None:
        refused.kill9()
    else:  # it was faster than the poll: it must then have been refused
        assert refused.wait() == 1 and "ResumeRefused" in _stderr(refused), refused.failure()
    assert _workdir_hash(workdir) == before  # a refused start changes nothing, killed or not

    # the refused run released the lock cleanly unless the kill caught it: kill the resume at its own take-over,
    # or (nothing stale to take over) right after it resumed, so the last run has a stale lock to take over
    stale = bool(open(os.path.join(workdir, "LOCK"), encoding="utf-8").read())
    resumed = _Run(workdir, tmp_path, 3)
    kill_point = (lambda: took_over(resumed)) if stale else (lambda: "Resumed from step" in resumed.stdout())
    assert resumed.poll_until(kill_point, poll_s=0.002), resumed.failure()
    killed = resumed.proc.poll() is None
    if killed:
        resumed.kill9()

    # the kill may land between the take-over's truncation of LOCK and its write (an empty lock file: free, and no
    # holder to name), so a take-over message is expected only when a dead holder's details were left behind
    left_behind = workdir_lib._Holder.parse(open(os.path.join(workdir, "LOCK"), encoding="utf-8").read())
    final = _Run(workdir, tmp_path, 4)
    assert final.wait() == 0, final.failure()
    assert "Resumed from step" in final.stdout(), final.failure()
    assert took_over(final) or not killed or left_behind is None, final.failure()
    assert workdir_lib.read_done(workdir)["step"] == TOTAL_STEPS
    _, state = _final_state(workdir)
    _assert_same_state(state, reference["state"])
    assert data_log.trained_sequence(_data_records(workdir)) == reference["sequence"]
    assert open(os.path.join(workdir, "LOCK"), encoding="utf-8").read() == ""  # released at the end
