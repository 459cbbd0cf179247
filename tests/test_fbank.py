"""Kaldi fbank and the audio front-ends: torchaudio golden vectors, an independent float64 NumPy Kaldi reference,
``log_mel`` padding/cropping/normalisation, and argument errors.

The reference below is written from Kaldi's definitions (feature-window.cc: ``ExtractWindow``/``ProcessWindow``,
mel-computations.cc: ``MelBanks``), per frame and per filter, not from the JAX code. Where Kaldi and torchaudio
differ, torchaudio is followed (the frame-energy floor is float32 eps, not FLT_MIN).

float32 resolves a mel energy only to roughly 80 dB below its frame's peak (FFT and pre-emphasis round-off, and
float32 window coefficients). So the synthetic signals carry a noise floor 40-50 dB below their rms, as a recording
does; and the golden chirp (pure tones, ~130 dB range) is held to 1e-3 only within 18 nats (78 dB) of each frame's
peak, plus a check that we are at least as close to the float64 truth as torchaudio's own float32 output is.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import fbank as fb

GOLDEN = "/work/shared/golden/fbank_torchaudio.npz"
EPS32 = float(np.finfo(np.float32).eps)
LOG_EPS = math.log(EPS32)  # -15.9424: the value of an empty Kaldi filter
SR = 16000


# ------------------------------------------------------------------------------------------------ NumPy reference


def kaldi_mel_scale(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


@functools.cache
def kaldi_mel_banks(num_bins, padded, sample_freq, low_freq, high_freq):
    """mel-computations.cc MelBanks: weight of FFT bin i (0 .. padded/2 - 1) in filter b, as [num_bins, padded/2]."""
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    mel_low, mel_high = kaldi_mel_scale(low_freq), kaldi_mel_scale(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    banks = np.zeros((num_bins, padded // 2))
    fft_bin_mels = [float(kaldi_mel_scale(sample_freq / padded * i)) for i in range(padded // 2)]
    for b in range(num_bins):
        left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        for i, mel in enumerate(fft_bin_mels):
            if left < mel < right:
                banks[b, i] = (mel - left) / (center - left) if mel <= center else (right - mel) / (right - center)
    return banks


def kaldi_window(window_type, size, blackman_coeff=0.42):
    i = np.arange(size, dtype=np.float64)
    a = 2 * np.pi / (size - 1)
    if window_type == "hanning":
        return 0.5 - 0.5 * np.cos(a * i)
    if window_type == "hamming":
        return 0.54 - 0.46 * np.cos(a * i)
    if window_type == "povey":
        return np.power(0.5 - 0.5 * np.cos(a * i), 0.85)
    if window_type == "rectangular":
        return np.ones(size)
    if window_type == "blackman":
        return blackman_coeff - 0.5 * np.cos(a * i) + (0.5 - blackman_coeff) * np.cos(2 * a * i)
    raise AssertionError(window_type)


def ref_fbank(
    x,
    sample_rate=SR,
    *,
    num_mel_bins=23,
    frame_length=25.0,
    frame_shift=10.0,
    window_type="povey",
    htk_compat=False,
    use_energy=False,
    energy_floor=1.0,
    raw_energy=True,
    preemphasis_coefficient=0.97,
    remove_dc_offset=True,
    round_to_power_of_two=True,
    snip_edges=True,
    low_freq=20.0,
    high_freq=0.0,
    use_log_fbank=True,
    use_power=True,
    blackman_coeff=0.42,
    dither=0.0,
    dither_noise=None,
):
    """float64 Kaldi compute-fbank-feats of a 1-D signal; ``dither_noise`` [T, size] is added to the frames."""
    assert dither == 0.0 or dither_noise is not None, "pass the dither noise itself"
    x, sr = np.asarray(x, np.float64), sample_rate
    n = len(x)
    size, shift = int(sr * frame_length * 0.001), int(sr * frame_shift * 0.001)
    padded = 2 ** math.ceil(math.log2(size)) if round_to_power_of_two else size
    banks = kaldi_mel_banks(num_mel_bins, padded, sr, low_freq, high_freq)
    window = kaldi_window(window_type, size, blackman_coeff)
    num = (1 + (n - size) // shift if n >= size else 0) if snip_edges else (n + shift // 2) // shift
    rows = []
    for t in range(num):
        # ExtractWindow: first sample t*shift (snip_edges) or t*shift + shift/2 - size/2, reflected at both ends.
        start = t * shift if snip_edges else t * shift + shift // 2 - size // 2
        s = np.arange(start, start + size)
        s = np.where(s < 0, -s - 1, s)
        s = np.where(s >= n, 2 * n - 1 - s, s)
        frame = x[s].copy()
        if dither_noise is not None:
            frame += dither_noise[t]
        if remove_dc_offset:
            frame -= frame.mean()
        if raw_energy:
            log_energy = math.log(max(float(frame @ frame), EPS32))
        if preemphasis_coefficient != 0.0:  # Kaldi: for i = size-1 .. 1: w[i] -= c w[i-1]; then w[0] -= c w[0]
            frame[1:] = frame[1:] - preemphasis_coefficient * frame[:-1]
            frame[0] -= preemphasis_coefficient * frame[0]
        frame *= window
        if not raw_energy:
            log_energy = math.log(max(float(frame @ frame), EPS32))
        if energy_floor > 0.0 and log_energy < math.log(energy_floor):
            log_energy = math.log(energy_floor)
        spectrum = np.abs(np.fft.rfft(frame, padded))[: padded // 2]
        if use_power:
            spectrum = spectrum**2
        mel = banks @ spectrum
        if use_log_fbank:
            mel = np.log(np.maximum(mel, EPS32))
        if use_energy:
            mel = np.concatenate([mel, [log_energy]]) if htk_compat else np.concatenate([[log_energy], mel])
        rows.append(mel)
    return np.stack(rows)


# ------------------------------------------------------------------------------------------------------- signals


def noise_signal(rng, n, sr=SR):
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


def speech_like(rng, n, sr=SR):
    """Glottal-pulse-like harmonics of a gliding f0, with formant-shaped amplitudes and syllabic AM."""
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 180) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = rng.uniform([500, 1200, 2400], [800, 1800, 3200])
    y = np.zeros_like(t)
    for h in range(1, 40):
        fh = h * f0.mean()
        gain = sum(np.exp(-(((fh - f) / 150.0) ** 2)) for f in formants) + 0.02
        y += gain / h * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    y *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2
    y = 0.2 * y / np.abs(y).max()
    return (y + 2e-4 * rng.standard_normal(len(t))).astype(np.float32)


def sine_sweeps(rng, n, sr=SR):
    """Two exponential sweeps, noise floor 40 dB below their rms (a noiseless sweep spans 130 dB, beyond float32)."""
    t = np.arange(n) / sr
    seconds = n / sr
    y = np.zeros_like(t)
    for f_lo, f_hi in [(rng.uniform(50, 200), rng.uniform(5000, 7500)), (rng.uniform(2000, 3000), 300.0)]:
        k = math.log(f_hi / f_lo) / seconds
        y += 0.15 * np.sin(2 * np.pi * f_lo * (np.exp(k * t) - 1) / k)
    return (y + 2e-3 * rng.standard_normal(len(t))).astype(np.float32)


SIGNALS = {"noise": noise_signal, "speech": speech_like, "sweep": sine_sweeps}


# ----------------------------------------------------------------------------------------------- golden vectors


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


@pytest.mark.parametrize("name", ["voiced", "noise", "chirp"])
@pytest.mark.parametrize("kind", ["bridle", "beats"])
def test_matches_torchaudio_golden(golden, name, kind):
    wave = golden[f"wave_{name}"]
    expected = golden[f"{kind}_{name}"]
    spec = fb.preset("audioset" if kind == "bridle" else "beats")
    x = wave - wave.mean() if kind == "bridle" else wave * np.float32(2**15)  # as the golden README says
    out = np.asarray(fb.fbank(x, **fb.kaldi_options(spec)))
    assert out.dtype == np.float32 and out.shape == expected.shape

    # The empty filter (128 bins on a 512-point FFT) is log(float32 eps) in every frame, as in torchaudio.
    empty = np.all(expected == np.float32(LOG_EPS), axis=0)
    assert empty.sum() == 1
    np.testing.assert_array_equal(out[:, empty], np.float32(LOG_EPS))

    err = np.abs(out - expected)
    if name != "chirp":
        assert err.max() <= 1e-3, err.max()
        return
    # Pure tones: values more than ~80 dB below the frame's peak are float32 round-off in torchaudio as in ours.
    resolvable = expected.max(axis=1, keepdims=True) - expected < 18.0
    assert resolvable.mean() > 0.8
    assert err[resolvable].max() <= 1e-3, err[resolvable].max()
    truth = ref_fbank(x, **fb.kaldi_options(spec))
    ours_vs_truth, torch_vs_truth = np.abs(out - truth).max(), np.abs(expected - truth).max()
    assert ours_vs_truth <= torch_vs_truth, (ours_vs_truth, torch_vs_truth)
    assert err.max() <= 3e-2


def test_reference_matches_golden(golden):
    """The NumPy reference itself agrees with torchaudio (so agreeing with it means agreeing with Kaldi)."""
    x = golden["wave_voiced"] * np.float32(2**15)
    ref = ref_fbank(x, **fb.kaldi_options(fb.preset("beats")))
    assert np.abs(ref - golden["beats_voiced"]).max() <= 1e-3


# ------------------------------------------------------------------------------------------- float64 reference

CASES = [
    ("noise", SR, {}),
    ("speech", SR, {"window_type": "hanning", "htk_compat": True, "num_mel_bins": 128}),
    ("sweep", SR, {"window_type": "hamming", "use_energy": True, "num_mel_bins": 40}),
    ("noise", SR, {"window_type": "rectangular", "use_energy": True, "htk_compat": True, "num_mel_bins": 80}),
    ("speech", SR, {"window_type": "blackman", "use_energy": True, "raw_energy": False, "num_mel_bins": 40}),
    ("sweep", SR, {"snip_edges": False, "num_mel_bins": 80}),
    ("speech", SR, {"snip_edges": False, "frame_length": 10.0, "frame_shift": 25.0, "num_mel_bins": 23}),  # pad < 0
    (
        "speech",
        SR,
        {"snip_edges": False, "frame_length": 20.0, "frame_shift": 7.5, "num_mel_bins": 40, "use_energy": True},
    ),
    ("sweep", SR, {"use_power": False, "num_mel_bins": 40}),
    ("noise", SR, {"use_log_fbank": False, "num_mel_bins": 23}),
    ("speech", SR, {"low_freq": 100.0, "high_freq": -400.0, "num_mel_bins": 40}),
    ("sweep", SR, {"low_freq": 64.0, "high_freq": 6000.0, "num_mel_bins": 80, "window_type": "hanning"}),
    ("noise", SR, {"round_to_power_of_two": False, "num_mel_bins": 23, "use_energy": True}),
    (
        "speech",
        SR,
        {"preemphasis_coefficient": 0.0, "remove_dc_offset": False, "use_energy": True, "energy_floor": 0.0},
    ),
    ("sweep", 8000, {"num_mel_bins": 23, "window_type": "povey"}),
    ("speech", SR, {"num_mel_bins": 128}),
]


@pytest.fixture(scope="module")
def max_seen():
    seen = {}
    yield seen
    print(f"\nmax |fbank - float64 Kaldi reference| per case: {seen}")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_kaldi_reference(case, max_seen):
    signal, sr, options = CASES[case]
    rng = np.random.default_rng(1000 + case)
    x = SIGNALS[signal](rng, sr, sr)  # 1 s
    if "preemphasis_coefficient" in options:  # no DC removal: give the signal an offset so it matters
        x = x + np.float32(0.05)
    out = np.asarray(fb.fbank(x, sr, **options))
    ref = ref_fbank(x, sr, **options)
    assert out.dtype == np.float32 and out.shape == ref.shape
    if options.get("use_log_fbank", True):
        err = np.abs(out - ref)
    else:  # linear energies: compare in the log domain (1e-3 there = 0.1% relative)
        assert np.all(out >= 0)
        err = np.abs(np.log(np.maximum(out, EPS32)) - np.log(np.maximum(ref, EPS32)))
    max_seen[case] = float(f"{err.max():.2e}")
    assert err.max() <= 1e-3, err.max()


def test_batch_dims_and_jit():
    rng = np.random.default_rng(7)
    x = np.stack([noise_signal(rng, 4800) for _ in range(6)]).reshape(2, 3, -1)
    f = jax.jit(functools.partial(fb.fbank, num_mel_bins=40, snip_edges=False))
    out = np.asarray(f(x))
    assert out.shape == (2, 3, fb.num_frames(x.shape[-1], snip_edges=False), 40)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(
                out[i, j], np.asarray(fb.fbank(x[i, j], num_mel_bins=40, snip_edges=False)), atol=1e-4
            )
    # float64 NumPy input is accepted (cast to float32) and the output is float32.
    assert fb.fbank(x[0, 0].astype(np.float64)).dtype == jnp.float32


def test_dither_uses_key_per_frame():
    rng = np.random.default_rng(8)
    x = speech_like(rng, 8000)
    key = jax.random.key(3)
    out = np.asarray(fb.fbank(x, dither=0.5, key=key, num_mel_bins=40))
    np.testing.assert_array_equal(out, np.asarray(fb.fbank(x, dither=0.5, key=key, num_mel_bins=40)))
    assert np.abs(out - np.asarray(fb.fbank(x, dither=0.5, key=jax.random.key(4), num_mel_bins=40))).max() > 1e-3
    # Kaldi dithers each frame's samples independently: same noise as the implementation draws, per frame.
    frames = fb.num_frames(len(x))
    noise = 0.5 * np.asarray(jax.random.normal(key, (1, frames, 400), jnp.float32), np.float64)[0]
    ref = ref_fbank(x, num_mel_bins=40, dither_noise=noise)
    assert np.abs(out - ref).max() <= 1e-3
    assert np.abs(out - ref_fbank(x, num_mel_bins=40)).max() > 1e-3


def test_num_frames_forms_and_values():
    assert fb.num_frames(399) == 0 and fb.num_frames(400) == 1 and fb.num_frames(559) == 1
    assert fb.num_frames(560) == 2 and fb.num_frames(160_000) == 998
    assert fb.num_frames(160_000, snip_edges=False) == 1000 and fb.num_frames(79, snip_edges=False) == 0
    n = np.array([0, 399, 400, 16_000, 16_561])
    expected = np.array([0, 0, 1, 98, 102])
    out = fb.num_frames(n)
    assert isinstance(out, np.ndarray) and out.dtype == n.dtype
    np.testing.assert_array_equal(out, expected)
    out = fb.num_frames(jnp.asarray(n, jnp.int32))
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(fb.num_frames)(jnp.asarray(n))), expected)
    # Consistent with fbank's output length, for both edge modes and a non-default geometry.
    rng = np.random.default_rng(9)
    for length in [400, 1234, 4000]:
        x = noise_signal(rng, length)
        for snip in (True, False):
            kw = {"frame_length": 20.0, "frame_shift": 7.5, "snip_edges": snip}
            shape = jax.eval_shape(functools.partial(fb.fbank, **kw), x).shape  # shapes only: nothing compiles
            assert shape[0] == fb.num_frames(length, **kw) == ref_fbank(x, **kw).shape[0]


# -------------------------------------------------------------------------------------------------------- presets


def test_presets_and_options():
    a, e, b = fb.preset("audioset"), fb.preset("esc50"), fb.preset("beats")
    assert (a.kind, a.target_frames, a.mean, a.std) == ("bridle", 1024, -4.4446096, 3.3216383)
    assert all((p.sample_rate, p.num_mel_bins) == (16000, 128) for p in (a, e, b))
    assert (e.kind, e.target_frames, e.mean, e.std) == ("bridle", 512, -6.6268077, 5.358466)
    assert (b.kind, b.target_frames, b.mean, b.std) == ("beats", None, 15.41663, 6.55582)
    assert fb.kaldi_options(a) == {
        "sample_rate": 16000,
        "num_mel_bins": 128,
        "frame_length": 25.0,
        "frame_shift": 10.0,
        "htk_compat": True,
        "use_energy": False,
        "window_type": "hanning",
        "dither": 0.0,
    }
    assert fb.kaldi_options(b) == {"sample_rate": 16000, "num_mel_bins": 128, "frame_length": 25.0, "frame_shift": 10.0}
    assert fb.samples_for_frames(1024, a) == 164_080 and fb.samples_for_frames(998, b) == 159_920
    for k in (1, 2, 512, 1024):
        s = fb.samples_for_frames(k, a)
        assert fb.num_frames(s) == k and fb.num_frames(s - 1) == k - 1


# -------------------------------------------------------------------------------------------------------- log_mel


def trimmed_reference(waveforms, num_samples, spec):
    """log_mel as the authors do it, one clip at a time: trim, (mean), scale, fbank, zero-pad/crop, normalise.

    float64 NumPy throughout (the Kaldi reference above), so nothing is shared with the code under test.
    """
    rows, counts = [], []
    scale = 2.0**15 if spec.kind == "beats" else 1.0
    s = waveforms.shape[1]
    total = fb.num_frames(s)
    t = spec.target_frames or total
    for w, n in zip(waveforms, num_samples):
        clip = w[:n].astype(np.float64)
        if spec.kind == "bridle":
            clip = clip - clip.mean()
        feats = np.zeros((t, spec.num_mel_bins))
        k = min(fb.num_frames(int(n)), t)
        if k:
            feats[:k] = ref_fbank(clip * scale, **fb.kaldi_options(spec))[:k]
        rows.append((feats - spec.mean) / (2 * spec.std))
        counts.append(k)
    return np.stack(rows), np.array(counts)


@pytest.mark.parametrize(
    "spec",
    [
        fb.FrontendSpec("bridle", num_mel_bins=64, target_frames=120, mean=-5.0, std=3.0),  # pads
        fb.FrontendSpec("bridle", num_mel_bins=64, target_frames=70, mean=-6.0, std=4.0),  # crops
        fb.FrontendSpec("beats", num_mel_bins=64, target_frames=None, mean=15.41663, std=6.55582),
    ],
)
def test_log_mel_batch_of_different_lengths(spec):
    rng = np.random.default_rng(11)
    lengths = np.array([16_000, 9_999, 300, 16_000 + 159], np.int32)  # 300 < one window: no real frame
    s = int(lengths.max())
    waves = np.zeros((len(lengths), s), np.float32)
    for i, n in enumerate(lengths):
        waves[i, :n] = SIGNALS[["speech", "noise", "sweep", "speech"][i]](rng, int(n)) + np.float32(0.02 * i)
    feats, counts = fb.log_mel(waves, lengths, spec)
    t = spec.target_frames or fb.num_frames(s)
    assert feats.shape == (4, t, spec.num_mel_bins) and feats.dtype == jnp.float32 and counts.dtype == jnp.int32
    expected, expected_counts = trimmed_reference(waves, lengths, spec)
    np.testing.assert_array_equal(np.asarray(counts), expected_counts)
    np.testing.assert_array_equal(np.asarray(counts), np.minimum(fb.num_frames(lengths), t))
    np.testing.assert_allclose(np.asarray(feats), expected, atol=2e-4)
    # Padding frames hold exactly the normalised zero of AudioMAE's ZeroPad2d.
    pad_value = np.float32(-spec.mean / (2 * spec.std))
    for i, k in enumerate(np.asarray(counts)):
        np.testing.assert_allclose(np.asarray(feats[i, k:]), pad_value, rtol=1e-6)
    # jit with a static spec gives the same result.
    jitted = jax.jit(fb.log_mel, static_argnums=2)(waves, lengths, spec)
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(feats), atol=1e-4 / (2 * spec.std))
    np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(counts))


def test_log_mel_waveform_mean_only_for_bridle():
    """Real frames of a clip equal fbank of the trimmed clip after (bridle) mean removal and (beats) x 2^15."""
    rng = np.random.default_rng(12)
    x = speech_like(rng, 8000) + np.float32(0.3)
    waves = np.concatenate([x, np.zeros(1000, np.float32)])[None]
    for spec, clip in [
        (fb.FrontendSpec("bridle", target_frames=None), x - x.mean()),
        (fb.FrontendSpec("beats", target_frames=None, mean=15.41663, std=6.55582), x * np.float32(2**15)),
    ]:
        feats, counts = fb.log_mel(waves, np.array([len(x)]), spec)
        expected = np.asarray(fb.fbank(clip, **fb.kaldi_options(spec)))
        assert int(counts[0]) == expected.shape[0]
        np.testing.assert_allclose(
            np.asarray(feats[0, : expected.shape[0]]) * 2 * spec.std + spec.mean, expected, atol=5e-4
        )


# --------------------------------------------------------------------------------------------------- bad arguments

X = np.random.default_rng(13).standard_normal(4000).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"window_type": "kaiser"}, "window_type"),
        ({"frame_length": 0.0}, "frame_length"),
        ({"frame_shift": -10.0}, "frame_shift"),
        ({"num_mel_bins": 0}, "num_mel_bins"),
        ({"high_freq": 9000.0}, "high_freq"),
        ({"high_freq": -9000.0}, "high_freq"),
        ({"low_freq": -1.0}, "low_freq"),
        ({"low_freq": 8000.0}, "low_freq"),
        ({"low_freq": 5000.0, "high_freq": 4000.0}, "low_freq"),
        ({"preemphasis_coefficient": 1.5}, "preemphasis_coefficient"),
        ({"energy_floor": -1.0}, "energy_floor"),
        ({"dither": 0.1}, "key"),
        ({"frame_length": 25.0625, "round_to_power_of_two": False}, "round_to_power_of_two"),
    ],
)
def test_fbank_bad_options_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        fb.fbank(X, **kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="waveform .*399 samples.*one frame"):
        fb.fbank(X[:399])
    with pytest.raises(ValueError, match="waveform must be a float"):
        fb.fbank(np.arange(4000))
    with pytest.raises(ValueError, match="sample_rate"):
        fb.fbank(X, 0)
    with pytest.raises(ValueError, match="num_samples"):
        fb.num_frames(np.array([1.5]))
    with pytest.raises(ValueError, match="'audioset', 'beats', 'esc50'"):
        fb.preset("librispeech")
    with pytest.raises(ValueError, match="kind"):
        fb.FrontendSpec("mfcc")
    with pytest.raises(ValueError, match="target_frames"):
        fb.FrontendSpec("bridle", target_frames=0)
    with pytest.raises(ValueError, match="frames"):
        fb.samples_for_frames(0, fb.preset("audioset"))
    with pytest.raises(ValueError, match="num_samples must be an int array"):
        fb.log_mel(X[None], np.array([4000, 4000]), fb.preset("esc50"))
    with pytest.raises(ValueError, match="waveforms"):
        fb.log_mel(X, np.array([4000]), fb.preset("esc50"))
