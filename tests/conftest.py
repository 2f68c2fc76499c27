"""Shared test fixtures: the real small models of ../shared/models and real sample photos."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = Path(os.environ.get("FACESTAGE_SHARED_MODELS", ROOT.parent / "shared" / "models"))


def shared_model(name: str) -> Path:
    """Path of a model in ../shared/models, or skips the test with the reason."""
    path = SHARED_MODELS / name
    if not path.is_file():
        pytest.skip(f"needs {path} (the real small models of ../shared/models are absent)")
    return path


@pytest.fixture(scope="session")
def scrfd_2_5g_path() -> Path:
    return shared_model("scrfd_2.5g_bnkps.onnx")


@pytest.fixture(scope="session")
def scrfd_500m_path() -> Path:
    return shared_model("scrfd_500m_bnkps.onnx")


@pytest.fixture(scope="session")
def yunet_path() -> Path:
    return shared_model("yunet_2026may.onnx")


@pytest.fixture(scope="session")
def mobilefacenet_path() -> Path:
    return shared_model("mobilefacenet_128.onnx")


def t1_path() -> Path:
    """insightface's sample photo with six faces."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="session")
def t1_bgr() -> np.ndarray:
    frame = cv2.imread(str(t1_path()))
    assert frame is not None
    return frame


@pytest.fixture(scope="session")
def t1_jpeg() -> bytes:
    return t1_path().read_bytes()


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut (one face), as BGR."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., ::-1])
