"""Face alignment: templates, the similarity fit, cropping, and pasting a crop back.

Templates are those of MODEL_CONTRACTS.md. The transform is a least-squares similarity
fit (Umeyama, as InsightFace's ``norm_crop`` does through skimage) rather than
FaceFusion's RANSAC ``estimateAffinePartial2D``: with exactly five well-spread points
RANSAC buys nothing and makes the fit depend on a random seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facestage.types import AlignmentTemplateName, Crop, FaceLandmark5, Matrix2x3, VisionFrame

_ARCFACE_112_V2 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# Points in pixels at each template's native crop size.
TEMPLATES: dict[AlignmentTemplateName, tuple[int, np.ndarray]] = {
    "arcface_112_v2": (112, _ARCFACE_112_V2),
    "arcface_128": (128, _ARCFACE_112_V2 + np.array([8.0, 0.0])),
    "ffhq_512": (
        512,
        np.array(
            [
                [192.98138, 239.94708],
                [318.90277, 240.19360],
                [256.63416, 314.01935],
                [201.26117, 371.41043],
                [313.08905, 371.15118],
            ],
            dtype=np.float64,
        ),
    ),
    "arcface_112_v1": (
        112,
        np.array(
            [
                [0.35473214, 0.45658929],
                [0.64526786, 0.45658929],
                [0.5, 0.61154464],
                [0.37913393, 0.776875],
                [0.62086607, 0.776875],
            ],
            dtype=np.float64,
        )
        * 112.0,
    ),
}


def template_points(name: AlignmentTemplateName, crop_size_px: int) -> np.ndarray:
    """The template's five points scaled to a crop of ``crop_size_px`` (pixel boost)."""
    native, points = TEMPLATES[name]
    return points * (crop_size_px / native)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> Matrix2x3:
    """Least-squares similarity transform (rotation, uniform scale, shift) mapping src to dst.

    Umeyama (1991), the estimator behind skimage's ``SimilarityTransform.estimate``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c**2).sum() / len(src)
    scale = float((s * d).sum() / src_var) if src_var > 0 else 1.0
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


@dataclass(frozen=True)
class AlignedCrop:
    """A crop and the frame-to-crop transform that made it (for pasting back)."""

    crop: Crop
    matrix: Matrix2x3


def align_face(
    frame: VisionFrame,
    landmarks: FaceLandmark5,
    template: AlignmentTemplateName | np.ndarray,
    crop_size_px: int,
) -> AlignedCrop:
    """Warps the face with these landmarks onto the template at ``crop_size_px``.

    ``template`` is a template name or the five points already at ``crop_size_px`` (as a
    stage's ``GetModelInfo`` reports them).
    """
    points = template_points(template, crop_size_px) if isinstance(template, str) else template
    matrix = estimate_similarity(np.asarray(landmarks, dtype=np.float64), points)
    crop = cv2.warpAffine(
        frame,
        matrix,
        (crop_size_px, crop_size_px),
        flags=cv2.INTER_AREA,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return AlignedCrop(crop=np.asarray(crop, dtype=np.uint8), matrix=matrix)


def box_mask(
    crop_size_px: int,
    blur: float = 0.3,
    padding_percent: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> np.ndarray:
    """A float32 mask, 1 inside, feathered to 0 at the crop border (FaceFusion's box mask).

    ``blur`` is the feather width as a fraction of half the crop side; padding is
    (top, right, bottom, left) in percent of the side, cut off the mask.
    """
    size = crop_size_px
    blur_px = int(size * 0.5 * blur)
    blur_area = max(blur_px // 2, 1)
    mask = np.ones((size, size), dtype=np.float32)
    top, right, bottom, left = padding_percent
    mask[: max(blur_area, int(size * top / 100)), :] = 0
    mask[-max(blur_area, int(size * bottom / 100)) :, :] = 0
    mask[:, : max(blur_area, int(size * left / 100))] = 0
    mask[:, -max(blur_area, int(size * right / 100)) :] = 0
    if blur_px > 0:
        mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), blur_px * 0.25), dtype=np.float32)
    return mask


def paste_back(
    frame: VisionFrame,
    crop: Crop,
    matrix: Matrix2x3,
    mask: np.ndarray,
    blend: float = 1.0,
) -> VisionFrame:
    """Blends ``crop`` back into ``frame`` in place, touching only the face's region.

    The inverse transform maps the crop's corners into the frame; crop and mask are
    warped into that bounding rectangle alone (clipped to the frame), never the whole
    frame. Returns ``frame``.
    """
    height, width = frame.shape[:2]
    size = crop.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    mapped = corners @ inverse.T
    x0 = max(int(np.floor(mapped[:, 0].min())), 0)
    y0 = max(int(np.floor(mapped[:, 1].min())), 0)
    x1 = min(int(np.ceil(mapped[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(mapped[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return frame
    roi_inverse = inverse.copy()
    roi_inverse[:, 2] -= (x0, y0)
    roi_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(
        crop, roi_inverse, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    warped_mask = cv2.warpAffine(
        mask,
        roi_inverse,
        roi_size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    weight = (np.clip(warped_mask, 0.0, 1.0) * blend)[..., None]
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = (
        np.clip(roi * (1.0 - weight) + warped.astype(np.float32) * weight, 0, 255)
        .round()
        .astype(np.uint8)
    )
    return frame
