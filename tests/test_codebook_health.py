"""Codebook health evaluator on a real (tiny) run: counts, statistics vs a NumPy recomputation, EMA off, plots,
errors. One short training per module (cold-start encoder 2 steps, tokenizer 2 steps), probe off."""

import dataclasses
import json
import logging
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from bridle_jax import quantizer, steps, train
from bridle_jax.data import pipeline
from bridle_jax.evaluators import codebook
from tests.tiny import tiny_config

NUM_EXAMPLES = 40
BATCH = 16  # 40 examples -> chunks of 16, 16, 8 (+8 padding)
PATCHES = 16  # 16x16 images, 4x4 patches


def _config():
    c = tiny_config()
    c.schedule.phases = ("encoder_cold_start:2", "tokenizer:2")
    c.evals.linear_probe.enabled = False
    c.checkpoint.max_to_keep = 10  # keep the iteration-1 checkpoint (step 2) next to the last one (step 4)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    summary = train.train_and_evaluate(_config(), workdir)
    return workdir, summary["final_state"]


def _checkpoint_files(workdir):
    root = os.path.join(workdir, "checkpoints")
    return {
        os.path.join(d, name): os.stat(os.path.join(d, name)).st_mtime_ns
        for d, _, names in os.walk(root)
        for name in names
    }


@pytest.fixture(scope="module")
def report(run):
    """The default report (newest checkpoint), with the checkpoint files' mtimes before and after it."""
    workdir, _ = run
    before = _checkpoint_files(workdir)
    result = codebook.codebook_health(workdir, max_examples=NUM_EXAMPLES, batch_size=BATCH)
    result["_checkpoint_files"] = (before, _checkpoint_files(workdir))
    return result


def _codes_of(state, cold_start, config):
    """Independent recomputation: the tokenizer on the whole split at once (one device, one call), then
    `quantize`."""
    models = codebook.bridle.build_models(config)
    arrays = pipeline.eval_arrays(config.data, pipeline.eval_split(config.data), NUM_EXAMPLES)
    q = config.quantizer

    @jax.jit
    def fn(params, codebooks, batch):
        x, valid = models.model_input(batch)
        z = steps.tokenizer_features(models, params, x, cold_start=cold_start)
        return quantizer.quantize(codebooks, z, normalize_stage_inputs=q.normalize_stage_inputs), z, valid

    host = jax.device_get((state.params, state.codebooks))
    out, z, valid = fn(*host, {"input": arrays["input"], "length": arrays["length"]})
    assert valid is None  # images: every patch is valid
    return out, z


def _numpy_level_stats(counts):
    counts = np.asarray(counts, np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    ue = -np.sum(nz * np.log2(nz))
    cur = np.mean(counts > 0)
    return {"utilisation": cur, "entropy_bits": ue, "perplexity": 2.0**ue, "ecu": cur / (ue * np.log(counts.size))}


def test_report_has_every_field_and_counts_every_valid_patch(run, report):
    workdir, _ = run
    with open(os.path.join(workdir, codebook.HEALTH_FILE), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps({k: v for k, v in report.items() if k != "_checkpoint_files"}))
    assert report["step"] == 4 and report["phase"] == "iter2_tokenizer" and report["tokenizer"] == "tokenizer"
    assert report["codebooks_initialized"] is True
    assert report["num_examples"] == NUM_EXAMPLES
    assert report["num_patches"] == report["num_valid_patches"] == NUM_EXAMPLES * PATCHES
    assert report["num_padded_patches"] == 0 and report["num_nonfinite_patches"] == 0
    assert report["num_levels"] == 2 and report["codebook_size"] == 16 and len(report["levels"]) == 2
    fields = {"utilisation", "num_used_codes", "entropy_bits", "perplexity", "normalised_entropy", "ecu"}
    fields |= {"q_norm", "codebook_norm", "counts", "sorted_counts", "level"}
    for m, level in enumerate(report["levels"]):
        assert fields <= set(level) and level["level"] == m
        assert sum(level["counts"]) == report["num_valid_patches"]
        assert level["sorted_counts"] == sorted(level["counts"], reverse=True)
        for key in ("count", "mean", "std", "min", "max"):
            assert key in level["q_norm"] and key in level["codebook_norm"]
    for name in ("z_norm", "z_q_norm", "error_norm", "relative_error"):
        assert report[name]["count"] == report["num_valid_patches"]


def test_statistics_equal_numpy_recomputation(run, report):
    workdir, final_state = run
    config = codebook.workdir_lib.read_config(workdir)
    out, z = _codes_of(final_state, False, config)
    codes = np.asarray(out.codes).reshape(-1, 2)
    for m, level in enumerate(report["levels"]):
        counts = np.bincount(codes[:, m], minlength=16)
        np.testing.assert_array_equal(level["counts"], counts)
        ref = _numpy_level_stats(counts)
        for key, value in ref.items():
            assert level[key] == pytest.approx(value, rel=1e-12), key
        assert level["num_used_codes"] == int(np.sum(counts > 0))
        assert level["normalised_entropy"] == pytest.approx(ref["entropy_bits"] / 4.0, rel=1e-12)
        norms = np.asarray(out.code_norms).reshape(-1, 2)[:, m].astype(np.float64)
        for key, value in (("mean", norms.mean()), ("std", norms.std()), ("min", norms.min()), ("max", norms.max())):
            assert level["q_norm"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        books = np.asarray(final_state.codebooks.codes, np.float64)[m]
        assert level["codebook_norm"]["mean"] == pytest.approx(np.linalg.norm(books, axis=-1).mean(), rel=1e-12)
    z = np.asarray(z, np.float64).reshape(-1, 8)
    z_q = np.asarray(out.z_q, np.float64).reshape(-1, 8)
    assert report["z_norm"]["mean"] == pytest.approx(np.linalg.norm(z, axis=-1).mean(), rel=1e-5)
    assert report["z_q_norm"]["max"] == pytest.approx(np.linalg.norm(z_q, axis=-1).max(), rel=1e-5)
    assert report["error_norm"]["mean"] == pytest.approx(np.linalg.norm(z - z_q, axis=-1).mean(), rel=1e-4)


def test_padded_patches_are_not_counted(run):
    """The validity mask of padded inputs (audio, video) reaches the counts: the image run's models are told that
    the input's rows are time steps and given random lengths, so later patch rows count as padding."""
    workdir, final_state = run
    restored = codebook.restore_run(workdir)
    restored = dataclasses.replace(
        restored, models=dataclasses.replace(restored.models, modality="audio", time_patch=4)
    )
    config = restored.config
    arrays = pipeline.eval_arrays(config.data, pipeline.eval_split(config.data), NUM_EXAMPLES)
    lengths = np.random.default_rng(7).integers(1, 17, size=NUM_EXAMPLES).astype(np.int32)
    acc = codebook.collect_counts(restored, {"input": arrays["input"], "length": lengths}, batch_size=BATCH)
    rows_valid = np.arange(4)[None, :] * 4 < lengths[:, None]  # [40, 4] patch rows whose first pixel row is real
    valid = np.repeat(rows_valid, 4, axis=1)  # [40, 16]
    assert acc["num_valid_patches"] == int(valid.sum()) < NUM_EXAMPLES * PATCHES
    assert acc["num_padded_patches"] == NUM_EXAMPLES * PATCHES - int(valid.sum())
    out, _ = _codes_of(final_state, False, config)
    codes = np.asarray(out.codes)[valid]  # the codes do not depend on the mask, only what is counted does
    for m in range(2):
        np.testing.assert_array_equal(acc["counts"][m], np.bincount(codes[:, m], minlength=16))


def test_iteration_one_uses_the_cold_start_tokenizer(run, tmp_path):
    workdir, final_state = run
    rep = codebook.codebook_health(
        workdir, iteration=1, max_examples=NUM_EXAMPLES, batch_size=BATCH, out_dir=str(tmp_path), plots=False
    )
    assert rep["step"] == 2 and rep["iteration"] == 1 and rep["tokenizer"] == "cold_start"
    assert sorted(os.listdir(tmp_path)) == [codebook.HEALTH_FILE]
    restored = codebook.restore_run(workdir, iteration=1)
    assert restored.cold_start and restored.step == 2
    # the tokenizer phase re-initialised and trained the codebooks: iteration 1's are different ones
    assert not np.array_equal(np.asarray(restored.state.codebooks.codes), np.asarray(final_state.codebooks.codes))
    config = codebook.workdir_lib.read_config(workdir)
    out, _ = _codes_of(restored.state, True, config)
    codes = np.asarray(out.codes).reshape(-1, 2)
    for m, level in enumerate(rep["levels"]):
        np.testing.assert_array_equal(level["counts"], np.bincount(codes[:, m], minlength=16))


def test_ema_is_off_and_checkpoints_untouched(run, report):
    workdir, final_state = run
    before, after = report["_checkpoint_files"]
    assert before and before == after  # nothing written, moved or cleaned up
    restored = codebook.restore_run(workdir)
    assert restored.step == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        restored.state.codebooks,
        final_state.codebooks,
    )
    # the report measured exactly those codebooks: had an EMA step run during the pass, norms would have moved
    books = np.asarray(final_state.codebooks.codes, np.float64)
    for m, level in enumerate(report["levels"]):
        assert level["codebook_norm"]["max"] == pytest.approx(np.linalg.norm(books[m], axis=-1).max(), rel=1e-12)


def test_plots_are_valid_pngs(run, report):
    workdir, _ = run
    names = [codebook.USAGE_PLOT.format(level=m) for m in range(2)] + [codebook.NORMS_PLOT]
    assert set(names) <= set(report["files"])
    for name in names:
        path = os.path.join(workdir, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 200


def test_cli_writes_the_report(run, tmp_path, capsys):
    workdir, _ = run
    out = tmp_path / "cli"
    codebook.main(
        [f"--workdir={workdir}", f"--max_examples={NUM_EXAMPLES}", f"--batch_size={BATCH}", f"--out_dir={out}"]
    )
    assert sorted(os.listdir(out)) == sorted(
        [codebook.HEALTH_FILE, codebook.NORMS_PLOT] + [codebook.USAGE_PLOT.format(level=m) for m in range(2)]
    )
    printed = capsys.readouterr().out
    assert "step 4" in printed and "perplex" in printed


def test_bad_workdirs_raise_clear_errors(run, tmp_path):
    workdir, _ = run
    with pytest.raises(FileNotFoundError, match="no such workdir"):
        codebook.codebook_health(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not a bridle_jax workdir"):
        codebook.codebook_health(str(tmp_path))
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), only_config / "config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        codebook.codebook_health(str(only_config))
    with pytest.raises(
        ValueError, match=r"iteration=5: no checkpoint .* available: 2 \(iteration 1\), 4 \(iteration 2\)"
    ):
        codebook.restore_run(workdir, iteration=5)
    with pytest.raises(ValueError, match="step=3: no checkpoint of that step"):
        codebook.restore_run(workdir, step=3)


def test_level_statistics_hand_cases():
    stats = codebook.level_statistics([[4, 0, 0, 4], [1, 1, 1, 1], [0, 7, 0, 0]])
    assert stats[0]["utilisation"] == 0.5 and stats[0]["entropy_bits"] == pytest.approx(1.0)
    assert stats[0]["perplexity"] == pytest.approx(2.0) and stats[0]["num_used_codes"] == 2
    assert stats[1]["entropy_bits"] == pytest.approx(2.0) and stats[1]["normalised_entropy"] == pytest.approx(1.0)
    assert stats[1]["ecu"] == pytest.approx(1.0 / (2.0 * np.log(4)))
    assert stats[2]["entropy_bits"] == 0.0 and stats[2]["perplexity"] == 1.0 and stats[2]["ecu"] is None
    with pytest.raises(ValueError, match="counts"):
        codebook.level_statistics([[1, -1]])


def test_without_matplotlib_the_json_is_written_and_the_plots_skipped(run, tmp_path, monkeypatch, capsys, caplog):
    """A plain `pip install` has no matplotlib (it is the `plots` extra): the CLI still writes its JSON."""
    workdir, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "no_plots"
    with caplog.at_level(logging.WARNING):
        report = codebook.main(
            [f"--workdir={workdir}", f"--max_examples={NUM_EXAMPLES}", f"--batch_size={BATCH}", f"--out_dir={out}"]
        )
    assert sorted(os.listdir(out)) == [codebook.HEALTH_FILE]
    assert report["files"] == [codebook.HEALTH_FILE]
    written = json.loads((out / codebook.HEALTH_FILE).read_text())
    assert written["levels"] and "bridle_jax[plots]" in written["plots_skipped"]
    assert "matplotlib is not installed" in caplog.text
    assert "plots not written" in capsys.readouterr().out
