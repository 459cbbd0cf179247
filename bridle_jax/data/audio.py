"""Audio decoding and waveform-level transforms (SPEC §1.2), in NumPy/SciPy on the host.

The log-mel front-end runs on device inside the training step (``bridle_jax/fbank.py``), so the host side only has to
turn a
file into a clean mono float32 waveform at 16 kHz, augment it, and cut/pad it to a static length:

  load_audio(path)          soundfile decode → mean over channels → polyphase resampling (``resample_poly``)
  roll_mag_aug(wav, rng)    × (Beta(10, 10) + 0.5), the gain AudioMAE/BRIDLE apply (their roll is a no-op); with
                            roll=True a true random circular roll first (a deviation, off by default)
  crop_or_pad(wav, S)       keep the first S samples (AudioMAE keeps the first target frames) or zero-pad to S

The waveform mean is *not* removed here: the front-end removes it over the real samples only, so padding never
biases it. Every decode failure is an :class:`AudioDecodeError` naming the file and why, so the pipeline can count
and skip it instead of dying deep inside a worker thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import numpy as np
import soundfile as sf
from scipy import signal

from bridle_jax.data import csv_files
from bridle_jax.validation import is_int

SAMPLE_RATE = 16000

# libsndfile's header log says "data : <declared> (should be <present>)" when a WAV's data chunk runs past the end of
# the file: it then silently reads only what is there. 0 and 0xFFFFFFFF are the placeholders streaming writers
# (ffmpeg to a pipe) leave in valid files, so they are not taken as truncation.
_WAV_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_PLACEHOLDERS = (0, 0xFFFFFFFF)

# Float samples are on the [-1, 1] full scale (SPEC §1.2: torchaudio.load's scale, no x2^15). Real float audio can
# exceed it a little (resampling ringing, lossy decoding, float masters above 0 dBFS) and is kept unchanged, as
# torchaudio.load keeps it; a peak above 2 (+6 dB) is not a level but a scale mistake: int16-scale samples 32768x too
# loud, whose features would be meaningless. Any real int16-scale signal peaks far above 2 (2 is one int16 step).
MAX_FLOAT_PEAK = 2.0


class AudioDecodeError(ValueError):
    """A file that cannot be turned into a usable waveform (missing, corrupt, truncated, empty, non-finite)."""


class AudioFileNotFoundError(AudioDecodeError, FileNotFoundError):
    """A missing audio file: both an :class:`AudioDecodeError` (skip-and-count) and a ``FileNotFoundError``."""


def float_scale_problem(samples: np.ndarray) -> str | None:
    """Why float ``samples`` are not on the [-1, 1] scale (peak above ``MAX_FLOAT_PEAK``), or None when they are."""
    peak = float(np.max(np.abs(samples))) if np.size(samples) else 0.0
    if peak <= MAX_FLOAT_PEAK:
        return None
    return (
        f"float samples peak at {peak:g}, expected the [-1, 1] scale (peaks up to {MAX_FLOAT_PEAK:g} are accepted); "
        "int16-scale samples must be divided by 32768"
    )


def _check_rate(name: str, rate) -> int:
    if not is_int(rate) or rate < 1:
        raise ValueError(f"{name} must be a positive int (Hz), got {rate!r}")
    return int(rate)


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling ``orig_sr → target_sr`` with ``up/down`` reduced by their gcd (44.1k → 16k: 160/441).

    Computed in float64 (the anti-aliasing FIR sums thousands of taps) and returned as float32; the output has
    ``ceil(n · up / down)`` samples, as ``scipy.signal.resample_poly``.
    """
    orig_sr = _check_rate("orig_sr", orig_sr)
    target_sr = _check_rate("target_sr", target_sr)
    waveform = np.asarray(waveform)
    if orig_sr == target_sr:
        return waveform.astype(np.float32, copy=False)
    g = math.gcd(orig_sr, target_sr)
    out = signal.resample_poly(waveform.astype(np.float64), target_sr // g, orig_sr // g)
    return out.astype(np.float32)


def load_audio(path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decodes a wav/flac/ogg (anything libsndfile reads) into a mono float32 waveform ``[n]`` at ``target_sr``.

    ``path`` is a local file or a URL (``gs://``, any fsspec URL: ``csv_files.open_binary``).

    Samples are on soundfile's [-1, 1] float scale (as ``torchaudio.load``; no ×2^15). Channels are averaged.
    Raises :class:`AudioDecodeError` (:class:`AudioFileNotFoundError` for a missing file) naming the file and why:
    undecodable or corrupt bytes, a truncated file (fewer frames than its header declares), zero samples, NaN/Inf
    samples, or a float file at int16 scale (peak above ``MAX_FLOAT_PEAK``; integer PCM is always within [-1, 1]).
    A silent clip is valid.
    """
    target_sr = _check_rate("target_sr", target_sr)
    path = os.fspath(path)
    remote = csv_files.is_url(path)
    if not remote and not os.path.isfile(path):
        raise AudioFileNotFoundError(f"audio file {path!r}: no such file")
    try:
        with contextlib.ExitStack() as stack:
            # A local file goes to libsndfile by name (its own buffered, seekable I/O: the fast path); a URL
            # (gs://, memory://, ...) is streamed through a file object, never copied to local disk first.
            source = stack.enter_context(csv_files.open_binary(path)) if remote else path
            with sf.SoundFile(source) as f:
                declared = f.frames
                sample_rate = f.samplerate
                data = f.read(dtype="float32", always_2d=True)
                header_log = f.extra_info
    except FileNotFoundError as e:
        raise AudioFileNotFoundError(f"audio file {path!r}: no such file") from e
    except (sf.SoundFileError, RuntimeError, OSError, EOFError) as e:
        raise AudioDecodeError(f"audio file {path!r}: cannot decode ({e})") from e
    if data.shape[0] < declared:
        raise AudioDecodeError(f"audio file {path!r}: truncated, read {data.shape[0]} of {declared} frames")
    for match in _WAV_SHORT_DATA.finditer(header_log):
        claimed, present = int(match.group(1)), int(match.group(2))
        if present < claimed and claimed not in _STREAMING_PLACEHOLDERS:
            raise AudioDecodeError(
                f"audio file {path!r}: truncated, the data chunk declares {claimed} bytes but only {present} are "
                "present"
            )
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioDecodeError(f"audio file {path!r}: no samples (empty or truncated before the first frame)")
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise AudioDecodeError(f"audio file {path!r}: {bad} NaN/Inf samples (expected finite samples)")
    problem = float_scale_problem(data)
    if problem:
        raise AudioDecodeError(f"audio file {path!r}: {problem} (rescale the file)")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float64).astype(np.float32)
    return resample(mono, sample_rate, target_sr)


def roll_mag_aug(waveform: np.ndarray, rng: np.random.Generator, *, roll: bool = False) -> np.ndarray:
    """``roll_mag_aug`` as the authors' code runs it: the waveform × ``Beta(10, 10) + 0.5`` (one scalar gain).

    AudioMAE/BRIDLE's ``_roll_mag_aug`` means to roll first, but draws the shift as ``randint(len(waveform))`` on the
    ``[1, N]`` tensor ``torchaudio.load`` returns, so the shift is always 0 and only the gain is applied: that is
    what produced the published numbers, and the default here. ``roll=True`` (``config.data.roll_shift``) adds the
    intended circular roll by a uniform shift in ``[0, n)`` before the gain, a deviation from the as-run recipe.
    Draws from ``rng``: the gain only; with ``roll``, the shift and then the gain.

    Apply it to the real samples only (before padding), so a roll never moves padding into the clip.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1 or waveform.size == 0:
        raise ValueError(f"roll_mag_aug: expected a non-empty 1-D waveform, got shape {waveform.shape}")
    if roll:
        waveform = np.roll(waveform, int(rng.integers(0, waveform.size)))
    magnitude = rng.beta(10.0, 10.0) + 0.5
    return (waveform * np.float32(magnitude)).astype(np.float32)


def crop_or_pad(
    waveform: np.ndarray, num_samples_out: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, int]:
    """Fixed-length ``(float32 [num_samples_out], length)``: zero-pad short clips, crop long ones.

    Without ``rng`` a long clip keeps its first ``num_samples_out`` samples: AudioMAE/BRIDLE crop the fbank to the
    first ``target_frames`` frames, and ``num_samples_out = samples_for_frames(target_frames)`` gives exactly those.
    With ``rng`` the crop window starts uniformly at random (an option, not the recipe). ``length`` is the number
    of real samples, ``min(n, num_samples_out)``.
    """
    if not is_int(num_samples_out) or num_samples_out < 1:
        raise ValueError(f"crop_or_pad: num_samples_out must be a positive int, got {num_samples_out!r}")
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"crop_or_pad: expected a 1-D waveform, got shape {waveform.shape}")
    n = waveform.size
    if n >= num_samples_out:
        start = 0 if rng is None else int(rng.integers(0, n - num_samples_out + 1))
        return np.ascontiguousarray(waveform[start : start + num_samples_out]), int(num_samples_out)
    out = np.zeros((num_samples_out,), np.float32)
    out[:n] = waveform
    return out, int(n)
