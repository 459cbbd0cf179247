"""The linear probe as the pretraining loop runs it (`config.evals.linear_probe`): every kept encoder probed once
per workdir, the results recorded in `<workdir>/linear_probe.json`.

`LinearProbeEvaluator` is the loop's plug-in (bridle_jax/evaluators/base.py): at start-up it probes the encoder as
initialised and every kept encoder whose probe never finished; at the end of each phase that trains the encoder it
probes that encoder. The probe itself (features streamed batch by batch, the head) is `linear_probe`.
"""

import functools
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from bridle_jax import encoder_store, paths, reporting
from bridle_jax.data import pipeline
from bridle_jax.evaluators import base, linear_probe

PROBE_FILE = "linear_probe.json"


class ProbeData:
    """The labelled splits the linear probe reads and how much of each, known at start-up from the sources' lengths:
    nothing is decoded here. Each probe streams both splits through the encoder (`linear_probe.split_features`
    over `pipeline.eval_batches`), holding one batch of decoded inputs at a time and keeping only the pooled
    features (N x width float32) and labels. Listing the sources at start-up also checks the splits exist on every
    start and resume, so a wrong split fails before step 1, not at the end of the next encoder phase.

    `train` / `test` are the splits as whole arrays (`pipeline.eval_arrays`), decoded on first use and held: the
    training loop never touches them (benchmarks/study.py's raw-pixel baseline does, on a small dataset)."""

    def __init__(self, config):
        p = config.evals.linear_probe
        self.data_config = config.data
        self.train_split, self.test_split = p.train_split, p.test_split
        self.train_cap = p.max_examples
        self.test_cap = p.get("max_test_examples", None) or p.max_examples
        self.train_size = pipeline.eval_size(config.data, self.train_split, self.train_cap)
        self.test_size = pipeline.eval_size(config.data, self.test_split, self.test_cap)

        def describe(split, size):
            part = f"first {size.examples:,} of {size.total:,}" if size.capped else f"all {size.total:,}"
            return f"{split!r} ({part})"

        reporting.log_line(
            f"Linear probe splits: train {describe(self.train_split, self.train_size)}, test "
            f"{describe(self.test_split, self.test_size)}; read batch by batch at each probe"
        )

    @functools.cached_property
    def train(self) -> dict:
        return pipeline.eval_arrays(self.data_config, self.train_split, self.train_cap)

    @functools.cached_property
    def test(self) -> dict:
        return pipeline.eval_arrays(self.data_config, self.test_split, self.test_cap)


def run_linear_probe(models, encoder_params, data: ProbeData, config, mesh) -> dict:
    """Extracts the pooled features of both probe splits from the encoder, streamed batch by batch (one batch of
    decoded inputs held at a time), then fits the probe: {"top1_train", "top1_test", "final_loss"}."""
    p = config.evals.linear_probe
    feats = lambda split, cap: linear_probe.split_features(
        models, encoder_params, data.data_config, split, cap, mesh=mesh, batch_size=p.batch_size
    )
    train_x, train_y = feats(data.train_split, data.train_cap)
    test_x, test_y = feats(data.test_split, data.test_cap)
    return linear_probe.linear_probe(
        train_x, train_y, test_x, test_y, steps=p.steps, lr=p.lr, batch_size=p.batch_size, seed=config.seed
    )


def probe_once(workdir: str, key: str, models, encoder_params, data: ProbeData, config, mesh):
    """The probe of the encoder `key` ("iteration_k"), computed at most once per workdir: returns (result, reused).

    When linear_probe.json already holds `key` (a resume re-running the last steps of an encoder phase whose probe
    had finished before the run was stopped, or a restart at step 0), the recorded result is returned and neither
    the features nor the head are computed again; resumes are exact, so it is the same encoder. On several
    processes the features are a collective: process 0's file decides for all (`result` is None on a process that
    cannot read it). Settings of `evals.linear_probe` changed on a resume apply to the encoders probed after it.

    `encoder_params` may be a callable returning them (a kept encoder, restored only if the probe runs).

    No cache of the features is written. The phase-end checkpoint is written before the probe, so a run killed
    during a probe loses only that probe: the resume starts at the phase end and probes the kept encoder
    (`pending_probes`), re-extracting its features (minutes) but training nothing again. A features file would only
    save that extraction, for a window (a hard kill during a probe; a SIGTERM lets the probe finish, as preemption is
    acted on between steps) that is short against a run, while it costs N x width x 4 bytes per split and encoder
    in the workdir (~150 MB per split for 50k ViT-B features, on gs:// for TPU runs) and needs its own staleness
    checks (which encoder, which splits and caps, which preprocessing).
    """
    recorded = read_probes(workdir).get(key)
    reuse = recorded is not None
    if jax.process_count() > 1:
        reuse = bool(multihost_utils.broadcast_one_to_all(np.int32(reuse)))
    if reuse:
        return recorded, True
    if callable(encoder_params):  # a kept encoder, restored only now that its probe runs
        encoder_params = encoder_params()
    result = run_linear_probe(models, encoder_params, data, config, mesh)
    record_probe(workdir, key, result)
    return result, False


def pending_probes(workdir: str, plan, step: int, state):
    """(key, phase or None, params) of the encoders kept before this start: iteration 0 and every encoder phase that
    ended at or before `step`. `params` is the encoder itself (iteration 0 at step 0: the state's) or a callable that
    restores the kept one (`encoders/iteration_k`, on the state's shardings) only when its probe must run: the
    recorded probes are skipped by `probe_once` without reading anything. A run stopped during an end-of-phase
    probe (after the phase-end checkpoint) gets that probe here; so does a run resumed with the probe turned on, and
    one resumed from a converted checkpoint (`bridle_jax.convert` keeps the imported encoders). An encoder that was
    not kept is left out (with a line saying so), never a reason to stop the run."""
    current = state.params["encoder"]["encoder"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current)
    kept = lambda k: lambda: encoder_store.load_encoder_params(workdir, k, abstract)
    yield "iteration_0", None, current if step == 0 else kept(0)
    saved = set(encoder_store.saved_iterations(workdir))
    for phase in plan:
        if phase.trains_encoder and phase.end_step <= step:
            if phase.iteration in saved:
                yield f"iteration_{phase.iteration}", phase, kept(phase.iteration)
            elif f"iteration_{phase.iteration}" not in read_probes(workdir):
                kept_dir = f"encoders/iteration_{phase.iteration}"
                reporting.log_line(f"No kept encoder for {phase.name} ({kept_dir}): its probe is left out")


def read_probes(workdir: str) -> dict:
    path = paths.workdir_path(workdir) / PROBE_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def record_probe(workdir: str, key: str, result: dict) -> dict:
    """Process 0 writes; the others wait for that write, so any later read of the file on any process (the next
    `probe_once`, the run's summary) sees `key`: without the barrier process 1 could read the file first."""
    results = read_probes(workdir)
    results[key] = result
    if jax.process_index() == 0:
        path = paths.workdir_path(workdir) / PROBE_FILE
        paths.write_text_atomic(path, json.dumps(results, indent=2, sort_keys=True))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"linear_probe.json:{key}")
    return results


class LinearProbeEvaluator(base.Evaluator):
    """The loop's linear probe: see the module docstring."""

    name = "linear_probe"

    def __init__(self, config, **context):
        super().__init__(config, **context)
        self.data = ProbeData(config)
        self._results = {}

    def summary(self) -> dict:
        """The test split's size from the source's length: nothing decoded for the summary."""
        size = self.data.test_size
        return {"eval_split": self.data.test_split, "eval_examples": size.examples, "eval_capped": size.capped}

    def _probe(self, key: str, params):
        result, reused = probe_once(self.workdir, key, self.models, params, self.data, self.config, self.mesh)
        if result is not None:
            self._results[key] = result
        return result, reused

    def at_start(self, state, step: int) -> base.Lines:
        """The encoder as initialised, and any kept encoder whose probe never finished (its metric line, late)."""
        lines = []
        for key, where, params in pending_probes(self.workdir, self.plan, step, state):
            result, reused = self._probe(key, params)
            if result is None or reused:
                continue
            if where is not None:
                lines.append((where.end_step, where.name, {"eval/linear_probe/top1": result["top1_test"]}))
            name = "encoder as initialised" if where is None else f"kept encoder of {where.name}"
            reporting.log_line(f"Linear probe, {name}: top-1 {result['top1_test']:.4f}")
        return lines

    def at_phase_end(self, phase, state) -> base.Lines:
        if not phase.trains_encoder:
            return []
        result, reused = self._probe(f"iteration_{phase.iteration}", state.params["encoder"]["encoder"])
        if result is None:
            return []
        again = " (recorded before; not recomputed)" if reused else ""
        reporting.log_line(f"Linear probe after {phase.name}: top-1 {result['top1_test']:.4f}{again}")
        return [(phase.end_step, phase.name, {"eval/linear_probe/top1": result["top1_test"]})]

    def results(self) -> dict:
        return read_probes(self.workdir) or self._results
