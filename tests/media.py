"""Test videos made from real photos: a moving, zooming picture with a sine-tone track.

Unit and end-to-end tests import these to build small, deterministic inputs. The picture
moves so that encoders cannot turn the video into one key frame and a run of skips, and
so that a decoder returning frames out of order or repeated would fail a pixel test.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from facestage.types import VisionFrame

TONE_HZ = 440.0
"""Frequency of the audio track's sine tone."""


def frame_count(seconds: float, fps: float | Fraction) -> int:
    """Frames :func:`make_test_video` writes for ``seconds`` at ``fps``."""
    return round(seconds * Fraction(fps))


def render_test_frame(
    frame_source: VisionFrame,
    index: int,
    *,
    fps: float | Fraction,
    size: tuple[int, int],
    moving: bool = True,
) -> VisionFrame:
    """Frame ``index`` of a test video: ``frame_source`` scaled to cover ``size``, then
    panned and zoomed a little over time (about 1 s per cycle) when ``moving``."""
    width, height = size
    src_h, src_w = frame_source.shape[:2]
    cover = max(width / src_w, height / src_h)
    t = index / float(fps)
    zoom = 1.0 + (0.15 * (1 - math.cos(2 * math.pi * t)) if moving else 0.0)
    shift_x = 0.08 * width * math.sin(2 * math.pi * t * 0.5) if moving else 0.0
    shift_y = 0.05 * height * math.sin(2 * math.pi * t * 0.7) if moving else 0.0
    scale = cover * zoom
    # Centre of the photo goes to the centre of the frame, plus the pan.
    matrix = np.array(
        [
            [scale, 0.0, width / 2 - scale * src_w / 2 + shift_x],
            [0.0, scale, height / 2 - scale * src_h / 2 + shift_y],
        ],
        dtype=np.float64,
    )
    frame = cv2.warpAffine(
        frame_source, matrix, (width, height), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT
    )
    return np.ascontiguousarray(frame, dtype=np.uint8)


def make_test_video(
    path: Path,
    *,
    frame_source: VisionFrame,
    seconds: float,
    fps: float | Fraction,
    size: tuple[int, int],
    audio: bool = True,
    codec: str = "libx264",
    rotation_degrees: int = 0,
    moving: bool = True,
    audio_codec: str = "aac",
    audio_rate: int = 44100,
    container_format: str | None = None,
    bit_rate: int = 4_000_000,
) -> Path:
    """Write a test video of ``frame_source`` and return ``path``.

    ``size`` is the coded (width, height); ``rotation_degrees`` (counter-clockwise, as PyAV's
    ``VideoFrame.rotation`` reads it back) is stored as a display matrix, so a reader that
    honours it shows :func:`render_test_frame` turned by that angle. Frame ``i`` is
    :func:`render_test_frame` ``(frame_source, i, ...)``; the audio track, when asked for,
    is a :data:`TONE_HZ` sine tone of the same duration.
    """
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    count = frame_count(seconds, rate)
    with av.open(str(path), mode="w", format=container_format) as container:
        video = container.add_stream(codec, rate=rate)
        assert isinstance(video, av.VideoStream), f"{codec} is not a video encoder"
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        if codec == "libx264":
            video.options = {"crf": "12", "preset": "veryfast"}
        else:
            video.bit_rate = bit_rate  # encoders without CRF default to a blurry rate
        if rotation_degrees:
            video.set_display_rotation(rotation_degrees)
        tone: av.AudioStream | None = None
        if audio:
            stream = container.add_stream(audio_codec, rate=audio_rate, layout="mono")
            assert isinstance(stream, av.AudioStream), f"{audio_codec} is not an audio encoder"
            tone = stream
        samples_done = 0
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(
                render_test_frame(frame_source, index, fps=rate, size=size, moving=moving),
                format="bgr24",
            )
            frame.pts = index
            frame.time_base = 1 / rate
            container.mux(video.encode(frame))
            if tone is not None:
                # Audio up to the end of this video frame, so the file is interleaved.
                samples_end = round((index + 1) / rate * audio_rate)
                container.mux(tone.encode(_tone(samples_done, samples_end, audio_rate)))
                samples_done = samples_end
        container.mux(video.encode(None))
        if tone is not None:
            container.mux(tone.encode(None))
    return path


def _tone(start: int, end: int, rate: int) -> av.AudioFrame:
    t = np.arange(start, end, dtype=np.float64) / rate
    samples = (0.3 * np.sin(2 * math.pi * TONE_HZ * t)).astype(np.float32)[np.newaxis, :]
    frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
    frame.sample_rate = rate
    frame.pts = start
    frame.time_base = Fraction(1, rate)
    return frame


def psnr(a: VisionFrame, b: VisionFrame) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def stream_duration_s(path: Path, kind: str) -> float:
    """Span of the first ``kind`` ("video" or "audio") stream's packets, in seconds.

    Measured from the packets themselves rather than container headers, so a test sees
    what a player would play.
    """
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams if s.type == kind)
        start: int | None = None
        end: int | None = None
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            start = packet.pts if start is None else min(start, packet.pts)
            packet_end = packet.pts + (packet.duration or 0)
            end = packet_end if end is None else max(end, packet_end)
        assert start is not None and end is not None and stream.time_base is not None
        return float((end - start) * stream.time_base)
