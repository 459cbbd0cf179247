"""Entry point: python -m bridle_jax.main --config=configs/digits.py --workdir=DIR [--config.x.y=v ...]

On several hosts it joins them through `jax.distributed` first: TPU pods are detected automatically; elsewhere set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or pass the --coordinator_* flags).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and kept encoders.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs off TPU.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value:
        num = _NUM_PROCESSES.value or int(os.environ["JAX_NUM_PROCESSES"])
        pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=num, process_id=pid)
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()  # a multi-host TPU slice: everything is auto-detected


def main(argv) -> None:
    del argv
    _maybe_initialize_distributed()
    from bridle_jax import train  # after distributed initialisation: importing may touch the backend

    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary["preempted"]:  # "Preempted at step N: checkpoint saved; ..." is logged: exit 0, re-run resumes
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
