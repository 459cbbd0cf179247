"""The device mesh ("data" x "fsdp") and the shardings of parameters and batches.

Parameters follow one rule: an array with at least `FSDP_MIN_SIZE` elements is split over "fsdp" along its largest
dimension that divides evenly; everything else is replicated. With fsdp=1 (the default) that is pure data
parallelism. The batch is split over both axes, so every device sees distinct examples.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**14


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Builds the mesh from `config.mesh` ({data, fsdp}, one of them may be -1 = the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config.data), int(mesh_config.fsdp)]
    if sizes.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data/fsdp may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh: {len(devices)} devices are not divisible by the fixed axis size {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"config.mesh: data={sizes[0]} x fsdp={sizes[1]} != {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _param_spec(shape, fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_tree):
    """NamedShardings for a pytree of ShapeDtypeStructs (parameters, optimizer state, codebooks)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(x.shape, fsdp)), abstract_tree)


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Turns this process's share of the batch (NumPy) into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global batch; errors name the config field when it does not divide."""
    num_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % num_shards:
        raise ValueError(
            f"config.batch_size={global_batch_size} must be divisible by the {num_shards} batch shards "
            "(mesh data x fsdp)"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={global_batch_size} must be divisible by {jax.process_count()} processes")
    return global_batch_size // jax.process_count()
