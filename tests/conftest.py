"""Test set-up: 8 fake CPU devices so every test exercises sharding (must run before jax is imported)."""

import os

# LLVM's optimisation level 0 compiles 2-3x faster; the test models are tiny, so run time hardly changes.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One compilation cache per test session: the end-to-end and resume tests run the same jitted steps several
# times in fresh `jax.jit` wrappers, which then compile once instead of once per run.
import atexit
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="bridle_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir  # the test subprocesses inherit it
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)  # not left in /tmp after the session
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
