"""ONNX Runtime sessions (providers, loading, batching) and stage settings (env and flags)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from facestage.errors import ModelFileError
from facestage.runtime import LoadedModel, open_session, resolve_providers, run_batched
from facestage.settings import StageSettings, parse_settings, stage_settings_class

ALL_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

# --- resolve_providers -------------------------------------------------------------------


def _names(chosen: Sequence[str | tuple[str, dict[str, Any]]]) -> list[str]:
    return [c if isinstance(c, str) else c[0] for c in chosen]


def test_unavailable_providers_are_dropped() -> None:
    chosen = resolve_providers(["tensorrt", "cuda", "cpu"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]


def test_cpu_is_added_last_when_not_asked_for() -> None:
    chosen = resolve_providers(["cuda"], ALL_PROVIDERS, device_id=3)
    assert chosen == [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    assert resolve_providers(["cuda"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_all_providers_keep_their_order_with_cpu_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FACESTAGE_TRT_CACHE", str(tmp_path / "trt"))
    chosen = resolve_providers(["tensorrt", "cuda", "cpu"], ALL_PROVIDERS, device_id=1)
    assert _names(chosen) == ALL_PROVIDERS
    first = chosen[0]
    assert isinstance(first, tuple)
    name, options = first
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert options["device_id"] == 1
    assert chosen[1] == ("CUDAExecutionProvider", {"device_id": 1})


def test_tensorrt_cache_defaults_to_the_home_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACESTAGE_TRT_CACHE", raising=False)
    chosen = resolve_providers(["tensorrt"], ALL_PROVIDERS)
    assert _names(chosen) == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    first = chosen[0]
    assert isinstance(first, tuple)
    options = first[1]
    assert options["trt_engine_cache_path"] == str(Path.home() / ".cache/facestage/trt")


# --- open_session and run_batched --------------------------------------------------------


def _add_model(path: Path, batch: int | str) -> Path:
    """y = x + w: x is (batch, 3) float32, w a shared (1,) float32."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def fixed_model(tmp_path: Path) -> Path:
    return _add_model(tmp_path / "add_fixed.onnx", 1)


@pytest.fixture
def dynamic_model(tmp_path: Path) -> Path:
    return _add_model(tmp_path / "add_dynamic.onnx", "batch")


def test_open_session_reports_cpu_and_the_file_hash(fixed_model: Path) -> None:
    loaded = open_session(fixed_model, ["cpu"])
    assert loaded.provider == "CPUExecutionProvider"
    assert loaded.sha256 == hashlib.sha256(fixed_model.read_bytes()).hexdigest()
    assert loaded.name == "add_fixed"
    assert loaded.path == fixed_model
    assert not loaded.fp16


def test_open_session_falls_back_to_cpu(dynamic_model: Path) -> None:
    # CUDA and TensorRT are absent from this build (or skipped): CPU runs the model.
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this build has CUDA")
    loaded = open_session(dynamic_model)
    assert loaded.provider == "CPUExecutionProvider"


def test_batch_axis_fixed_or_dynamic(fixed_model: Path, dynamic_model: Path) -> None:
    fixed = open_session(fixed_model, ["cpu"])
    dynamic = open_session(dynamic_model, ["cpu"])
    assert fixed.input_shape(0)[0] == 1
    assert fixed.batch_dim_fixed
    assert dynamic.input_shape(0)[0] == "batch"
    assert not dynamic.batch_dim_fixed


class _CountingSession:
    """The real session, counting its runs and the batch sizes it was given."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.batches: list[int] = []

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, Any]) -> list[Any]:
        self.batches.append(int(feed["x"].shape[0]))
        return list(self._session.run(output_names, dict(feed)))

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return self._session.get_outputs()

    def get_providers(self) -> list[str]:
        return list(self._session.get_providers())


def _counting(loaded: LoadedModel) -> tuple[LoadedModel, _CountingSession]:
    counting = _CountingSession(loaded.session)
    return replace(loaded, session=counting), counting


def _items(count: int) -> np.ndarray:
    # Item i is (i, 10 i, 100 i): its results say where it went.
    return np.array([[i, 10 * i, 100 * i] for i in range(count)], dtype=np.float32)


def test_run_batched_loops_over_a_fixed_batch_axis_in_order(fixed_model: Path) -> None:
    loaded, counting = _counting(open_session(fixed_model, ["cpu"]))
    w = np.array([0.5], dtype=np.float32)

    (out,) = run_batched(loaded, {"x": _items(5)}, shared={"w": w})

    assert counting.batches == [1, 1, 1, 1, 1]
    np.testing.assert_array_equal(out, _items(5) + 0.5)


def test_run_batched_runs_a_dynamic_batch_once(dynamic_model: Path) -> None:
    loaded, counting = _counting(open_session(dynamic_model, ["cpu"]))
    (out,) = run_batched(loaded, {"x": _items(6)}, ["y"], {"w": np.array([2.0], np.float32)})
    assert counting.batches == [6]
    np.testing.assert_array_equal(out, _items(6) + 2.0)


def test_run_batched_single_item_on_a_fixed_axis(fixed_model: Path) -> None:
    loaded, counting = _counting(open_session(fixed_model, ["cpu"]))
    (out,) = run_batched(loaded, {"x": _items(1), "w": np.array([1.0], np.float32)})
    assert counting.batches == [1]
    np.testing.assert_array_equal(out, _items(1) + 1.0)


def test_open_session_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "missing.onnx"
    with pytest.raises(ModelFileError) as info:
        open_session(path, ["cpu"])
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)
    assert "facestage models pull" in str(info.value)


def test_open_session_on_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf at all \x00\x01\x02" * 10)
    with pytest.raises(ModelFileError) as info:
        open_session(path, ["cpu"])
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert "cannot be loaded" in str(info.value)


# --- settings ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("FACESTAGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_stage_settings_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("FACESTAGE_MODEL_DIR", str(tmp_path / "models"))
    cls = stage_settings_class("swapper", "inswapper_128")
    assert issubclass(cls, StageSettings)
    assert cls.STAGE == "swapper"
    settings = parse_settings(cls, [])
    assert settings.model == "inswapper_128"
    assert settings.model_dir == tmp_path / "models"
    assert settings.providers == ["tensorrt", "cuda", "cpu"]
    assert settings.port == 50051


def test_stage_settings_read_their_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FACESTAGE_SWAPPER_PORT", "6001")
    clean_env.setenv("FACESTAGE_SWAPPER_MAX_BATCH_SIZE", "4")
    clean_env.setenv("FACESTAGE_SWAPPER_PROVIDERS", "cuda, cpu")
    clean_env.setenv("FACESTAGE_SWAPPER_MODEL", "/models/other.onnx")
    clean_env.setenv("FACESTAGE_DETECTOR_PORT", "7777")  # another stage's: ignored
    settings = parse_settings(stage_settings_class("swapper", "inswapper_128"), [])
    assert settings.port == 6001
    assert settings.max_batch_size == 4
    assert settings.providers == ["cuda", "cpu"]
    assert settings.model == "/models/other.onnx"


def test_flags_override_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FACESTAGE_SWAPPER_PORT", "6001")
    clean_env.setenv("FACESTAGE_SWAPPER_BATCH_WINDOW_MS", "9")
    cls = stage_settings_class("swapper", "inswapper_128")
    settings = parse_settings(
        cls, ["--port", "7002", "--providers", "cuda,cpu", "--max-batch-size", "3"]
    )
    assert settings.port == 7002
    assert settings.providers == ["cuda", "cpu"]
    assert settings.max_batch_size == 3
    assert settings.batch_window_ms == 9.0  # from the environment, no flag given


def test_model_dir_from_its_own_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("FACESTAGE_MODEL_DIR", str(tmp_path / "shared"))
    clean_env.setenv("FACESTAGE_SWAPPER_MODEL_DIR", str(tmp_path / "swapper"))
    settings = parse_settings(stage_settings_class("swapper", "inswapper_128"), [])
    assert settings.model_dir == tmp_path / "swapper"


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "-1"],
        ["--port", "70000"],
        ["--providers", "gpu,cpu"],
        ["--max-batch-size", "0"],
        ["--metrics-port", "-2"],
    ],
)
def test_invalid_flags_are_rejected(clean_env: pytest.MonkeyPatch, argv: list[str]) -> None:
    with pytest.raises(ValidationError):
        parse_settings(stage_settings_class("swapper", "inswapper_128"), argv)


@pytest.mark.parametrize(
    ("name", "value"),
    [("FACESTAGE_SWAPPER_PORT", "-5"), ("FACESTAGE_SWAPPER_PROVIDERS", "cuda,rocm")],
)
def test_invalid_environment_is_rejected(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        parse_settings(stage_settings_class("swapper", "inswapper_128"), [])


def test_stage_classes_are_independent(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FACESTAGE_DETECTOR_PORT", "5005")
    detector = parse_settings(stage_settings_class("detector", "scrfd_2.5g_bnkps"), [])
    swapper = parse_settings(stage_settings_class("swapper", "inswapper_128"), [])
    assert (detector.port, detector.model) == (5005, "scrfd_2.5g_bnkps")
    assert (swapper.port, swapper.model) == (50051, "inswapper_128")
