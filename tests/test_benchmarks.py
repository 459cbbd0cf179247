"""The benchmarks' shared synthetic batches (benchmarks/benchlib.py), the train-step benchmark's configs, and the
accelerator benchmark's toy run (benchmarks/accelerator.py --toy, the same code paths as on a device)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from bridle_jax import config_checks
from bridle_jax.models.bridle import build_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RECIPES = {  # recipe -> (modality, "input" shape of one example, what the encoder consumes, patches)
    "imagenet": ("image", (224, 224, 3), (224, 224, 3), 196),
    "audioset": ("audio", (164_080,), (1024, 128, 1), 512),  # 10.24 s at 16 kHz: (1024 - 1) x 160 + 400 samples
    "kinetics400": ("video", (16, 224, 224, 3), (16, 224, 224, 3), 1568),
}
STEPS = ("image_encoder", "image_tokenizer", "audio_encoder", "video_encoder")


@pytest.fixture(scope="module")
def bench():
    """The scripts' modules (run as scripts, they import each other from their own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import accelerator
        import benchlib
        import train_step

        yield {"benchlib": benchlib, "accelerator": accelerator, "train_step": train_step}
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_synthetic_batch_of_each_recipe_needs_no_data(bench, recipe):
    benchlib = bench["benchlib"]
    modality, example, model_input, patches = RECIPES[recipe]
    given = benchlib.load_config(str(ROOT / "configs" / f"{recipe}.py"))
    assert given.data.data_dir is None and given.modality == modality
    config = benchlib.without_data(given)
    config_checks.validate(config)  # data_dir unset is refused by the AudioSet and Kinetics checks: not here
    assert given.data.data_dir is None  # the recipe's config is left as it was

    batch = benchlib.numpy_batch(config, 2)
    assert batch["input"].shape == (2, *example) and batch["input"].dtype == np.float32
    assert batch["length"].dtype == np.int32 and np.all(batch["length"] == benchlib.full_length(config))
    assert np.all(np.isfinite(batch["input"]))
    abstract = benchlib.abstract_batch(config, 2)
    assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    # what the step makes of it: the encoder's input (audio: log-mels from the waveform) and every patch valid
    models = build_models(config)
    x, valid = jax.eval_shape(models.model_input, abstract)
    assert x.shape == (2, *model_input) and models.num_patches == patches
    assert (valid is None) == (modality == "image")
    if valid is not None:
        assert valid.shape == (2, patches)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_train_step_benchmark_builds_each_recipe(bench, recipe):
    train_step = bench["train_step"]
    args = train_step.parse_args(["--config", str(ROOT / "configs" / f"{recipe}.py")])
    config = train_step.make_config(args)
    config_checks.validate(config)
    assert config.modality == RECIPES[recipe][0] and config.batch_size == 8
    assert not train_step.is_reference_point(args)
    assert train_step.is_reference_point(train_step.parse_args([]))  # no --config: the sizes


def test_train_step_peer_runs_only_at_the_peers_sizes(bench):
    """--peer-python times the authors' step: only at the sizes it builds, so both sides do the same work."""
    train_step = bench["train_step"]
    peer = ["--peer-python", sys.executable, "--official", "/nonexistent"]
    train_step.check_peer_point(train_step.make_config(train_step.parse_args(peer)))  # the reference point
    audio = ["--config", str(ROOT / "configs" / "audioset.py"), "--batch", "2"]
    train_step.check_peer_point(train_step.make_config(train_step.parse_args(audio + peer)))
    with pytest.raises(SystemExit, match="model.decoder_depth=8"):
        train_step.check_peer_point(train_step.make_config(train_step.parse_args(["--decoder-depth", "8", *peer])))
    with pytest.raises(SystemExit, match="not 'video'"):
        video = ["--config", str(ROOT / "configs" / "kinetics400.py")]
        train_step.check_peer_point(train_step.make_config(train_step.parse_args(video + peer)))
    with pytest.raises(SystemExit):  # one without the other
        train_step.parse_args(["--peer-python", sys.executable])


def test_chip_peaks(bench):
    chip_peak = bench["accelerator"].chip_peak
    assert chip_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.0)
    assert chip_peak("NVIDIA H200") == ("H200", 989.0)
    assert chip_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert chip_peak("TPU v4") == ("TPU v4", 275.0)
    assert chip_peak("TPU v5 lite") == ("TPU v5e", 197.0)
    assert chip_peak("TPU v5") == ("TPU v5p", 459.0)
    assert chip_peak("TPU v6 lite") == ("TPU v6e", 918.0)
    for other in ("cpu", "NVIDIA H100 PCIe", "NVIDIA GeForce RTX 4090"):
        assert chip_peak(other) == (None, None)


def test_accelerator_toy_run(tmp_path):
    out = tmp_path / "toy.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "accelerator.py"), "--toy", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["toy"] and report["ok"] and report["failed"] == [] and report["recompiled"] == []
    assert report["platform"] == "cpu" and report["peak_bf16_tflops"] is None
    assert sorted(report["steps"]) == sorted(STEPS)
    for name, r in report["steps"].items():
        assert r["case"] == name and r["dtype"] == "bfloat16" and r["devices"] == 1
        assert r["modality"] == name.split("_")[0]
        assert r["phase"] == ("iter2_tokenizer" if name == "image_tokenizer" else "iter2_encoder")
        assert len(r["step_s"]["all"]) == r["timed_steps"] >= 1
        assert 0 < r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert r["samples_per_s"] == pytest.approx(r["global_batch"] / r["step_s"]["median"])
        assert r["flops_per_step_per_chip"] > 0 and r["achieved_tflops_per_s_per_chip"] > 0
        assert r["mfu"] is None and r["chip"] is None  # CPU: no peak in the table
        assert "peak_bytes_in_use" in r and r["compile_s"] > 0
        assert r["compilations"]["timed"] == 0 and not r["recompiled"]
        assert r["compilations"]["cache_size_before_timed"] == r["compilations"]["cache_size_after_timed"]
        assert r["loss_finite"]
    assert report["steps"]["video_encoder"]["remat"]  # the recipe's remat is kept at toy sizes
    assert report["steps"]["audio_encoder"]["patch_grid"] == [8, 4]
