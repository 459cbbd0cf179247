"""The tiny end-to-end config (tests/tiny.py) as a config file, for `python -m bridle_jax.main --config=...`
subprocesses (the preemption and kill tests)."""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("bridle_jax_tests_tiny", pathlib.Path(__file__).with_name("tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config(arg=None):
    del arg
    return _tiny.tiny_config()
