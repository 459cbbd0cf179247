"""Video decoding (PyAV), temporal sampling and clip geometry, plus the typed Grain transforms built on them.

A clip is uint8 ``[T, H, W, 3]`` (time first) until :class:`NormalizeClip` turns it into float32. Decoding is
sequential from the first frame and indexes frames by their *order* in the decoded stream (never by timestamp), so
variable-frame-rate files and odd time bases sample the same way as constant-rate ones, and no seek can land on
the wrong frame. Only the frames a sampler asks for are converted to RGB, and decoding stops after the last one.

Geometry follows VideoMAE (SPEC 1.8): training uses ``GroupMultiScaleCrop(size, [1, .875, .75, .66])`` — a crop
whose sides are drawn from the short side times the scales (|i - j| <= ``max_distort`` pairing), placed at one of
13 fixed offsets, resized with PIL **bilinear** — the same crop for every frame, then an optional horizontal flip.
Eval resizes the short side (PIL bilinear, VideoMAE's ``Resize(short_side, 'bilinear')``) and centre-crops.
Bilinear everywhere because VideoMAE's video transforms use it; PIL's bilinear antialiases when downscaling.

Errors: a missing file raises :class:`VideoNotFoundError`; a corrupt, truncated or empty (zero-frame) container
raises :class:`VideoDecodeError` (a ``ValueError``) naming the file and why. A one-frame clip is valid: it is looped
or padded like any clip shorter than the sampled span.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

import av
import grain
import numpy as np
from PIL import Image

from bridle_jax.data import csv_files
from bridle_jax.validation import is_int

SHORT_CLIP_MODES = ("loop", "pad")
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
VIDEOMAE_SCALES = (1.0, 0.875, 0.75, 0.66)


class VideoDecodeError(ValueError):
    """A video that cannot be decoded: the message names the file and why (corrupt, truncated, empty, ...)."""


class VideoNotFoundError(VideoDecodeError, FileNotFoundError):
    """A video file that does not exist (both a VideoDecodeError and a FileNotFoundError)."""


# Errors PyAV/FFmpeg raise on bad data; anything else is a bug and propagates unchanged.
_AV_ERRORS = (av.error.FFmpegError, OSError, EOFError)


# ------------------------------------------------------------------------------------------------------ decoding


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (``fps`` is the average rate, None if unknown)."""

    num_frames: int
    height: int
    width: int
    fps: float | None
    codec: str


@contextlib.contextmanager
def _open(path: str) -> Iterator[av.container.InputContainer]:
    """The container of ``path`` (closed on exit), checked to have a video stream.

    A local file is opened by name, so FFmpeg does its own buffered, seekable reads (the fast path); a URL
    (``gs://``, any fsspec URL) is streamed through a file object (``csv_files.open_binary``), never copied to local
    disk first. An mp4 whose index comes last needs seeks, which fsspec's file objects serve.
    """
    remote = csv_files.is_url(path)
    if not remote and not os.path.isfile(path):
        raise VideoNotFoundError(f"{path}: no such video file")
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(csv_files.open_binary(path)) if remote else path
        except FileNotFoundError:
            raise VideoNotFoundError(f"{path}: no such video file") from None
        except OSError as e:
            raise VideoDecodeError(f"{path}: cannot read the file ({e})") from e
        try:
            container = av.open(source, mode="r")
        except _AV_ERRORS as e:
            raise VideoDecodeError(f"{path}: cannot open the container, corrupt or truncated file? ({e})") from e
        stack.callback(container.close)  # closed before the file object under it
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream (a zero-frame clip, an audio-only or a corrupt file)")
        yield container


def _count_packets(path: str) -> int:
    """Frame count when the container has no index (WebM/Matroska): one demuxed video packet per frame."""
    with _open(path) as container:
        try:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except _AV_ERRORS as e:
            raise VideoDecodeError(f"{path}: demuxing failed, corrupt or truncated file? ({e})") from e


def probe(path) -> VideoInfo:
    """Frame count, size, rate and codec of ``path`` without decoding (counts packets if the index has no count)."""
    path = os.fspath(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        num_frames = int(stream.frames or 0)
        rate = stream.average_rate
        info = VideoInfo(
            num_frames, int(stream.height), int(stream.width), float(rate) if rate else None, stream.codec_context.name
        )
    if info.num_frames == 0:
        info = dataclasses.replace(info, num_frames=_count_packets(path))
    if info.num_frames == 0:
        raise VideoDecodeError(f"{path}: the video stream has no frames")
    return info


def frame_count(path) -> int:
    """Number of frames of ``path`` (from the container's index; > 0, else VideoDecodeError)."""
    return probe(path).num_frames


def _decode(path: str, container, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Decodes sequentially up to ``max(indices)``: (the wanted frames converted to RGB, frames decoded)."""
    wanted, last = set(indices.tolist()), int(indices.max())
    frames: dict[int, np.ndarray] = {}
    size, decoded = None, 0
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            decoded = i + 1
            if i in wanted:
                if size is None:
                    size = (frame.width, frame.height)
                frames[i] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            if i >= last:
                break
    except _AV_ERRORS as e:
        raise VideoDecodeError(f"{path}: decoding failed after {decoded} frames, corrupt or truncated? ({e})") from e
    return frames, decoded


def read_sampled(path, select: Callable[[int], np.ndarray]) -> np.ndarray:
    """Opens ``path`` (a local file or a URL), asks ``select(num_frames)`` for frame indices, returns those frames
    uint8 [n, H, W, 3].

    Frames come back in the order of the indices (repeats allowed). The stream is decoded sequentially up to the
    largest index. If it ends cleanly before that (the index over-counts, e.g. an edit list that drops frames),
    ``select`` is asked again with the number of frames that did decode and the clip is decoded once more; a stream
    with no decodable frame, or one that fails to decode, is a VideoDecodeError. Every frame is converted at the
    size of the first decoded frame, so a mid-stream size change cannot break stacking.
    """
    path = os.fspath(path)
    total = None
    for attempt in range(2):
        with _open(path) as container:
            if total is None:
                total = int(container.streams.video[0].frames or 0) or _count_packets(path)
            if total == 0:
                raise VideoDecodeError(f"{path}: the video stream has no frames")
            indices = np.asarray(select(total), dtype=np.int64).reshape(-1)
            if indices.size == 0 or indices.min() < 0 or indices.max() >= total:
                raise ValueError(f"{path}: frame indices must lie in [0, {total}), got {indices.tolist()}")
            frames, decoded = _decode(path, container, indices)
        if len(frames) == len(set(indices.tolist())):
            return np.stack([frames[i] for i in indices.tolist()])
        if decoded == 0 or attempt == 1:
            raise VideoDecodeError(
                f"{path}: the container lists {total} frames but the stream ends after {decoded} (truncated?)"
            )
        total = decoded
    raise AssertionError("unreachable")


def read_frames(path, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Frames ``indices`` (all frames if None) of the video ``path`` as uint8 [n, H, W, 3], in the given order."""
    if indices is None:
        return read_sampled(path, lambda n: np.arange(n))
    return read_sampled(path, lambda n: np.asarray(indices))


def write_video(path, frames: np.ndarray, *, fps: int = 8, codec: str | None = None, crf: int = 12) -> str:
    """Encodes uint8 [T, H, W, 3] ``frames`` to ``path`` (mp4, yuv420p; H and W must be even) and returns the codec.

    h264 ('libx264', every thread knob pinned to one; a re-render decodes to the same pixels within a few levels,
    not always byte for byte) when the bundled FFmpeg has it, else 'mpeg4'.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_video: frames must be uint8 [T >= 1, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: yuv420p needs even height and width, got {height}x{width}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(os.fspath(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            # Every x264 thread knob pinned; even so, under load one macroblock was seen to encode differently
            # (<= 3 levels), so clips are reproducible in content, not guaranteed byte for byte.
            x264 = "threads=1:lookahead-threads=1:sliced-threads=0:sync-lookahead=0"
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": x264}
        else:
            stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


# ---------------------------------------------------------------------------------------------- temporal sampling


def sample_indices(
    num_frames_in_clip: int,
    num_frames: int = 16,
    sampling_rate: int = 4,
    rng: np.random.Generator | None = None,
    short_clip: str = "loop",
) -> np.ndarray:
    """Frame indices of one clip: ``num_frames`` frames ``sampling_rate`` apart (VideoMAE's 16x4), int64 [L].

    The span holds ``L = min(num_frames, (n - 1) // sampling_rate + 1)`` real frames; its start is uniform over
    the slack ``n - 1 - (L - 1) * sampling_rate`` when ``rng`` is given (training) and the slack's middle otherwise
    (eval). A clip shorter than the full span (``L < num_frames``): "loop" continues the stride past the end and
    wraps around (``index % n``, the clip played in a loop), so ``L == num_frames``; "pad" returns only the ``L``
    real indices and the caller pads (``length = L``). VideoMAE's own loaders instead repeat the last frame.
    """
    n = num_frames_in_clip
    if not is_int(n) or n < 1:
        raise ValueError(f"sample_indices: num_frames_in_clip must be a positive int, got {n!r}")
    if not is_int(num_frames) or num_frames < 1:
        raise ValueError(f"sample_indices: num_frames must be a positive int, got {num_frames!r}")
    if not is_int(sampling_rate) or sampling_rate < 1:
        raise ValueError(f"sample_indices: sampling_rate must be a positive int, got {sampling_rate!r}")
    if short_clip not in SHORT_CLIP_MODES:
        raise ValueError(f"sample_indices: short_clip must be one of {SHORT_CLIP_MODES}, got {short_clip!r}")
    real = min(num_frames, (n - 1) // sampling_rate + 1)
    slack = n - 1 - (real - 1) * sampling_rate
    start = int(rng.integers(0, slack + 1)) if rng is not None else slack // 2
    count = num_frames if short_clip == "loop" else real
    return (start + np.arange(count, dtype=np.int64) * sampling_rate) % n


def pad_clip(frames: np.ndarray, num_frames: int) -> tuple[np.ndarray, int]:
    """Pads a clip with zero frames at the end to ``num_frames``; returns (clip, number of real frames)."""
    length = frames.shape[0]
    if length > num_frames:
        raise ValueError(f"pad_clip: the clip has {length} frames, more than num_frames={num_frames}")
    if length == num_frames:
        return frames, length
    pad = np.zeros((num_frames - length, *frames.shape[1:]), frames.dtype)
    return np.concatenate([frames, pad]), length


# ---------------------------------------------------------------------------------------------------- geometry


def _check_clip(frames, name: str) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(
            f"{name}: a clip must be a non-empty array [T, H, W, 3], got {getattr(frames, 'shape', frames)}"
        )
    return frames


def _resize_frames(frames: np.ndarray, width: int, height: int, resample: str) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    method = RESAMPLE[resample]
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), method)) for f in frames])


def resize_short_side(frames: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
    """Resizes every frame so the short side is ``size``; the long side is truncated (torchvision/VideoMAE rule)."""
    frames = _check_clip(frames, "resize_short_side")
    if resample not in RESAMPLE:
        raise ValueError(f"resize_short_side: resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    height, width = frames.shape[1:3]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    return _resize_frames(frames, new_w, new_h, resample)


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window of every frame (offsets rounded as VideoMAE's ``center_crop``)."""
    frames = _check_clip(frames, "center_crop")
    height, width = frames.shape[1:3]
    if height < size or width < size:
        raise ValueError(f"center_crop: frames {height}x{width} are smaller than the crop {size}")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return np.ascontiguousarray(frames[:, top : top + size, left : left + size])


def fix_crop_offsets(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """VideoMAE's 13 fixed (left, top) offsets (``fill_fix_offset`` with ``more_fix_crop``): a 5x5 grid's corners,
    centre, edge midpoints and quarter points, steps ``(size - crop) // 4``."""
    w, h = (width - crop_w) // 4, (height - crop_h) // 4
    return [
        (0, 0), (4 * w, 0), (0, 4 * h), (4 * w, 4 * h), (2 * w, 2 * h),  # corners and centre
        (0, 2 * h), (4 * w, 2 * h), (2 * w, 4 * h), (2 * w, 0),  # edge midpoints
        (w, h), (3 * w, h), (w, 3 * h), (3 * w, 3 * h),  # quarter points
    ]  # fmt: skip


def multi_scale_crop_sizes(
    height: int, width: int, output_size: int, scales: Sequence[float] = VIDEOMAE_SCALES, max_distort: int = 1
) -> list[tuple[int, int]]:
    """The (crop_w, crop_h) pairs GroupMultiScaleCrop draws from, uniformly.

    Sides are ``int(short_side * scale)``, snapped to ``output_size`` when within 2 px of it, paired when their
    scale indices differ by at most ``max_distort``. Unlike VideoMAE (whose PIL crop pads with black), a side is
    clamped to the frame, which only matters when the frame is within 2 px of ``output_size``.
    """
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [output_size if abs(x - output_size) < 3 else x for x in sides]
    return [
        (min(max(w, 1), width), min(max(h, 1), height))
        for i, h in enumerate(sides)
        for j, w in enumerate(sides)
        if abs(i - j) <= max_distort
    ]


def multi_scale_crop_params(
    height: int,
    width: int,
    output_size: int,
    rng: np.random.Generator,
    scales: Sequence[float] = VIDEOMAE_SCALES,
    max_distort: int = 1,
) -> tuple[int, int, int, int]:
    """One draw of GroupMultiScaleCrop: (top, left, crop_h, crop_w) — a size pair, then one of the 13 offsets."""
    pairs = multi_scale_crop_sizes(height, width, output_size, scales, max_distort)
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    offsets = fix_crop_offsets(width, height, crop_w, crop_h)
    left, top = offsets[int(rng.integers(len(offsets)))]
    return top, left, crop_h, crop_w


def crop_resize(frames: np.ndarray, box: tuple[int, int, int, int], output_size: int) -> np.ndarray:
    """Crops (top, left, h, w) from every frame, then resizes to ``output_size`` squared (PIL bilinear)."""
    top, left, h, w = box
    crop = frames[:, top : top + h, left : left + w]
    return np.ascontiguousarray(_resize_frames(crop, output_size, output_size, "bilinear"))


# ---------------------------------------------------------------------------------------------- Grain transforms


def _clip_of(element: dict, name: str) -> np.ndarray:
    return _check_clip(element["input"], name)


class MultiScaleCrop(grain.transforms.RandomMap):
    """VideoMAE's GroupMultiScaleCrop: one crop per clip (same for every frame), resized to ``size`` (bilinear)."""

    def __init__(self, size: int, scales: Sequence[float] = VIDEOMAE_SCALES, max_distort: int = 1):
        if not is_int(size) or size < 1:
            raise ValueError(f"MultiScaleCrop: size must be a positive int, got {size!r}")
        scales = tuple(float(s) for s in scales)
        if not scales or not all(0 < s <= 1 for s in scales):
            raise ValueError(f"MultiScaleCrop: scales must be a non-empty list of numbers in (0, 1], got {scales!r}")
        if not is_int(max_distort) or max_distort < 0:
            raise ValueError(f"MultiScaleCrop: max_distort must be an int >= 0, got {max_distort!r}")
        self.size, self.scales, self.max_distort = int(size), scales, int(max_distort)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        frames = _clip_of(element, "MultiScaleCrop")
        box = multi_scale_crop_params(*frames.shape[1:3], self.size, rng, self.scales, self.max_distort)
        return {**element, "input": crop_resize(frames, box, self.size)}

    def __repr__(self) -> str:
        return f"MultiScaleCrop(size={self.size}, scales={self.scales}, max_distort={self.max_distort})"


class RandomClipFlip(grain.transforms.RandomMap):
    """Horizontal mirror of the whole clip (every frame or none) with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomClipFlip: p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        frames = _clip_of(element, "RandomClipFlip")
        if rng.random() < self.p:
            frames = np.ascontiguousarray(frames[:, :, ::-1])
        return {**element, "input": frames}

    def __repr__(self) -> str:
        return f"RandomClipFlip(p={self.p})"


class ResizeCenterCropClip(grain.transforms.Map):
    """Eval geometry: short side to ``short_side`` (bilinear), then the central ``size`` x ``size`` crop."""

    def __init__(self, size: int, short_side: int):
        if not is_int(size) or not is_int(short_side) or not 1 <= size <= short_side:
            raise ValueError(f"ResizeCenterCropClip: need ints 1 <= size <= short_side, got {size!r}, {short_side!r}")
        self.size, self.short_side = int(size), int(short_side)

    def map(self, element: dict) -> dict:
        frames = resize_short_side(_clip_of(element, "ResizeCenterCropClip"), self.short_side)
        return {**element, "input": center_crop(frames, self.size)}

    def __repr__(self) -> str:
        return f"ResizeCenterCropClip(size={self.size}, short_side={self.short_side})"


class NormalizeClip(grain.transforms.Map):
    """uint8 clip -> float32 ``(x / 255 - mean) / std`` per channel (mean/std on the [0, 1] scale, e.g. ImageNet)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if mean.shape != (3,) or std.shape != (3,) or not np.all(np.isfinite(mean)) or not np.all(std > 0):
            raise ValueError(f"NormalizeClip: need 3 finite means and 3 positive stds, got {mean} and {std}")
        self.mean, self.std = tuple(mean.tolist()), tuple(std.tolist())
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (mean / std).astype(np.float32)

    def map(self, element: dict) -> dict:
        frames = _clip_of(element, "NormalizeClip")
        return {**element, "input": frames.astype(np.float32) * self._scale - self._offset}

    def __repr__(self) -> str:
        return f"NormalizeClip(mean={self.mean}, std={self.std})"


class PadClip(grain.transforms.Map):
    """Zero-pads ``input`` along time to ``num_frames`` and records ``length`` (int32), so batches have one shape."""

    def __init__(self, num_frames: int):
        if not is_int(num_frames) or num_frames < 1:
            raise ValueError(f"PadClip: num_frames must be a positive int, got {num_frames!r}")
        self.num_frames = int(num_frames)

    def map(self, element: dict) -> dict:
        frames, length = pad_clip(_clip_of(element, "PadClip"), self.num_frames)
        return {**element, "input": frames, "length": np.int32(length)}

    def __repr__(self) -> str:
        return f"PadClip(num_frames={self.num_frames})"
