"""The bad-input battery: configs, workdirs, checkpoints and the per-modality files and records. Every kind must end
in a clear error naming the culprit (field, file, row) or in a counted skip, and never damage an existing
checkpoint. The deeper per-module cases live next to each module's tests; this file is the one place that tries
them all, through the public entry points."""

import hashlib
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import soundfile

from bridle_jax import config_checks, paths, sharding, train
from bridle_jax.data import audio, audio_pipeline, audio_sources, csv_files, sources, video, video_sources
from tests.tiny import ROOT, load_config, tiny_config


def _set(c, dotted, value):
    *path, leaf = dotted.split(".")
    for part in path:
        c = c[part]
    c[leaf] = value


def _tree_hash(path) -> str:
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.nonexistent=3", "nonexistent"),  # 1 unknown field
        ("--config.batch_size=many", "batch_size"),  # 2 wrong type
    ],
)
def test_command_line_overrides_are_checked(override, message, tmp_path):
    """Through the real entry point: the run stops before anything is written, naming the field."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "bridle_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path}/w", override]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.name", "mnist", r"config.data.name: expected one of"),  # 3 unknown dataset
        ("modality", "audio", r"config.data.name: expected a dataset of modality 'audio'"),  # 4 modality mismatch
        ("model.variant", "B16", r"config.model.variant"),  # 5 malformed variant
        ("model.decoder_heads", 3, r"config.model.decoder_width: expected a multiple of model.decoder_heads"),  # 6
        ("optim.encoder.lr", -1.0, r"config.optim.encoder.lr: expected > 0"),  # 7
        ("schedule.phases", ("encoder:10",), r"config.schedule.phases"),  # 8 plan without a cold start
        ("quantizer.decay", 1.5, r"config.quantizer.decay"),  # 9
        ("data.image_size", 30, r"config.data.image_size: expected a positive multiple of the patch size"),  # 10
        ("masking.ratio", 1.0, r"config.masking.ratio"),  # 11
    ],
)
def test_config_fields_are_validated_by_name(field, value, message):
    c = tiny_config()
    _set(c, field, value)
    with pytest.raises(ValueError, match=message):
        config_checks.validate(c)


def test_missing_data_dir_names_the_field():  # 12
    for name in ("audioset", "kinetics400"):
        with pytest.raises(ValueError, match=r"config.data.data_dir"):
            config_checks.validate(load_config(name))


def test_impossible_mesh_and_indivisible_batch():  # 13, 14
    with pytest.raises(ValueError, match=r"config.mesh: data=3 x fsdp=1 != 8 devices"):
        sharding.make_mesh(ml_mesh(3, 1))
    with pytest.raises(ValueError, match=r"config.mesh: 8 devices are not divisible"):
        sharding.make_mesh(ml_mesh(-1, 3))
    mesh = sharding.make_mesh(ml_mesh(-1, 1))
    with pytest.raises(ValueError, match=r"config.batch_size: expected a multiple of .*8 batch shards.*, got 12"):
        sharding.local_batch_size(12, mesh)


def ml_mesh(data, fsdp):
    import ml_collections

    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


# ------------------------------------------------------------------------------------------------ workdirs


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir holding checkpoints of the tiny run (steps 4 and 6: stopped at the end of the first phase)."""
    workdir = tmp_path_factory.mktemp("run")
    c = tiny_config()
    c.evals.linear_probe.enabled = False
    train.train_and_evaluate(c, str(workdir), stop_at_step=6)
    return workdir, c


def test_unwritable_workdir_is_named(tmp_path):  # 15
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"workdir .*a_file/run: cannot create or write there"):
        train.train_and_evaluate(tiny_config(), str(blocker / "run"))


def test_workdir_of_another_config_is_refused_and_left_intact(trained_workdir):  # 16
    workdir, _ = trained_workdir
    before = _tree_hash(workdir)
    other = tiny_config()
    other.quantizer.codebook_size = 32
    with pytest.raises(ValueError, match=r"another config.*quantizer.codebook_size: 16 -> 32"):
        train.train_and_evaluate(other, str(workdir))
    assert _tree_hash(workdir) == before


def test_corrupt_newest_checkpoint_falls_back_and_is_kept_aside(trained_workdir, tmp_path, caplog):  # 17
    workdir, c = trained_workdir
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2
    newest = copy / "checkpoints" / str(steps[-1])
    for f in (newest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 4)
    result = train.train_and_evaluate(c, str(copy), stop_at_step=steps[-2] + 1)
    assert int(result["final_state"].step) == steps[-2] + 1  # resumed from the previous step and went on
    assert (copy / "checkpoints" / f"{steps[-1]}.unreadable").exists()  # kept for inspection, not deleted
    assert "cannot be restored" in caplog.text


# ------------------------------------------------------------------------------------------------ audio files


@pytest.fixture()
def esc50(tmp_path):
    root = tmp_path / "esc50"
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(0)
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i in range(6):
        soundfile.write(root / "audio" / f"c{i}.wav", 0.1 * rng.normal(size=8000).astype(np.float32), 16000)
        rows.append(f"c{i}.wav,{1 + i % 5},{i % 3},cat{i % 3},False,src{i},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def test_corrupt_truncated_and_nonfinite_audio_are_named(esc50):  # 18, 19, 20, 21
    bad = esc50 / "audio" / "c0.wav"
    bad.write_bytes(b"RIFF\x00\x00not audio at all")
    with pytest.raises(audio.AudioDecodeError, match="c0.wav"):
        audio.load_audio(bad)
    good = (esc50 / "audio" / "c1.wav").read_bytes()
    (esc50 / "audio" / "cut.wav").write_bytes(good[: len(good) // 2])
    with pytest.raises(audio.AudioDecodeError, match="cut.wav"):
        audio.load_audio(esc50 / "audio" / "cut.wav")
    wave = np.ones(1600, np.float32)
    wave[7] = np.nan
    soundfile.write(esc50 / "audio" / "nan.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(audio.AudioDecodeError, match=r"nan.wav.*(NaN|non-finite)"):
        audio.load_audio(esc50 / "audio" / "nan.wav")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio.load_audio(esc50 / "audio" / "missing.wav")


def test_malformed_rows_unknown_labels_and_escaping_paths_are_named(esc50, tmp_path):  # 22, 23, 24
    csv = esc50 / "meta" / "esc50.csv"
    csv.write_text(csv.read_text() + "c9.wav,two,1,cat,False,src,A\n")
    with pytest.raises(ValueError, match=r"esc50.csv.* row 8.*fold"):
        audio_sources.ESC50Source(esc50, folds=(1, 2))
    with pytest.raises(ValueError, match=r"leaves|outside|escape|\.\."):
        csv_files.resolve_inside(str(esc50), "../../etc/passwd", "CSV row 3")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "list.csv").write_text("path,label\n/etc/passwd,dog\n")
    with pytest.raises(ValueError, match=r"list.csv.*(absolute|leaves|outside)"):
        audio_sources.FolderCsvSource(tmp_path / "f", "list.csv")
    (tmp_path / "f" / "train.csv").write_text("path,label\na.wav,0\n")
    (tmp_path / "f" / "test.csv").write_text("path,label\na.wav,7\n")
    soundfile.write(tmp_path / "f" / "a.wav", np.zeros(800, np.float32), 16000)
    with pytest.raises(ValueError, match=r"test.csv.*label"):
        audio_sources.FolderCsvSource(tmp_path / "f", "test.csv", num_classes=1)


def test_unreadable_clips_are_skipped_counted_and_capped(esc50):  # 25, 26
    (esc50 / "audio" / "c2.wav").write_bytes(b"broken")
    (esc50 / "audio" / "c3.wav").unlink()
    c = load_config("sounds")
    c.data.name, c.data.data_dir, c.data.target_frames, c.data.max_skipped = "esc50", str(esc50), 48, 5
    c.data.train_folds, c.data.test_folds = (1, 2, 3, 4, 5), (5,)
    start = audio_pipeline.skipped_count()
    batch = next(iter(audio_pipeline.train_dataset(c.data, local_batch_size=6, seed=0)))
    assert batch["input"].shape[0] == 6 and np.isfinite(batch["input"]).all()
    assert audio_pipeline.skipped_count() - start == 2  # both bad files, each counted once
    c.data.max_skipped = 0
    audio_pipeline.SKIPPED.reset()
    with pytest.raises(RuntimeError, match=r"config.data.max_skipped=0"):
        list(zip(range(2), iter(audio_pipeline.train_dataset(c.data, local_batch_size=6, seed=1))))


# ------------------------------------------------------------------------------------------------ video files


def test_corrupt_truncated_and_empty_videos_are_named(tmp_path):  # 27, 28, 29
    frames = np.random.default_rng(1).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    good = tmp_path / "good.mp4"
    video.write_video(good, frames)
    assert video.read_frames(good).shape == (6, 16, 16, 3)
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    with pytest.raises(video.VideoDecodeError, match="junk.mp4"):
        video.read_frames(tmp_path / "junk.mp4")
    data = pathlib.Path(good).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(video.VideoDecodeError, match="cut.mp4"):
        video.read_frames(tmp_path / "cut.mp4")
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        video.read_frames(tmp_path / "nothing.mp4")
    (tmp_path / "clips.csv").write_text("path,label,split\n../outside.mp4,1,train\n")
    with pytest.raises(ValueError, match=r"clips.csv"):
        video_sources.FolderCsvSource(tmp_path, tmp_path / "clips.csv", split="train")


# ------------------------------------------------------------------------------------------------ records, security


def test_bad_image_records_are_named():  # 30
    with pytest.raises(ValueError, match="imagenet2012 record 3: 'image' must be uint8"):
        sources.check_record({"image": np.zeros((4, 4, 3), np.float32), "label": 1}, 3, "imagenet2012")
    with pytest.raises(ValueError, match="'label' must be a non-negative integer"):
        sources.check_record({"image": np.zeros((4, 4, 3), np.uint8), "label": -2}, 4, "imagenet2012")


def test_nothing_loads_code_from_data_checkpoints_or_configs_it_did_not_choose():  # 31
    """No pickle, eval or exec in the package: checkpoints are Orbax/TensorStore + JSON, configs are the Python
    files the user passes on the command line (documented), datasets are decoded media and CSV."""
    import re

    pattern = re.compile(r"import pickle|pickle\.load|cloudpickle|allow_pickle=True|(?<![\w.])(eval|exec)\(")
    offenders = []
    for path in (ROOT / "bridle_jax").rglob("*.py"):
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert not offenders, offenders
    assert len(jax.devices()) == 8  # the battery runs on the fake mesh like everything else
    assert os.path.isdir(paths.workdir_path(ROOT))
