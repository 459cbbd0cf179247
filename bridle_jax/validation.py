"""Config-validation helpers shared by every module that checks a config.

Why one module: every config error reads the same, whichever module raises it, as
``config.<field>: expected <what>, got <value>`` (a field absent altogether: ``config.<field> is missing``), where
``field`` is the dotted path below ``config`` ("data.sample_rate", "optim.lr"). It imports nothing from bridle_jax,
so any module may use it.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np

MISSING = object()  # get's default: the field is required


def fail(field: str, expected: str, got: Any) -> NoReturn:
    """Raises ``ValueError("config.<field>: expected <expected>, got <repr(got)>")``."""
    raise ValueError(f"config.{field}: expected {expected}, got {got!r}")


def is_int(x: Any) -> bool:
    """An int or a numpy integer, but not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x: Any) -> bool:
    """A Python or numpy int or float, but not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def get(config: Any, field: str, default: Any = MISSING, *, hint: str = "") -> Any:
    """The value of ``config.<field>``, read from ``config``, the object holding its last component (``config.data``
    for "data.sample_rate"); ``default`` if it is absent, or, with no default, ``ValueError("config.<field> is
    missing (<hint>)")``."""
    value = getattr(config, field.rpartition(".")[2], default)
    if value is MISSING:
        raise ValueError(f"config.{field} is missing" + (f" ({hint})" if hint else ""))
    return value
