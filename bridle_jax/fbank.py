"""Kaldi-compatible log-mel filterbank in JAX, and the two audio front-ends (BRIDLE/AudioMAE and BEATs).

Where: below both the data side (the audio pipeline sizes its waveforms with :func:`samples_for_frames`) and the
models (:func:`log_mel` runs inside the jitted step), so neither imports the other; :func:`frontend_spec` is the one
place the front-end settings are read from ``config.data``.

Why here: both reference front-ends call ``torchaudio.compliance.kaldi.fbank`` (SPEC 1.2, 6.2). Computing it in
JAX lets the input pipeline or the train step batch it on any backend with no torch dependency (SPEC A17 suggests
precomputing; this port makes both options give the same features). ``fbank`` mirrors torchaudio's option names,
defaults and semantics, which mirror Kaldi's ``compute-fbank-feats`` (feature-window.cc, mel-computations.cc):

    frames (snip_edges, or Kaldi's symmetric reflection at both ends) -> optional Gaussian dither
    -> per-frame DC removal -> raw log-energy -> pre-emphasis x[n] - c x[n-1] (x[-1] = x[0]) -> window
    -> zero-pad to a power of two -> |rfft|^2 -> triangular mel filters, linear in mel = 1127 ln(1 + f/700),
       over FFT bins 0 .. N/2-1 (the Nyquist bin gets weight 0) -> log(max(E, float32 eps)).

With 128 bins on a 512-point FFT one Kaldi filter covers no FFT bin: its value is log(float32 eps) = -15.9424 in
every frame, exactly as in torchaudio (not a bug of the port). Windows and mel banks are built once per option set
in float64 NumPy and cast to float32; everything traced is float32.

Front-end constants and where they come from:

- ``kind="bridle"`` (SPEC 1.2, BRIDLE ``dataset.py``, inherited from AudioMAE): waveform in [-1, 1] (no x2^15),
  waveform mean subtracted, ``fbank(htk_compat=True, use_energy=False, window_type='hanning', num_mel_bins=128,
  dither=0.0, frame_shift=10)`` with torchaudio's default 25 ms frames (and default pre-emphasis 0.97, DC removal,
  snip_edges), then zero-pad (``ZeroPad2d``) or crop to ``target_length`` frames (AudioSet 1024, ESC-50 512), then
  ``(fbank - mean) / (2 * std)``. AudioSet: mean -4.4446096, std 3.3216383 (the authors' "new analytical stats");
  ESC-50: -6.6268077, 5.358466.
- ``kind="beats"`` (SPEC 6.2, BEATs ``BEATs.py`` ``preprocess``): waveform x 2^15, no waveform-mean removal
  (only Kaldi's per-frame DC removal), ``fbank(num_mel_bins=128, sample_frequency=16000, frame_length=25,
  frame_shift=10)`` with torchaudio's defaults otherwise (povey window), no padding to a fixed length, then
  ``(fbank - 15.41663) / (2 * 6.55582)``.

``mean`` and ``std`` are dataset statistics of the un-normalised log-mel (per dataset, not per clip); a new dataset
needs its own (or one of these, as the authors do for fine-tuning sets).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax.validation import fail, get, is_int, is_number

__all__ = [
    "FRONTENDS",
    "FrontendSpec",
    "fbank",
    "frontend_spec",
    "kaldi_options",
    "log_mel",
    "num_frames",
    "preset",
    "samples_for_frames",
]

# torch.finfo(torch.float).eps: the floor torchaudio puts under the mel energies and the frame energy before the log.
_EPS = float(np.finfo(np.float32).eps)
_WINDOW_TYPES = ("povey", "hanning", "hamming", "rectangular", "blackman")
FRONTENDS = ("bridle", "beats")  # FrontendSpec.kind, config.data.frontend


# ----------------------------------------------------------------------------------------------------------------
# Option checking and static tables (Python/NumPy, once per option set)
# ----------------------------------------------------------------------------------------------------------------


def _frame_sizes(sample_rate, frame_length: float, frame_shift: float) -> tuple[int, int]:
    """(window_size, window_shift) in samples, truncated exactly as torchaudio/Kaldi do."""
    if not is_number(sample_rate):
        raise ValueError(f"sample_rate must be a positive number, got {sample_rate!r}")
    if not sample_rate > 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate!r}")
    if not frame_length > 0:
        raise ValueError(f"frame_length must be > 0 ms, got {frame_length!r}")
    if not frame_shift > 0:
        raise ValueError(f"frame_shift must be > 0 ms, got {frame_shift!r}")
    # Same expression as torchaudio (int(sr * ms * 0.001)) so rounding edge cases agree.
    size = int(sample_rate * frame_length * 0.001)
    shift = int(sample_rate * frame_shift * 0.001)
    if size < 2:
        raise ValueError(f"frame_length={frame_length} ms gives {size} samples at {sample_rate} Hz; need >= 2")
    if shift < 1:
        raise ValueError(f"frame_shift={frame_shift} ms gives {shift} samples at {sample_rate} Hz; need >= 1")
    return size, shift


def _padded_size(size: int, round_to_power_of_two: bool) -> int:
    padded = 1 << (size - 1).bit_length() if round_to_power_of_two else size
    if padded % 2:
        raise ValueError(
            f"frame_length gives an odd window of {size} samples and round_to_power_of_two=False; Kaldi needs an even "
            "FFT size (use round_to_power_of_two=True or change frame_length)"
        )
    return padded


@functools.lru_cache(maxsize=64)
def _window(window_type: str, size: int, blackman_coeff: float) -> np.ndarray:
    """Kaldi's window of ``size`` samples (feature-window.cc), float32."""
    a = 2.0 * math.pi / (size - 1)
    n = np.arange(size, dtype=np.float64)
    if window_type == "hanning":
        w = 0.5 - 0.5 * np.cos(a * n)
    elif window_type == "povey":
        w = (0.5 - 0.5 * np.cos(a * n)) ** 0.85
    elif window_type == "hamming":
        w = 0.54 - 0.46 * np.cos(a * n)
    elif window_type == "rectangular":
        w = np.ones(size)
    else:  # blackman (Kaldi's generalised form; not numpy's coefficients)
        w = blackman_coeff - 0.5 * np.cos(a * n) + (0.5 - blackman_coeff) * np.cos(2 * a * n)
    return w.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _mel_banks(num_mel_bins: int, padded: int, sample_rate: float, low_freq: float, high_freq: float) -> np.ndarray:
    """Kaldi's triangular mel filters as a float32 ``[padded // 2, num_mel_bins]`` matrix (Nyquist bin dropped).

    Triangles are linear in mel between equally spaced mel points from low_freq to high_freq (num_bins + 2 points),
    evaluated at the mel value of each FFT bin's frequency, exactly as mel-computations.cc.
    """
    nyquist = 0.5 * sample_rate
    hi = high_freq + nyquist if high_freq <= 0.0 else high_freq  # <= 0 means an offset from Nyquist
    if not 0.0 <= low_freq < nyquist:
        raise ValueError(f"low_freq must be in [0, {nyquist}) Hz (Nyquist), got {low_freq!r}")
    if not 0.0 < hi <= nyquist:
        raise ValueError(
            f"high_freq must give a cutoff in (0, {nyquist}] Hz (<= 0 is an offset from Nyquist), "
            f"got high_freq={high_freq!r} -> {hi}"
        )
    if not low_freq < hi:
        raise ValueError(f"low_freq ({low_freq}) must be below the high_freq cutoff ({hi})")

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)

    mel_lo, mel_hi = mel(low_freq), mel(hi)
    delta = (mel_hi - mel_lo) / (num_mel_bins + 1)
    b = np.arange(num_mel_bins, dtype=np.float64)[None, :]
    left, center, right = mel_lo + b * delta, mel_lo + (b + 1) * delta, mel_lo + (b + 2) * delta
    fft_mel = mel(sample_rate / padded * np.arange(padded // 2))[:, None]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def _check_options(window_type, num_mel_bins, preemphasis_coefficient, energy_floor, dither):
    if window_type not in _WINDOW_TYPES:
        raise ValueError(f"window_type must be one of {_WINDOW_TYPES}, got {window_type!r}")
    if not is_int(num_mel_bins) or num_mel_bins < 1:
        raise ValueError(f"num_mel_bins must be an int >= 1, got {num_mel_bins!r}")
    if not 0.0 <= preemphasis_coefficient <= 1.0:
        raise ValueError(f"preemphasis_coefficient must be in [0, 1], got {preemphasis_coefficient!r}")
    if not energy_floor >= 0.0:
        raise ValueError(f"energy_floor must be >= 0 (0 disables it), got {energy_floor!r}")
    if not dither >= 0.0:
        raise ValueError(f"dither must be >= 0, got {dither!r}")


def num_frames(num_samples, sample_rate=16000, frame_length=25.0, frame_shift=10.0, snip_edges=True):
    """Kaldi's frame count for clips of ``num_samples`` samples (Python int, NumPy or JAX int array).

    With snip_edges only whole windows count (0 for a clip shorter than one window); without, it depends on the
    shift only: (n + shift // 2) // shift.
    """
    size, shift = _frame_sizes(sample_rate, frame_length, frame_shift)
    if isinstance(num_samples, bool):
        raise ValueError(f"num_samples must be an integer or an integer array, got {num_samples!r}")  # noqa: TRY004
    if is_int(num_samples):
        n = int(num_samples)
        if n < 0:
            raise ValueError(f"num_samples must be >= 0, got {n}")
        if snip_edges:
            return 0 if n < size else 1 + (n - size) // shift
        return (n + shift // 2) // shift
    xp = jnp if isinstance(num_samples, jax.Array) else np
    n = xp.asarray(num_samples)
    if not xp.issubdtype(n.dtype, xp.integer):
        raise ValueError(f"num_samples must hold integers, got dtype {n.dtype}")
    if snip_edges:
        return xp.where(n < size, 0, 1 + (n - size) // shift).astype(n.dtype)
    return (n + shift // 2) // shift


# ----------------------------------------------------------------------------------------------------------------
# fbank
# ----------------------------------------------------------------------------------------------------------------


def _frames(x: jax.Array, size: int, shift: int, snip_edges: bool) -> jax.Array:
    """``[B, n] -> [B, T, size]`` frames by slicing ``shift``-sized blocks (no gather: cheap on every backend)."""
    n = x.shape[-1]
    if snip_edges:
        t = 1 + (n - size) // shift
    else:
        # Kaldi reflects without repeating the edge sample ([2,1,0 | 0,1,2 ... | n-1,n-2 ...]); frame i starts at
        # i * shift + shift // 2 - size // 2 in the original signal.
        t = (n + shift // 2) // shift
        pad = size // 2 - shift // 2
        flipped = jnp.flip(x, axis=-1)
        if pad > 0:
            x = jnp.concatenate([flipped[:, n - pad :], x, flipped], axis=-1)
        else:
            x = jnp.concatenate([x[:, -pad:], flipped], axis=-1)
    full, rest = divmod(size, shift)  # a frame is `full` whole blocks plus the first `rest` samples of the next
    k = full + (rest > 0)
    need = (t - 1 + k) * shift
    if x.shape[-1] < need:
        x = jnp.pad(x, ((0, 0), (0, need - x.shape[-1])))
    blocks = x[:, :need].reshape(x.shape[0], t - 1 + k, shift)
    parts = [blocks[:, j : j + t] for j in range(full)]
    if rest:
        parts.append(blocks[:, full : full + t, :rest])
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def _log_energy(frames: jax.Array, energy_floor: float) -> jax.Array:
    e = jnp.log(jnp.maximum(jnp.sum(frames * frames, axis=-1), _EPS))
    return jnp.maximum(e, math.log(energy_floor)) if energy_floor > 0.0 else e


def fbank(
    waveform,
    sample_rate=16000,
    *,
    num_mel_bins=23,
    frame_length=25.0,
    frame_shift=10.0,
    window_type="povey",
    htk_compat=False,
    use_energy=False,
    energy_floor=1.0,
    raw_energy=True,
    dither=0.0,
    preemphasis_coefficient=0.97,
    remove_dc_offset=True,
    round_to_power_of_two=True,
    snip_edges=True,
    low_freq=20.0,
    high_freq=0.0,
    use_log_fbank=True,
    use_power=True,
    blackman_coeff=0.42,
    key=None,
) -> jax.Array:
    """Kaldi fbank of float ``waveform [..., num_samples]`` -> float32 ``[..., num_frames, num_mel_bins (+1)]``.

    Same options and defaults as ``torchaudio.compliance.kaldi.fbank`` (``sample_rate`` is its
    ``sample_frequency``); all options are static Python values, so ``jax.jit(functools.partial(fbank, ...))``
    works. With ``use_energy`` the log-energy column comes first, or last when ``htk_compat``. ``dither > 0`` adds
    ``dither * N(0, 1)`` to every frame sample (per frame, as Kaldi) and needs a PRNG ``key``. Differences from
    torchaudio: any leading batch dims (torchaudio takes one channel), and ``num_mel_bins`` >= 1 (torchaudio: > 3).
    """
    size, shift = _frame_sizes(sample_rate, frame_length, frame_shift)
    padded = _padded_size(size, round_to_power_of_two)
    _check_options(window_type, num_mel_bins, preemphasis_coefficient, energy_floor, dither)
    banks = _mel_banks(int(num_mel_bins), padded, float(sample_rate), float(low_freq), float(high_freq))
    if dither > 0.0 and key is None:
        raise ValueError(f"dither={dither} > 0 needs a PRNG key (key=jax.random.key(...))")

    x = jnp.asarray(waveform)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"waveform must be a float array [..., num_samples], got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("waveform must have a samples axis [..., num_samples], got a scalar")
    n = x.shape[-1]
    if n < size:
        raise ValueError(
            f"waveform has {n} samples, shorter than one frame ({size} samples = frame_length {frame_length} ms at "
            f"{sample_rate} Hz)"
        )
    lead = x.shape[:-1]
    x = x.astype(jnp.float32).reshape(-1, n)

    frames = _frames(x, size, shift, snip_edges)  # [B, T, size]
    if dither > 0.0:
        frames = frames + dither * jax.random.normal(key, frames.shape, jnp.float32)
    if remove_dc_offset:
        frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
    if raw_energy:
        energy = _log_energy(frames, energy_floor)
    if preemphasis_coefficient != 0.0:
        previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
        frames = frames - preemphasis_coefficient * previous
    frames = frames * _window(window_type, size, float(blackman_coeff))
    if not raw_energy:
        energy = _log_energy(frames, energy_floor)  # zero padding adds no energy

    spectrum = jnp.fft.rfft(frames, n=padded, axis=-1)[..., : padded // 2]  # Kaldi's banks skip the Nyquist bin
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    magnitude = power if use_power else jnp.sqrt(power)
    # HIGHEST: GPUs would otherwise run this float32 matmul in TF32 (1e-3 relative error = 1e-3 in the log).
    mel = jnp.matmul(magnitude, jnp.asarray(banks), precision=jax.lax.Precision.HIGHEST)
    if use_log_fbank:
        mel = jnp.log(jnp.maximum(mel, _EPS))
    if use_energy:
        parts = [mel, energy[..., None]] if htk_compat else [energy[..., None], mel]
        mel = jnp.concatenate(parts, axis=-1)
    return mel.reshape(*lead, *mel.shape[-2:])


# ----------------------------------------------------------------------------------------------------------------
# Front-end presets and the batched model input
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrontendSpec:
    """One audio front-end: Kaldi options by ``kind``, fixed length, and the dataset's log-mel statistics.

    Frozen (hashable), so it can be a static argument of ``jax.jit``.
    """

    kind: str  # "bridle" (AudioMAE/BRIDLE) or "beats"
    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int | None = 1024  # pad/crop to this many frames; None = no padding (BEATs)
    mean: float = -4.4446096
    std: float = 3.3216383

    def __post_init__(self):
        if self.kind not in FRONTENDS:
            raise ValueError(f"FrontendSpec.kind must be one of {FRONTENDS}, got {self.kind!r}")
        if self.target_frames is not None and (not is_int(self.target_frames) or self.target_frames < 1):
            raise ValueError(f"FrontendSpec.target_frames must be an int >= 1 or None, got {self.target_frames!r}")
        if not self.std > 0:
            raise ValueError(f"FrontendSpec.std must be > 0, got {self.std!r}")


_PRESETS = {
    # SPEC 1.2: BRIDLE dataset.py, AudioSet target_length 1024 and its "new analytical stats".
    "audioset": FrontendSpec("bridle", target_frames=1024, mean=-4.4446096, std=3.3216383),
    # SPEC 1.2: ESC-50 target_length 512 and its statistics.
    "esc50": FrontendSpec("bridle", target_frames=512, mean=-6.6268077, std=5.358466),
    # SPEC 6.2: BEATs.py preprocess defaults (fbank_mean, fbank_std), no fixed length.
    "beats": FrontendSpec("beats", target_frames=None, mean=15.41663, std=6.55582),
}


def _int_field(data_config, field: str, hint: str) -> int:
    value = get(data_config, "data." + field, hint=hint)
    if not is_int(value) or value < 1:
        fail("data." + field, "an int >= 1", value)
    return int(value)


def _finite_field(data_config, field: str, hint: str, positive: bool = False) -> float:
    value = get(data_config, "data." + field, hint=hint)
    if not is_number(value):
        fail("data." + field, "a finite number", value)
    if not math.isfinite(value) or (positive and value <= 0):
        fail("data." + field, "a finite number" + (" > 0" if positive else ""), value)
    return float(value)


def frontend_spec(data_config, *, hint: str = "see audio_pipeline.default_data_config()") -> FrontendSpec:
    """The front-end described by ``config.data`` (``frontend``, ``sample_rate``, ``num_mel_bins``, ``target_frames``,
    ``norm_mean``, ``norm_std``), checked: an error names ``config.data.<field>`` and what was expected (``hint``
    follows a missing field's name). The audio pipeline sizes its waveforms from it and the model applies it."""
    kind = get(data_config, "data.frontend", hint=hint)
    if kind not in FRONTENDS:
        fail("data.frontend", f"one of {FRONTENDS}", kind)
    return FrontendSpec(
        kind=kind,
        sample_rate=_int_field(data_config, "sample_rate", hint),
        num_mel_bins=_int_field(data_config, "num_mel_bins", hint),
        target_frames=_int_field(data_config, "target_frames", hint),
        mean=_finite_field(data_config, "norm_mean", hint),
        std=_finite_field(data_config, "norm_std", hint, positive=True),
    )


def preset(name: str) -> FrontendSpec:
    """The documented front-end ``name``: "audioset", "esc50" (BRIDLE) or "beats"."""
    if name not in _PRESETS:
        raise ValueError(f"unknown front-end preset {name!r}; expected one of {sorted(_PRESETS)}")
    return _PRESETS[name]


def kaldi_options(spec: FrontendSpec) -> dict:
    """``fbank`` keyword arguments of ``spec.kind`` (everything not listed is torchaudio's default)."""
    common = {
        "sample_rate": spec.sample_rate,
        "num_mel_bins": spec.num_mel_bins,
        "frame_length": 25.0,
        "frame_shift": 10.0,
    }
    if spec.kind == "bridle":
        return dict(common, htk_compat=True, use_energy=False, window_type="hanning", dither=0.0)
    return common


def _waveform_scale(spec: FrontendSpec) -> float:
    """BEATs feeds int16-scaled samples (x 2^15); AudioMAE/BRIDLE keeps torchaudio.load's [-1, 1]."""
    return 2.0**15 if spec.kind == "beats" else 1.0


def samples_for_frames(frames: int, spec: FrontendSpec) -> int:
    """Samples a clip needs for exactly ``frames`` frames (snip_edges: one window plus frames - 1 shifts)."""
    if not is_int(frames) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    size, shift = _frame_sizes(spec.sample_rate, 25.0, 10.0)
    return size + (int(frames) - 1) * shift


def log_mel(waveforms, num_samples, spec: FrontendSpec) -> tuple[jax.Array, jax.Array]:
    """Normalised log-mel model input of a zero-padded batch, in the authors' order of operations.

    ``waveforms`` float ``[B, S]`` hold clip b in ``[:num_samples[b]]`` (int ``[B]``, clipped to [0, S]). Returns
    ``(features float32 [B, T, num_mel_bins], num_frames int32 [B])`` with T = ``spec.target_frames`` or, when
    None, the frame count of S samples. Steps: (bridle) subtract each clip's mean over its real samples; scale
    (x 2^15 for beats); Kaldi fbank of each whole row; frames not wholly inside the real samples set to 0 (as
    AudioMAE's ZeroPad2d of the trimmed clip's fbank: the other frames equal fbank of the trimmed clip); pad with
    zero frames / crop to T; ``(x - mean) / (2 * std)``. Jittable with ``spec`` static.
    """
    w = jnp.asarray(waveforms)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim != 2:
        raise ValueError(f"waveforms must be a float array [B, S], got dtype {w.dtype} shape {w.shape}")
    n = jnp.asarray(num_samples)
    if not jnp.issubdtype(n.dtype, jnp.integer) or n.shape != w.shape[:1]:
        raise ValueError(f"num_samples must be an int array [B] = [{w.shape[0]}], got dtype {n.dtype} shape {n.shape}")
    w = w.astype(jnp.float32)
    s = w.shape[1]
    n = jnp.clip(n, 0, s)
    real = jnp.arange(s)[None, :] < n[:, None]
    if spec.kind == "bridle":  # BRIDLE dataset.py: waveform = waveform - waveform.mean() on the trimmed clip
        mean = jnp.sum(jnp.where(real, w, 0.0), axis=1, keepdims=True) / jnp.maximum(n, 1)[:, None]
        w = jnp.where(real, w - mean, 0.0)
    feats = fbank(w * _waveform_scale(spec), **kaldi_options(spec))  # [B, F, M]
    frames_real = num_frames(n, spec.sample_rate, 25.0, 10.0, True)
    f = feats.shape[1]
    feats = jnp.where(jnp.arange(f)[None, :, None] < frames_real[:, None, None], feats, 0.0)
    t = f if spec.target_frames is None else spec.target_frames
    feats = jnp.pad(feats, ((0, 0), (0, t - f), (0, 0))) if f < t else feats[:, :t]
    feats = (feats - spec.mean) / (2.0 * spec.std)
    return feats.astype(jnp.float32), jnp.minimum(frames_real, t).astype(jnp.int32)
