"""Entry point: python -m bridle_jax.main --config=configs/digits.py --workdir=DIR [--config.x.y=v ...]

--config takes a recipe name (`--config=digits`) or a path; the recipes ship with the package, so the same
command runs from any folder after `pip install` (bridle_jax/recipes.py). Library logs (Orbax, JAX) are kept at
WARNING unless --verbosity asks for more; the run's own lines are always printed.

On several hosts it joins them through `jax.distributed` first (`bridle_jax.distributed`, shared with
`bridle_jax.finetune_main`): --coordinator_address/--num_processes/--process_id or the JAX_* variables, or a bare
`jax.distributed.initialize()` on a Cloud TPU VM; --distributed=off skips it.
"""

import os
import sys
import tempfile
import time
import traceback

from absl import app, flags

from bridle_jax import recipes
from bridle_jax.distributed import TPU_ENV_VARS, initialize_distributed  # noqa: F401  (re-exported: tests, callers)

_CONFIG = recipes.DEFINE_config_flag("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and kept encoders.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs off TPU.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "off"], "auto: join the other processes (see above); off: run as one process."
)
flags.mark_flags_as_required(["config", "workdir"])


def _report(error: BaseException, workdir: str) -> str:
    """The message main exits with: the error in one line, and where its traceback was kept (under the workdir's
    logs/ when it can be written there, e.g. not on a full disk; else the temporary folder)."""
    text = "".join(traceback.format_exception(error))
    name = f"error-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.txt"
    where = None
    for folder in (os.path.join(workdir, "logs"), tempfile.gettempdir()):
        try:
            if "://" in folder:
                continue
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
            where = os.path.join(folder, name)
            break
        except OSError:
            continue
    kept = f" (traceback in {where})" if where else ""
    return f"bridle_jax: {type(error).__name__}: {error}{kept}"


def main(argv) -> None:
    del argv
    from bridle_jax import reporting

    reporting.quiet_library_logs(verbosity_given=flags.FLAGS["verbosity"].present)
    if _DISTRIBUTED.value == "auto":
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import jax

    from bridle_jax import run as run_lib  # after distributed initialisation: importing may touch the backend
    from bridle_jax import train

    try:
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except run_lib.RUN_ERRORS as e:  # the user's run cannot go on: one clear line, the traceback kept in a file
        sys.exit(_report(e, _WORKDIR.value))
    if summary["preempted"]:  # "Preempted at step N: checkpoint saved; ..." is logged: exit 0, re-run resumes
        return
    if jax.process_index() != 0:  # one report, from process 0
        return
    probe = summary["linear_probe"]
    if probe:
        print("Linear probe top-1 (test split):")
        for key in sorted(probe, key=lambda k: int(k.split("_")[1])):
            label = "random init" if key == "iteration_0" else "pretrained"
            print(f"  {key:<12} ({label:<11}) {probe[key]['top1_test']:.4f}")
    print(f"Workdir: {summary['workdir']}")


if __name__ == "__main__":
    app.run(main)
