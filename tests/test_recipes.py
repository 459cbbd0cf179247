"""--config takes a recipe name or a path (bridle_jax/recipes.py), from a checkout and from an installed wheel, which
ships the recipes (setup.py: configs/ -> bridle_jax/configs)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
from absl import flags

from bridle_jax import recipes
from tests.tiny import ROOT

RECIPES = sorted(p[:-3] for p in os.listdir(ROOT / "configs") if p.endswith(".py") and not p.startswith("_"))


def test_names_and_configs_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    imagenet = str(ROOT / "configs" / "imagenet.py")
    for value in ("imagenet", "imagenet.py", "configs/imagenet.py", "./configs/imagenet.py"):
        assert recipes.resolve(value) == imagenet, value
    assert (
        recipes.resolve("configs/audioset_finetune.py:as20k")
        == str(ROOT / "configs" / "audioset_finetune.py") + ":as20k"
    )
    assert recipes.available() == RECIPES

    mine = tmp_path / "configs" / "imagenet.py"  # a file that exists is used as given
    mine.parent.mkdir()
    mine.write_text("def get_config(arg=None):\n    return None\n")
    assert recipes.resolve("configs/imagenet.py") == "configs/imagenet.py"
    assert recipes.resolve(str(mine) + ":v") == f"{mine}:v"


@pytest.mark.parametrize("value", ["nope", "configs/nope.py", "elsewhere/imagenet.py", "configs/_private", ""])
def test_anything_else_is_refused_with_the_list_of_recipes(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        recipes.resolve(value)
    assert f"--config={value}: no such config file" in str(e.value)
    assert ", ".join(RECIPES) in str(e.value)


def test_the_flag_takes_names_variants_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--config=audioset_finetune:as20k", "--config.batch_size=8"]
    fv = flags.FlagValues()
    recipes.DEFINE_config_flag("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    expected = recipes.load("audioset_finetune:as20k")
    assert fv.config.batch_size == 8 and fv.config.epochs == expected.epochs == 150
    assert recipes.load("audioset_finetune").epochs != expected.epochs  # the variant reached get_config

    bad = ["prog", "--config=imagenett"]
    fv = flags.FlagValues()
    recipes.DEFINE_config_flag("config", flag_values=fv, sys_argv=bad)
    with pytest.raises(flags.IllegalFlagValueError, match="no recipe of that name.*imagenet"):
        fv(bad)


def test_main_reports_an_unknown_recipe_at_start_up(tmp_path):
    cmd = [sys.executable, "-m", "bridle_jax.main", "--config=imagenett", f"--workdir={tmp_path}/w"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--config=imagenett: no such config file, and no recipe of that name" in proc.stderr
    assert "digits" in proc.stderr and not os.path.exists(tmp_path / "w")


def _can_build_offline() -> bool:
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_the_wheel_ships_the_recipes_and_they_resolve_outside_the_checkout(tmp_path):
    if not _can_build_offline():
        pytest.skip("building a wheel without network needs setuptools>=70.1 or `wheel` (the test extra has both)")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to setup.py
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    for name in ("bridle_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
    ]
    subprocess.run([*cmd, str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("bridle_jax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    for name in RECIPES:
        assert f"bridle_jax/configs/{name}.py" in names, name
    assert "bridle_jax/recipes.py" in names

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(
        f"""
        import os, bridle_jax
        from absl import flags
        from bridle_jax import recipes
        site = {str(site)!r}
        assert bridle_jax.__file__.startswith(site), bridle_jax.__file__  # the installed copy, not the checkout
        installed = os.path.join(site, "bridle_jax", "configs", "imagenet.py")
        assert recipes.resolve("imagenet") == installed
        assert recipes.resolve("configs/imagenet.py") == installed
        assert recipes.load("imagenet").data.name == "imagenet2012"
        argv = ["prog", "--config=configs/audioset_finetune.py:as20k", "--config.batch_size=8"]
        fv = flags.FlagValues()
        recipes.DEFINE_config_flag("config", flag_values=fv, sys_argv=argv)
        fv(argv)
        assert fv.config.batch_size == 8
        print("ok", ",".join(recipes.available()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok " + ",".join(RECIPES)
