"""Entry point of the downstream recipes: fine-tuning or a linear probe of a pretraining workdir's encoder.

    python -m bridle_jax.finetune_main --config=configs/esc50_finetune.py --workdir=OUT --config.init_from=PRETRAIN_DIR

The result (best- and last-eval numbers, the whole eval history, mean +- std over folds for cross-validated
recipes) is printed and kept in OUT/finetune.json; re-running the same command resumes an interrupted run. Several
processes (GPU clusters, TPU pods) join through `jax.distributed` by the start-up `bridle_jax.main` uses
(`bridle_jax.distributed`): --coordinator_address, --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or a bare `jax.distributed.initialize()` on a Cloud TPU VM, recognised by its
environment or by JAX's own check; --distributed=off runs one process.
"""

import os
import sys

from absl import app, flags

from bridle_jax import recipes
from bridle_jax.distributed import initialize_distributed

_CONFIG = recipes.DEFINE_config_flag("config", lock_config=True)  # a recipe name (esc50_finetune) or a path, [:variant]
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the fine-tune's checkpoints, metrics and finetune.json.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0 (multi-process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "off"], "auto: join the other processes (see above); off: run as one process."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv
    from bridle_jax import reporting

    reporting.quiet_library_logs(verbosity_given=flags.FLAGS["verbosity"].present)
    if _DISTRIBUTED.value == "auto":
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from bridle_jax import finetune  # after distributed initialisation: importing may touch the backend
    from bridle_jax import run as run_lib  # its run errors: one clear line instead of a traceback

    try:
        result = finetune.run(_CONFIG.value, _WORKDIR.value)
    except run_lib.RUN_ERRORS as e:
        sys.exit(f"bridle_jax.finetune_main: {type(e).__name__}: {e}")
    if result.get("preempted"):
        print("Preempted: checkpoint saved; re-run the same command to resume.")
        return
    print(finetune.format_result(result))
    print(f"Result: {os.path.join(_WORKDIR.value, finetune.RESULT_FILE)}")


if __name__ == "__main__":
    app.run(main)
