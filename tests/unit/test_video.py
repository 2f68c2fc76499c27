"""Video I/O: probing, decoding with rotation, atomic encoding with the audio carried over."""

from __future__ import annotations

import asyncio
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from facestage.errors import FacestageError, InvalidArgumentError
from facestage.types import VisionFrame
from orchestrator.video import VideoInfo, VideoWriter, iter_frames, probe, quality_to_crf
from tests.media import make_test_video, psnr, render_test_frame, stream_duration_s

SIZE = (320, 240)
FPS = 25
SECONDS = 2.0
AAC_FRAME_S = 1024 / 44100  # one AAC packet: the granularity of audio durations


@pytest.fixture(scope="module")
def t1_video(tmp_path_factory: pytest.TempPathFactory, t1_bgr: VisionFrame) -> Path:
    """t1.jpg moving for 2 s at 25 fps, 320x240, H.264 with an AAC tone, in MP4."""
    path = tmp_path_factory.mktemp("video") / "t1.mp4"
    return make_test_video(path, frame_source=t1_bgr, seconds=SECONDS, fps=FPS, size=SIZE)


@pytest.fixture(scope="module")
def t1_frames(t1_video: Path) -> list[VisionFrame]:
    return list(iter_frames(t1_video))


def _round_trip(source: Path, output: Path, **options: object) -> VideoWriter:
    with VideoWriter(output, target=source, **options) as writer:  # type: ignore[arg-type]
        for frame in iter_frames(source):
            writer.write(frame)
    return writer


def test_probe_reports_counts_rate_duration_and_audio(t1_video: Path) -> None:
    info = probe(t1_video)
    assert (info.width, info.height) == SIZE
    assert info.fps == Fraction(25)
    assert info.frame_count == 50
    assert info.frame_count_source == "container"
    assert info.duration_s == pytest.approx(2.0, abs=1 / FPS)
    assert info.codec == "h264"
    assert info.rotation_degrees == 0 and not info.mirrored
    assert info.has_audio and info.audio_codec == "aac"
    assert "mp4" in info.format_name


def test_iter_frames_decodes_every_frame_in_order(
    t1_frames: list[VisionFrame], t1_bgr: VisionFrame
) -> None:
    assert len(t1_frames) == 50
    assert all(frame.shape == (240, 320, 3) and frame.dtype == np.uint8 for frame in t1_frames)
    for index, frame in enumerate(t1_frames):
        expected = render_test_frame(t1_bgr, index, fps=FPS, size=SIZE)
        assert psnr(frame, expected) > 28, f"frame {index}"
        # The picture moves, so a neighbouring frame must match worse: order is kept.
        for other in (index - 1, index + 1):
            if 0 <= other < 50:
                neighbour = render_test_frame(t1_bgr, other, fps=FPS, size=SIZE)
                assert psnr(frame, expected) > psnr(frame, neighbour), (index, other)


def test_round_trip_keeps_frames_rate_duration_audio_and_pixels(
    t1_video: Path, t1_frames: list[VisionFrame], tmp_path: Path
) -> None:
    output = tmp_path / "out.mp4"
    writer = _round_trip(t1_video, output)

    assert writer.frames_written == 50
    assert writer.audio_copied is True  # AAC goes into MP4 without re-encoding
    info = probe(output)
    assert info.frame_count == 50
    assert info.fps == Fraction(25)
    assert abs(info.duration_s - probe(t1_video).duration_s) <= 1 / FPS
    assert info.has_audio and info.audio_codec == "aac"
    assert stream_duration_s(output, "audio") == pytest.approx(
        stream_duration_s(t1_video, "audio"), abs=AAC_FRAME_S
    )
    decoded = list(iter_frames(output))
    assert len(decoded) == 50
    worst = min(psnr(a, b) for a, b in zip(decoded, t1_frames, strict=True))
    assert worst > 30, f"default quality lost too much: {worst:.1f} dB"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]  # no temporary file left over


def test_lower_quality_gives_smaller_file(t1_video: Path, tmp_path: Path) -> None:
    _round_trip(t1_video, tmp_path / "high.mp4", quality=90)
    _round_trip(t1_video, tmp_path / "low.mp4", quality=30)
    assert (tmp_path / "low.mp4").stat().st_size < (tmp_path / "high.mp4").stat().st_size / 2


@pytest.mark.parametrize(("degrees", "numpy_turns"), [(90, 1), (180, 2), (270, 3)])
def test_rotation_metadata_is_honoured(
    degrees: int, numpy_turns: int, t1_bgr: VisionFrame, tmp_path: Path
) -> None:
    path = make_test_video(
        tmp_path / "rotated.mp4",
        frame_source=t1_bgr,
        seconds=0.4,
        fps=FPS,
        size=SIZE,
        audio=False,
        rotation_degrees=degrees,
    )
    info = probe(path)
    assert info.rotation_degrees == degrees
    swapped = degrees % 180 == 90
    assert (info.width, info.height) == ((240, 320) if swapped else SIZE)

    frames = list(iter_frames(path))
    assert len(frames) == 10
    for index in (0, 9):
        coded = render_test_frame(t1_bgr, index, fps=FPS, size=SIZE)
        right = np.rot90(coded, numpy_turns)  # counter-clockwise, as the metadata says
        wrong = np.rot90(coded, -numpy_turns)
        assert frames[index].shape == right.shape
        assert psnr(frames[index], right) > 28
        if degrees != 180:  # for 180 degrees both directions are the same picture
            assert psnr(frames[index], wrong) < 20


def test_mirroring_display_matrix_is_honoured(t1_bgr: VisionFrame, tmp_path: Path) -> None:
    path = tmp_path / "mirrored.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = SIZE
        stream.set_display_rotation(90, hflip=True)  # rotate, then mirror
        frame = av.VideoFrame.from_ndarray(
            render_test_frame(t1_bgr, 0, fps=FPS, size=SIZE), format="bgr24"
        )
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    info = probe(path)
    assert info.mirrored and (info.width, info.height) == (240, 320)
    (decoded,) = list(iter_frames(path))
    expected = np.rot90(render_test_frame(t1_bgr, 0, fps=FPS, size=SIZE), 1)[:, ::-1]
    assert psnr(decoded, expected) > 28
    assert psnr(decoded, expected[:, ::-1]) < 20


def test_ntsc_rate_is_kept_exactly(t1_bgr: VisionFrame, tmp_path: Path) -> None:
    ntsc = Fraction(30000, 1001)
    source = make_test_video(
        tmp_path / "ntsc.mp4", frame_source=t1_bgr, seconds=1.0, fps=ntsc, size=SIZE
    )
    assert probe(source).fps == ntsc
    assert probe(source).frame_count == 30

    output = tmp_path / "out.mp4"
    _round_trip(source, output)
    info = probe(output)
    assert info.fps == ntsc
    assert info.frame_count == 30
    assert info.duration_s == pytest.approx(30 / ntsc, abs=1e-3)


def test_float_rate_snaps_to_the_ntsc_fraction(tmp_path: Path) -> None:
    assert VideoWriter(tmp_path / "x.mp4", fps=29.97).fps == Fraction(30000, 1001)
    assert VideoWriter(tmp_path / "x.mp4", fps=23.976).fps == Fraction(24000, 1001)


def test_mpeg4_avi_decodes_and_pcm_audio_is_reencoded(t1_bgr: VisionFrame, tmp_path: Path) -> None:
    source = make_test_video(
        tmp_path / "in.avi",
        frame_source=t1_bgr,
        seconds=SECONDS,
        fps=FPS,
        size=SIZE,
        codec="mpeg4",
        audio_codec="pcm_s16le",
    )
    info = probe(source)
    assert (info.codec, info.audio_codec, info.frame_count) == ("mpeg4", "pcm_s16le", 50)
    frames = list(iter_frames(source))
    assert len(frames) == 50
    assert psnr(frames[25], render_test_frame(t1_bgr, 25, fps=FPS, size=SIZE)) > 25

    output = tmp_path / "out.mp4"
    writer = _round_trip(source, output)
    assert writer.audio_copied is False  # MP4 takes no PCM from us: re-encoded to AAC
    out = probe(output)
    assert (out.codec, out.audio_codec, out.frame_count) == ("h264", "aac", 50)
    # AAC adds one frame of encoder priming at most.
    assert stream_duration_s(output, "audio") == pytest.approx(SECONDS, abs=2 * AAC_FRAME_S)


@pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="no VP9 encoder")
def test_vp9_webm_decodes_with_an_estimated_frame_count(
    t1_bgr: VisionFrame, tmp_path: Path
) -> None:
    source = make_test_video(
        tmp_path / "in.webm",
        frame_source=t1_bgr,
        seconds=1.0,
        fps=30,
        size=SIZE,
        codec="libvpx-vp9",
        audio_codec="libopus",
        audio_rate=48000,
        bit_rate=1_000_000,
    )
    info = probe(source)
    assert (info.codec, info.audio_codec) == ("vp9", "opus")
    assert info.frame_count_source == "estimated"  # Matroska states no frame count
    assert info.frame_count == 30
    assert len(list(iter_frames(source))) == 30


def test_odd_size_is_padded_to_even(t1_bgr: VisionFrame, tmp_path: Path) -> None:
    frame = render_test_frame(t1_bgr, 0, fps=FPS, size=(321, 241))
    output = tmp_path / "odd.mp4"
    with VideoWriter(output, fps=FPS) as writer:
        for _ in range(3):
            writer.write(frame)
    info = probe(output)
    assert (info.width, info.height, info.frame_count) == (322, 242, 3)
    decoded = next(iter_frames(output))
    assert psnr(decoded[:241, :321], frame) > 30
    # The padding repeats the edge, so it carries no black stripe.
    assert np.abs(decoded[:241, 321].astype(int) - frame[:, 320].astype(int)).mean() < 10


def test_size_option_rescales(t1_video: Path, tmp_path: Path) -> None:
    output = tmp_path / "small.mp4"
    _round_trip(t1_video, output, size=(160, 120))
    info = probe(output)
    assert (info.width, info.height, info.frame_count) == (160, 120, 50)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda _: os.urandom(50_000), id="random-bytes"),
        pytest.param(lambda video: video.read_bytes()[: video.stat().st_size // 2], id="truncated"),
        pytest.param(lambda _: b"", id="zero-length"),
        pytest.param(lambda _: b"hello, this is not a video\n" * 100, id="text"),
    ],
)
def test_unreadable_input_is_an_invalid_argument(
    payload: object, t1_video: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(payload(t1_video))  # type: ignore[operator]
    with pytest.raises(InvalidArgumentError) as probed:
        probe(bad)
    assert probed.value.field == "target_video"
    message = str(probed.value)
    assert message.startswith("target_video: bad.mp4: ")
    assert "empty" in message if bad.stat().st_size == 0 else "not a readable video" in message
    with pytest.raises(InvalidArgumentError):
        list(iter_frames(bad))


def test_missing_file_and_audio_only_file_are_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no such file"):
        probe(tmp_path / "absent.mp4")
    audio_only = tmp_path / "tone.m4a"
    with av.open(str(audio_only), mode="w") as container:
        stream = container.add_stream("aac", rate=44100, layout="mono")
        assert isinstance(stream, av.AudioStream)
        samples = np.zeros((1, 4410), dtype=np.float32)
        silence = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        silence.sample_rate = 44100
        container.mux(stream.encode(silence))
        container.mux(stream.encode(None))
    with pytest.raises(InvalidArgumentError, match="no video stream"):
        probe(audio_only, field="source_video")


@pytest.mark.parametrize(
    "error", [RuntimeError("stage failed"), asyncio.CancelledError(), KeyboardInterrupt()]
)
def test_exception_in_block_leaves_no_file(
    error: BaseException, t1_video: Path, t1_frames: list[VisionFrame], tmp_path: Path
) -> None:
    output = tmp_path / "out.mp4"
    with pytest.raises(type(error)), VideoWriter(output, target=t1_video) as writer:
        for frame in t1_frames[:10]:
            writer.write(frame)
        raise error
    assert os.listdir(tmp_path) == []


def test_failure_keeps_an_existing_output_untouched(
    t1_video: Path, t1_frames: list[VisionFrame], tmp_path: Path
) -> None:
    output = tmp_path / "out.mp4"
    output.write_bytes(b"previous result")
    with pytest.raises(RuntimeError), VideoWriter(output, target=t1_video) as writer:
        writer.write(t1_frames[0])
        raise RuntimeError("cancelled")
    assert output.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_no_frames_is_an_error_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(FacestageError, match="no frames"), VideoWriter(tmp_path / "e.mp4", fps=25):
        pass
    assert os.listdir(tmp_path) == []


def test_temp_file_lives_beside_the_output_until_commit(
    t1_frames: list[VisionFrame], tmp_path: Path
) -> None:
    output = tmp_path / "out.mp4"
    with VideoWriter(output, fps=FPS) as writer:
        writer.write(t1_frames[0])
        (partial,) = os.listdir(tmp_path)
        assert partial.startswith(".out.mp4.") and partial.endswith(".partial")
        assert not output.exists()
    assert os.listdir(tmp_path) == ["out.mp4"]
    assert probe(output).frame_count == 1


def test_quality_to_crf_mapping() -> None:
    assert [quality_to_crf(q) for q in (100, 90, 80, 67, 50, 0)] == [0, 9, 18, 23, 30, 51]
    assert quality_to_crf(80, max_crf=63) == 22  # VP9 / AV1 scale
    with pytest.raises(InvalidArgumentError, match="output_quality"):
        quality_to_crf(101)


def test_video_info_is_frozen(t1_video: Path) -> None:
    info: VideoInfo = probe(t1_video)
    with pytest.raises(AttributeError):
        info.width = 1  # type: ignore[misc]
    assert info.size == SIZE


def _first_audio_position_in_seconds_of_video(path: Path) -> float:
    """Video time already written to the file when the first audio packet appears."""
    # Read what is needed while the file is open: a packet outlives its stream otherwise.
    with av.open(str(path)) as container:
        packets = [
            (packet.pos, packet.stream.type)
            for packet in container.demux()
            if packet.pos is not None and packet.pos >= 0
        ]
    first_audio = min(pos for pos, kind in packets if kind == "audio")
    video_before = [pos for pos, kind in packets if kind == "video" and pos < first_audio]
    return len(video_before) / FPS


def test_audio_is_interleaved_while_encoding(t1_bgr: VisionFrame, tmp_path: Path) -> None:
    # Longer than libavformat's 10 s interleaving window: audio muxed only at the end
    # would leave ~10 s of video buffered in memory and written ahead of any audio.
    source = make_test_video(
        tmp_path / "long.mp4", frame_source=t1_bgr, seconds=12, fps=FPS, size=(64, 48)
    )
    output = tmp_path / "out.mp4"
    _round_trip(source, output)
    assert probe(output).frame_count == 12 * FPS
    assert _first_audio_position_in_seconds_of_video(output) < 1.0
