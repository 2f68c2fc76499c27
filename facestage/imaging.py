"""Image codecs between ``facestage.common.v1.Image`` and numpy frames, strictly validated.

Everything inside facestage is a BGR uint8 frame (:data:`facestage.types.VisionFrame`).
Decoding checks the magic bytes before handing data to OpenCV, checks the declared size
against the pixel limit *before* decoding (a 30-byte PNG can claim 100k x 100k pixels),
and names the offending field in every error.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from facestage.common.v1 import common_pb2
from facestage.errors import InvalidArgumentError
from facestage.types import VisionFrame

DEFAULT_MAX_PIXELS = 40_000_000
"""Default pixel limit per image (40 MP: an 8K frame is 33 MP)."""

_CHANNELS = {
    common_pb2.CHANNEL_ORDER_UNSPECIFIED: 3,
    common_pb2.CHANNEL_ORDER_BGR: 3,
    common_pb2.CHANNEL_ORDER_RGB: 3,
    common_pb2.CHANNEL_ORDER_GRAY: 1,
}

_ENCODE_EXT = {
    common_pb2.IMAGE_FORMAT_JPEG: ".jpg",
    common_pb2.IMAGE_FORMAT_PNG: ".png",
    common_pb2.IMAGE_FORMAT_WEBP: ".webp",
}


def sniff_format(data: bytes) -> str | None:
    """Returns 'jpeg', 'png' or 'webp' from the magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """Width and height an encoded image declares in its header, without decoding it."""
    try:
        if kind == "png" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            return int(width), int(height)
        if kind == "jpeg":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB):
                    height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                    return int(width), int(height)
                (length,) = struct.unpack(">H", data[i + 2 : i + 4])
                i += 2 + length
            return None
        if kind == "webp" and len(data) >= 30:
            chunk = data[12:16]
            if chunk == b"VP8X":
                width = 1 + int.from_bytes(data[24:27], "little")
                height = 1 + int.from_bytes(data[27:30], "little")
                return width, height
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", data[26:30])
                return width & 0x3FFF, height & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    except struct.error:
        return None
    return None


def _check_pixels(field: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgumentError(field, f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidArgumentError(
            field, f"image of {width}x{height} exceeds the limit of {max_pixels} pixels"
        )


def decode_image(
    image: common_pb2.Image, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> VisionFrame:
    """Decodes a proto image into a BGR uint8 frame, or raises InvalidArgumentError."""
    kind = image.WhichOneof("data")
    if kind is None:
        raise InvalidArgumentError(field, "image is empty: set `encoded` or `raw`")
    if kind == "raw":
        return decode_raw(image.raw, f"{field}.raw", max_pixels)
    return decode_bytes(image.encoded, f"{field}.encoded", max_pixels)


def decode_bytes(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> VisionFrame:
    """Decodes JPEG, PNG or WebP bytes into a BGR frame."""
    if not data:
        raise InvalidArgumentError(field, "image is empty (0 bytes)")
    kind = sniff_format(data)
    if kind is None:
        raise InvalidArgumentError(field, "not a JPEG, PNG or WebP image")
    size = declared_size(data, kind)
    if size is not None:
        _check_pixels(field, size[0], size[1], max_pixels)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None or decoded.size == 0:
        raise InvalidArgumentError(field, f"{kind} data is corrupt or truncated")
    if kind == "jpeg" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        # libjpeg fills a truncated scan with grey and only warns; a partial image
        # must not be swapped as if it were whole.
        raise InvalidArgumentError(field, "jpeg data is truncated (no end-of-image marker)")
    _check_pixels(field, decoded.shape[1], decoded.shape[0], max_pixels)
    return np.ascontiguousarray(decoded)


def decode_raw(
    raw: common_pb2.RawImage, field: str = "raw", max_pixels: int = DEFAULT_MAX_PIXELS
) -> VisionFrame:
    """Turns raw pixels into a BGR frame, checking length against the declared shape."""
    width, height = raw.width_px, raw.height_px
    _check_pixels(field, width, height, max_pixels)
    channels = _CHANNELS.get(raw.channel_order)
    if channels is None:
        raise InvalidArgumentError(f"{field}.channel_order", f"unknown value {raw.channel_order}")
    expected = width * height * channels
    if len(raw.pixels) != expected:
        raise InvalidArgumentError(
            f"{field}.pixels",
            f"has {len(raw.pixels)} bytes, expected {expected} ({width}x{height}x{channels})",
        )
    array = np.frombuffer(raw.pixels, dtype=np.uint8).reshape(height, width, channels)
    if raw.channel_order == common_pb2.CHANNEL_ORDER_RGB:
        return np.ascontiguousarray(array[..., ::-1])
    if raw.channel_order == common_pb2.CHANNEL_ORDER_GRAY:
        return np.asarray(cv2.cvtColor(array, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    return array


def encode_raw(
    frame: VisionFrame, channel_order: int = common_pb2.CHANNEL_ORDER_BGR
) -> common_pb2.Image:
    """Wraps a BGR frame as raw pixels in the given channel order (BGR or RGB)."""
    if channel_order == common_pb2.CHANNEL_ORDER_RGB:
        frame = frame[..., ::-1]
    else:
        channel_order = common_pb2.CHANNEL_ORDER_BGR
    return common_pb2.Image(
        raw=common_pb2.RawImage(
            pixels=np.ascontiguousarray(frame).tobytes(),
            width_px=frame.shape[1],
            height_px=frame.shape[0],
            channel_order=channel_order,  # type: ignore[arg-type]
        )
    )


def encode_bytes(frame: VisionFrame, image_format: int, quality: int = 95) -> bytes:
    """Encodes a BGR frame as JPEG, PNG or WebP bytes."""
    ext = _ENCODE_EXT.get(image_format)  # type: ignore[call-overload]
    if ext is None:
        raise InvalidArgumentError("output_format", f"cannot encode to format {image_format}")
    params: list[int] = []
    if ext == ".jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    ok, buffer = cv2.imencode(ext, frame, params)
    if not ok:
        raise InvalidArgumentError("output_format", f"encoding to {ext} failed")
    return bytes(buffer.tobytes())


def encode_image(
    frame: VisionFrame,
    image_format: int = common_pb2.IMAGE_FORMAT_RAW,
    raw_channel_order: int = common_pb2.CHANNEL_ORDER_BGR,
) -> common_pb2.Image:
    """Encodes a BGR frame as the proto image a caller asked for (raw by default)."""
    if image_format in (common_pb2.IMAGE_FORMAT_UNSPECIFIED, common_pb2.IMAGE_FORMAT_RAW):
        return encode_raw(frame, raw_channel_order)
    return common_pb2.Image(encoded=encode_bytes(frame, image_format))


def reply_channel_order(image: common_pb2.Image) -> int:
    """The channel order to answer a request image in: its own if raw RGB/BGR, else BGR."""
    if (
        image.WhichOneof("data") == "raw"
        and image.raw.channel_order == common_pb2.CHANNEL_ORDER_RGB
    ):
        return common_pb2.CHANNEL_ORDER_RGB
    return common_pb2.CHANNEL_ORDER_BGR
