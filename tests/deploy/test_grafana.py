"""The capacity dashboard and Grafana's provisioning files."""

from __future__ import annotations

import re
from pathlib import Path

from .helpers import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    check_promql,
    dashboard_exprs,
    iter_panels,
    load_dashboard,
    load_yaml,
    substitute_grafana,
)

DS_UID = "${datasource}"


def test_dashboard_is_valid_json_with_a_stable_uid() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "facestage-capacity"
    assert dash["title"]
    ids = [p["id"] for p in iter_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert "__inputs" not in dash, "a file-provisioned dashboard cannot use import inputs"
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text()


def test_datasource_is_a_variable_used_by_every_panel_and_target() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in iter_panels(dash["panels"]):
        assert panel.get("datasource", {}).get("uid") == DS_UID, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource", {}).get("uid") == DS_UID, (
                panel["title"],
                target["refId"],
            )
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == DS_UID, var["name"]


def test_namespace_and_stage_variables_come_from_label_values() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    for name in ("namespace", "stage"):
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        assert re.fullmatch(rf"label_values\(.*,\s*{name}\)", query), query


def test_a_row_per_stage_and_an_orchestrator_row() -> None:
    dash = load_dashboard()
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert any(r.get("repeat") == "stage" for r in rows), "no row repeated by $stage"
    assert any(r["title"] == "Orchestrator" for r in rows)
    titles = {p["title"] for p in iter_panels(dash["panels"])}
    for wanted in (
        "GPU utilisation",
        "VRAM used vs total",
        "Items per second",
        "Latency p50 / p95",
        "Batch size",
        "In-flight and queued work",
        "Replicas",
        "Error rate",
        "Frames per second",
        "Jobs",
        "Stage latency seen by the orchestrator",
        "Bytes sent per stage",
    ):
        assert wanted in titles, wanted


def test_stage_row_panels_filter_by_stage_and_namespace() -> None:
    dash = load_dashboard()
    in_stage_row = False
    for panel in dash["panels"]:
        if panel["type"] == "row":
            in_stage_row = panel.get("repeat") == "stage"
            continue
        if in_stage_row:
            for target in panel["targets"]:
                assert 'stage="$stage"' in target["expr"], (panel["title"], target["expr"])
                assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    exprs = {origin: substitute_grafana(expr) for origin, expr in dashboard_exprs().items()}
    assert len(exprs) > 20
    check_promql(exprs, tmp_path)


def test_provisioning_matches_the_compose_mounts() -> None:
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "facestage.yaml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert provider["options"]["path"] in mounts
    host_dir = (COMPOSE.parent / mounts[provider["options"]["path"]]).resolve()
    assert (host_dir / DASHBOARD.name).is_file()
    assert (
        COMPOSE.parent / mounts["/etc/grafana/provisioning"]
    ).resolve() == DEPLOY / "grafana" / "provisioning"
