"""docs/services.md is generated from the typed settings and must be current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_services_doc_matches_the_settings() -> None:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_settings_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.render()
    assert (ROOT / "docs" / "services.md").read_text() == expected, (
        "docs/services.md is stale: run python scripts/gen_settings_doc.py"
    )
    for flag in ("--max-batch-size", "--batch-window-ms", "--providers", "--spool-dir"):
        assert f"`{flag}`" in expected
