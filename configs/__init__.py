"""The recipes. Each module's get_config(arg=None) returns a validated-on-start ConfigDict; its docstring starts with
the command that runs it. They ship inside the package as `bridle_jax.configs` (setup.py), so after `pip install`
any CLI takes `--config=NAME` (or `configs/NAME.py` from a checkout): see bridle_jax/recipes.py."""
