"""Joining the other processes of a multi-process run, for every entry point (`bridle_jax.main`,
`bridle_jax.finetune_main`): one start-up, so pretraining and fine-tuning find the same hosts.

  - explicit (GPU clusters, local tests): a coordinator address, the number of processes and this process's id, from
    the entry point's flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; CPU processes talk
    through gloo collectives;
  - Cloud TPU VMs: `jax.distributed.initialize()` with no arguments, which reads the slice's topology from the TPU
    metadata server (TPU_WORKER_HOSTNAMES is not set on every TPU VM, so its absence proves nothing). A TPU VM is
    recognised by JAX's own Cloud TPU check (libtpu and TPU chips present) or by any of TPU_ENV_VARS. On a
    single-host TPU VM that is a one-process cluster (harmless).
"""

import os

TPU_ENV_VARS = (
    "TPU_ACCELERATOR_TYPE",
    "TPU_WORKER_ID",
    "CLOUD_TPU_TASK_ID",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _on_cloud_tpu() -> bool:
    if any(os.environ.get(name) for name in TPU_ENV_VARS):
        return True
    try:  # set by `import jax` when libtpu and TPU chips are present (no env var needed)
        from jax._src import cloud_tpu_init

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


def _env_int(name: str, flag: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"a coordinator address is set, so --{flag} or the environment variable {name} is required")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins the other processes of a multi-process run (see the module docstring); returns whether
    `jax.distributed` is initialised. Must run before anything touches a JAX backend; a second call is a no-op."""
    import jax

    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):  # CPU processes need gloo for cross-process ops
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        num = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES", "num_processes")
        pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID", "process_id")
        if not 0 <= pid < num:
            raise ValueError(f"process id {pid} must lie in [0, {num}) (num_processes={num})")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num, process_id=pid)
        return True
    if _on_cloud_tpu():
        jax.distributed.initialize()  # the slice's hosts, this host's index and the coordinator come from the TPU VM
        return True
    return False
