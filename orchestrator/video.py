"""Video I/O for the orchestrator: probe, decode frame by frame, encode with the audio kept.

Everything streams: :func:`iter_frames` yields one decoded frame at a time and
:class:`VideoWriter` encodes one frame at a time while copying the target's audio packets
alongside, so memory stays bounded by the codec's own look-ahead whatever the video's
length. PyAV (FFmpeg) does the work; its exceptions never reach a caller: unreadable input
becomes :class:`~facestage.errors.InvalidArgumentError` naming the request field.

Conventions:

- Frames are :data:`~facestage.types.VisionFrame`: HxWx3 uint8 BGR, in display orientation
  (rotation metadata already applied).
- Frame rates are :class:`fractions.Fraction` so NTSC rates such as 30000/1001 survive a
  round trip exactly.
- Output quality is 0..100 (FaceFusion users know this knob); see :func:`quality_to_crf`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, cast

import av
import cv2
import numpy as np
from av.sidedata.sidedata import Type as SideDataType

from facestage.errors import FacestageError, InvalidArgumentError
from facestage.types import VisionFrame
from orchestrator.tempfiles import AtomicOutput

PathLike = str | os.PathLike[str]

DEFAULT_FIELD: Final = "target_video"
"""Request field named in errors about an unreadable input video."""

DEFAULT_CODEC: Final = "libx264"
DEFAULT_PIX_FMT: Final = "yuv420p"
DEFAULT_CONTAINER: Final = "mp4"
DEFAULT_QUALITY: Final = 80
"""Maps to CRF 18 for x264, the usual "visually lossless" setting."""

FrameCountSource = Literal["container", "estimated"]

# Knots of the piecewise-linear quality -> x264 CRF mapping; see quality_to_crf.
_QUALITY_CRF_KNOTS: Final = ((0, 51), (80, 18), (100, 0))

# Codecs whose rate control takes a CRF, with the top of their CRF scale.
_CRF_SCALE: Final[Mapping[str, int]] = {
    "libx264": 51,
    "libx265": 51,
    "libvpx-vp9": 63,
    "libvpx": 63,
    "libsvtav1": 63,
}

# Output format chosen from the output file's suffix when none is given.
_FORMAT_BY_SUFFIX: Final[Mapping[str, str]] = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
}

# Audio codecs each output format carries as they are (stream copy). A format missing
# here (matroska) accepts any codec; anything else is re-encoded to _REENCODE_AUDIO.
_COPYABLE_AUDIO: Final[Mapping[str, frozenset[str]]] = {
    "mp4": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}),
    "mov": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le"}),
    "webm": frozenset({"opus", "vorbis"}),
    "avi": frozenset({"mp3", "ac3", "pcm_s16le", "aac"}),
}
_REENCODE_AUDIO: Final[Mapping[str, str]] = {"webm": "libopus"}
_DEFAULT_REENCODE_AUDIO: Final = "aac"

# Pixel formats whose chroma is subsampled by 2 in both directions or horizontally, which
# the encoders reject at odd widths/heights.
_EVEN_WIDTH_PIX_FMTS: Final = frozenset({"yuv420p", "yuvj420p", "nv12", "yuv422p", "yuv420p10le"})
_EVEN_HEIGHT_PIX_FMTS: Final = frozenset({"yuv420p", "yuvj420p", "nv12", "yuv420p10le"})


def quality_to_crf(quality: int, max_crf: int = 51) -> int:
    """Map output quality 0..100 to a CRF on a ``0..max_crf`` scale (lower CRF is better).

    Piecewise linear through (quality, x264 CRF) = (0, 51), (80, 18), (100, 0):

    ======= ==== ==============================================
    quality CRF  meaning (x264)
    ======= ==== ==============================================
    100     0    lossless (in YUV; needs a High 4:4:4 decoder)
    90      9    near lossless, large files
    80      18   visually lossless; the default
    67      23   x264's own default
    50      30   visible softening
    0       51   worst
    ======= ==== ==============================================

    The x264 value is rescaled for codecs with another scale (VP9/AV1: 0..63).
    """
    if not 0 <= quality <= 100:
        raise InvalidArgumentError("output_quality", f"must be within 0..100, got {quality}")
    for (q_lo, crf_lo), (q_hi, crf_hi) in itertools.pairwise(_QUALITY_CRF_KNOTS):
        if quality <= q_hi:
            crf_x264 = crf_lo + (crf_hi - crf_lo) * (quality - q_lo) / (q_hi - q_lo)
            return round(crf_x264 * max_crf / 51)
    raise AssertionError("unreachable: knots cover 0..100")


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video; sizes are display sizes (after rotation)."""

    width: int
    height: int
    fps: Fraction
    frame_count: int
    frame_count_source: FrameCountSource
    """``container`` when the container states the count, ``estimated`` from duration*fps."""
    duration_s: float
    codec: str
    rotation_degrees: int
    """Counter-clockwise rotation applied for display: 0, 90, 180 or 270."""
    mirrored: bool
    """The display matrix also mirrors the picture (applied after ``rotation_degrees``)."""
    has_audio: bool
    audio_codec: str | None
    format_name: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in display orientation."""
        return self.width, self.height


# --- orientation -------------------------------------------------------------------------

Orientation = Literal[
    "identity", "rot90_ccw", "rot90_cw", "rot180", "transpose", "antitranspose", "hflip", "vflip"
]


def _orientation_from_matrix(matrix: tuple[int, ...]) -> Orientation:
    """The display transform of an FFmpeg display matrix, with the ``ffmpeg`` CLI's rules.

    Mirrors fftools' autorotate: the clockwise angle ``theta`` is the negated
    ``av_display_rotation_get`` rounded to a multiple of 90, and the signs of the matrix
    entries tell a rotation from a rotation plus a mirror (front-camera recordings).
    """
    a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
    scale0, scale1 = math.hypot(a, c), math.hypot(b, d)
    if scale0 == 0 or scale1 == 0:
        return "identity"  # a degenerate matrix; showing the coded frame beats failing
    ccw = math.degrees(math.atan2(b / scale1, a / scale0))
    theta = round(ccw / 90) * 90 % 360  # clockwise angle (FFmpeg's rotation_get negated)
    if theta == 90:
        return "transpose" if c > 0 else "rot90_cw"
    if theta == 270:
        return "antitranspose" if c < 0 else "rot90_ccw"
    if theta == 180:
        if a < 0 and d < 0:
            return "rot180"
        return "hflip" if a < 0 else ("vflip" if d < 0 else "identity")
    return "vflip" if d < 0 else "identity"


def _orientation_from_rotate_tag(tag: str) -> Orientation:
    """The old ``rotate`` stream tag: a clockwise angle in degrees."""
    try:
        clockwise = round(float(tag) / 90) * 90 % 360
    except ValueError:
        return "identity"
    return {90: "rot90_cw", 180: "rot180", 270: "rot90_ccw"}.get(clockwise, "identity")  # type: ignore[return-value]


_CCW_DEGREES: Final[Mapping[Orientation, int]] = {
    "identity": 0,
    "hflip": 0,
    "vflip": 0,
    "rot90_ccw": 90,
    "transpose": 90,
    "rot180": 180,
    "rot90_cw": 270,
    "antitranspose": 270,
}


_MIRRORED: Final = frozenset({"hflip", "vflip", "transpose", "antitranspose"})


def _frame_orientation(frame: av.VideoFrame, stream: av.VideoStream) -> Orientation:
    """Orientation from the frame's display matrix side data, else the ``rotate`` tag.

    PyAV 18 exposes the matrix as frame side data (FFmpeg copies the container's matrix
    onto every decoded frame); ``VideoFrame.rotation`` gives only the angle, so the raw
    nine int32 values are read to see mirroring too.
    """
    # PyAV's stub types side_data as a TypedDict of motion vectors only; at run time it is
    # a mapping keyed by side data type.
    side_data = cast("Mapping[object, bytes]", frame.side_data).get(SideDataType.DISPLAYMATRIX)
    if side_data is None:
        tag = stream.metadata.get("rotate")
        return _orientation_from_rotate_tag(tag) if tag else "identity"
    raw = bytes(side_data)
    if len(raw) != 36:
        return "identity"
    return _orientation_from_matrix(struct.unpack("=9i", raw))


def _apply_orientation(image: VisionFrame, orientation: Orientation) -> VisionFrame:
    """Return ``image`` as it should be displayed (contiguous, so encoders accept it)."""
    if orientation == "identity":
        return image
    if orientation == "rot90_ccw":
        result = cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    elif orientation == "rot90_cw":
        result = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    elif orientation == "rot180":
        result = cv2.rotate(image, cv2.ROTATE_180)
    elif orientation == "transpose":
        result = cv2.transpose(image)
    elif orientation == "antitranspose":
        result = cv2.rotate(cv2.transpose(image), cv2.ROTATE_180)
    elif orientation == "hflip":
        result = cv2.flip(image, 1)
    else:
        result = cv2.flip(image, 0)
    return np.ascontiguousarray(result, dtype=np.uint8)


# --- probing and decoding -----------------------------------------------------------------


def _invalid(field: str, path: Path, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(field, f"{path.name}: {problem}")


@contextlib.contextmanager
def _open_input(path: PathLike, field: str) -> Iterator[Any]:
    """Open ``path`` for reading, turning every failure into InvalidArgumentError."""
    file = Path(path)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise _invalid(field, file, "no such file") from None
    if size == 0:
        raise _invalid(field, file, "the file is empty (0 bytes)")
    try:
        container = av.open(str(file), mode="r")
    except av.FFmpegError as error:
        raise _invalid(
            field, file, f"not a readable video file (corrupt, truncated or unsupported): {error}"
        ) from None
    try:
        yield container
    finally:
        container.close()


def _video_stream(container: Any, field: str, path: Path) -> Any:
    if not container.streams.video:
        raise _invalid(field, path, "the file has no video stream")
    stream = container.streams.video[0]
    # Frame threading decodes several frames at once; slice threading helps single frames.
    stream.codec_context.thread_type = "AUTO"
    return stream


def _stream_fps(stream: Any) -> Fraction | None:
    """The stream's frame rate as an exact fraction, preferring the container's nominal rate.

    ``guessed_rate`` (r_frame_rate) is the exact nominal rate (30000/1001) when the stream is
    constant-rate; ``average_rate`` is frames/duration and the better answer for a variable
    rate, where the nominal rate is often a time base such as 1000.
    """
    average: Fraction | None = stream.average_rate
    guessed: Fraction | None = stream.guessed_rate
    if average and guessed and abs(guessed - average) <= average / 100:
        return Fraction(guessed)
    if average:
        return Fraction(average)
    if guessed:
        return Fraction(guessed)
    return None


def _first_frame(container: Any, stream: Any, field: str, path: Path) -> Any:
    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError as error:
        raise _invalid(field, path, f"the video stream cannot be decoded: {error}") from None
    raise _invalid(field, path, "the video stream contains no decodable frames")


def probe(path: PathLike, *, field: str = DEFAULT_FIELD) -> VideoInfo:
    """Read a video's size, rate, frame count, duration, codecs and rotation.

    Decodes the first frame, both to read rotation (PyAV 18 exposes the display matrix on
    frames, not streams) and to reject files whose headers parse but whose video does not.

    Raises:
        InvalidArgumentError: ``field`` for a missing, empty, corrupt, truncated or
            non-video file.
    """
    file = Path(path)
    with _open_input(file, field) as container:
        stream = _video_stream(container, field, file)
        fps = _stream_fps(stream)
        if fps is None or fps <= 0:
            raise _invalid(field, file, "the video stream states no frame rate")
        duration_s = _duration_s(container, stream)
        frame = _first_frame(container, stream, field, file)
        orientation = _frame_orientation(frame, stream)
        coded_width, coded_height = frame.width, frame.height
        if orientation in ("rot90_ccw", "rot90_cw", "transpose", "antitranspose"):
            width, height = coded_height, coded_width
        else:
            width, height = coded_width, coded_height
        if stream.frames > 0:
            frame_count, source = int(stream.frames), "container"
        else:
            frame_count, source = max(1, round(duration_s * fps)), "estimated"
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            width=width,
            height=height,
            fps=fps,
            frame_count=frame_count,
            frame_count_source=source,  # type: ignore[arg-type]
            duration_s=duration_s if duration_s > 0 else float(frame_count / fps),
            codec=str(stream.codec_context.name),
            rotation_degrees=_CCW_DEGREES[orientation],
            mirrored=orientation in _MIRRORED,
            has_audio=audio is not None,
            audio_codec=str(audio.codec_context.name) if audio is not None else None,
            format_name=str(container.format.name),
        )


def _duration_s(container: Any, stream: Any) -> float:
    """The video stream's duration, else the container's (which may include audio)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration / av.time_base)
    return 0.0


def iter_frames(path: PathLike, *, field: str = DEFAULT_FIELD) -> Iterator[VisionFrame]:
    """Yield the video's frames in presentation order as BGR uint8, display-oriented.

    Decodes lazily with FFmpeg's frame threading; only the decoder's own delay is buffered.
    Closing the generator early closes the file.

    Raises:
        InvalidArgumentError: ``field`` when the file cannot be opened or decoding fails.
    """
    file = Path(path)
    with _open_input(file, field) as container:
        stream = _video_stream(container, field, file)
        orientation: Orientation | None = None
        decoded = container.decode(stream)
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                return
            except av.FFmpegError as error:
                raise _invalid(field, file, f"decoding failed: {error}") from None
            if orientation is None:
                # The display matrix is a stream property that FFmpeg repeats per frame.
                orientation = _frame_orientation(frame, stream)
            image: VisionFrame = frame.to_ndarray(format="bgr24")
            yield _apply_orientation(image, orientation)


# --- encoding -------------------------------------------------------------------------------


class _AudioRemuxer:
    """Carries the target's first audio stream into the output, packet by packet.

    Copies packets when the output format accepts the codec, else decodes and re-encodes.
    :meth:`mux_until` is called after each video frame so the file is interleaved and only
    one look-ahead packet is held in memory.
    """

    copied: bool
    """True when packets are stream-copied, False when re-encoded."""

    def __init__(self, source: Path, output: Any, output_format: str, field: str) -> None:
        self._input = av.open(str(source), mode="r")
        try:
            self._in_stream = self._input.streams.audio[0]
            codec_name = str(self._in_stream.codec_context.name)
            copyable = _COPYABLE_AUDIO.get(output_format)
            self.copied = copyable is None or codec_name in copyable
            if self.copied:
                self._out_stream = output.add_stream_from_template(self._in_stream)
            else:
                target_codec = _REENCODE_AUDIO.get(output_format, _DEFAULT_REENCODE_AUDIO)
                rate = 48000 if target_codec == "libopus" else self._in_stream.rate
                self._out_stream = output.add_stream(
                    target_codec, rate=rate, layout=_encodable_layout(self._in_stream.layout)
                )
            self._shift_s = self._video_start_s()
            self._packets = self._input.demux(self._in_stream)
            self._pending: Any | None = None
            self._exhausted = False
        except BaseException:
            self._input.close()
            raise
        self._output = output
        self._field = field
        self._source = source

    def _video_start_s(self) -> float:
        # Our output video starts at 0; shift the audio by the target video's start so
        # lip sync survives targets whose video starts late (common after cutting).
        if not self._input.streams.video:
            return 0.0
        video = self._input.streams.video[0]
        if video.start_time is None or video.time_base is None:
            return 0.0
        return float(video.start_time * video.time_base)

    def _next_packet(self) -> Any | None:
        if self._pending is None and not self._exhausted:
            try:
                for packet in self._packets:
                    if packet.dts is None and packet.pts is None:
                        continue  # demuxer's empty end-of-stream packet
                    self._pending = packet
                    break
                else:
                    self._exhausted = True
            except av.FFmpegError as error:
                raise _invalid(self._field, self._source, f"audio demux failed: {error}") from None
        return self._pending

    def mux_until(self, time_s: float | None) -> None:
        """Mux audio packets that start before ``time_s`` seconds (all when None)."""
        while (packet := self._next_packet()) is not None:
            shift = round(self._shift_s / packet.time_base) if self._shift_s else 0
            start = packet.pts if packet.pts is not None else packet.dts
            if time_s is not None and float((start - shift) * packet.time_base) > time_s:
                return
            self._pending = None
            if self.copied:
                if packet.pts is not None:
                    packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
                packet.stream = self._out_stream
                self._output.mux(packet)
            else:
                try:
                    frames = self._in_stream.decode(packet)
                except av.FFmpegError as error:
                    raise _invalid(
                        self._field, self._source, f"audio decoding failed: {error}"
                    ) from None
                for frame in frames:
                    frame.pts = None  # the encoder counts samples from 0
                    self._output.mux(self._out_stream.encode(frame))
        if time_s is None and not self.copied:
            self._output.mux(self._out_stream.encode(None))

    def close(self) -> None:
        """Close the target file."""
        self._pending = None  # a packet must not outlive the demuxer it came from
        self._input.close()


def _encodable_layout(layout: Any) -> str:
    """A named channel layout for the encoder.

    Containers without channel masks (AVI, WAV) give "N channels" with no order, which
    the AAC and Opus encoders refuse; FFmpeg's resampler maps them onto the named layout.
    """
    if all(channel.name != "NONE" for channel in layout.channels):
        return str(layout.name)
    return {1: "mono", 6: "5.1"}.get(int(layout.nb_channels), "stereo")


class VideoWriter:
    """Encode BGR frames to a video file, carrying the target's audio; atomic on disk.

    Use as a context manager. Frames go to a temporary file in the output's directory,
    renamed onto ``path`` by :meth:`commit`, which a clean exit from the ``with`` block
    calls. Any exception in the block (``asyncio.CancelledError`` and
    ``KeyboardInterrupt`` included) deletes the temporary file, so a failed or cancelled
    job never leaves a plausible-looking partial video. A caller that stops early on
    purpose calls :meth:`abort`.

    Defaults come from ``target`` (the video the frames were decoded from): its exact
    rational frame rate, its display size, its first audio stream (copied when the
    output format accepts the codec, e.g. AAC into MP4, else re-encoded to AAC; Opus for
    WebM). With the same number of frames as the target, the output has the target's
    frame count and duration. Passing another ``fps`` changes the timestamps only: the
    writer never drops or repeats frames, so resampling the rate is the caller's job.

    Odd sizes: 4:2:0 pixel formats need even dimensions, so an odd width or height is
    padded by one replicated edge pixel (never rescaled: the picture's pixels stay
    exactly where they were).

    ``quality`` (0..100) sets the CRF through :func:`quality_to_crf` for libx264, libx265,
    libvpx(-vp9) and libsvtav1; other encoders keep their own defaults.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        target: PathLike | None = None,
        fps: Fraction | float | None = None,
        size: tuple[int, int] | None = None,
        codec: str = DEFAULT_CODEC,
        container_format: str | None = None,
        pix_fmt: str = DEFAULT_PIX_FMT,
        quality: int = DEFAULT_QUALITY,
        copy_audio: bool = True,
        encoder_options: Mapping[str, str] | None = None,
        field: str = DEFAULT_FIELD,
    ) -> None:
        self.path = Path(path)
        self._target = Path(target) if target is not None else None
        self._field = field
        info = probe(self._target, field=field) if self._target is not None else None
        self.target_info = info
        chosen_fps = fps if fps is not None else (info.fps if info is not None else None)
        if chosen_fps is None:
            raise ValueError("VideoWriter needs fps, or a target to take it from")
        self.fps = _as_fraction(chosen_fps)
        if self.fps <= 0:
            raise InvalidArgumentError("output_fps", f"must be positive, got {chosen_fps}")
        self.size = size if size is not None else (info.size if info is not None else None)
        if self.size is not None and (self.size[0] <= 0 or self.size[1] <= 0):
            raise InvalidArgumentError("output_resolution", f"must be positive, got {self.size}")
        self.codec = codec
        self.container_format = container_format or _FORMAT_BY_SUFFIX.get(
            self.path.suffix.lower(), DEFAULT_CONTAINER
        )
        self.pix_fmt = pix_fmt
        self._options = dict(_quality_options(codec, quality))
        self._options.update(encoder_options or {})
        self._with_audio = copy_audio and info is not None and info.has_audio
        self._output_file: AtomicOutput | None = None
        self._container: Any | None = None
        self._stream: Any | None = None
        self._audio: _AudioRemuxer | None = None
        self._audio_copied: bool | None = None
        self._frames_written = 0
        self._time_base = Fraction(self.fps.denominator, self.fps.numerator)

    @property
    def frames_written(self) -> int:
        """Frames handed to the encoder so far."""
        return self._frames_written

    @property
    def audio_copied(self) -> bool | None:
        """True if the audio is stream-copied, False if re-encoded, None without audio."""
        return self._audio_copied

    def __enter__(self) -> VideoWriter:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._output_file is not None and not self._output_file.done:
            self.commit()

    def open(self) -> None:
        """Create the temporary output; called by ``__enter__``."""
        if self._output_file is not None:
            raise RuntimeError("VideoWriter is already open")
        self._output_file = AtomicOutput(self.path)
        try:
            self._container = av.open(
                str(self._output_file.temp_path), mode="w", format=self.container_format
            )
        except BaseException:
            self._output_file.discard()
            raise

    def _start(self, width: int, height: int) -> None:
        """Add the streams once the first frame fixes the size; writes no header yet."""
        assert self._container is not None
        stream = self._container.add_stream(self.codec, rate=self.fps, options=self._options)
        stream.width, stream.height = _encodable_size(width, height, self.pix_fmt)
        stream.pix_fmt = self.pix_fmt
        stream.codec_context.time_base = self._time_base
        self._stream = stream
        if self._with_audio and self._target is not None:
            self._audio = _AudioRemuxer(
                self._target, self._container, self.container_format, self._field
            )
            self._audio_copied = self._audio.copied

    def write(self, frame: VisionFrame) -> None:
        """Encode one HxWx3 uint8 BGR frame; resized to ``size`` when that differs."""
        if self._container is None or self._output_file is None or self._output_file.done:
            raise RuntimeError("VideoWriter is not open")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 BGR frame, got {frame.shape} {frame.dtype}")
        width, height = self.size if self.size is not None else (frame.shape[1], frame.shape[0])
        if self._stream is None:
            self._start(width, height)
        assert self._stream is not None
        image = _fit(frame, width, height, self._stream.width, self._stream.height)
        video_frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        video_frame.pts = self._frames_written
        video_frame.time_base = self._time_base
        self._container.mux(self._stream.encode(video_frame))
        self._frames_written += 1
        if self._audio is not None:
            self._audio.mux_until(float(self._frames_written * self._time_base))

    def commit(self) -> Path:
        """Flush the encoder, finish the audio, close the file and rename it onto ``path``.

        Raises:
            FacestageError: no frame was written (an empty video is never committed).
        """
        if self._container is None or self._output_file is None or self._output_file.done:
            raise RuntimeError("VideoWriter is not open")
        if self._stream is None:
            self.abort()
            raise FacestageError(f"{self.path.name}: no frames were written; nothing committed")
        try:
            self._container.mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.mux_until(None)
            self._close_files()
        except BaseException:
            self.abort()
            raise
        return self._output_file.commit()

    def abort(self) -> None:
        """Discard the output: close everything and delete the temporary file. Idempotent."""
        # Closing a muxer whose header was never written can raise; the file is going
        # away regardless, so such errors must not mask the exception that brought us here.
        with contextlib.suppress(Exception):
            self._close_files()
        if self._output_file is not None:
            self._output_file.discard()

    def _close_files(self) -> None:
        try:
            if self._container is not None:
                container, self._container = self._container, None
                container.close()
        finally:
            if self._audio is not None:
                audio, self._audio = self._audio, None
                audio.close()


def _as_fraction(fps: Fraction | float) -> Fraction:
    """An exact rate; floats such as 29.97 snap to the NTSC fraction they stand for."""
    if isinstance(fps, Fraction):
        return fps
    if float(fps).is_integer():
        return Fraction(int(fps))
    # 29.97 is a rounded 30000/1001; Fraction(29.97) would be 2997/100, which drifts
    # against the target's NTSC timestamps by a frame every few minutes.
    ntsc_base = round(fps * 1.001)
    if abs(fps * 1.001 - ntsc_base) < 0.005:
        return Fraction(ntsc_base * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _quality_options(codec: str, quality: int) -> dict[str, str]:
    quality_to_crf(quality)  # validates the range for every codec, CRF-driven or not
    max_crf = _CRF_SCALE.get(codec)
    if max_crf is None:
        return {}
    options = {"crf": str(quality_to_crf(quality, max_crf))}
    if codec.startswith("libvpx"):
        options["b"] = "0"  # libvpx honours CRF only in constant-quality mode (no bitrate)
    return options


def _encodable_size(width: int, height: int, pix_fmt: str) -> tuple[int, int]:
    """Round odd dimensions up where the pixel format's chroma subsampling needs it."""
    if pix_fmt in _EVEN_WIDTH_PIX_FMTS and width % 2:
        width += 1
    if pix_fmt in _EVEN_HEIGHT_PIX_FMTS and height % 2:
        height += 1
    return width, height


def _fit(frame: VisionFrame, width: int, height: int, coded_w: int, coded_h: int) -> VisionFrame:
    """Resize to (width, height) if needed, then pad to the coded size by edge replication."""
    if (frame.shape[1], frame.shape[0]) != (width, height):
        shrinking = width * height < frame.shape[0] * frame.shape[1]
        frame = np.asarray(
            cv2.resize(
                frame,
                (width, height),
                interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR,
            ),
            dtype=np.uint8,
        )
    if (coded_w, coded_h) != (width, height):
        frame = np.pad(frame, ((0, coded_h - height), (0, coded_w - width), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)
