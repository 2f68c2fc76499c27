"""The production model manifest: every entry downloadable, licensed, pinned or honestly not."""

from __future__ import annotations

import re
from dataclasses import replace
from urllib.parse import urlparse

import pytest

from facestage.manifest import MANIFEST, ModelSpec, find_spec, model_names
from facestage.types import STAGES

SPECS = list(MANIFEST.values())
IDS = [spec.name for spec in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_entry_downloads_over_https(spec: ModelSpec) -> None:
    assert spec.urls
    for url in spec.urls:
        parsed = urlparse(url)
        assert parsed.scheme == "https", url
        assert parsed.path.endswith(".onnx"), url


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_entry_has_a_licence_and_an_honest_checksum(spec: ModelSpec) -> None:
    assert spec.licence.strip()
    assert spec.checksum_source.strip()
    assert spec.size_bytes > 0
    if spec.sha256 is None:
        assert not spec.pinned
    else:
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.pinned


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_entry_states_its_contract(spec: ModelSpec) -> None:
    assert spec.stage in STAGES
    assert spec.inputs.strip() and spec.outputs.strip()
    assert spec.file_name.endswith(".onnx")


def test_names_and_file_names_are_unique() -> None:
    assert len({spec.file_name for spec in SPECS}) == len(SPECS)
    assert model_names() == IDS


def test_the_supported_production_models_are_listed() -> None:
    assert set(MANIFEST) >= {
        "det_10g",
        "scrfd_2.5g_bnkps",
        "yunet",
        "w600k_r50",
        "inswapper_128",
        "inswapper_128_fp16",
        "gfpgan_1.4",
        "codeformer",
    }


def test_alignment_facts_match_the_model_contracts() -> None:
    # The orchestrator aligns crops from these; a wrong template gives wrong faces.
    assert (MANIFEST["w600k_r50"].template, MANIFEST["w600k_r50"].input_size) == (
        "arcface_112_v2",
        112,
    )
    for name in ("inswapper_128", "inswapper_128_fp16"):
        assert (MANIFEST[name].template, MANIFEST[name].input_size) == ("arcface_128", 128)
    for name in ("gfpgan_1.4", "codeformer"):
        assert (MANIFEST[name].template, MANIFEST[name].input_size) == ("ffhq_512", 512)


def test_inswapper_accepts_the_original_insightface_release() -> None:
    spec = MANIFEST["inswapper_128"]
    original = "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af"
    assert spec.accepts_sha256(original)
    assert spec.accepts_sha256(original.upper())
    assert not spec.accepts_sha256("0" * 64)


def test_find_spec_by_name_file_name_or_stem() -> None:
    detector = MANIFEST["det_10g"]
    assert find_spec("det_10g") is detector
    assert find_spec(detector.file_name) is detector
    assert find_spec(detector.file_name.removesuffix(".onnx")) is detector
    assert find_spec("nothing_like_it") is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"sha256": "E4A3" + "0" * 60}, "sha256"),
        ({"sha256": "abc"}, "sha256"),
        ({"crc32": "xyz"}, "crc32"),
        ({"urls": ()}, "URL"),
        ({"size_bytes": 0}, "size_bytes"),
    ],
)
def test_malformed_entries_fail_at_import(change: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        replace(MANIFEST["gfpgan_1.4"], **change)  # type: ignore[arg-type]
