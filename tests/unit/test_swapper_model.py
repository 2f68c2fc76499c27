"""Swapper model on the inswapper contract fixture (plumbing only: its output is no swap)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from facestage.errors import InvalidArgumentError, ModelFileError
from facestage.fixtures import write_contract_fixtures
from facestage.runtime import open_session
from services.swapper.model import (
    Swapper,
    normalize_swapper_output,
    prepare_source_latents,
    prepare_swapper_input,
    read_last_initializer,
)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_contract_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def swapper(fixtures: dict[str, Path]) -> Swapper:
    return Swapper(open_session(fixtures["inswapper"], ["cpu"]))


def _crops(n: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 128, 128, 3), dtype=np.uint8)


def _embeddings(n: int, seed: int = 6, size: int = 512) -> np.ndarray:
    # Raw ArcFace embeddings are not unit vectors; norms around 20 are typical.
    return (np.random.default_rng(seed).normal(size=(n, size)) * 20).astype(np.float32)


def test_model_info_comes_from_the_graph(swapper: Swapper) -> None:
    assert swapper.crop_size_px == 128
    assert swapper.template == "arcface_128"
    assert swapper.embedding_size == 512
    assert swapper.latent_normalization == "insightface"


def test_emap_is_read_without_loading_the_model(fixtures: dict[str, Path]) -> None:
    name, emap = read_last_initializer(fixtures["inswapper"])
    expected = onnx.numpy_helper.to_array(
        onnx.load(str(fixtures["inswapper"])).graph.initializer[-1]
    )
    assert name == "emap"
    np.testing.assert_array_equal(emap, expected)


def test_n_crops_in_n_out_in_order(swapper: Swapper) -> None:
    crops, embeddings = _crops(4), _embeddings(4)
    swapped = swapper.swap(crops, embeddings)
    assert swapped.shape == crops.shape and swapped.dtype == np.uint8
    singles = np.concatenate(
        [swapper.swap(crops[i : i + 1], embeddings[i : i + 1]) for i in range(4)]
    )
    np.testing.assert_array_equal(swapped, singles)
    reversed_swapped = swapper.swap(crops[::-1].copy(), embeddings[::-1].copy())
    np.testing.assert_array_equal(reversed_swapped, swapped[::-1])
    # Outputs of different items really differ, so the order checks above could fail.
    assert np.abs(swapped[0].astype(int) - swapped[1].astype(int)).mean() > 5


def test_different_source_embeddings_give_different_outputs(swapper: Swapper) -> None:
    crops = _crops(1)
    first = swapper.swap(crops, _embeddings(1, seed=7)).astype(int)
    second = swapper.swap(crops, _embeddings(1, seed=8)).astype(int)
    assert np.abs(first - second).mean() > 10


def test_one_embedding_for_the_batch_equals_repeating_it(swapper: Swapper) -> None:
    crops, embedding = _crops(3), _embeddings(1)
    shared = swapper.swap(crops, embedding)
    repeated = swapper.swap(crops, np.repeat(embedding, 3, axis=0))
    np.testing.assert_array_equal(shared, repeated)


def test_a_128_d_embedding_is_refused_naming_the_field(swapper: Swapper) -> None:
    with pytest.raises(InvalidArgumentError) as excinfo:
        swapper.swap(_crops(2), _embeddings(2, size=128))
    assert excinfo.value.field == "source_embeddings"
    assert "expected 512" in str(excinfo.value) and "got 128" in str(excinfo.value)


@pytest.mark.parametrize("count", [0, 3])
def test_embedding_count_must_be_one_or_n(swapper: Swapper, count: int) -> None:
    with pytest.raises(InvalidArgumentError) as excinfo:
        swapper.swap(_crops(2), _embeddings(count) if count else np.zeros((0, 512), np.float32))
    assert excinfo.value.field == "source_embeddings"


def test_zero_embedding_and_wrong_crops_are_refused(swapper: Swapper) -> None:
    with pytest.raises(InvalidArgumentError) as excinfo:
        swapper.swap(_crops(1), np.zeros((1, 512), dtype=np.float32))
    assert excinfo.value.field == "source_embeddings"
    with pytest.raises(InvalidArgumentError) as excinfo:
        swapper.swap(np.zeros((1, 112, 112, 3), dtype=np.uint8), _embeddings(1))
    assert excinfo.value.field == "target_crops"


def test_a_graph_without_emap_is_refused_naming_the_file(
    fixtures: dict[str, Path], tmp_path: Path
) -> None:
    model = onnx.load(str(fixtures["inswapper"]))
    del model.graph.initializer[-1]  # emap is unused by the nodes, so the graph stays valid
    path = tmp_path / "inswapper_without_emap.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelFileError) as excinfo:
        Swapper(open_session(path, ["cpu"]))
    assert str(path) in str(excinfo.value) and "emap" in str(excinfo.value)


def test_a_non_inswapper_graph_is_refused_naming_the_file(fixtures: dict[str, Path]) -> None:
    with pytest.raises(ModelFileError) as excinfo:
        Swapper(open_session(fixtures["gfpgan"], ["cpu"]))
    assert str(fixtures["gfpgan"]) in str(excinfo.value)


def test_latent_normalizations_follow_their_reference() -> None:
    rng = np.random.default_rng(9)
    emap = rng.normal(size=(512, 512)).astype(np.float32)
    raw = _embeddings(2)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    insightface = prepare_source_latents(raw, emap, "insightface")
    facefusion = prepare_source_latents(raw, emap, "facefusion")
    np.testing.assert_allclose(np.linalg.norm(insightface, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(facefusion, unit @ emap, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        insightface, facefusion / np.linalg.norm(facefusion, axis=1, keepdims=True), atol=1e-5
    )


def test_prepare_and_normalize_swap_channels_and_scale() -> None:
    crop = np.zeros((1, 128, 128, 3), dtype=np.uint8)
    crop[..., 2] = 255  # pure red in BGR
    tensor = prepare_swapper_input(crop)
    assert tensor.shape == (1, 3, 128, 128) and tensor.dtype == np.float32
    assert tensor[0, 0].min() == 1.0 and tensor[0, 2].max() == 0.0  # RGB, x / 255
    back = normalize_swapper_output(np.clip(tensor + 0.5, -1, 2))
    assert back.shape == (1, 128, 128, 3)
    assert back[0, 0, 0].tolist() == [128, 128, 255]  # clipped at 255, BGR again
