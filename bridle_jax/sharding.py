"""The device mesh ("data" x "fsdp"), the logical axis names, and the shardings of the state and the batches.

Kernels and activations carry *logical* axis names that say what a dimension is (the model width "embed", the MLP
hidden width "mlp", ...), never where it lives. One short table, `config.mesh.rules`, maps names onto mesh axes, so
the parallelism is a config change. The default table (`DEFAULT_RULES`) is FSDP: every kernel is split over "fsdp"
along its "embed" dimension (params and Adam moments alike, so each device holds 1/fsdp of the state), and the
batch is split over both axes, so every device sees distinct examples; with fsdp=1 it is pure data parallelism.
Biases, LayerNorm scales, cls/mask tokens and the codebooks carry no names and stay replicated: they are a
fraction of a percent of the bytes, and the codebooks are read whole by every quantisation.

Logical names (a kernel's two dims must differ; unlisted names are replicated):
  batch, length  activations: examples and tokens
  embed          the width of the module that owns the kernel (its residual stream)
  features       another module's width at a module boundary (E's tokens into D; TE's prediction of E's features)
  mlp            an MLP's hidden width (the blocks' fc1/fc2, T's head_in -> tanh -> head_out)
  qkv, heads     the fused q/k/v outputs; the concatenated head outputs (input of proj)
  vocab, code    the label predictor's M*K logits; the RQ code dimension

Rules are matched in order and each mesh axis is used at most once per array (flax's resolution): on the residual
stream ("batch", "length", "embed") "batch" takes ("data", "fsdp") first, so "embed" stays unsharded there, as FSDP
wants (activations split by example, kernels by width). Keep "batch" first.

Models call `logical(init, names)` for their kernels. Plain `Module.init` still returns plain arrays (so checkpoints,
`load_encoder` and every consumer of a parameter tree see exactly the trees they always did); only under
`logical_params()` are the kernels boxed as flax `LogicallyPartitioned`, which is how the state's shardings are
derived (`state.shardings_for`) without ever materialising it.
"""

import contextlib
import contextvars
import math
import types

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bridle_jax.config import DEFAULT_RULES  # the default table lives with the other defaults
from bridle_jax.validation import fail

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

RESIDUAL = ("batch", "length", "embed")  # the transformer's residual stream [B, N, width]

_BOXED = contextvars.ContextVar("bridle_jax_boxed_params", default=False)


def data_parallel_mesh(devices=None) -> Mesh:
    """Every device on the data axis (data=-1, fsdp=1): the evaluators' mesh, whatever mesh the run trained on."""
    return make_mesh(types.SimpleNamespace(data=-1, fsdp=1), devices)


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


# ---------------------------------------------------------------- logical names


def logical(init, names: tuple):
    """A kernel initialiser annotated with logical axis names: boxed (flax `with_logical_partitioning`) under
    `logical_params()`, plain otherwise (same values either way)."""
    boxed = nn.with_logical_partitioning(init, tuple(names))

    def init_fn(*args, **kwargs):
        return boxed(*args, **kwargs) if _BOXED.get() else init(*args, **kwargs)

    return init_fn


@contextlib.contextmanager
def logical_params():
    """Inside, `Module.init` returns the annotated kernels as `nn.LogicallyPartitioned` boxes."""
    token = _BOXED.set(True)
    try:
        yield
    finally:
        _BOXED.reset(token)


def logical_rules(mesh_config) -> tuple:
    """`config.mesh.rules` as a tuple of (name, mesh axes) pairs, validated (a config read back from JSON has
    lists; a config without the field gets `DEFAULT_RULES`). Errors name the rule and what was expected."""
    rules = mesh_config.get("rules", None) if hasattr(mesh_config, "get") else None
    if rules is None:
        return DEFAULT_RULES
    out, seen = [], set()
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"config.mesh.rules[{i}]: expected a pair (logical name, mesh axes), got {rule!r}")
        name, axes = rule
        if isinstance(axes, (tuple, list)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [] if axes is None or axes in MESH_AXES else [axes]
        if bad or axes == ():
            raise ValueError(
                f"config.mesh.rules[{i}] ({name!r}): expected None, a mesh axis or a tuple of mesh axes from "
                f"{MESH_AXES}, got {axes!r}"
            )
        if isinstance(axes, tuple) and len(set(axes)) != len(axes):
            raise ValueError(f"config.mesh.rules[{i}] ({name!r}): mesh axes repeat in {axes!r}")
        if name in seen:
            raise ValueError(f"config.mesh.rules[{i}]: logical name {name!r} appears twice")
        seen.add(name)
        out.append((name, axes))
    return tuple(out)


def _axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def fit_spec(spec: P, shape: tuple, mesh: Mesh) -> P:
    """`spec` with every dimension that its mesh axes do not divide evenly left unsharded.

    jit's in/out shardings must split a dimension into equal shards, so a kernel whose "embed" dimension is not a
    multiple of the fsdp size (an odd width, a tiny test model) is replicated along that dimension rather than
    rejected. Such kernels are rare and small; `describe` lists them.
    """
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(axes if size % _axes_size(mesh, axes) == 0 else None for size, axes in zip(shape, entries)))


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def logical_shardings(mesh: Mesh, boxed_abstract, rules) -> object:
    """NamedShardings for an abstract tree whose annotated leaves are `LogicallyPartitioned` boxes (from
    `jax.eval_shape` under `logical_params()`): boxes by their names through `rules` (then `fit_spec`), every other
    leaf replicated. The result has the structure of the *unboxed* tree."""

    def one(x):
        if _is_box(x):
            spec = nn.logical_to_mesh_axes(x.names, rules)
            return NamedSharding(mesh, fit_spec(spec, x.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_abstract, is_leaf=_is_box)


def describe(mesh: Mesh, boxed_abstract, rules) -> list[str]:
    """One line per annotated array: path, shape, logical names, mesh spec (and whether `fit_spec` replicated a
    dimension). For logs and for checking a new rule table."""
    lines = []
    for path, x in jax.tree_util.tree_leaves_with_path(boxed_abstract, is_leaf=_is_box):
        if not _is_box(x):
            continue
        want = nn.logical_to_mesh_axes(x.names, rules)
        got = fit_spec(want, x.value.shape, mesh)
        note = "" if tuple(got) == tuple(want) + (None,) * (len(got) - len(want)) else "  (not divisible: replicated)"
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(x.value.shape)} {x.names} -> {got}{note}")
    return lines


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """Inside a traced step: makes `nn.with_logical_constraint` on activations resolve through `rules` on `mesh`
    (outside this context the models' constraints are no-ops, e.g. in the probe's feature extraction)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


# ---------------------------------------------------------------- batches


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Turns this process's share of the batch (NumPy) into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def check_batch_split(global_batch_size: int, mesh: Mesh, accumulation_steps: int = 1) -> None:
    """Every micro-batch must split evenly over the batch shards (gradient accumulation splits the global batch into
    `accumulation_steps` micro-batches, each sharded like the whole batch)."""
    num_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % (accumulation_steps * num_shards):
        fail(
            "batch_size",
            f"a multiple of config.optim.accumulation_steps={accumulation_steps} x {num_shards} batch shards "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})",
            global_batch_size,
        )


def local_batch_size(global_batch_size: int, mesh: Mesh, accumulation_steps: int = 1) -> int:
    """This process's share of the global batch; errors name the config fields when it does not divide."""
    check_batch_split(global_batch_size, mesh, accumulation_steps)
    if global_batch_size % jax.process_count():
        fail("batch_size", f"a multiple of the {jax.process_count()} processes", global_batch_size)
    return global_batch_size // jax.process_count()
