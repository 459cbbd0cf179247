"""Step-level parity with the authors' PyTorch BRIDLE (README "Parity with the authors' code").

The golden file holds one training step of the official model at tiny sizes, 8 cases (image / audio: encoder phase
cold and warm, tokenizer phase; video: encoder phase cold, tokenizer phase). For each case the official state_dict
goes through `convert.from_official`, the recorded batch and mask are fed in, and the losses, logits or teacher
features, codes, the codebook EMA and every gradient (mapped back to PyTorch names by `convert.to_official`) are
compared with the recorded values. The config switches for the authors' behaviour are set per modality
(`official_config`). No torch: the comparisons are NumPy.

Tolerances (float32, the same math in a different summation order):
* losses: rtol 1e-5 (a few ulps of accumulated rounding);
* logits / features / z / z_q: atol 1e-5 on O(1) values;
* codes: exact (the nearest-code decisions are not near ties in these batches);
* codebooks: atol 1e-6 (unit-norm rows, one EMA step); cluster sizes (O(100)): atol 1e-6 plus numpy's rtol 1e-7;
* gradients: per tensor, max |g - g_ref| <= 1e-4 · max|g_ref| + 1e-7. A gradient is a sum over the batch and the
  tokens of products of O(1) factors through two blocks and a softmax; reordered float32 sums differ by ~1e-6
  relative per reduction, and a few reductions in series plus cancellation give ~1e-5 of the tensor's scale. The
  measured worst case is printed by `test_report` (run with -s).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import config as config_lib
from bridle_jax import convert, quantizer, steps
from bridle_jax.data import audio_pipeline, video_pipeline
from bridle_jax.models.bridle import build_models

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "official_bridle_tiny.npz"
CASES = (
    "img_enc_cold",
    "img_enc_warm",
    "img_tok",
    "aud_enc_cold",
    "aud_enc_warm",
    "aud_tok",
    "vid_enc_cold",
    "vid_tok",
)
MODALITY = {"img": "image", "aud": "audio", "vid": "video"}

LOSS_RTOL = 1e-5
ACT_ATOL = 1e-5
BOOK_ATOL = 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7

REPORT: dict = {}


def official_config(modality: str):
    """This project's config for the golden file's tiny official models, with the authors'-behaviour switches."""
    c = config_lib.base_config()
    c.modality = modality
    c.model.variant = "pico/8"
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 48, 2, 4
    c.model.estimator_width, c.model.estimator_depth, c.model.estimator_heads = 48, 2, 4
    c.quantizer.num_levels, c.quantizer.codebook_size, c.quantizer.dim = 2, 16, 24
    c.quantizer.lookup_after_ema = True  # the authors' train-mode order
    if modality == "image":
        c.data.image_size = 32
    elif modality == "audio":
        c.data = audio_pipeline.default_data_config()
        c.data.target_frames, c.data.num_mel_bins = 512, 64
        c.model.decoder_kind, c.model.decoder_heads = "local", 16  # the Swin decoder hard-codes 16 heads
        c.model.decoder_window, c.model.decoder_shift = (4, 4), (2, 0)
        c.model.pos_layout = "transposed"  # AudioMAE's table
        c.model.decoder_block_ln_eps = 1e-5  # torch's default in the released Swin block
    else:
        c.data = video_pipeline.default_data_config()
        c.data.num_frames, c.data.image_size = 16, 24
        c.model.cls_token = False
        c.model.input_proj_bias = False  # VideoMAE's encoder_to_decoder
        c.model.video_tokenizer_masked_only = True
        c.masking.kind, c.masking.ratio = "tube", 0.9
        c.quantizer.ema_kind = "vqvae"  # the authors' video RQ EMA
    return c


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.fail(f"golden file missing: {GOLDEN} (shared/ must sit beside the repository checkout)")
    with np.load(GOLDEN, allow_pickle=False) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def models():
    return {m: build_models(official_config(m)) for m in MODALITY.values()}


def state_dict(golden, case: str) -> dict:
    mod = MODALITY[case[:3]]
    sd = {k.split("/model0/", 1)[1]: v for k, v in golden.items() if k.startswith(f"{mod}/model0/")}
    sd.update({k.split("/rq_state/", 1)[1]: v for k, v in golden.items() if k.startswith(f"{case}/rq_state/")})
    return sd


def model_input(golden, mod: str) -> jnp.ndarray:
    x = golden[f"{mod}/x"]
    return jnp.asarray(np.moveaxis(x, 1, -1))  # channels last: [B,H,W,C], audio [B,T,F,1], video [B,T,H,W,C]


def masks(golden, case: str):
    """(keep_idx, restore_idx, masked) of the recorded masking."""
    masked = golden[f"{case}/mask"]
    if f"{case}/ids_keep" in golden:
        return golden[f"{case}/ids_keep"], golden[f"{case}/ids_restore"], masked
    # video: the visible tokens then the masked ones, each in increasing index order
    order = np.argsort(masked, axis=1, kind="stable")
    keep = order[:, : int((~masked[0]).sum())]
    return keep, np.argsort(order, axis=1), masked


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def absdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check_grads(grads_official: dict, golden, case: str) -> tuple[float, float]:
    want = {k.split("/grad/", 1)[1]: v for k, v in golden.items() if k.startswith(f"{case}/grad/")}
    none = [str(n) for n in np.atleast_1d(golden[f"{case}/grad_none"]) if str(n)]
    got = {k: v for k, v in grads_official.items() if k not in none}
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    worst_abs, worst_rel = 0.0, 0.0
    for name, ref in want.items():
        g = got[name]
        assert g.shape == ref.shape, name
        d = absdiff(g, ref)
        scale = float(np.abs(ref).max())
        assert d <= GRAD_RTOL * scale + GRAD_ATOL, f"{case} grad {name}: max diff {d:.3g}, scale {scale:.3g}"
        worst_abs = max(worst_abs, d)
        if scale > 1e-5:  # relative figures only where the gradient is not ~0 (e.g. a k bias, cancelling terms)
            worst_rel = max(worst_rel, d / scale)
    return worst_abs, worst_rel


def run_encoder_case(golden, models, case: str) -> dict:
    mod = MODALITY[case[:3]]
    m = models[mod]
    params, codebooks, _ = convert.from_official(state_dict(golden, case), m)
    x = model_input(golden, mod)
    keep, restore, masked = masks(golden, case)
    cold = "cold" in case
    cfg = official_config(mod)
    mb = {"x": x, "keep_idx": jnp.asarray(keep), "restore_idx": jnp.asarray(restore), "targets": jnp.asarray(masked)}
    idx = jnp.asarray(np.stack([np.flatnonzero(row) for row in masked]), jnp.int32)

    @jax.jit  # one compilation per case: ~4x faster than op-by-op here
    def compute(params, codebooks, mb, idx):
        if cfg.model.video_tokenizer_masked_only:  # the step's path: T on the masked tokens only, codes scattered
            z = steps.tokenizer_features(m, params, mb["x"], cold_start=cold, token_idx=idx)
            codes = steps._masked_only_codes(m, params, codebooks, mb["x"], mb["keep_idx"], cfg.quantizer, cold)
        else:
            z = steps.tokenizer_features(m, params, mb["x"], cold_start=cold)
            codes = steps._quantize(codebooks, z, cfg.quantizer).codes
        (loss, _), grads = jax.value_and_grad(steps.encoder_loss, has_aux=True)(params["encoder"], m, mb, codes)
        encoded, _ = m.encoder.apply({"params": params["encoder"]["encoder"]}, mb["x"], keep_idx=mb["keep_idx"])
        logits = m.decoder.apply({"params": params["encoder"]["decoder"]}, encoded, mb["restore_idx"], m.patch_grid)
        return z, codes, loss, grads, logits

    z, codes, loss, grads, logits = compute(params, codebooks, mb, idx)
    logits = np.asarray(logits).reshape(*masked.shape, -1)[masked]

    z_ref, codes_ref = golden[f"{case}/z"], golden[f"{case}/codes"]
    z_cmp, codes_cmp = np.asarray(z), np.asarray(codes)
    if z_ref.shape[1] != codes_cmp.shape[1]:  # video: the official tokenizer quantises the masked tokens only
        codes_cmp = codes_cmp[masked].reshape(codes_ref.shape)
    np.testing.assert_allclose(z_cmp, z_ref, atol=ACT_ATOL, err_msg=f"{case} z")
    np.testing.assert_array_equal(codes_cmp, codes_ref, err_msg=f"{case} codes")
    np.testing.assert_array_equal(np.asarray(codes)[masked], golden[f"{case}/targets_masked"])
    np.testing.assert_allclose(logits, golden[f"{case}/logits_masked"], atol=ACT_ATOL, err_msg=f"{case} logits")
    np.testing.assert_allclose(float(loss), float(golden[f"{case}/loss"]), rtol=LOSS_RTOL, err_msg=f"{case} loss")
    # the encoder phase never changes the codebooks; the authors' eval-mode forward still moves the cluster-size
    # statistic, which `ema_update` on the same stage inputs reproduces (the project keeps it unchanged here)
    np.testing.assert_array_equal(np.asarray(codebooks.codes), golden[f"{case}/rq/codebook_after"])
    out = quantizer.quantize(codebooks, jnp.asarray(z_ref))
    stats = quantizer.ema_update(codebooks, out.stage_inputs, out.codes)
    np.testing.assert_allclose(stats.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"], atol=BOOK_ATOL)
    g_abs, g_rel = check_grads(convert.to_official({"encoder": grads}, m), golden, case)
    return {
        "loss": rel(loss, golden[f"{case}/loss"]),
        "logits": absdiff(logits, golden[f"{case}/logits_masked"]),
        "z": absdiff(z_cmp, z_ref),
        "codes": int((codes_cmp != codes_ref).sum()),
        "codebook": absdiff(stats.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"]),
        "grad_abs": g_abs,
        "grad_rel": g_rel,
    }


@pytest.mark.parametrize("case", [c for c in CASES if "enc" in c])
def test_encoder_phase(golden, models, case):
    REPORT[case] = run_encoder_case(golden, models, case)


def run_tokenizer_case(golden, models, case: str) -> dict:
    mod = MODALITY[case[:3]]
    m = models[mod]
    cfg = official_config(mod)
    params, codebooks, extras = convert.from_official(state_dict(golden, case), m)
    x = model_input(golden, mod)
    teacher = jax.jit(lambda p: steps.teacher_features(m, p, x))(params)
    video = mod == "video"
    embed_ema = jnp.asarray(extras["embed_ema"]) if video else None

    def loss_fn(p):  # the project's own step code, with the config's switches
        loss, (cos, out) = steps.tokenizer_loss(p, m, codebooks, cfg.quantizer, {"x": x, "valid": None}, teacher)
        return loss, (cos, out)

    @jax.jit  # one compilation per case
    def compute(params):
        (loss, (cos, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["tokenizer"])
        z = m.tokenizer.apply({"params": params["tokenizer"]["tokenizer"]}, x)
        pred = m.estimator.apply({"params": params["tokenizer"]["estimator"]}, out.z_q, m.patch_grid)
        if video:  # what tokenizer_step applies after the forward (ema_kind "vqvae"), and with the explicit accumulator
            new, _ = quantizer.ema_update_vqvae(codebooks, None, out.stage_inputs, out.codes)
            explicit, acc = quantizer.ema_update_vqvae(codebooks, embed_ema, out.stage_inputs, out.codes)
            return loss, cos, out, pred, grads, z, new, (explicit, acc, quantizer.vqvae_accumulator(codebooks))
        new = quantizer.ema_update(codebooks, out.stage_inputs, out.codes, decay=cfg.quantizer.decay)
        return loss, cos, out, pred, grads, z, new, None

    loss, cos, out, pred, grads, z, new, vq = compute(params)
    if video:
        explicit, acc, recovered = vq
        np.testing.assert_allclose(recovered, golden[f"{case}/rq/embed_ema_before"], atol=BOOK_ATOL)
        np.testing.assert_allclose(acc, golden[f"{case}/rq/embed_ema_after"], atol=BOOK_ATOL)
        np.testing.assert_allclose(explicit.codes, golden[f"{case}/rq/codebook_after"], atol=BOOK_ATOL)
    t_ref = golden[f"{case}/teacher"]
    t_ref = t_ref if video else t_ref[:, 1:]
    np.testing.assert_allclose(teacher, t_ref, atol=ACT_ATOL, err_msg=f"{case} teacher")
    np.testing.assert_allclose(z, golden[f"{case}/z"], atol=ACT_ATOL, err_msg=f"{case} z")
    np.testing.assert_array_equal(out.codes, golden[f"{case}/codes"], err_msg=f"{case} codes")
    np.testing.assert_allclose(out.z_q, golden[f"{case}/z_q"], atol=ACT_ATOL, err_msg=f"{case} z_q")
    np.testing.assert_allclose(pred, golden[f"{case}/estimator_out"], atol=ACT_ATOL, err_msg=f"{case} estimator")
    for name, got in (("loss", loss), ("loss_cos", cos), ("loss_rq", out.loss)):
        np.testing.assert_allclose(
            float(got), float(golden[f"{case}/{name}"]), rtol=LOSS_RTOL, err_msg=f"{case} {name}"
        )
    np.testing.assert_allclose(out.level_mse, golden[f"{case}/rq/level_mse"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(new.codes, golden[f"{case}/rq/codebook_after"], atol=BOOK_ATOL, err_msg=f"{case} EMA")
    np.testing.assert_allclose(new.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"], atol=BOOK_ATOL)
    g_abs, g_rel = check_grads(convert.to_official({"tokenizer": grads}, m), golden, case)
    return {
        "loss": max(rel(loss, golden[f"{case}/loss"]), rel(cos, golden[f"{case}/loss_cos"])),
        "teacher/z_q/estimator": max(
            absdiff(teacher, t_ref),
            absdiff(out.z_q, golden[f"{case}/z_q"]),
            absdiff(pred, golden[f"{case}/estimator_out"]),
        ),
        "z": absdiff(z, golden[f"{case}/z"]),
        "codes": int((np.asarray(out.codes) != golden[f"{case}/codes"]).sum()),
        "codebook": max(
            absdiff(new.codes, golden[f"{case}/rq/codebook_after"]),
            absdiff(new.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"]),
        ),
        "grad_abs": g_abs,
        "grad_rel": g_rel,
    }


@pytest.mark.parametrize("case", [c for c in CASES if "tok" in c])
def test_tokenizer_phase(golden, models, case):
    REPORT[case] = run_tokenizer_case(golden, models, case)


def test_report():
    """The measured differences of every case (run with -s to see the table; README "Parity")."""
    assert sorted(REPORT) == sorted(CASES), f"run the whole module: cases missing {sorted(set(CASES) - set(REPORT))}"
    print("\n" + json.dumps(REPORT, indent=1))


@pytest.mark.parametrize("case", ["vid_tok"])  # both switches; img_tok's path is checked above
def test_tokenizer_step_with_switches(golden, models, case):
    """The jitted `steps.tokenizer_step` under the switches (lookup_after_ema; video: ema_kind "vqvae") reproduces
    the recorded loss and the codebooks after the step's EMA."""
    import functools

    from bridle_jax import optim, schedule
    from bridle_jax import state as state_lib

    mod = MODALITY[case[:3]]
    m, cfg = models[mod], official_config(mod)
    params, codebooks, _ = convert.from_official(state_dict(golden, case), m)
    phase = schedule.Phase(index=1, kind="tokenizer", cold_start=False, steps=1, iteration=1, start_step=0)
    tx, lr = optim.make_optimizer(cfg.optim, "tokenizer", 1)
    state = state_lib.create(m, cfg, tx, phase, 0).replace(params=params, codebooks=codebooks)
    step = jax.jit(functools.partial(steps.tokenizer_step, models=m, config=cfg, tx=tx, lr_schedule=lr))
    new, metrics = step(state, {"input": model_input(golden, mod)})
    np.testing.assert_allclose(float(metrics["train/loss"]), float(golden[f"{case}/loss"]), rtol=LOSS_RTOL)
    np.testing.assert_allclose(new.codebooks.codes, golden[f"{case}/rq/codebook_after"], atol=BOOK_ATOL)
    np.testing.assert_allclose(new.codebooks.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"], atol=BOOK_ATOL)


@pytest.mark.parametrize("case", ["vid_enc_cold"])
def test_encoder_step_with_switches(golden, models, case, monkeypatch):
    """The jitted `steps.encoder_step` on the recorded mask (make_mask replaced), under the video switches and
    quantizer.encoder_cluster_size_ema: the recorded loss, and the cluster sizes the authors' eval-mode forward left."""
    import functools

    from bridle_jax import masking, optim, schedule
    from bridle_jax import state as state_lib

    mod = MODALITY[case[:3]]
    m, cfg = models[mod], official_config(mod)
    cfg.quantizer.encoder_cluster_size_ema = True
    params, codebooks, _ = convert.from_official(state_dict(golden, case), m)
    keep, restore, masked = masks(golden, case)
    recorded = masking.Mask(jnp.asarray(keep, jnp.int32), jnp.asarray(restore, jnp.int32), jnp.asarray(masked))
    monkeypatch.setattr(steps.masking, "make_mask", lambda *a, **k: recorded)
    phase = schedule.Phase(index=0, kind="encoder", cold_start=True, steps=1, iteration=1, start_step=0)
    tx, lr = optim.make_optimizer(cfg.optim, "encoder", 1)
    state = state_lib.create(m, cfg, tx, phase, 0).replace(params=params, codebooks=codebooks)
    step = jax.jit(functools.partial(steps.encoder_step, models=m, config=cfg, tx=tx, lr_schedule=lr, cold_start=True))
    new, metrics = step(state, {"input": model_input(golden, mod)})
    np.testing.assert_allclose(float(metrics["train/loss"]), float(golden[f"{case}/loss"]), rtol=LOSS_RTOL)
    np.testing.assert_array_equal(new.codebooks.codes, golden[f"{case}/rq/codebook_after"])
    np.testing.assert_allclose(new.codebooks.cluster_size, golden[f"{case}/rq/cluster_size_ema_after"], atol=BOOK_ATOL)
