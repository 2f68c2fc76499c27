"""Prometheus config, recording and alert rules (promtool), their unit tests, and the
local (loopback) config variant."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .helpers import (
    DOCS,
    PROMETHEUS_DIR,
    RULE_FILES,
    alert_rules,
    local_prometheus_config,
    promtool_check_rules,
    recording_rules,
    run,
    tool,
    write_local_prometheus_config,
)


def test_promtool_check_config() -> None:
    out = run([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    # The config loads both rule files (relative paths resolve beside it).
    assert "2 rule files found" in out.stdout + out.stderr


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    out = promtool_check_rules(path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alerts() -> None:
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*_test.yml"))
    assert tests
    out = run([tool("promtool"), "test", "rules", *map(str, tests)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_targets_are_the_services_at_their_metrics_port() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "facestage"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {
        f"{s}:9100" for s in ("detector", "embedder", "swapper", "enhancer", "orchestrator")
    }


def test_every_alert_has_severity_summary_and_a_runbook_that_exists() -> None:
    docs = (DOCS / "deploy.md").read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+\s+(.*?)\s*$", docs, re.M)}
    anchors |= set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', docs))
    alerts = alert_rules()
    assert {a["alert"] for a in alerts} >= {
        "FacestageGpuMemoryHigh",
        "FacestageStageSaturated",
        "FacestageHighErrorRatio",
        "FacestageStageNoHealthyReplica",
        "FacestageBatcherQueueGrowing",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        path, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert path.endswith("docs/deploy.md"), alert["alert"]
        assert anchor == alert["alert"].lower(), alert["alert"]
        assert anchor in anchors, f"docs/deploy.md has no section #{anchor}"


def test_recording_rule_names_follow_level_metric_operation() -> None:
    names = [r["record"] for r in recording_rules()]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z_]+:facestage_[a-z0-9_]+:[a-z0-9_]+", name), name


def test_local_config_for_loopback_targets_is_valid(tmp_path: Path) -> None:
    path = write_local_prometheus_config(
        tmp_path,
        {"detector": ["127.0.0.1:19101"], "orchestrator": ["[::1]:19105", "localhost:19106"]},
    )
    out = run([tool("promtool"), "check", "config", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rule files found" in out.stdout + out.stderr


def test_local_config_refuses_targets_off_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        local_prometheus_config(["10.0.0.5:9100"])


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")
