"""notebooks/evaluate.ipynb executed headless (nbclient) on a tiny pretraining run: every cell runs, and what it
reports agrees with the run's own records and with NumPy recomputations.

One tiny plan per module (cold-start encoder 3 steps, tokenizer 2, encoder 3; probe on 96 examples). The notebook
runs in a fresh kernel with the run's workdir in BRIDLE_WORKDIR and MAX_EXAMPLES injected after its parameters
cell, papermill-style, equal to the run's probe cap: its probe must then reproduce linear_probe.json.
"""

import json
import os
import pathlib

import nbformat
import numpy as np
import pytest

from bridle_jax.data import pipeline
from tests.tiny import ROOT, tiny_config

NOTEBOOK = ROOT / "notebooks" / "evaluate.ipynb"
MAX_EXAMPLES = 96
KERNEL = "bridle_jax_test"


def _config():
    c = tiny_config()
    c.schedule.phases = ("encoder_cold_start:3", "tokenizer:2", "encoder:3")
    c.log_every_steps = 1
    c.evals.linear_probe.steps = 30
    c.evals.linear_probe.max_examples = MAX_EXAMPLES
    return c


def _parameters_cell(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from bridle_jax import train

    path = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(_config(), path)
    return path


@pytest.fixture(scope="module")
def executed(workdir, tmp_path_factory):
    """The notebook after a headless run, in a kernel of this interpreter registered in a temp dir (so whatever
    "python3" kernel the machine has, or lacks, does not matter)."""
    from ipykernel import kernelspec
    from nbclient import NotebookClient

    prefix = tmp_path_factory.mktemp("kernel")
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(_parameters_cell(nb) + 1, nbformat.v4.new_code_cell(f"MAX_EXAMPLES = {MAX_EXAMPLES}"))
    env = dict(os.environ, BRIDLE_WORKDIR=workdir, JAX_PLATFORMS="cpu")  # XLA_FLAGS: 8 devices, from conftest
    env.pop("BRIDLE_NOTEBOOK_OUT", None)  # the default OUT_DIR: <WORKDIR>/evaluate
    assert "xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))  # where this process looks the kernel up
        client = NotebookClient(
            nb,
            kernel_name=KERNEL,
            timeout=300,
            startup_timeout=120,
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # started in notebooks/, as Jupyter does
        )
        client.execute(env=env)  # raises CellExecutionError, with the traceback, on the first failing cell
    return nb, pathlib.Path(workdir) / "evaluate"


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_committed_notebook_is_clean_nbformat4():
    """The committed file: valid nbformat 4, no stored outputs, the documented parameters with their defaults."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    params = nb.cells[_parameters_cell(nb)].source
    assert 'WORKDIR = os.environ.get("BRIDLE_WORKDIR")' in params and "DEMO_STEPS =" in params
    assert "ITERATION = None" in params and "MAX_EXAMPLES =" in params
    install = code[0].source
    assert '"google.colab" in sys.modules' in install and "git+" in install and "nvidia-smi" in install
    assert install.count("REPO_URL = ") == 2  # the one constant, and its environment override


def test_notebook_uses_only_public_api():
    """No private function of the package (`module._name`) is called from the notebook."""
    import re

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.findall(r"\b(?:linear_probe|enc|encoder|pipeline|checkpoint|codebook|bridle_jax)\._\w+", code)


def _cell(nb, marker: str) -> str:
    hits = [c.source for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(hits) == 1, marker
    return hits[0]


@pytest.mark.parametrize(
    "runtime, expected",
    [
        ("cpu", "bridle_jax[plots] @ git+"),
        ("gpu", "bridle_jax[plots,gpu] @ git+"),
        ("tpu", "bridle_jax[plots,tpu] @ git+"),
    ],
)
def test_colab_install_cell_picks_the_runtimes_jax(runtime, expected, monkeypatch):
    """The install cell under a stand-in Colab (no pip run): the package from REPO_URL with the runtime's extra; a
    missing URL is a clear error; outside Colab it runs nothing."""
    import glob
    import importlib.util
    import shutil
    import subprocess
    import sys
    import types

    source = _cell(nbformat.read(NOTEBOOK, as_version=4), "def runtime_extras")
    ran = []

    class Done:
        returncode, stdout = 0, "GPU 0: NVIDIA T4 (UUID: GPU-0)\n"

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd) or Done())
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if runtime == "gpu" else None)
    monkeypatch.setattr(
        glob, "glob", lambda pattern: ["/dev/accel0"] if runtime == "tpu" and "accel" in pattern else []
    )
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bridle_jax" else real_find_spec(n, *a))

    exec(source, {})  # not on Colab: nothing installed  # noqa: S102
    assert ran == []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.delenv("BRIDLE_REPO_URL", raising=False)
    with pytest.raises(RuntimeError, match="Set REPO_URL"):
        exec(source, {})  # noqa: S102
    monkeypatch.setenv("BRIDLE_REPO_URL", "https://example.org/fork/bridle_jax.git")
    exec(source, {})  # noqa: S102
    pip = [cmd for cmd in ran if "pip" in cmd]
    assert len(pip) == 1 and f"{expected}https://example.org/fork/bridle_jax.git" in pip[0]
    monkeypatch.setenv("BRIDLE_REPO_URL", str(NOTEBOOK.parents[1]))  # a checkout on disk (e.g. on Google Drive)
    exec(source, {})  # noqa: S102
    extras = expected.split("[")[1].split("]")[0]
    assert [cmd for cmd in ran if "pip" in cmd][-1][5] == f"{NOTEBOOK.parents[1]}[{extras}]"


def test_auth_and_demo_cells(tmp_path, monkeypatch):
    """Auth runs only on Colab for a gs:// workdir; with no workdir the demo cell runs the digits recipe, shortened
    to DEMO_STEPS, into a temporary workdir (training stubbed here)."""
    import sys
    import types

    from bridle_jax import train

    nb = nbformat.read(NOTEBOOK, as_version=4)
    auth_source = _cell(nb, "authenticate_user")
    calls = []
    colab = types.ModuleType("google.colab")
    colab.auth = types.SimpleNamespace(authenticate_user=lambda: calls.append("auth"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    for in_colab, workdir in [(False, "gs://b/run"), (True, "/tmp/run"), (True, None), (True, "gs://b/run")]:
        exec(auth_source, {"IN_COLAB": in_colab, "WORKDIR": workdir})  # noqa: S102
    assert calls == ["auth"]

    demo_source = _cell(nb, "train.train_and_evaluate(demo_config, WORKDIR)")
    runs = []
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: runs.append((config, workdir)))
    monkeypatch.chdir(tmp_path)  # no workdirs/digits here
    namespace = {"os": os, "IN_COLAB": False, "WORKDIR": None, "DEMO_STEPS": 4}
    exec(demo_source, namespace)  # noqa: S102
    ((config, workdir),) = runs
    assert config.data.name == "digits" and tuple(config.schedule.phases) == (
        "encoder_cold_start:4",
        "tokenizer:2",
        "encoder:4",
    )
    assert namespace["WORKDIR"] == workdir and workdir.endswith("bridle_jax_demo_4")
    namespace = {"os": os, "IN_COLAB": False, "WORKDIR": "/some/run", "DEMO_STEPS": 4}
    exec(demo_source, namespace)  # noqa: S102
    assert len(runs) == 1 and namespace["WORKDIR"] == "/some/run"  # a given workdir: no demo run


def test_every_cell_ran_without_error(executed):
    nb, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    # training curves, codebook curves, encoder accuracy, codebook use, embedded digits, confusion matrices
    assert len(images) >= 6
    assert "Linear probe top-1 (encoder of iteration 2)" in _text(nb)


def test_probe_reproduces_the_run_and_confusion_matrix(workdir, executed):
    """Same encoder, same examples, same seed and settings: the probe equals the one the run logged, and the
    confusion matrix holds every test example, by true class, with the probe's top-1 on its diagonal."""
    _, out = executed
    summary = json.loads((out / "evaluate_summary.json").read_text())
    logged = json.loads((pathlib.Path(workdir) / "linear_probe.json").read_text())
    assert summary["iteration"] == 2 and summary["max_examples"] == MAX_EXAMPLES
    assert set(summary["probe"]) == {"iteration_0", "iteration_2"}
    for key, result in summary["probe"].items():
        assert result["top1_test"] == logged[key]["top1_test"]
        assert result["top1_train"] == logged[key]["top1_train"]
        np.testing.assert_allclose(result["final_loss"], logged[key]["final_loss"], rtol=1e-5)

    config = _config()
    labels = pipeline.eval_arrays(config.data, config.evals.linear_probe.test_split, MAX_EXAMPLES)["label"]
    for key, matrix in summary["confusion_matrix"].items():
        cm = np.asarray(matrix)
        assert cm.shape == (10, 10)
        np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels, minlength=10))
        assert np.trace(cm) / MAX_EXAMPLES == pytest.approx(summary["probe"][key]["top1_test"], abs=1e-12)
    assert summary["embed_max_abs_diff"] < 1e-5  # enc.embed on raw digits == pooled eval features


def test_codebook_health_and_figures_written(executed):
    _, out = executed
    health = json.loads((out / "codebook_health.json").read_text())
    assert health["num_examples"] == MAX_EXAMPLES and health["step"] == 8 and health["tokenizer"] == "tokenizer"
    assert health["num_valid_patches"] == MAX_EXAMPLES * 16  # 16x16 images, 4x4 patches
    assert len(health["levels"]) == 2
    for level in health["levels"]:
        counts = np.asarray(level["counts"], np.float64)
        assert counts.sum() == health["num_valid_patches"]
        p = counts[counts > 0] / counts.sum()
        np.testing.assert_allclose(level["perplexity"], 2.0 ** -np.sum(p * np.log2(p)), rtol=1e-12)
    summary = json.loads((out / "evaluate_summary.json").read_text())
    assert [lv["perplexity"] for lv in summary["codebook_health"]["levels"]] == [
        lv["perplexity"] for lv in health["levels"]
    ]
    for name in (
        "training_curves.png",
        "codebook_curves.png",
        "encoder_accuracy.png",
        "codebook_usage.png",
        "embed_digits.png",
        "confusion_matrix.png",
        "codebook_usage_level0.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def _tensorboard_tags(workdir) -> set:
    """Every scalar tag in the run's TensorBoard event files (TFRecord framing: length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in (pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + length + 4
    return tags


def test_encoder_accuracy_and_position_only_baseline(workdir, executed):
    """Every logged step of an encoder phase has, per level, the masked-prediction accuracy and its position-only
    baseline, in metrics.jsonl and TensorBoard; the notebook's table holds the last logged step of each phase."""
    _, out = executed
    levels = _config().quantizer.num_levels
    keys = [f"train/encoder/{name}_level{m}" for name in ("accuracy", "position_only_accuracy") for m in range(levels)]
    lines = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    encoder_lines = [r for r in lines if "encoder" in r["phase"] and "train/loss" in r]
    assert {r["phase"] for r in encoder_lines} == {"iter1_encoder", "iter2_encoder"}
    assert len(encoder_lines) == 6  # log_every_steps = 1, 3 steps per encoder phase
    for r in encoder_lines:
        for k in keys:
            assert 0.0 <= r[k] <= 1.0, (r["step"], k)
    assert not [k for r in lines if "tokenizer" in r["phase"] for k in r if "position_only" in k]
    assert set(keys) <= _tensorboard_tags(workdir)
    table = json.loads((out / "evaluate_summary.json").read_text())["encoder_accuracy"]
    assert set(table) == {"iter1_encoder", "iter2_encoder"}
    for phase, entry in table.items():
        last = max((r for r in encoder_lines if r["phase"] == phase), key=lambda r: r["step"])
        assert entry["step"] == last["step"]
        assert entry["accuracy"] == [last[f"train/encoder/accuracy_level{m}"] for m in range(levels)]
        assert entry["position_only_accuracy"] == [
            last[f"train/encoder/position_only_accuracy_level{m}"] for m in range(levels)
        ]
