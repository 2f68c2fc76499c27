"""Contract fixtures: exact production interfaces, deterministic, small, input-dependent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from facestage.fixtures import (
    ARCFACE_FIXTURE_FILE,
    CODEFORMER_FIXTURE_FILE,
    GFPGAN_FIXTURE_FILE,
    INSWAPPER_FIXTURE_FILE,
    write_contract_fixtures,
)

# (name, shape, ORT type) of every input and output, as the production models declare them.
EXPECTED = {
    "arcface": (
        ARCFACE_FIXTURE_FILE,
        [("input.1", ["None", 3, 112, 112], "tensor(float)")],
        [("683", ["None", 512], "tensor(float)")],
    ),
    "inswapper": (
        INSWAPPER_FIXTURE_FILE,
        [
            ("target", [1, 3, 128, 128], "tensor(float)"),
            ("source", [1, 512], "tensor(float)"),
        ],
        [("output", [1, 3, 128, 128], "tensor(float)")],
    ),
    "gfpgan": (
        GFPGAN_FIXTURE_FILE,
        [("input", [1, 3, 512, 512], "tensor(float)")],
        [("output", [1, 3, 512, 512], "tensor(float)")],
    ),
    "codeformer": (
        CODEFORMER_FIXTURE_FILE,
        [
            ("input", [1, 3, 512, 512], "tensor(float)"),
            ("weight", [1], "tensor(double)"),
        ],
        [("output", [1, 3, 512, 512], "tensor(float)")],
    ),
}


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_contract_fixtures(tmp_path_factory.mktemp("contract_fixtures"))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the unused-emap notice is expected, as with the real file
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_fixture_has_the_production_interface(fixture_paths: dict[str, Path], key: str) -> None:
    file_name, inputs, outputs = EXPECTED[key]
    path = fixture_paths[key]
    assert path.name == file_name
    assert path.stat().st_size < 3_000_000
    session = _session(path)
    assert [(i.name, list(i.shape), i.type) for i in session.get_inputs()] == inputs
    assert [(o.name, list(o.shape), o.type) for o in session.get_outputs()] == outputs


def test_emap_is_the_last_initializer_and_512_square(fixture_paths: dict[str, Path]) -> None:
    graph = onnx.load(str(fixture_paths["inswapper"])).graph
    last = graph.initializer[-1]
    emap = onnx.numpy_helper.to_array(last)
    assert last.name == "emap"
    assert emap.shape == (512, 512) and emap.dtype == np.float32
    # Scaled so a unit embedding keeps roughly unit norm, like a rotation would.
    rng = np.random.default_rng(0)
    unit = rng.normal(size=512)
    unit /= np.linalg.norm(unit)
    assert 0.8 < np.linalg.norm(unit @ emap) < 1.2


def test_fixtures_are_byte_identical_when_written_twice(tmp_path: Path) -> None:
    first = write_contract_fixtures(tmp_path / "a")
    second = write_contract_fixtures(tmp_path / "b")
    assert first.keys() == second.keys() == EXPECTED.keys()
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key


def test_arcface_fixture_output_depends_on_input_and_batches(
    fixture_paths: dict[str, Path],
) -> None:
    session = _session(fixture_paths["arcface"])
    rng = np.random.default_rng(1)
    batch = rng.uniform(-1, 1, size=(3, 3, 112, 112)).astype(np.float32)
    (out,) = session.run(None, {"input.1": batch})
    assert out.shape == (3, 512)
    assert not np.allclose(out[0], out[1])
    (single,) = session.run(None, {"input.1": batch[1:2]})
    np.testing.assert_allclose(single[0], out[1], rtol=1e-5, atol=1e-5)


def test_inswapper_fixture_source_changes_output_within_unit_range(
    fixture_paths: dict[str, Path],
) -> None:
    session = _session(fixture_paths["inswapper"])
    rng = np.random.default_rng(2)
    target = rng.uniform(0, 1, size=(1, 3, 128, 128)).astype(np.float32)
    sources = rng.normal(size=(2, 512)).astype(np.float32)
    sources /= np.linalg.norm(sources, axis=1, keepdims=True)
    (a,) = session.run(None, {"target": target, "source": sources[:1]})
    (b,) = session.run(None, {"target": target, "source": sources[1:]})
    assert a.min() > 0.0 and a.max() < 1.0
    assert np.abs(a - b).mean() > 0.05
    (c,) = session.run(None, {"target": target[:, ::-1].copy(), "source": sources[:1]})
    assert np.abs(a - c).mean() > 0.05


def test_enhancer_fixtures_stay_in_minus_one_one_and_weight_matters(
    fixture_paths: dict[str, Path],
) -> None:
    rng = np.random.default_rng(3)
    crop = rng.uniform(-1, 1, size=(1, 3, 512, 512)).astype(np.float32)
    (gfpgan,) = _session(fixture_paths["gfpgan"]).run(None, {"input": crop})
    assert gfpgan.shape == crop.shape
    assert gfpgan.min() > -1.0 and gfpgan.max() < 1.0
    codeformer = _session(fixture_paths["codeformer"])
    (low,) = codeformer.run(None, {"input": crop, "weight": np.array([0.0])})
    (high,) = codeformer.run(None, {"input": crop, "weight": np.array([1.0])})
    assert np.abs(low - high).mean() > 0.05
    # w = 1 keeps the input (through tanh), as CodeFormer's fidelity weight suggests.
    np.testing.assert_allclose(high, np.tanh(crop), atol=1e-5)
