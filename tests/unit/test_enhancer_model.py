"""Enhancer model on the GFPGAN and CodeFormer contract fixtures (they restore nothing)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.fixtures import write_contract_fixtures
from facestage.runtime import InferenceSession, NodeArg, open_session
from services.enhancer.model import (
    Enhancer,
    normalize_enhancer_output,
    prepare_enhancer_input,
)


class RecordingSession:
    """Wraps a session and keeps every feed it was given."""

    def __init__(self, inner: InferenceSession) -> None:
        self.inner = inner
        self.feeds: list[dict[str, Any]] = []

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]:
        self.feeds.append(dict(input_feed))
        return self.inner.run(output_names, input_feed)

    def get_inputs(self) -> Sequence[NodeArg]:
        return self.inner.get_inputs()

    def get_outputs(self) -> Sequence[NodeArg]:
        return self.inner.get_outputs()

    def get_providers(self) -> list[str]:
        return self.inner.get_providers()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_contract_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(10).integers(0, 256, size=(3, 512, 512, 3), dtype=np.uint8)


def test_gfpgan_shapes_dtype_and_batch_order(fixtures: dict[str, Path], crops: np.ndarray) -> None:
    enhancer = Enhancer(open_session(fixtures["gfpgan"], ["cpu"]))
    assert enhancer.crop_size_px == 512 and enhancer.template == "ffhq_512"
    assert not enhancer.has_fidelity_weight
    enhanced = enhancer.enhance(crops)
    assert enhanced.shape == crops.shape and enhanced.dtype == np.uint8
    np.testing.assert_array_equal(enhancer.enhance(crops[::-1].copy()), enhanced[::-1])
    np.testing.assert_array_equal(enhancer.enhance(crops[1:2]), enhanced[1:2])
    # The fixture changes pixels (tanh of a conv), so the output is not an echo of the input.
    assert np.abs(enhanced.astype(int) - crops.astype(int)).mean() > 5


def test_codeformer_weight_is_fed_as_declared_and_changes_output(
    fixtures: dict[str, Path], crops: np.ndarray
) -> None:
    loaded = open_session(fixtures["codeformer"], ["cpu"])
    session = RecordingSession(loaded.session)
    enhancer = Enhancer(dataclasses.replace(loaded, session=session))
    assert enhancer.has_fidelity_weight
    low = enhancer.enhance(crops, fidelity_weight=0.0)
    assert len(session.feeds) == len(crops)  # batch axis fixed at 1: one run per crop
    for feed in session.feeds:
        assert feed["weight"].dtype == np.float64 and feed["weight"].shape == (1,)
        assert feed["weight"][0] == 0.0
    high = enhancer.enhance(crops, fidelity_weight=1.0)
    assert low.shape == high.shape == crops.shape and high.dtype == np.uint8
    assert np.abs(low.astype(int) - high.astype(int)).mean() > 5
    np.testing.assert_array_equal(enhancer.enhance(crops[::-1].copy(), 1.0), high[::-1])


def test_fidelity_weight_out_of_range_names_the_field(fixtures: dict[str, Path]) -> None:
    enhancer = Enhancer(open_session(fixtures["codeformer"], ["cpu"]))
    with pytest.raises(InvalidArgumentError) as excinfo:
        enhancer.enhance(np.zeros((1, 512, 512, 3), dtype=np.uint8), fidelity_weight=1.5)
    assert excinfo.value.field == "fidelity_weight"
    with pytest.raises(InvalidArgumentError) as excinfo:
        enhancer.enhance(np.zeros((1, 256, 256, 3), dtype=np.uint8))
    assert excinfo.value.field == "crops"


def test_a_non_enhancer_graph_is_refused_naming_the_file(fixtures: dict[str, Path]) -> None:
    with pytest.raises(ModelFileError) as excinfo:
        Enhancer(open_session(fixtures["inswapper"], ["cpu"]))
    assert str(fixtures["inswapper"]) in str(excinfo.value)


def test_prepare_then_normalize_returns_the_same_pixels() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    pixels[..., 0] = 0  # blue plane differs, so a lost channel swap would show
    tensor = prepare_enhancer_input(pixels)
    assert tensor.shape == (1, 3, 16, 16) and tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor[0, 2].max() == -1.0  # blue is the last plane in RGB
    np.testing.assert_array_equal(normalize_enhancer_output(tensor), pixels)
    # Out-of-range outputs are clipped, not wrapped around.
    assert normalize_enhancer_output(np.full((1, 3, 2, 2), 3.0)).min() == 255
    assert normalize_enhancer_output(np.full((1, 3, 2, 2), -3.0)).max() == 0


def test_torch_backend_without_torch_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # gfpgan needs torchvision, which has no CPU build here, so only this path is testable.
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.delitem(sys.modules, "services.enhancer.torch_backend", raising=False)
    with pytest.raises(ImportError) as excinfo:
        importlib.import_module("services.enhancer.torch_backend")
    assert "pip install 'facestage[torch]'" in str(excinfo.value)
    assert "torch" in str(excinfo.value)
