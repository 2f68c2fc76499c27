"""The metric names documented in docs/metrics.md, and what a live /metrics exports."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
_NAME = re.compile(r"^\|\s*`(facestage_[a-z0-9_]+)`")


def documented_names() -> dict[str, list[str]]:
    """Documented metric names by section heading of docs/metrics.md."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        match = _NAME.match(line)
        if match:
            sections.setdefault(current, []).append(match.group(1))
    return sections


def family_name(name: str) -> str:
    """The family name prometheus_client's parser reports (counters lose ``_total``)."""
    return name.removesuffix("_total")


def scrape(url: str) -> str:
    """The body of a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def exported_families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family name -> samples (labels, value) of a Prometheus exposition."""
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = [(dict(s.labels), s.value) for s in family.samples]
    return families
