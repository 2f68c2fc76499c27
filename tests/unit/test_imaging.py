"""Image codecs: format sniffing, header sizes, strict decoding and encoding round trips."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from facestage.common.v1 import common_pb2
from facestage.errors import InvalidArgumentError
from facestage.imaging import (
    declared_size,
    decode_bytes,
    decode_image,
    encode_image,
    reply_channel_order,
    sniff_format,
)

SIZES = [(1, 1), (17, 31), (300, 200), (640, 360)]  # (width, height)


def _frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _smooth(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256 // 2],
        axis=-1,
    ).astype(np.uint8)


def _encode(frame: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, frame, params or [])
    assert ok
    return bytes(buffer.tobytes())


ENCODINGS = {
    "jpeg": (".jpg", []),
    "jpeg-progressive": (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    "png": (".png", []),
    "webp-lossy": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
    "webp-lossless": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
}


# --- sniff_format and declared_size ------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_sniff_and_declared_size_of_real_encodings(encoding: str, size: tuple[int, int]) -> None:
    ext, params = ENCODINGS[encoding]
    data = _encode(_frame(*size), ext, params)
    kind = sniff_format(data)
    assert kind == encoding.split("-")[0]
    assert declared_size(data, kind) == size


@pytest.mark.parametrize("size", SIZES)
def test_declared_size_of_extended_webp_with_alpha(size: tuple[int, int]) -> None:
    frame = np.dstack([_frame(*size), np.full(size[::-1], 128, dtype=np.uint8)])
    data = _encode(frame, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert data[12:16] == b"VP8X"
    assert declared_size(data, "webp") == size
    assert decode_bytes(data, "image").shape == (size[1], size[0], 3)


def test_sniff_format_rejects_other_data() -> None:
    assert sniff_format(b"") is None
    assert sniff_format(b"GIF89a" + b"\x00" * 20) is None
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_format(_encode(_frame(4, 4), ".bmp")) is None


def test_declared_size_of_garbage_is_none() -> None:
    assert declared_size(b"\xff\xd8\xff", "jpeg") is None
    assert declared_size(b"\xff\xd8\x00" + b"\x00" * 20, "jpeg") is None
    assert declared_size(b"\x89PNG\r\n\x1a\n", "png") is None
    assert declared_size(b"RIFF\x00\x00\x00\x00WEBP", "webp") is None


# --- decode_image ------------------------------------------------------------------------


def test_decode_png_gives_the_exact_bgr_pixels() -> None:
    frame = _frame(37, 23, seed=1)
    image = common_pb2.Image(encoded=_encode(frame, ".png"))
    decoded = decode_image(image)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, frame)


def test_decode_lossless_webp_gives_the_exact_bgr_pixels() -> None:
    frame = _frame(40, 30, seed=2)
    data = _encode(frame, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    np.testing.assert_array_equal(decode_image(common_pb2.Image(encoded=data)), frame)


def test_decode_jpeg_keeps_colours_in_bgr_order() -> None:
    frame = np.zeros((64, 64, 3), dtype=np.uint8)
    frame[:, :32] = (255, 0, 0)  # blue on the left
    frame[:, 32:] = (0, 0, 255)  # red on the right
    data = _encode(frame, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    decoded = decode_image(common_pb2.Image(encoded=data))
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded[32, 8].astype(int) - [255, 0, 0]).max() < 10
    assert np.abs(decoded[32, 56].astype(int) - [0, 0, 255]).max() < 10


def test_decode_gray_png_becomes_three_channel_bgr() -> None:
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    decoded = decode_image(common_pb2.Image(encoded=_encode(gray, ".png")))
    assert decoded.shape == (12, 20, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def _raw(pixels: bytes, width: int, height: int, order: int) -> common_pb2.Image:
    return common_pb2.Image(
        raw=common_pb2.RawImage(
            pixels=pixels,
            width_px=width,
            height_px=height,
            channel_order=order,  # type: ignore[arg-type]
        )
    )


@pytest.mark.parametrize(
    "order", [common_pb2.CHANNEL_ORDER_BGR, common_pb2.CHANNEL_ORDER_UNSPECIFIED]
)
def test_decode_raw_bgr(order: int) -> None:
    frame = _frame(5, 3, seed=4)
    decoded = decode_image(_raw(frame.tobytes(), 5, 3, order))
    np.testing.assert_array_equal(decoded, frame)


def test_decode_raw_rgb_is_turned_into_bgr() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 10, 20)  # red-ish in RGB
    decoded = decode_image(_raw(rgb.tobytes(), 3, 2, common_pb2.CHANNEL_ORDER_RGB))
    assert decoded[0, 0].tolist() == [20, 10, 255]
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, rgb[..., ::-1])


def test_decode_raw_gray_is_replicated_to_bgr() -> None:
    gray = np.array([[0, 50, 100], [150, 200, 255]], dtype=np.uint8)
    decoded = decode_image(_raw(gray.tobytes(), 3, 2, common_pb2.CHANNEL_ORDER_GRAY))
    assert decoded.shape == (2, 3, 3)
    assert decoded[1, 2].tolist() == [255, 255, 255]
    assert decoded[0, 1].tolist() == [50, 50, 50]


# --- decode errors -----------------------------------------------------------------------


def _error(image: common_pb2.Image, field: str = "target", **kwargs: int) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        decode_image(image, field, **kwargs)
    return str(info.value)


def test_empty_image_message_is_rejected() -> None:
    message = _error(common_pb2.Image(), "source_images[2]")
    assert message.startswith("source_images[2]:")
    assert "empty" in message


def test_empty_encoded_bytes_are_rejected() -> None:
    message = _error(common_pb2.Image(encoded=b""), "target")
    # An empty bytes field is still "set" in a oneof.
    assert message == "target.encoded: image is empty (0 bytes)"


def test_random_bytes_are_rejected() -> None:
    data = np.random.default_rng(5).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    message = _error(common_pb2.Image(encoded=b"\x00" + data))
    assert message.startswith("target.encoded:")
    assert "not a JPEG, PNG or WebP" in message


def test_jpeg_magic_with_garbage_is_corrupt() -> None:
    message = _error(common_pb2.Image(encoded=b"\xff\xd8\xff" + b"\x13" * 200))
    assert message.startswith("target.encoded:")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_jpeg_is_rejected(fraction: float) -> None:
    data = _encode(_smooth(200, 150), ".jpg")
    truncated = data[: int(len(data) * fraction)]
    message = _error(common_pb2.Image(encoded=truncated))
    assert message.startswith("target.encoded:")
    assert "truncated" in message or "corrupt" in message


def test_declared_size_over_the_limit_is_rejected_before_decoding() -> None:
    data = bytearray(_encode(_frame(8, 8), ".png"))
    # Claim 100000 x 100000 in the IHDR (its CRC no longer matches, so a decoder would
    # fail differently: the message proves the header was checked first).
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    message = _error(common_pb2.Image(encoded=bytes(data)), max_pixels=40_000_000)
    assert message.startswith("target.encoded:")
    assert "100000x100000 exceeds the limit of 40000000 pixels" in message


def test_real_image_over_the_limit_is_rejected() -> None:
    data = _encode(_frame(100, 60), ".jpg")
    message = _error(common_pb2.Image(encoded=data), max_pixels=5999)
    assert "100x60 exceeds the limit of 5999 pixels" in message
    assert decode_image(common_pb2.Image(encoded=data), max_pixels=6000).shape == (60, 100, 3)


def test_raw_length_mismatch_is_rejected() -> None:
    message = _error(_raw(b"\x00" * 29, 5, 2, common_pb2.CHANNEL_ORDER_BGR))
    assert message.startswith("target.raw.pixels:")
    assert "29 bytes, expected 30" in message


def test_raw_gray_length_counts_one_channel() -> None:
    message = _error(_raw(b"\x00" * 30, 5, 2, common_pb2.CHANNEL_ORDER_GRAY))
    assert "expected 10" in message


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (0, 0)])
def test_raw_zero_size_is_rejected(width: int, height: int) -> None:
    message = _error(_raw(b"", width, height, common_pb2.CHANNEL_ORDER_BGR))
    assert message.startswith("target.raw:")
    assert "zero size" in message


def test_raw_over_the_limit_is_rejected() -> None:
    message = _error(_raw(b"", 1000, 1000, common_pb2.CHANNEL_ORDER_BGR), max_pixels=999_999)
    assert message.startswith("target.raw:")
    assert "exceeds" in message


def test_unknown_channel_order_is_rejected() -> None:
    message = _error(_raw(b"\x00" * 12, 2, 2, 7))
    assert message.startswith("target.raw.channel_order:")
    assert "7" in message


def test_decode_bytes_names_its_field() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        decode_bytes(b"nope", "crops[3]")
    assert info.value.field == "crops[3]"


# --- encode_image ------------------------------------------------------------------------


def test_encode_raw_bgr_round_trip() -> None:
    frame = _frame(7, 5, seed=6)
    image = encode_image(frame)
    assert image.WhichOneof("data") == "raw"
    assert image.raw.channel_order == common_pb2.CHANNEL_ORDER_BGR
    assert (image.raw.width_px, image.raw.height_px) == (7, 5)
    assert image.raw.pixels == frame.tobytes()
    np.testing.assert_array_equal(decode_image(image), frame)


def test_encode_raw_rgb_round_trip() -> None:
    frame = _frame(7, 5, seed=7)
    image = encode_image(frame, common_pb2.IMAGE_FORMAT_RAW, common_pb2.CHANNEL_ORDER_RGB)
    assert image.raw.channel_order == common_pb2.CHANNEL_ORDER_RGB
    assert image.raw.pixels == np.ascontiguousarray(frame[..., ::-1]).tobytes()
    np.testing.assert_array_equal(decode_image(image), frame)


def test_encode_raw_gray_order_falls_back_to_bgr() -> None:
    frame = _frame(4, 4, seed=8)
    image = encode_image(frame, common_pb2.IMAGE_FORMAT_RAW, common_pb2.CHANNEL_ORDER_GRAY)
    assert image.raw.channel_order == common_pb2.CHANNEL_ORDER_BGR
    np.testing.assert_array_equal(decode_image(image), frame)


def test_encode_png_round_trip_is_exact() -> None:
    frame = _frame(33, 21, seed=9)
    image = encode_image(frame, common_pb2.IMAGE_FORMAT_PNG)
    assert sniff_format(image.encoded) == "png"
    np.testing.assert_array_equal(decode_image(image), frame)


@pytest.mark.parametrize(
    ("image_format", "kind"),
    [(common_pb2.IMAGE_FORMAT_JPEG, "jpeg"), (common_pb2.IMAGE_FORMAT_WEBP, "webp")],
)
def test_encode_lossy_round_trip_is_close(image_format: int, kind: str) -> None:
    frame = _smooth(120, 80)
    image = encode_image(frame, image_format)
    assert sniff_format(image.encoded) == kind
    assert declared_size(image.encoded, kind) == (120, 80)
    decoded = decode_image(image)
    assert decoded.shape == frame.shape
    assert np.abs(decoded.astype(int) - frame.astype(int)).mean() < 3.0


def test_encode_unknown_format_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        encode_image(_frame(4, 4), 99)
    assert info.value.field == "output_format"


# --- reply_channel_order -----------------------------------------------------------------


def test_reply_channel_order() -> None:
    assert (
        reply_channel_order(_raw(b"", 1, 1, common_pb2.CHANNEL_ORDER_RGB))
        == common_pb2.CHANNEL_ORDER_RGB
    )
    for order in (
        common_pb2.CHANNEL_ORDER_BGR,
        common_pb2.CHANNEL_ORDER_GRAY,
        common_pb2.CHANNEL_ORDER_UNSPECIFIED,
    ):
        assert reply_channel_order(_raw(b"", 1, 1, order)) == common_pb2.CHANNEL_ORDER_BGR
    assert (
        reply_channel_order(common_pb2.Image(encoded=_encode(_frame(2, 2), ".png")))
        == common_pb2.CHANNEL_ORDER_BGR
    )
    assert reply_channel_order(common_pb2.Image()) == common_pb2.CHANNEL_ORDER_BGR
