"""The recipes (configs/*.py) by name or path, from a checkout or an installed package: `--config=imagenet`.

The recipes are shipped inside the package (`bridle_jax/configs/`, from the checkout's `configs/`; see setup.py),
so after a plain `pip install` every command line takes any of

    --config=configs/imagenet.py      a file relative to the current folder (a checkout), or else the recipe
    --config=imagenet                 the recipe of that name (also imagenet.py)
    --config=path/to/my_config.py     any config file
    --config=configs/audioset_finetune.py:as20k    a variant: everything after the first ':' goes to get_config

A path that exists is always used as given. `configs/NAME.py`, `NAME.py` and `NAME` that do not exist relative to
the current folder are looked up among the recipes: the checkout's `configs/` next to the package first (an
editable install or a run from the checkout), then the installed copy. Anything else is refused with the list of
recipes. `DEFINE_config_flag` is `config_flags.DEFINE_config_file` with that resolution, used by every CLI with
--config (bridle_jax.main, bridle_jax.finetune_main, bridle_jax.convert).
"""

from __future__ import annotations

import os
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
RECIPE_FOLDER = "configs"


def recipe_dirs() -> list[pathlib.Path]:
    """Where recipes are looked up, in order: the checkout's configs/ (beside the package, when the package is a
    checkout's: setup.py next to it), then the installed copy (bridle_jax/configs/)."""
    checkout = PACKAGE_DIR.parent
    candidates = [checkout / RECIPE_FOLDER] if (checkout / "setup.py").is_file() else []
    candidates.append(PACKAGE_DIR / RECIPE_FOLDER)
    return [d for d in candidates if d.is_dir()]


def available() -> list[str]:
    """The recipe names (sorted, without .py) over all recipe folders."""
    names = set()
    for folder in recipe_dirs():
        names.update(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))
    return sorted(names)


def _recipe_name(path: str) -> str | None:
    """NAME for `NAME`, `NAME.py`, `configs/NAME` and `configs/NAME.py` (also ./configs/...); None otherwise."""
    head, tail = os.path.split(os.path.normpath(path))
    if head not in ("", RECIPE_FOLDER) or not tail or tail.startswith("_"):
        return None
    name = tail[:-3] if tail.endswith(".py") else tail
    return name if name.isidentifier() else None


def resolve_path(path: str) -> str:
    """The config file `path` names (see the module docstring), without a variant; raises FileNotFoundError naming
    the recipes when there is none."""
    if os.path.isfile(path):
        return path
    name = _recipe_name(path)
    if name is not None:
        for folder in recipe_dirs():
            candidate = folder / f"{name}.py"
            if candidate.is_file():
                return str(candidate)
    folders = ", ".join(str(d) for d in recipe_dirs()) or "none found"
    raise FileNotFoundError(
        f"--config={path}: no such config file, and no recipe of that name. Recipes (--config=NAME, or "
        f"configs/NAME.py in a checkout): {', '.join(available()) or 'none'} (from {folders}); or give the path of a "
        "config file with a get_config()."
    )


def resolve(value: str) -> str:
    """`resolve_path` on the part of a --config value before the first ':' (the variant, if any, is kept)."""
    path, sep, variant = value.partition(":")
    return resolve_path(path) + sep + variant


def load(value: str):
    """The config of a --config value (`NAME[:variant]` or a path, no overrides), for Python callers: the recipe
    module's get_config(variant) as the command lines call it."""
    import importlib.util

    path, sep, variant = resolve(value).partition(":")
    spec = importlib.util.spec_from_file_location(f"bridle_jax_recipe_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if sep else module.get_config()


class _ResolvingParser:
    """Wraps ml_collections' config-file parser: resolves the value first (`resolve`). A value that names nothing
    is a flag error, which absl reports at start-up with the list of recipes (instead of ml_collections' deferred
    error on the config's first use)."""

    def __init__(self, parser):
        self._parser = parser

    def parse(self, value):
        if isinstance(value, str):
            try:
                value = resolve(value)
            except FileNotFoundError as e:
                raise ValueError(str(e)) from None
        return self._parser.parse(value)

    def __getattr__(self, name):  # flag_type(), name, ... of the wrapped parser
        if name.startswith("__") or name == "_parser":  # copy/pickle probing before __init__ ran
            raise AttributeError(name)
        return getattr(self._parser, name)


def DEFINE_config_flag(name: str = "config", help_string: str | None = None, *, lock_config: bool = True, **kwargs):  # pylint: disable=invalid-name
    """`config_flags.DEFINE_config_file(name, None, ...)` whose value may be a recipe name (`--config=imagenet`),
    `configs/NAME.py` from any folder, or a path; `--config.x.y=v` overrides and `:variant` work as before."""
    from absl import flags
    from ml_collections import config_flags

    help_string = help_string or (
        "A recipe name (" + ", ".join(available()) + ") or the path of a config file (configs/NAME.py), "
        "optionally with ':variant'."
    )
    flag_values = kwargs.pop("flag_values", flags.FLAGS)
    holder = config_flags.DEFINE_config_file(
        name, None, help_string, flag_values=flag_values, lock_config=lock_config, **kwargs
    )
    flag = flag_values[name]
    flag.parser = _ResolvingParser(flag.parser)  # the flag parses its value with parser.parse(value)
    return holder
