"""Codebook health of a run (SPEC 5.3): how the tokenizer's RQ codebooks are used over one pass of an eval split.

    python -m bridle_jax.evaluators.codebook --workdir=DIR [--iteration=N | --step=S] [--split=test]

Restores the newest checkpoint of the workdir (or of an iteration, or a given step), runs the tokenizer of that
point of the plan (the cold-start tokenizer in iteration 1, T's ViT + head afterwards) over the split, quantises
with `quantizer.quantize` -- a pure look-up, so the EMA is off and the checkpoint's codebooks are exactly the ones
measured -- and counts, per RQ level m, how often each code is picked over the valid (not padded, finite) patches.
From the counts [M, K], in float64 (the authors' `unit_eval.calc_code_stats`):

    utilisation (CUR) = #codes used / K
    entropy (UE)      = −Σ_k p_k log2 p_k over the used codes, in bits; perplexity = 2**UE
    ecu               = CUR / (UE · ln K), exactly as the authors code it (log2 and ln mixed); null when UE = 0
                        (they print inf)

plus `normalised_entropy` = UE / log2 K (1 = uniform use), the sorted histogram of code use, the norms of the
quantised vectors q_m per level (their distribution is the codebook norms weighted by the counts, so its moments are
exact), of z and z_q per patch, of the quantisation error z − z_q, and of all K codebook vectors. Writes
`codebook_health.json`, then `codebook_usage_level{m}.png` (sorted use) and `codebook_norms.png` (the authors'
"codebook norms by depth" plus the codebook vectors' norms) into `out_dir` (default: the workdir). The plots need
matplotlib (`pip install 'bridle_jax[plots]'`); without it the JSON is written alone, with a warning.

The checkpoints are opened read-only: the evaluator can run beside a training run of the same workdir without
touching its files (no clean-up of in-flight saves, nothing set aside). Only the `state` item is restored (the data
iterator is not needed), into the abstract state of the phase that wrote the checkpoint, as train.py restores it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bridle_jax import checkpoint as ckpt_lib
from bridle_jax import optim, paths, quantizer, reporting, schedule, sharding, steps
from bridle_jax import state as state_lib
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import pipeline
from bridle_jax.evaluators import base
from bridle_jax.models import bridle

HEALTH_FILE = "codebook_health.json"
NORMS_PLOT = "codebook_norms.png"
USAGE_PLOT = "codebook_usage_level{level}.png"

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- restore


@dataclasses.dataclass
class RestoredRun:
    """One checkpoint of a run, ready to tokenize: the config, models, state and the phase that wrote it."""

    config: ml_collections.ConfigDict
    models: bridle.BridleModels
    state: state_lib.TrainState
    step: int
    phase: schedule.Phase
    mesh: jax.sharding.Mesh

    @property
    def cold_start(self) -> bool:
        """Iteration 1's targets come from the cold-start tokenizer (its codebooks were k-means'd on its features)."""
        return self.phase.cold_start


def _eval_mesh(config) -> jax.sharding.Mesh:
    """The run's mesh when it fits this machine's devices, else plain data parallelism over all of them (the
    checkpoint is resharded on restore)."""
    try:
        return sharding.make_mesh(config.mesh)
    except ValueError as e:
        _log.warning("config.mesh does not fit the %d devices here (%s); using data=-1, fsdp=1", jax.device_count(), e)
        return sharding.data_parallel_mesh()


def restore_run(workdir, *, iteration: int | None = None, step: int | None = None) -> RestoredRun:
    """Restores a full checkpoint of `workdir`: the newest one, the newest of BRIDLE `iteration`, or `step`.

    Raises FileNotFoundError when `workdir` is not a bridle_jax workdir or holds no checkpoint, ValueError when the
    requested iteration or step has no checkpoint (the message lists those available).
    """
    path = paths.workdir_path(workdir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such workdir")
    config = workdir_lib.read_config(workdir)  # FileNotFoundError: not a bridle_jax workdir
    plan = schedule.parse_plan(config.schedule.phases)
    directory = path / ckpt_lib.CHECKPOINTS_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints in {path} (has the run saved one yet?)")
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        available = checkpointer.all_steps()
        if not available:
            raise FileNotFoundError(f"{directory}: no checkpoints in {path} (has the run saved one yet?)")
        listing = ", ".join(f"{s} (iteration {schedule.phase_of_checkpoint(plan, s).iteration})" for s in available)
        if step is not None:
            if step not in available:
                raise ValueError(f"step={step}: no checkpoint of that step in {directory}; available: {listing}")
            candidates = [step]
        elif iteration is not None:
            candidates = [s for s in available if schedule.phase_of_checkpoint(plan, s).iteration == iteration]
            if not candidates:
                raise ValueError(
                    f"iteration={iteration}: no checkpoint of that iteration in {directory}; available: {listing}"
                )
        else:
            candidates = available
        models = bridle.build_models(config)
        mesh = _eval_mesh(config)

        def abstract_for_step(s):
            phase = schedule.phase_of_checkpoint(plan, s)
            tx, _ = optim.make_optimizer(config.optim, phase.kind, phase.steps)
            return state_lib.abstract_for(models, config, tx, phase, config.seed, mesh)

        restored = checkpointer.restore_latest(abstract_for_step, None, steps=candidates)
        if restored is None:
            raise ValueError(f"{directory}: no checkpoint of steps {candidates} could be restored (see the warnings)")
        state, _ = restored
        s = int(state.step)
        return RestoredRun(config, models, state, s, schedule.phase_of_checkpoint(plan, s), mesh)
    finally:
        checkpointer.close()


# ----------------------------------------------------------------------------------------------- statistics


def level_statistics(counts) -> list[dict]:
    """Per level of `counts` [M, K] (code-use counts): utilisation, entropy (bits), perplexity, normalised entropy,
    the authors' ECU and the number of used codes (float64; see the module docstring)."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2 or counts.shape[1] < 2 or np.any(counts < 0):
        raise ValueError(f"counts: expected non-negative counts [M, K] with K >= 2, got shape {counts.shape}")
    k = counts.shape[1]
    out = []
    for row in counts:
        total = row.sum()
        used = row > 0
        cur = float(np.mean(used))
        p = row[used] / total if total > 0 else np.zeros(0)
        ue = float(-np.sum(p * np.log2(p))) + 0.0  # + 0.0: no "-0.0" for a single used code
        out.append(
            {
                "utilisation": cur,
                "num_used_codes": int(np.sum(used)),
                "entropy_bits": ue,
                "perplexity": float(2.0**ue),
                "normalised_entropy": ue / math.log2(k),
                "ecu": cur / (ue * math.log(k)) if ue > 0 else None,
            }
        )
    return out


class _Moments:
    """Running count / mean / std / min / max of a stream of values (float64)."""

    def __init__(self):
        self.n, self.total, self.total_sq = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.float64).reshape(-1)
        if v.size:
            self.n += v.size
            self.total += float(v.sum())
            self.total_sq += float(np.square(v).sum())
            self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))

    def summary(self) -> dict:
        if self.n == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = self.total / self.n
        return {
            "count": self.n,
            "mean": mean,
            "std": math.sqrt(max(self.total_sq / self.n - mean * mean, 0.0)),
            "min": self.lo,
            "max": self.hi,
        }


def _weighted_moments(values: np.ndarray, weights: np.ndarray) -> dict:
    """Moments of `values` repeated `weights` times (the q_m norms: code norms weighted by code use)."""
    w = np.asarray(weights, np.float64)
    n = float(w.sum())
    if n == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = float(np.sum(w * values) / n)
    used = values[w > 0]
    return {
        "count": int(n),
        "mean": mean,
        "std": float(np.sqrt(np.sum(w * np.square(values - mean)) / n)),
        "min": float(used.min()),
        "max": float(used.max()),
    }


def _moments(values: np.ndarray) -> dict:
    m = _Moments()
    m.add(values)
    return m.summary()


# ----------------------------------------------------------------------------------------------- the pass


def _pass_fn(models: bridle.BridleModels, q: ml_collections.ConfigDict, cold_start: bool):
    """(tokenizer params, codebooks, batch) -> per-patch codes, validity and norms; no state change (EMA off)."""

    def fn(params, codebooks, batch):
        x, valid = models.model_input(batch)
        z = steps.tokenizer_features(models, params, x, cold_start=cold_start).astype(jnp.float32)
        out = quantizer.quantize(
            codebooks,
            z,
            normalize_stage_inputs=q.normalize_stage_inputs,
            commitment_weight=q.commitment_weight,
            mask=valid,
        )
        keep = out.valid if valid is None else out.valid & valid
        z_q = out.z_q.astype(jnp.float32)
        norm = lambda a: jnp.sqrt(jnp.sum(a * a, axis=-1))
        return {
            "codes": out.codes,
            "keep": keep,
            "model_valid": jnp.ones_like(keep) if valid is None else valid,
            "z_norm": norm(z),
            "z_q_norm": norm(z_q),
            "error_norm": norm(z - z_q),
        }

    return fn


def _tokenizer_params(run: RestoredRun) -> dict:
    params = run.state.params
    if run.cold_start:
        return {"cold_start": params["cold_start"]}
    return {"tokenizer": {"tokenizer": params["tokenizer"]["tokenizer"]}}


def collect_counts(run: RestoredRun, arrays: dict, *, batch_size: int = 256) -> dict:
    """One pass of `run`'s tokenizer + quantizer over `arrays` ({"input", "length"} NumPy, as
    `pipeline.eval_arrays` returns them), in chunks sharded over the mesh. Returns the raw accumulators:
    counts [M, K] int64 and the moments of ‖z‖, ‖z_q‖, ‖z − z_q‖ and ‖z − z_q‖ / ‖z‖ over the counted patches."""
    mesh, q = run.mesh, run.config.quantizer
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    total = len(arrays["input"])
    if total == 0:
        raise ValueError("the eval split has no examples")
    batch_size = max(shards, min(batch_size, -(-total // shards) * shards) // shards * shards)
    keys = ("input", "length")
    # params and codebooks keep their restored shardings; the batch is placed by `device_put` below
    fn = jax.jit(_pass_fn(run.models, q, run.cold_start), out_shardings=sharding.replicated(mesh))
    params = _tokenizer_params(run)
    m_levels, k = q.num_levels, q.codebook_size
    counts = np.zeros((m_levels, k), np.int64)
    moments = {name: _Moments() for name in ("z_norm", "z_q_norm", "error_norm", "relative_error")}
    num_patches = num_model_valid = 0
    for start in range(0, total, batch_size):
        chunk = {k_: np.asarray(arrays[k_][start : start + batch_size]) for k_ in keys}
        n = len(chunk["input"])
        if n < batch_size:  # pad the last chunk so every call has the same (compiled) shape
            chunk = {k_: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k_, v in chunk.items()}
        chunk = {"input": chunk["input"].astype(np.float32), "length": chunk["length"].astype(np.int32)}
        out = jax.device_get(fn(params, run.state.codebooks, jax.device_put(chunk, sharding.batch_sharding(mesh))))
        out = {name: np.asarray(v)[:n] for name, v in out.items()}
        keep = out["keep"]
        num_patches += keep.size
        num_model_valid += int(out["model_valid"].sum())
        codes = out["codes"][keep]  # [P, M]
        for m in range(m_levels):
            counts[m] += np.bincount(codes[:, m], minlength=k)[:k]
        for name in ("z_norm", "z_q_norm", "error_norm"):
            moments[name].add(out[name][keep])
        moments["relative_error"].add(out["error_norm"][keep] / np.maximum(out["z_norm"][keep], 1e-12))
    return {
        "counts": counts,
        "num_examples": total,
        "num_patches": num_patches,
        "num_valid_patches": int(counts[0].sum()),
        "num_padded_patches": num_patches - num_model_valid,
        "num_nonfinite_patches": num_model_valid - int(counts[0].sum()),
        **{name: m.summary() for name, m in moments.items()},
    }


# ----------------------------------------------------------------------------------------------- report


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    except ImportError:
        return False
    return True


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state or backend switching
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plots(report: dict, code_norms: np.ndarray) -> dict[str, bytes]:
    """{file name: PNG bytes}: sorted code use per level, and the norms of q_m (use-weighted) and of the codes."""
    files = {}
    for level in report["levels"]:
        m = level["level"]
        sorted_counts = np.asarray(level["sorted_counts"], np.float64)
        fig, (ax,) = _figure(8, 4)
        ax.bar(np.arange(sorted_counts.size), sorted_counts, width=1.0, color="tab:blue")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("patches (symlog)")
        ax.set_title(
            f"level {m}: utilisation {level['utilisation']:.3f}, entropy {level['entropy_bits']:.2f} bits, "
            f"perplexity {level['perplexity']:.1f} (K={sorted_counts.size})",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        files[USAGE_PLOT.format(level=m)] = _png(fig)

    fig, (ax_q, ax_c) = _figure(12, 4.5, ncols=2)
    lo, hi = float(code_norms.min()), float(code_norms.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 60)
    for level in report["levels"]:
        m = level["level"]
        ax_q.hist(
            code_norms[m],
            bins=bins,
            weights=np.asarray(level["counts"], np.float64),
            histtype="step",
            label=f"level {m}",
        )
        ax_c.hist(code_norms[m], bins=bins, histtype="step", label=f"level {m}")
    ax_q.set_title("quantised vectors ‖q_m‖ over the patches (codebook norms by depth)", fontsize=9)
    ax_q.set_xlabel("norm")
    ax_q.set_ylabel("patches (log)")
    ax_q.set_yscale("log")
    ax_c.set_title("codebook vectors ‖C_m,k‖ (all K codes)", fontsize=9)
    ax_c.set_xlabel("norm")
    ax_c.set_ylabel("codes")
    for ax in (ax_q, ax_c):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files[NORMS_PLOT] = _png(fig)
    return files


def codebook_health(
    workdir,
    *,
    iteration: int | None = None,
    step: int | None = None,
    split: str | None = None,
    max_examples: int | None = None,
    batch_size: int = 256,
    out_dir=None,
    plots: bool = True,
) -> dict:
    """Codebook health of a checkpoint of `workdir` over one pass of `split` (default: the dataset's labelled eval
    split; `max_examples` caps it, else `config.data.max_eval_examples` does). Writes `codebook_health.json` (and
    the PNGs unless `plots=False`) into `out_dir` (default: the workdir) and returns the report (see the module
    docstring; per level under "levels")."""
    run = restore_run(workdir, iteration=iteration, step=step)
    report, code_norms = health_report(run, split=split, max_examples=max_examples, batch_size=batch_size)
    report = {"workdir": paths.resolve_workdir(workdir), **report}
    out = paths.workdir_path(out_dir if out_dir is not None else workdir)
    return write_report(report, code_norms, out, plots=plots)


def health_report(run: RestoredRun, *, split: str | None, max_examples: int | None, batch_size: int):
    """(report, code norms [M, K]) of `run`'s tokenizer and codebooks over one pass of `split`."""
    config = run.config
    split = split or pipeline.eval_split(config.data)
    arrays = pipeline.eval_arrays(config.data, split, max_examples)
    acc = collect_counts(run, arrays, batch_size=batch_size)
    if acc["num_valid_patches"] == 0:
        raise ValueError(f"split {split!r}: no valid patch to count (every patch was padded or non-finite)")

    books = np.asarray(jax.device_get(run.state.codebooks.codes), np.float64)  # [M, K, D]
    code_norms = np.sqrt(np.sum(books * books, axis=-1))  # [M, K]
    counts = acc.pop("counts")
    levels = []
    for m, stats in enumerate(level_statistics(counts)):
        levels.append(
            {
                "level": m,
                **stats,
                "q_norm": _weighted_moments(code_norms[m], counts[m]),
                "codebook_norm": _moments(code_norms[m]),
                "counts": counts[m].tolist(),
                "sorted_counts": np.sort(counts[m])[::-1].tolist(),
            }
        )
    report = {
        "step": run.step,
        "phase": run.phase.name,
        "iteration": run.phase.iteration,
        "tokenizer": "cold_start" if run.cold_start else "tokenizer",
        "codebooks_initialized": bool(jax.device_get(run.state.codebooks.initialized)),
        "split": split,
        "num_levels": int(counts.shape[0]),
        "codebook_size": int(counts.shape[1]),
        **acc,
        "levels": levels,
    }
    return report, code_norms


def write_report(report: dict, code_norms, out, *, plots: bool) -> dict:
    """Writes the report into `out` (process 0), then its PNGs when `plots` and matplotlib is installed."""
    if plots and not _have_matplotlib():
        logging.warning(
            "matplotlib is not installed: writing %s without its plots (pip install 'bridle_jax[plots]' for the "
            "PNGs, or pass --no_plots)",
            HEALTH_FILE,
        )
        report["plots_skipped"] = "matplotlib is not installed (pip install 'bridle_jax[plots]')"
        plots = False
    names = [USAGE_PLOT.format(level=lv["level"]) for lv in report["levels"]] + [NORMS_PLOT] if plots else []
    report["files"] = [HEALTH_FILE, *names]
    if jax.process_index() == 0:  # the JSON first: a plotting failure never costs the numbers
        out.mkdir(parents=True, exist_ok=True)
        paths.write_text_atomic(out / HEALTH_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")
        if plots:
            for plot_name, data in _plots(report, code_norms).items():
                (out / plot_name).write_bytes(data)
    return report


class CodebookEvaluator(base.Evaluator):
    """The codebook evaluator in the pretraining loop (`config.evals.codebook`): at the end of every phase that
    (re)fits codebooks (the cold start, tokenizer and joint phases), the health of the codebooks the next encoder
    phase trains against, over `split` (default: the labelled eval split) capped at `max_examples`. Writes
    `<workdir>/codebook_health/<phase>/codebook_health.json` (with its PNGs when `plots`) and logs per level the
    utilisation and
    perplexity as `eval/codebook/{utilisation,perplexity}_level{m}`."""

    name = "codebook"
    DIR = "codebook_health"

    def __init__(self, config, **context):
        super().__init__(config, **context)
        self._reports = {}

    def at_phase_end(self, phase, state) -> base.Lines:
        if not phase.fresh_codebooks:  # an encoder phase: the codebooks of the phase before it, unchanged
            return []
        restored = RestoredRun(self.config, self.models, state, phase.end_step, phase, self.mesh)
        s = self.settings
        report, code_norms = health_report(
            restored, split=s.split, max_examples=s.max_examples, batch_size=s.batch_size
        )
        out = paths.workdir_path(self.workdir) / self.DIR / phase.name
        self._reports[phase.name] = write_report(report, code_norms, out, plots=s.plots)
        values = {}
        for level in report["levels"]:
            m = level["level"]
            values[f"eval/codebook/utilisation_level{m}"] = level["utilisation"]
            values[f"eval/codebook/perplexity_level{m}"] = level["perplexity"]
        line = ", ".join(f"level {lv['level']} {lv['perplexity']:.1f}" for lv in report["levels"])
        reporting.log_line(f"Codebook health after {phase.name} ({report['split']}): perplexity {line}")
        return [(phase.end_step, phase.name, values)]

    def results(self) -> dict:
        return self._reports


# ----------------------------------------------------------------------------------------------- CLI


def _summary_lines(report: dict) -> list[str]:
    lines = [
        (
            f"codebook health of {report['workdir']} at step {report['step']} ({report['phase']}, "
            f"{report['tokenizer']}), split {report['split']!r}: {report['num_valid_patches']} patches of "
            f"{report['num_examples']} examples"
        ),
        f"{'level':>5} {'used':>9} {'CUR':>7} {'UE bits':>8} {'perplex':>8} {'mean‖q‖':>8}",
    ]
    for lv in report["levels"]:
        lines.append(
            f"{lv['level']:>5} {lv['num_used_codes']:>4}/{report['codebook_size']:<4} {lv['utilisation']:>7.3f} "
            f"{lv['entropy_bits']:>8.3f} {lv['perplexity']:>8.2f} {lv['q_norm']['mean']:>8.4f}"
        )
    if report.get("plots_skipped"):
        lines.append(f"plots not written: {report['plots_skipped']}")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bridle_jax.evaluators.codebook", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir (config.json + checkpoints/)")
    parser.add_argument("--iteration", type=int, default=None, help="newest checkpoint of this BRIDLE iteration")
    parser.add_argument("--step", type=int, default=None, help="this checkpoint step (overrides --iteration)")
    parser.add_argument("--split", default=None, help="eval split (default: the dataset's labelled eval split)")
    parser.add_argument("--max_examples", type=int, default=None, help="cap on the split's examples")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--out_dir", default=None, help="where the JSON and PNGs go (default: the workdir)")
    parser.add_argument("--no_plots", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    report = codebook_health(
        args.workdir,
        iteration=args.iteration,
        step=args.step,
        split=args.split,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        out_dir=args.out_dir,
        plots=not args.no_plots,
    )
    if jax.process_index() == 0:
        print("\n".join(_summary_lines(report)), flush=True)
    return report


if __name__ == "__main__":
    main()
