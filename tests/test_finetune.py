"""Fine-tuning and linear probes (bridle_jax/finetune/, data/randaugment.py,
data/weighted_sampler.py, vit drop-path, optim layer decay):
NumPy references for the optimizer step and the on-device augmentations, the drop-path semantics, the fold logic,
the bad-input messages, and one fine-tune vs linear-probe comparison from a tiny pretraining workdir."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from bridle_jax import finetune, optim
from bridle_jax.data import randaugment, weighted_sampler
from bridle_jax.finetune import augment
from bridle_jax.models import vit

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny image pretraining workdir: one short cold-start encoder phase (iteration 1 kept), no probe."""
    from bridle_jax import train

    workdir = str(tmp_path_factory.mktemp("pretrain"))
    c = tiny.tiny_config()
    c.evals.linear_probe.enabled = False
    c.schedule.phases = ("encoder_cold_start:2",)
    c.checkpoint.async_save = False
    train.train_and_evaluate(c, workdir)
    return workdir


def _digits_config(init_from, mode="finetune", steps=100):
    c = finetune.base_config("image")
    c.init_from = init_from
    c.mode = mode
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.num_threads, c.data.prefetch_buffer_size = 1, 2
    c.num_classes = 10
    c.batch_size = 32
    c.num_steps, c.warmup_steps = steps, 10
    c.eval_every_steps, c.log_every_steps = steps // 2, steps // 2
    c.eval_batch_size = 128
    c.optim.lr = 2e-3 if mode == "finetune" else 1e-2
    c.model.drop_path = 0.1 if mode == "finetune" else 0.0
    # digits are 8x8 strokes: no flips, mild crops, no RandAugment (it is tested on its own below)
    c.augment.flip, c.augment.crop_scale, c.augment.randaugment_ops = False, (0.5, 1.0), 0
    c.checkpoint.async_save = False
    return c


def _tiny_encoder(**kw):
    return vit.ViTEncoder(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4, **kw)


# ------------------------------------------------------------------------------------------------ layer decay


def test_layer_decay_scales_and_one_adamw_step_match_numpy():
    rng = np.random.default_rng(0)
    clf = finetune.Classifier(encoder=_tiny_encoder(), num_classes=5)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    params = clf.init(jax.random.PRNGKey(1), x)["params"]
    depth, decay = 3, 0.75
    scales = optim.layer_decay_scales(params, depth, decay)
    # the module whose parameters a leaf is: its first key below "encoder" (blocks: below "transformer")
    expected_layer = {"patch_embed": 0, "cls": 0, "block_0": 1, "block_1": 2, "block_2": 3, "norm": 4}
    expected_layer.update({"fc_norm": 4, "head": 4})
    seen = set()
    for path, s in jax.tree_util.tree_leaves_with_path(scales):
        keys = [k.key for k in path]
        name = keys[0] if keys[0] != "encoder" else keys[2] if keys[1] == "transformer" else keys[1]
        assert s == pytest.approx(decay ** (depth + 1 - expected_layer[name])), keys
        seen.add(name)
    assert seen == set(expected_layer)

    # one AdamW step (lr at its peak: no warm-up) against float64 NumPy, decay mask and layer scales included
    c = finetune.base_config("image")
    c.num_steps, c.warmup_steps = 10, 0
    c.optim.lr, c.optim.weight_decay = 1e-2, 0.3
    tx = finetune.make_optimizer(c, params, depth)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for (path, p), g, s, n in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(grads),
        jax.tree.leaves(scales),
        jax.tree.leaves(new),
    ):
        keys = [k.key for k in path]
        p64, g64 = np.asarray(p, np.float64), np.asarray(g, np.float64)
        decayed = p64.ndim > 1 and "cls" not in keys
        adam = g64 / (np.abs(g64) + 1e-8)  # first Adam step: m_hat = g, v_hat = g^2
        ref = p64 - 1e-2 * s * (adam + (0.3 * p64 if decayed else 0.0))
        np.testing.assert_allclose(np.asarray(n), ref, rtol=1e-5, atol=1e-6, err_msg=str(keys))


# ------------------------------------------------------------------------------------------------ drop-path


def test_drop_path_identity_at_rate_zero_and_in_eval():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8, 8, 3)), jnp.float32)
    plain = _tiny_encoder()
    params = plain.init(jax.random.PRNGKey(0), x)["params"]
    ref, _ = plain.apply({"params": params}, x)
    train_zero, _ = plain.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    evaluated, _ = _tiny_encoder(drop_path=0.5).apply({"params": params}, x)  # deterministic (eval) by default
    np.testing.assert_array_equal(np.asarray(train_zero), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(ref))
    dropped, _ = _tiny_encoder(drop_path=0.5).apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)}
    )
    assert not np.allclose(np.asarray(dropped), np.asarray(ref))


def test_drop_path_drops_whole_residual_branches_per_example():
    import flax.linen as nn

    b, n, w, rate = 64, 5, 16, 0.5
    x = jnp.asarray(np.random.default_rng(4).normal(size=(b, n, w)), jnp.float32)
    block = vit.Block(w, 2, 32, drop_path=rate, deterministic=False)
    params = vit.Block(w, 2, 32).init(jax.random.PRNGKey(0), x)["params"]
    out = np.asarray(block.apply({"params": params}, x, rngs={"dropout": jax.random.PRNGKey(7)}))

    def ln(name, v):
        return nn.LayerNorm(epsilon=1e-6).apply({"params": params[name]}, v)

    def attn(v):
        return vit.Attention(w, 2).apply({"params": params["attn"]}, ln("norm1", v))

    def mlp(v):
        h = nn.gelu(ln("norm2", v) @ params["fc1"]["kernel"] + params["fc1"]["bias"], approximate=False)
        return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]

    kept = []
    for keep_attn in (0.0, 1.0 / (1 - rate)):
        y = x + keep_attn * attn(x)
        for keep_mlp in (0.0, 1.0 / (1 - rate)):
            kept.append(((keep_attn > 0, keep_mlp > 0), np.asarray(y + keep_mlp * mlp(y))))
    choices = []
    for i in range(b):
        match = [k for k, cand in kept if np.allclose(out[i], cand[i], rtol=1e-4, atol=1e-4)]
        assert len(match) == 1, f"example {i}: output is not one whole-branch keep/drop combination"
        choices.append(match[0])
    attn_kept = {c[0] for c in choices}
    mlp_kept = {c[1] for c in choices}
    assert attn_kept == {True, False} and mlp_kept == {True, False}  # both outcomes occur (p = 1 - 2^-63)


# ------------------------------------------------------------------------------------------------ augmentations


def test_mixup_matches_numpy_reference():
    rng = np.random.default_rng(5)
    b, s = 16, 50
    lengths = rng.integers(10, s + 1, size=b).astype(np.int32)
    wav = rng.normal(size=(b, s)).astype(np.float32) + 0.3
    wav[np.arange(s)[None, :] >= lengths[:, None]] = 0.0
    onehot = np.eye(b, dtype=np.float32)  # example i has class i: the partner is readable from the targets
    out, targets, lam = augment.mixup(jax.random.PRNGKey(0), wav, lengths, onehot, rate=1.0, alpha=10.0)
    out, targets, lam = np.asarray(out), np.asarray(targets), np.asarray(lam)
    assert np.all((lam > 0) & (lam < 1)) and np.allclose(targets.sum(1), 1.0)
    for i in range(b):
        j = int(np.argmax(targets[i] - lam[i] * onehot[i])) if lam[i] < 1 else i
        real = np.arange(s) < lengths[i]
        x1 = np.where(real, wav[i] - wav[i, : lengths[i]].astype(np.float64).mean(), 0.0)
        x2 = np.where(np.arange(s) < lengths[j], wav[j] - wav[j, : lengths[j]].astype(np.float64).mean(), 0.0)
        ref = np.where(real, lam[i] * x1 + (1 - lam[i]) * x2, 0.0)
        np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=1e-5)
        assert targets[i, i] == pytest.approx(lam[i] + (1 - lam[i]) * (j == i), abs=1e-6)
    lam = np.asarray(augment.beta_symmetric(jax.random.PRNGKey(9), 10, (20000,)))  # Beta(10, 10)
    assert lam.mean() == pytest.approx(0.5, abs=0.005) and lam.var() == pytest.approx(1 / 84, rel=0.05)
    with pytest.raises(ValueError, match="positive integer"):
        augment.beta_symmetric(jax.random.PRNGKey(0), 2.5, (2,))
    same, t0, lam0 = augment.mixup(jax.random.PRNGKey(0), wav, lengths, onehot, rate=0.0)
    np.testing.assert_array_equal(np.asarray(same), wav)
    np.testing.assert_array_equal(np.asarray(t0), onehot)
    assert np.all(np.asarray(lam0) == 1.0)


def test_spec_augment_masks_contiguous_bands_with_the_fill_value():
    rng = np.random.default_rng(6)
    b, t, f, fill = 256, 40, 12, -0.75
    feats = rng.normal(size=(b, t, f)).astype(np.float32)
    out = np.asarray(augment.spec_augment(jax.random.PRNGKey(1), feats, freq_mask=6, time_mask=10, fill=fill))
    changed = out != feats
    np.testing.assert_array_equal(out[changed], fill)
    widths_f, widths_t = [], []
    for i in range(b):
        cols = np.flatnonzero(changed[i].all(axis=0))
        rows = np.flatnonzero(changed[i].all(axis=1))
        for idx, limit, widths in ((cols, 6, widths_f), (rows, 10, widths_t)):
            assert len(idx) < limit and (len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx))  # one band, < param
            widths.append(len(idx))
        masked = np.zeros((t, f), bool)
        masked[:, cols], masked[rows, :] = True, True
        np.testing.assert_array_equal(changed[i], masked)  # nothing outside the two bands changes
    # widths are floor(U * param): uniform on 0..param-1, mean (param - 1) / 2
    assert np.mean(widths_f) == pytest.approx(2.5, abs=0.5) and np.mean(widths_t) == pytest.approx(4.5, abs=0.8)


def test_patch_mask_2d_keeps_whole_rows_times_whole_columns():
    keep = np.asarray(augment.patch_mask_2d(jax.random.PRNGKey(2), 32, (10, 5), mask_t_prob=0.2, mask_f_prob=0.2))
    assert keep.shape == (32, 8 * 4) and keep.dtype == np.int32
    row_sets = set()
    for k in keep:
        rows, cols = k // 5, k % 5
        assert len(set(k.tolist())) == len(k)
        assert len(set(rows.tolist())) == 8 and len(set(cols.tolist())) == 4
        for r in set(rows.tolist()):  # every kept row keeps the same 4 columns
            assert set(cols[rows == r].tolist()) == set(cols.tolist())
        row_sets.add(tuple(sorted(set(rows.tolist()))))
    assert len(row_sets) > 1  # drawn per example
    with pytest.raises(ValueError, match="keep no row"):
        augment.patch_mask_2d(jax.random.PRNGKey(0), 2, (2, 2), mask_t_prob=0.6, mask_f_prob=0.0)


def test_randaugment_and_random_erasing():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    invert = randaugment.RandAugment(num_ops=1, magnitude_std=0.0, prob=1.0, ops=("Invert",))
    out = invert.random_map({"image": image, "label": 3}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], 255 - image)
    assert out["label"] == 3
    ra = randaugment.RandAugment()  # rand-m9-mstd0.5-inc1
    clip = np.repeat(image[None], 3, axis=0)
    for seed in range(20):  # every op at some point; a clip gets the same ops on every frame
        aug = ra.random_map({"image": clip}, np.random.default_rng(seed))["image"]
        assert aug.dtype == np.uint8 and aug.shape == clip.shape
        np.testing.assert_array_equal(aug[0], aug[2])
    with pytest.raises(ValueError, match="unknown ops"):
        randaugment.RandAugment(ops=("Cutout",))

    x = rng.normal(size=(20, 30, 3)).astype(np.float32)
    erase = randaugment.RandomErasing(prob=1.0)
    for seed in range(10):
        y = erase.random_map({"image": x}, np.random.default_rng(seed))["image"]
        diff = np.any(y != x, axis=-1)
        rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
        assert diff.sum() == len(rows) * len(cols)  # one axis-aligned box
        assert 0.02 * 600 * 0.5 <= diff.sum() <= 600 / 3 * 1.5
    np.testing.assert_array_equal(randaugment.RandomErasing(prob=0.0).random_map({"image": x}, rng)["image"], x)


def test_weighted_sample_draws_in_proportion_to_the_weights():
    import grain

    parent = grain.MapDataset.source(list(range(4)))
    ds = weighted_sampler.WeightedSample(parent, np.array([0.0, 1.0, 1.0, 2.0]), epoch_len=4000, seed=3)
    draws = np.array([ds[i] for i in range(4000)])
    freq = np.bincount(draws, minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.0, 0.25, 0.25, 0.5], atol=0.03)
    assert [ds[i] for i in range(4000, 4010)] != draws[:10].tolist()  # a new draw each epoch
    again = weighted_sampler.WeightedSample(parent, np.array([0.0, 1.0, 1.0, 2.0]), epoch_len=4000, seed=3)
    assert [again[i] for i in range(50)] == draws[:50].tolist()

    class Labels:  # a multi-label source: labels only
        def __init__(self, y):
            self.y = y

        def __len__(self):
            return len(self.y)

        def label(self, i):
            return self.y[i]

    y = (np.random.default_rng(10).random((37, 6)) < 0.3).astype(np.float32)
    np.testing.assert_allclose(
        weighted_sampler.sampler_weights(Labels(y), chunk=5), weighted_sampler.weighted_sampler_weights(y), rtol=1e-12
    )


# ------------------------------------------------------------------------------------------------ folds


def test_fold_config_and_cross_validation_summary(tmp_path, monkeypatch):
    c = finetune.base_config("audio")
    c.data.name = "sounds"
    c.init_from = "unused"
    c.num_classes = 10
    c.cv_folds = (1, 2, 3, 4, 5)
    f3 = finetune.fold_config(c, 3)
    assert tuple(f3.data.train_folds) == (1, 2, 4, 5) and tuple(f3.data.test_folds) == (3,)
    assert tuple(f3.cv_folds) == () and tuple(c.cv_folds) == (1, 2, 3, 4, 5)  # the original is untouched
    with pytest.raises(ValueError, match="test fold 6"):
        finetune.fold_config(c, 6)

    rng = np.random.default_rng(8)
    best, last = rng.uniform(0.5, 1.0, 5), rng.uniform(0.4, 0.9, 5)
    calls = []

    def fake_run_single(fc, workdir):
        k = fc.data.test_folds[0]
        calls.append((tuple(fc.data.train_folds), k, os.path.basename(workdir)))
        return {
            "best": {"step": 3, "top1": float(best[k - 1])},
            "last": {"step": 9, "top1": float(last[k - 1])},
            "init_iteration": 2,
            "test_folds": [k],
        }

    monkeypatch.setattr(finetune.runner, "run_single", fake_run_single)
    result = finetune.run(c, str(tmp_path))
    assert calls == [(tuple(f for f in range(1, 6) if f != k), k, f"fold_{k}") for k in range(1, 6)]
    for which, values in (("best", best), ("last", last)):
        s = result["summary"][which]
        assert s["mean"] == pytest.approx(np.mean(values)) and s["std"] == pytest.approx(np.std(values, ddof=1))
    saved = json.loads((tmp_path / finetune.RESULT_FILE).read_text())
    assert saved["done"] and saved["summary"]["best"]["num_folds"] == 5
    assert "+-" in finetune.format_result(result)
    assert finetune.steps_for_epochs(2, 1000, 64) == 30  # 15 full batches per epoch (drop_last)


# ------------------------------------------------------------------------------------------------ configs and bad input


@pytest.mark.parametrize(
    "name,arg",
    [
        ("esc50_finetune", None),
        ("esc50_finetune", "linear_probe"),
        ("audioset_finetune", None),
        ("audioset_finetune", "as20k"),
        ("audioset_finetune", "as20k_lp"),
        ("imagenet_finetune", None),
        ("imagenet_finetune", "linear_probe"),
        ("kinetics400_finetune", None),
        ("sounds_finetune", None),
    ],
)
def test_recipes_validate(name, arg):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", tiny.ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    with pytest.raises(ValueError, match="config.init_from"):
        finetune.validate(c)
    c.init_from = "/some/workdir"
    if c.data.name != "sounds":
        c.data.data_dir = "/some/data"
    finetune.validate(c)
    assert c.warmup_steps < c.num_steps and c.eval_every_steps <= c.num_steps


def test_bad_inputs_name_the_field_or_path(pretrained, tmp_path):
    c = _digits_config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        finetune.setup(c)

    unfinished = tmp_path / "unfinished"
    (unfinished / "encoders" / "iteration_0").mkdir(parents=True)
    shutil.copy(os.path.join(pretrained, "config.json"), unfinished / "config.json")
    with pytest.raises(FileNotFoundError, match="no finished encoder"):
        finetune.setup(_digits_config(str(unfinished)))

    c = _digits_config(pretrained)
    c.init_iteration = 7
    with pytest.raises(ValueError, match="config.init_iteration=7"):
        finetune.setup(c)

    audio = finetune.base_config("audio")
    audio.data.name, audio.init_from, audio.num_classes = "sounds", pretrained, 10
    with pytest.raises(ValueError, match="config.modality='audio' does not match the checkpoint"):
        finetune.setup(audio)

    c = _digits_config(pretrained)
    c.data.image_size = 18
    with pytest.raises(ValueError, match="config.data.image_size"):
        finetune.setup(c)

    c = _digits_config(pretrained)
    c.num_classes = 5  # digits has labels 0..9
    with pytest.raises(ValueError, match=r"label \d is outside 0..4: config.num_classes=5"):
        finetune.run_single(c, str(tmp_path / "ft5"))
    c.num_classes = 12
    with pytest.raises(ValueError, match="config.num_classes=12 does not match the data"):
        finetune.run_single(c, str(tmp_path / "ft12"))
    with pytest.raises(ValueError, match="multi-hot"):
        finetune.targets_from_labels(np.array([1, 2]), 3, True, "x")

    c = _digits_config(pretrained)
    c.mode = "probe"
    with pytest.raises(ValueError, match="config.mode"):
        finetune.validate(c)


# ------------------------------------------------------------------------------------------------ end to end


def test_finetune_beats_linear_probe_and_probe_keeps_the_encoder(pretrained, tmp_path):
    setup = finetune.setup(_digits_config(pretrained, "linear_probe"))
    assert setup.iteration == 1
    lp = finetune.run_single(_digits_config(pretrained, "linear_probe"), str(tmp_path / "lp"))
    for a, b in zip(jax.tree.leaves(setup.encoder_params), jax.tree.leaves(lp["final_state"].frozen["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen: bit-identical
    assert set(lp["final_state"].params) == {"fc_norm", "head"}

    ft = finetune.run_single(_digits_config(pretrained, "finetune"), str(tmp_path / "ft"))
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(setup.encoder_params), jax.tree.leaves(ft["final_state"].params["encoder"])
    ):
        # every encoder parameter trains except E's final LayerNorm, which the global-pool head bypasses (as MAE
        # deletes it): no gradient, and no weight decay on 1-D parameters
        unused = path[0].key == "norm"
        assert np.array_equal(np.asarray(a), np.asarray(b)) == unused, jax.tree_util.keystr(path)
    saved = json.loads((tmp_path / "ft" / finetune.RESULT_FILE).read_text())
    assert saved["done"] and [h["step"] for h in saved["history"]] == [50, 100]
    assert saved["best"]["top1"] == max(h["top1"] for h in saved["history"])
    assert saved["last"] == saved["history"][-1]
    assert 0.0 <= saved["last"]["top1"] <= saved["last"]["top5"] <= 1.0
    # same data, same budget: training the encoder too beats training the head alone
    assert ft["best"]["top1"] > lp["best"]["top1"], (ft["history"], lp["history"])
    assert ft["best"]["top1"] > 0.3  # 10 classes: well above chance
    again = finetune.run(_digits_config(pretrained, "finetune"), str(tmp_path / "ft"))  # finished: only reports
    assert again["history"] == saved["history"]


def test_preempted_finetune_resumes_bit_identically(pretrained, tmp_path, monkeypatch):
    from bridle_jax import preemption

    def config():
        c = _digits_config(pretrained, "finetune", steps=6)
        c.warmup_steps, c.eval_every_steps, c.checkpoint.every_steps = 2, 3, 100
        return c

    straight = finetune.run_single(config(), str(tmp_path / "straight"))
    original = preemption.PreemptionWatch.should_stop
    monkeypatch.setattr(preemption.PreemptionWatch, "should_stop", lambda self, step: step == 4)
    first = finetune.run_single(config(), str(tmp_path / "resumed"))
    assert first["preempted"] and not first["done"] and int(first["final_state"].step) == 4
    monkeypatch.setattr(preemption.PreemptionWatch, "should_stop", original)
    resumed = finetune.run_single(config(), str(tmp_path / "resumed"))
    assert resumed["done"] and resumed["history"] == straight["history"]
    for a, b in zip(jax.tree.leaves(straight["final_state"].params), jax.tree.leaves(resumed["final_state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_audio_cross_validation_end_to_end_from_random_init(tmp_path):
    """The sounds recipe (mixup, SpecAugment, 2-D patch masking on device; padded frames; CE) on 2 folds, from a
    random-init encoder of an audio workdir's architecture (init_iteration=0 needs only its config.json)."""
    from bridle_jax import workdir as workdir_lib
    from tests.test_train_modalities import audio_config

    pre = str(tmp_path / "audio_pretrain")
    workdir_lib.record_start(pre, audio_config(), {})  # 160 frames: the 126 real ones leave padded patch rows
    c = tiny.load_config("sounds_finetune")
    c.init_from, c.init_iteration = pre, 0
    c.data.target_frames = 160
    c.cv_folds = (1, 2)
    c.epochs = c.warmup_epochs = c.eval_every_epochs = None  # the recipe's epochs off: a few steps
    c.batch_size, c.num_steps, c.warmup_steps = 16, 4, 1
    c.eval_every_steps = c.log_every_steps = 2
    c.checkpoint.async_save = False
    assert c.augment.mixup > 0 and c.augment.freq_mask and c.augment.time_mask and c.augment.mask_t_prob > 0
    result = finetune.run(c, str(tmp_path / "ft"))
    assert result["done"] and sorted(result["folds"]) == ["1", "2"]
    for k in (1, 2):
        fold = json.loads((tmp_path / "ft" / f"fold_{k}" / finetune.RESULT_FILE).read_text())
        assert fold["done"] and fold["test_folds"] == [k] and fold["init_iteration"] == 0
        assert fold["num_eval_examples"] == 80 and [h["step"] for h in fold["history"]] == [2, 4]
        rows = [json.loads(line) for line in (tmp_path / "ft" / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        assert len(losses) == 2 and np.all(np.isfinite(losses)) and all(r.get("train/nonfinite", 0) == 0 for r in rows)
    best = [result["folds"][k]["best"]["top1"] for k in ("1", "2")]
    assert result["summary"]["best"]["mean"] == pytest.approx(np.mean(best))


def test_video_finetune_streams_the_eval_split(tmp_path):
    """Video eval clips are decoded chunk by chunk at every evaluation; they equal the pipeline's eval arrays."""
    from bridle_jax import workdir as workdir_lib
    from bridle_jax.data import pipeline
    from tests.test_train_modalities import video_config

    pre = str(tmp_path / "video_pretrain")
    pc = video_config()
    workdir_lib.record_start(pre, pc, {})
    c = finetune.base_config("video")
    c.data = pc.data
    c.data.flip, c.data.max_eval_examples = True, 20
    c.init_from, c.init_iteration, c.num_classes = pre, 0, 10
    c.batch_size, c.num_steps, c.warmup_steps, c.eval_every_steps, c.log_every_steps = 16, 4, 1, 2, 2
    c.eval_batch_size = 16
    c.checkpoint.async_save = False
    chunks = list(pipeline.eval_batches(c.data, "test", None, 8))  # what finetune.eval_logits streams
    assert [len(ch["input"]) for ch in chunks] == [8, 8, 4]
    arrays = pipeline.eval_arrays(c.data, "test")
    for key in ("input", "length", "label"):
        np.testing.assert_array_equal(np.concatenate([ch[key] for ch in chunks]), arrays[key])
    np.testing.assert_array_equal(pipeline.eval_labels(c.data, "test"), arrays["label"])
    result = finetune.run(c, str(tmp_path / "ft"))
    assert result["done"] and result["num_eval_examples"] == 20 and [h["step"] for h in result["history"]] == [2, 4]
    assert 0.0 <= result["best"]["top1"] <= result["best"]["top5"] <= 1.0


def test_repeated_nonfinite_finetune_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    pretrained, tmp_path, monkeypatch
):
    """As pretraining: non-finite steps are skipped, `optim.max_consecutive_nonfinite` in a row stop the run without
    saving, and the newest checkpoint is the last good step's."""
    from bridle_jax import checkpoint as ckpt_lib
    from bridle_jax import run as run_lib

    real = finetune.train_iterator
    monkeypatch.setattr(finetune.runner, "train_iterator", lambda *a, **k: tiny.PoisonedIterator(real(*a, **k), 3))
    c = _digits_config(pretrained, "finetune", steps=12)
    c.log_every_steps, c.eval_every_steps, c.checkpoint.every_steps = 1, 100, 1
    c.optim.max_consecutive_nonfinite = 3
    workdir = str(tmp_path / "nan")
    with pytest.raises(
        run_lib.NonFiniteError, match=r"step 6: 3 consecutive steps .*newest checkpoint, step 3 .*last good"
    ):
        finetune.run_single(c, workdir)
    assert ckpt_lib.Checkpointer(workdir, max_to_keep=2, async_save=False).all_steps() == [3]
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]
    assert [line["train/nonfinite_skipped_in_a_row"] for line in lines if "train/loss" in line] == [0, 0, 0, 1, 2]
    bad = c.copy_and_resolve_references()
    bad.optim.max_consecutive_nonfinite = 0
    with pytest.raises(ValueError, match="config.optim.max_consecutive_nonfinite"):
        finetune.validate(bad)
