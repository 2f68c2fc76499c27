"""The manifest of production models: what each file is, where it comes from, how to check it.

Every model a stage service can load is listed here once, with its download sources
(official first, mirrors after), its licence, its input and output contract and the
checksum it is pinned to. ``facestage models pull`` downloads from these entries and
services verify their model file against them at start.

Checksums come from public records, never from guesswork (see ``checksum_source`` of each
entry). Where no sha256 could be found, ``sha256`` is None and only the size (and the
publisher's CRC32 where known) is recorded; such a file is never reported as verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from facestage.types import AlignmentTemplateName, Stage

ModelFamily = Literal["scrfd", "yunet", "arcface", "inswapper", "gfpgan", "codeformer"]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CRC32_RE = re.compile(r"^[0-9a-f]{8}$")

# FaceFusion publishes its ONNX exports as GitHub release assets and mirrors them on
# Hugging Face; the GitHub asset is the one its own downloader tries first.
_FF_GITHUB = "https://github.com/facefusion/facefusion-assets/releases/download/models-3.0.0/"
_FF_HF = "https://huggingface.co/facefusion/models-3.0.0/resolve/main/"

_INSIGHTFACE_LICENCE = "InsightFace: non-commercial research only"

_SCRFD_INPUTS = (
    "[1,3,H,W] float32, batch fixed at 1, H and W multiples of 32 (640x640 default); "
    "(x - 127.5) / 128"
)
_SCRFD_OUTPUTS = (
    "9 tensors: scores (N,1), bbox distances (N,4), 5-point keypoints (N,10) "
    "for strides 8, 16, 32, 2 anchors per cell"
)


@dataclass(frozen=True)
class ModelSpec:
    """One supported model file: identity, sources, checksum, licence and contract.

    ``sha256`` is the digest of the file the listed URLs serve; ``also_accepted_sha256``
    lists other known-good builds of the same weights (a user may already have one) that
    verification accepts but downloads never aim for.
    """

    name: str
    file_name: str
    stage: Stage
    family: ModelFamily
    sha256: str | None
    size_bytes: int
    urls: tuple[str, ...]
    licence: str
    inputs: str
    outputs: str
    checksum_source: str
    crc32: str | None = None
    template: AlignmentTemplateName | None = None
    input_size: int | None = None
    also_accepted_sha256: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        # A typo in a pinned digest would make every download fail as "corrupt"; catch
        # it at import time instead.
        for digest in (self.sha256, *self.also_accepted_sha256):
            if digest is not None and not _SHA256_RE.match(digest):
                raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if self.crc32 is not None and not _CRC32_RE.match(self.crc32):
            raise ValueError(f"{self.name}: crc32 must be 8 lowercase hex digits")
        if not self.urls:
            raise ValueError(f"{self.name}: at least one download URL is needed")
        if self.size_bytes <= 0:
            raise ValueError(f"{self.name}: size_bytes must be positive")

    @property
    def pinned(self) -> bool:
        """True when the file is pinned by sha256 (and so can be verified)."""
        return self.sha256 is not None

    @property
    def contract(self) -> str:
        """Inputs and outputs in one line, for listings and error messages."""
        return f"in: {self.inputs}; out: {self.outputs}"

    def accepts_sha256(self, digest: str) -> bool:
        """True when ``digest`` is the pinned sha256 or another known-good build."""
        digest = digest.lower()
        return digest == self.sha256 or digest in self.also_accepted_sha256


def _facefusion_urls(file_name: str) -> tuple[str, ...]:
    return (_FF_GITHUB + file_name, _FF_HF + file_name)


MANIFEST: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="det_10g",
            file_name="retinaface_10g.onnx",
            stage="detector",
            family="scrfd",
            description="SCRFD 10G with keypoints (det_10g of buffalo_l), FaceFusion's export",
            # Only one public record of this digest was found: not enough to pin it.
            sha256=None,
            size_bytes=16_926_877,
            urls=_facefusion_urls("retinaface_10g.onnx"),
            licence=_INSIGHTFACE_LICENCE,
            inputs=_SCRFD_INPUTS,
            outputs=_SCRFD_OUTPUTS,
            input_size=640,
            checksum_source="size from one third-party manifest; no corroborated sha256",
        ),
        ModelSpec(
            name="scrfd_2.5g_bnkps",
            file_name="scrfd_2.5g.onnx",
            stage="detector",
            family="scrfd",
            description="SCRFD 2.5G with keypoints, FaceFusion's export",
            sha256="2c07342347cef21a619c49dd5664fb8c09570ae9eda5bff3e385c11eafc45ada",
            size_bytes=3_295_067,
            urls=_facefusion_urls("scrfd_2.5g.onnx"),
            licence=_INSIGHTFACE_LICENCE,
            inputs=_SCRFD_INPUTS,
            outputs=_SCRFD_OUTPUTS,
            input_size=640,
            checksum_source="independent public manifests pinning FaceFusion's scrfd_2.5g.onnx",
        ),
        ModelSpec(
            name="yunet",
            file_name="face_detection_yunet_2023mar.onnx",
            stage="detector",
            family="yunet",
            description="OpenCV YuNet 2023mar (OpenCV zoo)",
            sha256="8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
            size_bytes=232_589,
            # FaceFusion's yunet_2023_mar.onnx is a different file (232475 bytes), so it
            # is not a mirror of this one.
            urls=(
                "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
                "face_detection_yunet_2023mar.onnx",
            ),
            licence="MIT (OpenCV zoo)",
            inputs="[1,3,H,W] float32, BGR, 0..255 (no normalisation)",
            outputs="cls, obj, bbox and 5-point keypoints for strides 8, 16, 32",
            input_size=640,
            checksum_source="Git LFS pointer in opencv/opencv_zoo",
        ),
        ModelSpec(
            name="w600k_r50",
            file_name="arcface_w600k_r50.onnx",
            stage="embedder",
            family="arcface",
            description="ArcFace ResNet-50 trained on WebFace600K (buffalo_l), FaceFusion's export",
            sha256="f1f79dc3b0b79a69f94799af1fffebff09fbd78fd96a275fd8f0cbbea23270d1",
            size_bytes=174_388_474,
            urls=_facefusion_urls("arcface_w600k_r50.onnx"),
            licence=_INSIGHTFACE_LICENCE,
            inputs="[N,3,112,112] float32, RGB, (x - 127.5) / 127.5",
            outputs="[N,512] float32, not normalised",
            template="arcface_112_v2",
            input_size=112,
            checksum_source="independent public manifests pinning FaceFusion's file",
        ),
        ModelSpec(
            name="inswapper_128",
            file_name="inswapper_128.onnx",
            stage="swapper",
            family="inswapper",
            description="InsightFace inswapper 128, float32, FaceFusion's copy",
            sha256="a290273ed497312095dac48cdef20feec9d5208298223dd01288ab202b54bea7",
            size_bytes=555_303_150,
            urls=_facefusion_urls("inswapper_128.onnx"),
            licence=_INSIGHTFACE_LICENCE,
            inputs=(
                "target [1,3,128,128] float32, RGB, x / 255; "
                "source [1,512] = normalised w600k_r50 embedding @ emap"
            ),
            outputs="[1,3,128,128] float32, RGB in [0,1]",
            template="arcface_128",
            input_size=128,
            # The original InsightFace release (554253681 bytes) holds the same weights;
            # a user who already has it need not download FaceFusion's copy.
            also_accepted_sha256=(
                "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af",
            ),
            checksum_source=(
                "FaceFusion copy: independent public manifests; original InsightFace "
                "file: Git LFS pointers in public repositories"
            ),
        ),
        ModelSpec(
            name="inswapper_128_fp16",
            file_name="inswapper_128_fp16.onnx",
            stage="swapper",
            family="inswapper",
            description="InsightFace inswapper 128 converted to float16 weights by FaceFusion",
            sha256="c4eccca86ad177586c85c28bf1a64a9d9ed237e283a15818d831f7facfd3f420",
            size_bytes=277_680_829,
            urls=_facefusion_urls("inswapper_128_fp16.onnx"),
            licence=_INSIGHTFACE_LICENCE,
            inputs="as inswapper_128 (target [1,3,128,128], source [1,512])",
            outputs="[1,3,128,128], RGB in [0,1]",
            template="arcface_128",
            input_size=128,
            checksum_source="independent public manifests pinning FaceFusion's file",
        ),
        ModelSpec(
            name="gfpgan_1.4",
            file_name="gfpgan_1.4.onnx",
            stage="enhancer",
            family="gfpgan",
            description="GFPGAN 1.4 face restoration, ONNX export",
            sha256="accc4757b26bdb89b32b4d3500d4f79c9dff97c1dd7c7104bf9dcb95e3311385",
            size_bytes=340_299_087,
            crc32="5a6c6364",
            urls=_facefusion_urls("gfpgan_1.4.onnx"),
            licence="Apache-2.0 (GFPGAN; StyleGAN2 parts under their own terms)",
            inputs="input [1,3,512,512] float32, RGB, (x / 255 - 0.5) / 0.5",
            outputs="[1,3,512,512] float32 in [-1,1]",
            template="ffhq_512",
            input_size=512,
            checksum_source="independent public manifests pinning FaceFusion's file",
        ),
        ModelSpec(
            name="codeformer",
            file_name="codeformer.onnx",
            stage="enhancer",
            family="codeformer",
            description="CodeFormer face restoration, ONNX export",
            sha256="21710e7ab61c82683576c428e9c1b6fe1ed419586b7b39e394c3449c294b550f",
            size_bytes=376_951_650,
            crc32="1456f3ab",
            urls=_facefusion_urls("codeformer.onnx"),
            licence="S-Lab License 1.0: non-commercial",
            inputs=(
                "input [1,3,512,512] float32, RGB, (x / 255 - 0.5) / 0.5; "
                "weight: fidelity scalar (float64)"
            ),
            outputs="[1,3,512,512] float32 in [-1,1]",
            template="ffhq_512",
            input_size=512,
            checksum_source="independent public manifests pinning FaceFusion's file",
        ),
    )
}
"""Every supported production model, by name."""


def find_spec(name: str) -> ModelSpec | None:
    """The manifest entry called ``name``, or whose file name or file stem is ``name``."""
    if name in MANIFEST:
        return MANIFEST[name]
    for spec in MANIFEST.values():
        if name in (spec.file_name, spec.file_name.removesuffix(".onnx")):
            return spec
    return None


def model_names() -> list[str]:
    """Names of every manifest entry, in manifest order."""
    return list(MANIFEST)
