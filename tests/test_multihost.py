"""Multi-host training, for real: two local processes (4 fake CPU devices each, gloo collectives over 127.0.0.1)
join through `bridle_jax.main.initialize_distributed` and run the tiny plan (4/3/4 steps, stopped at step 4 and
resumed, linear probe on), next to one process with 8 devices fed the same global batches (the two process shards
side by side; see multihost_worker.py for why that is not yet the plain one-process batch order).

What must hold: the per-step metrics and the final codebooks and encoder equal the one-process run (float32
reductions run in another order, hence 1e-5 relative; the attention key bias, whose exact gradient is 0, only
stays at noise level); every device of both processes holds bit-identical
codebooks after k-means + restart (the first tokenizer step) and at the end (EMA); only process 0 writes the
metrics, config, probe results and DONE marker, while Orbax and Grain checkpoint every process.

All three processes start at once and share a compilation cache (process 1 cannot reuse process 0's entries on CPU:
the cache key includes the topology fingerprint, which differs per process).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bridle_jax import main as entry

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
TOTAL_STEPS = 11  # 4 cold-start encoder + 3 tokenizer + 4 encoder (multihost_worker.PLAN)
STOP_AT = 4  # the end of the first phase: the resume restores, then compiles nothing the run would not
TIMEOUT_S = 900
DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache_dir: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _launch(name: str, root: pathlib.Path, env: dict, *args) -> tuple:
    log = open(root / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed by the fixture)
    out = root / f"{name}.npz"
    cmd = [sys.executable, str(WORKER), f"--out={out}", "--probe", *args]
    proc = subprocess.Popen(cmd, cwd=str(root), env=env, stdout=log, stderr=subprocess.STDOUT)
    return name, proc, log, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    cache = str(root / "xla_cache")
    multi_dir, ref_dir = root / "multi", root / "reference"
    address = f"127.0.0.1:{_free_port()}"
    jobs = [
        _launch(
            f"process{pid}",
            root,
            _env(4, cache, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)),
            f"--workdir={multi_dir}",
            f"--stop_at_step={STOP_AT}",
        )
        for pid in (0, 1)
    ]
    jobs.append(_launch("reference", root, _env(8, cache), f"--workdir={ref_dir}", "--reference_processes=2"))
    deadline = time.monotonic() + TIMEOUT_S
    failed = []
    try:
        for name, proc, log, _ in jobs:
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0:
                failed.append((name, rc))
    finally:
        for _, proc, log, _ in jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        tails = "\n".join(
            f"--- {name} (exit {rc}) ---\n" + (root / f"{name}.log").read_text(errors="replace")[-3000:]
            for name, rc in failed
        )
        pytest.fail(f"worker processes failed: {failed}\n{tails}")
    dumps = {name: dict(np.load(out)) for name, _, _, out in jobs}
    print("worker CPU seconds:", {name: round(float(d["cpu_seconds"]), 1) for name, d in dumps.items()})
    return {"multi_dir": multi_dir, "reference_dir": ref_dir, **dumps}


def _metrics(workdir: pathlib.Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "train/loss" in line]


def _replicas(dump: dict, prefix: str) -> dict:
    """{leaf: {device id: array}} for the keys "<prefix>/<leaf>@<device id>" of a worker dump."""
    out = {}
    for key, value in dump.items():
        if key.startswith(prefix + "/"):
            leaf, device = key[len(prefix) + 1 :].rsplit("@", 1)
            out.setdefault(leaf, {})[int(device)] = value
    return out


def test_two_processes_form_one_eight_device_run(runs):
    for pid in (0, 1):
        dump = runs[f"process{pid}"]
        assert (int(dump["process_index"]), int(dump["process_count"]), int(dump["device_count"])) == (pid, 2, 8)
    ref = runs["reference"]
    assert (int(ref["process_count"]), int(ref["device_count"])) == (1, 8)


def test_per_step_metrics_match_one_process(runs):
    multi, ref = _metrics(runs["multi_dir"]), _metrics(runs["reference_dir"])
    # Every step logged exactly once: process 1 wrote nothing, and the resume at step 5 repeated no step.
    assert [m["step"] for m in multi] == list(range(1, TOTAL_STEPS + 1))
    assert [m["step"] for m in ref] == list(range(1, TOTAL_STEPS + 1))
    # The workers report 1 + process index skipped records: the log sums every process's count.
    assert {m["data/skipped_records"] for m in multi} == {3.0}
    assert {m["data/skipped_records"] for m in ref} == {1.0}
    compared = 0
    for a, b in zip(multi, ref):
        assert a["phase"] == b["phase"]
        for key, value in b.items():
            if key.startswith(("train/", "codebook/")):
                np.testing.assert_allclose(a[key], value, rtol=1e-5, atol=1e-7, err_msg=f"step {b['step']} {key}")
                compared += 1
    assert compared > 10 * TOTAL_STEPS
    losses = [m["train/loss"] for m in ref]
    assert len(set(losses)) == len(losses)  # the steps really differ (a constant would pass the comparison)


@pytest.mark.parametrize("prefix", ["prepare0", "prepare4", "final"])
def test_every_replica_holds_identical_codebooks(runs, prefix):
    """After k-means (step 0), k-means + dead-code restart (step 4, the tokenizer phase) and at the end (3 EMA
    steps later): all 8 devices of the two processes bit-identical, and equal to the one-process run."""
    multi = _replicas(runs["process0"], prefix)
    other = _replicas(runs["process1"], prefix)
    ref = _replicas(runs["reference"], prefix)
    assert set(multi) == set(other) == set(ref) and ".codes" in multi
    for leaf in multi:
        replicas = {**multi[leaf], **other[leaf]}
        assert len(replicas) == 8 and set(multi[leaf]).isdisjoint(other[leaf])
        first = next(iter(replicas.values()))
        for device, value in replicas.items():
            np.testing.assert_array_equal(value, first, err_msg=f"{prefix}{leaf} on device {device}")
        expected = next(iter(ref[leaf].values()))
        np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6, err_msg=f"{prefix}{leaf}")
    assert bool(next(iter(multi[".initialized"].values())))


def _key_bias(leaf: str, value: np.ndarray) -> slice | None:
    """The key part of a fused qkv bias: softmax ignores a constant added to every key's logit, so its exact
    gradient is 0 and what is computed is rounding noise, which Adam scales up to lr-sized steps. That noise depends
    on the reduction order, so this slice is only checked to stay at noise level."""
    if leaf.endswith("['qkv']['bias']"):
        width = value.shape[-1] // 3
        return slice(width, 2 * width)
    return None


def test_final_encoder_matches_one_process(runs):
    multi = _replicas(runs["process0"], "final_encoder")
    other = _replicas(runs["process1"], "final_encoder")
    ref = _replicas(runs["reference"], "final_encoder")
    assert set(multi) == set(other) == set(ref) and len(ref) > 10
    checked_key_bias = 0
    for leaf, by_device in ref.items():
        expected = next(iter(by_device.values()))
        replicas = {**multi[leaf], **other[leaf]}
        assert len(replicas) == 8
        first = next(iter(replicas.values()))
        for device, value in replicas.items():  # replicated (mesh fsdp=1): the whole array on each device
            np.testing.assert_array_equal(value, first, err_msg=f"{leaf} on device {device}")
        noise = _key_bias(leaf, expected)
        if noise is not None:
            assert np.abs(first[noise]).max() < 1e-3 and np.abs(expected[noise]).max() < 1e-3, leaf
            first, expected = np.delete(first, np.r_[noise]), np.delete(expected, np.r_[noise])
            checked_key_bias += 1
        # 11 Adam steps turn rounding-level gradient differences into ~1e-6 parameter differences
        np.testing.assert_allclose(first, expected, rtol=1e-5, atol=2e-5, err_msg=leaf)
    assert checked_key_bias == 2  # one per block of the tiny encoder


def test_linear_probe_on_gathered_features_matches(runs):
    multi = json.loads(str(runs["process0"]["probe"]))
    ref = json.loads(str(runs["reference"]["probe"]))
    assert set(multi) == set(ref) == {"iteration_0", "iteration_1", "iteration_2"}
    for key in ref:
        assert multi[key]["top1_test"] == pytest.approx(ref[key]["top1_test"], abs=1.5 / 64)
        assert multi[key]["final_loss"] == pytest.approx(ref[key]["final_loss"], rel=1e-4)
    assert json.loads(str(runs["process1"]["probe"])) == multi  # process 1 reads what process 0 wrote


def test_only_process_zero_writes_and_every_process_checkpoints(runs):
    multi = runs["multi_dir"]
    assert json.loads((multi / "config.json").read_text())["batch_size"] == 16
    assert json.loads((multi / "DONE").read_text())["step"] == TOTAL_STEPS
    probe_steps = [json.loads(x)["step"] for x in (multi / "metrics.jsonl").read_text().splitlines() if "eval/" in x]
    assert probe_steps == [4, TOTAL_STEPS]
    kept = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [7, TOTAL_STEPS]  # the phase ends (max_to_keep=2)
    for step in kept:  # each process checkpoints its own data iterator
        grain_files = sorted(p.name for p in (multi / "checkpoints" / str(step) / "data").glob("process_*"))
        assert grain_files == ["process_0-of-2.json", "process_1-of-2.json"], step
    assert sorted(p.name for p in (multi / "encoders").iterdir()) == ["iteration_0", "iteration_1", "iteration_2"]


# ------------------------------------------------------------------ start-up: what initialize_distributed decides


@pytest.fixture
def fake_initialize(monkeypatch):
    """Records jax.distributed.initialize calls, on a machine that looks like no TPU VM and has no JAX_* set."""
    import jax
    from jax._src import cloud_tpu_init

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
    for name in DIST_VARS + entry.TPU_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_from_environment(fake_initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert entry.initialize_distributed()
    assert fake_initialize == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


def test_initialize_flags_win_over_environment(fake_initialize, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    assert entry.initialize_distributed("h:1", num_processes=2, process_id=0)
    assert fake_initialize == [{"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}]


def test_single_process_off_tpu_does_not_initialize(fake_initialize):
    assert not entry.initialize_distributed()
    assert fake_initialize == []


@pytest.mark.parametrize("variable", ["TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "TPU_ACCELERATOR_TYPE", None])
def test_cloud_tpu_initializes_without_arguments(fake_initialize, monkeypatch, variable):
    """TPU_WORKER_HOSTNAMES is not set on every TPU VM: other variables, or JAX's own Cloud TPU check, suffice."""
    if variable is None:
        from jax._src import cloud_tpu_init

        monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
    else:
        monkeypatch.setenv(variable, "v4-32" if variable == "TPU_ACCELERATOR_TYPE" else "1")
    assert entry.initialize_distributed()
    assert fake_initialize == [{}]


@pytest.mark.parametrize(
    "env, match",
    [
        ({"JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES"),
        ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES: expected an integer"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"process id 2 must lie in \[0, 2\)"),
    ],
)
def test_initialize_errors_name_the_variable(fake_initialize, monkeypatch, env, match):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        entry.initialize_distributed()
    assert fake_initialize == []


_FINETUNE_START = """
import json
import jax
from jax._src import cloud_tpu_init
calls = []
jax.distributed.initialize = lambda **kw: calls.append(kw)
jax.distributed.is_initialized = lambda: False
cloud_tpu_init.running_in_cloud_tpu_vm = False
from absl import flags
from bridle_jax import finetune_main
from bridle_jax import finetune
finetune.run = lambda config, workdir: {"preempted": True}  # the start-up is under test, not the fine-tune
flags.FLAGS(["finetune_main", "--config=configs/esc50_finetune.py", "--workdir=unused"] + EXTRA)
finetune_main.main([])
print("CALLS " + json.dumps(calls))
"""


@pytest.mark.parametrize(
    "env, extra, expected",
    [
        # a Cloud TPU VM, by a variable the old copy missed: every host joins the slice (the other cases of the
        # shared initialize_distributed are tested above through bridle_jax.main)
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, [], [{}]),
        ({"TPU_WORKER_ID": "1"}, ["--distributed=off"], []),
    ],
)
def test_finetune_entry_joins_the_hosts_as_pretraining_does(env, extra, expected):
    """`bridle_jax.finetune_main` starts through the same `initialize_distributed` as `bridle_jax.main`: on a simulated
    TPU VM (a TPU variable set, no coordinator) it joins the slice, where its old copy of the start-up checked fewer
    variables (not TPU_PROCESS_ADDRESSES) and left each such host fine-tuning alone."""
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS + entry.TPU_ENV_VARS}
    code = f"EXTRA = {extra!r}\n" + _FINETUNE_START
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("CALLS "))
    assert json.loads(line[len("CALLS ") :]) == expected


def test_finetune_entry_names_a_missing_process_count():
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS + entry.TPU_ENV_VARS}
    code = "EXTRA = []\n" + _FINETUNE_START
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "JAX_COORDINATOR_ADDRESS": "h:1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "JAX_NUM_PROCESSES" in out.stderr and "KeyError" not in out.stderr
