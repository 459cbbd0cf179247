"""One process of the multi-host test (tests/test_multihost.py): the tiny config's whole plan, then a dump of what
every local device holds.

    python tests/multihost_worker.py --workdir=DIR --out=FILE.npz [--stop_at_step=N] [--reference_processes=P]

Multi-process: set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
`bridle_jax.main.initialize_distributed`, the entry point's own start-up) and the local device count through
XLA_FLAGS before starting. `--stop_at_step` stops there (a checkpoint) and resumes in the same process, so the
Orbax and Grain restore paths run on every process. `--reference_processes=P` is the single-process reference: its
global batch is the P process shards side by side, i.e. exactly the global array the P-process run assembles. (The
pipelines shard records before batching, `ds[p::P].batch(b)`, so that array holds the single-process batch's rows in
another order, 0, 2, 4, ..., 1, 3, ...; a per-row mask or k-means draw then lands on other examples.)

The dump (`--out`, one file per process) holds, for every call of k-means/restart and for the final state, each
addressable shard of the codebooks (keyed by device id), so the test can compare every replica on every process.
"""

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.tiny` from any cwd

PLAN = ("encoder_cold_start:4", "tokenizer:3", "encoder:4")


def _config(probe: bool):
    from tests.tiny import tiny_config

    c = tiny_config()
    c.schedule.phases = PLAN
    c.log_every_steps = 1  # every step's loss, to compare step by step
    c.checkpoint.every_steps = 100  # phase ends (and the planned stop) only
    c.evals.linear_probe.enabled = probe
    c.evals.linear_probe.steps = 20
    c.evals.linear_probe.max_examples = 64
    c.evals.linear_probe.batch_size = 32
    c.data.num_threads = 1
    return c


class _JoinedIterator:
    """The P process shards of the train stream side by side: the global batch a P-process run builds (process p's
    rows are the p-th block, as `make_array_from_process_local_data` lays them out)."""

    def __init__(self, make, processes: int):
        self._inner = [make(p) for p in range(processes)]

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        parts = [next(it) for it in self._inner]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:  # Grain's checkpoint handler takes bytes from non-DatasetIterator iterators
        return json.dumps([it.get_state() for it in self._inner]).encode()

    def set_state(self, state: bytes):
        for it, s in zip(self._inner, json.loads(state)):
            it.set_state(s)


def _shards(tree, prefix: str, dump: dict) -> None:
    import jax
    import numpy as np

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = prefix + jax.tree_util.keystr(path)
        for shard in leaf.addressable_shards:
            dump[f"{name}@{shard.device.id}"] = np.asarray(shard.data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop_at_step", type=int, default=None)
    parser.add_argument("--reference_processes", type=int, default=0)
    parser.add_argument("--probe", action="store_true")
    args = parser.parse_args()

    from bridle_jax import main as entry

    entry.initialize_distributed()

    import jax
    import numpy as np

    from bridle_jax import steps, train

    dump = {}
    real_prepare = steps.jit_prepare_codebooks

    def recording_prepare(*a, **k):  # k-means (+ restart): record every replica's codebooks after each call
        fn = real_prepare(*a, **k)

        def call(state, batch):
            state = fn(state, batch)
            _shards(state.codebooks, f"prepare{int(state.step)}/", dump)
            return state

        return call

    steps.jit_prepare_codebooks = recording_prepare
    # Each process pretends to have skipped 1 + its index unreadable records: the log must show the sum.
    train.pipeline.skipped_count = lambda data_config: 1 + jax.process_index()
    if args.reference_processes:
        real_iterator = train.pipeline.train_iterator

        def joined(data_config, *, local_batch_size, seed, process_index, process_count, source=None):
            assert (process_index, process_count) == (0, 1), (process_index, process_count)
            shard = local_batch_size // args.reference_processes
            make = lambda p: real_iterator(
                data_config,
                local_batch_size=shard,
                seed=seed,
                process_index=p,
                process_count=args.reference_processes,
                source=source,
            )
            return _JoinedIterator(make, args.reference_processes)

        train.pipeline.train_iterator = joined

    config = _config(args.probe)
    if args.stop_at_step is not None:
        train.train_and_evaluate(config, args.workdir, stop_at_step=args.stop_at_step)
    summary = train.train_and_evaluate(config, args.workdir)
    state = summary["final_state"]
    _shards(state.codebooks, "final/", dump)
    _shards(state.params["encoder"]["encoder"], "final_encoder/", dump)
    dump["process_index"] = np.asarray(jax.process_index())
    dump["process_count"] = np.asarray(jax.process_count())
    dump["device_count"] = np.asarray(jax.device_count())
    dump["probe"] = np.asarray(json.dumps(summary["linear_probe"], sort_keys=True))
    dump["cpu_seconds"] = np.asarray(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]))
    np.savez(args.out, **dump)


if __name__ == "__main__":
    main()
