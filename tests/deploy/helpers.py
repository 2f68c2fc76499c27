"""Shared helpers of the deploy tests: paths, tools, PromQL extraction and checks.

`metric_names_used()` is the contract hook: every facestage_* metric that deploy/
reads (dashboard, recording rules, alerts, prometheus-adapter rules, HPAs). The live
contract test compares it with what real processes export.
`local_prometheus_config()` builds a Prometheus config that scrapes loopback targets
with the shipped rules, for tests that run a real Prometheus against real processes.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULE_FILES = (PROMETHEUS_DIR / "rules" / "recording.yml", PROMETHEUS_DIR / "rules" / "alerts.yml")
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "facestage-capacity.json"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
OVERLAYS = ("gpu", "production", "cpu", "gpu-sharing")
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
ADAPTER_CONFIGMAP = K8S / "prometheus-adapter" / "configmap.yaml"
HPA_FILE = K8S / "components" / "autoscaling" / "hpa.yaml"
STAGES = ("detector", "embedder", "swapper", "enhancer")
ROLES = (*STAGES, "orchestrator")
K8S_VERSION = "1.30.0"

# Values the dashboard's variables and Grafana's interval macros stand for when an
# expression is handed to promtool.
GRAFANA_SUBSTITUTIONS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "namespace": ".*",
    "stage": "detector",
}
# What prometheus-adapter puts in place of its template fields.
ADAPTER_SUBSTITUTIONS = {
    "<<.LabelMatchers>>": 'namespace="facestage",pod=~"facestage-swapper-.*"',
    "<<.GroupBy>>": "namespace,pod",
    "<<.Series>>": "facestage_requests_in_flight",
}


# ---------------------------------------------------------------------- tools
def tool(name: str) -> str:
    """Path of a command-line tool, or skip the test with how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run .ci/install-deploy-tools.sh)")
    return path


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def kustomize_capable_kubectl() -> str:
    """kubectl with a kustomize new enough for these overlays (v4+), or skip."""
    kubectl = tool("kubectl")
    out = run([kubectl, "version", "--client", "-o", "json"])
    version = ""
    if out.returncode == 0:
        version = json.loads(out.stdout).get("kustomizeVersion", "")
    match = re.match(r"v?(\d+)\.", version)
    if match is None or int(match.group(1)) < 4:
        pytest.skip(
            f"kubectl's built-in kustomize is {version or 'unknown'}; the overlays need v4+ "
            "(Debian's kubernetes-client 1.20 carries v2)"
        )
    return kubectl


@cache
def _render(overlay: str) -> str:
    kubectl = kustomize_capable_kubectl()
    out = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}"
    return out.stdout


def render_overlay(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render(overlay)) if doc]


def promtool_check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("promtool"), "check", "rules", str(path)])


def check_promql(exprs: Mapping[str, str], tmp_path: Path) -> None:
    """Assert that every expression parses: they become recording rules of a temporary
    rule file that `promtool check rules` reads."""
    rules = [
        {"record": f"check:expr_{i}", "expr": expr, "labels": {"origin": origin[:200]}}
        for i, (origin, expr) in enumerate(exprs.items())
    ]
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}, width=1000))
    out = promtool_check_rules(path)
    assert out.returncode == 0, f"promtool rejects an expression:\n{out.stdout}\n{out.stderr}"


# ------------------------------------------------------------------ loading
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_dashboard() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dash


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def substitute_grafana(expr: str) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_SUBSTITUTIONS:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return GRAFANA_SUBSTITUTIONS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def substitute_adapter(query: str) -> str:
    for field, value in ADAPTER_SUBSTITUTIONS.items():
        query = query.replace(field, value)
    assert "<<" not in query, f"unknown adapter template field in {query!r}"
    return query


def label_values_selector(query: str) -> str:
    """The series selector of a Grafana `label_values(SELECTOR, LABEL)` query."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.S)
    assert match is not None, f"not a label_values query: {query!r}"
    return match.group(1)


def dashboard_exprs() -> dict[str, str]:
    """Origin -> expression (raw, with Grafana variables) of every dashboard query."""
    dash = load_dashboard()
    out: dict[str, str] = {}
    for panel in iter_panels(dash["panels"]):
        for target in panel.get("targets", []):
            out[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out[f"variable {var['name']}"] = label_values_selector(query)
    return out


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in RULE_FILES:
        groups.extend(load_yaml(path)["groups"])
    return groups


def recording_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(RULE_FILES[0])["groups"] for r in g["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(RULE_FILES[1])["groups"] for r in g["rules"]]


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    return rules


def adapter_exprs() -> dict[str, str]:
    out: dict[str, str] = {}
    for i, rule in enumerate(adapter_rules()):
        out[f"adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        out[f"adapter rule {i} metricsQuery"] = substitute_adapter(rule["metricsQuery"])
    return out


def hpa_metric_names() -> set[str]:
    names: set[str] = set()
    for hpa in load_yaml_all(HPA_FILE):
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] in ("Pods", "Object", "External"):
                key = metric["type"].lower()
                names.add(metric[key]["metric"]["name"])
    return names


# ------------------------------------------------------------ metric names
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def facestage_names_in(expr: str) -> set[str]:
    """facestage_* metric names in a PromQL expression (string literals ignored;
    identifiers taken whole, so `stage:facestage_x:rate1m` is not `facestage_x`)."""
    names = set()
    for ident in _IDENT.findall(_STRING.sub('""', expr)):
        if ident.startswith("facestage_"):
            for suffix in _HISTOGRAM_SUFFIXES:
                if ident.endswith(suffix):
                    ident = ident[: -len(suffix)]
                    break
            names.add(ident)
    return names


def metric_names_used() -> set[str]:
    """Every facestage_* metric name that deploy/ reads from the processes: the
    dashboard, the recording rules, the alert rules, the prometheus-adapter rules and
    (through the adapter rule that serves it) the HPAs. Histogram series suffixes are
    stripped; names that the recording rules or the adapter define are excluded."""
    exprs: list[str] = list(dashboard_exprs().values())
    exprs += [rule["expr"] for group in rule_groups() for rule in group["rules"]]
    adapter = adapter_rules()
    exprs += [rule["seriesQuery"] for rule in adapter] + [rule["metricsQuery"] for rule in adapter]

    defined = {
        rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule
    }
    adapter_outputs = {rule["name"]["as"] for rule in adapter}
    defined |= adapter_outputs

    used: set[str] = set()
    for expr in exprs:
        used |= facestage_names_in(expr)
    # An HPA metric must be served by an adapter rule, whose source series are above.
    for name in hpa_metric_names():
        if name not in adapter_outputs:
            used.add(name)
    return used - defined


def documented_metric_names() -> set[str]:
    text = (DOCS / "metrics.md").read_text()
    return set(re.findall(r"^\|\s*`(facestage_[a-z0-9_]+)`\s*\|", text, re.M))


# ------------------------------------------------- local Prometheus config
def local_prometheus_config(
    targets: Mapping[str, Iterable[str]] | Iterable[str],
    *,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    rule_files: Iterable[Path] = RULE_FILES,
    namespace: str = "local",
) -> dict[str, Any]:
    """A Prometheus config that scrapes the given loopback targets ("127.0.0.1:9101")
    with the shipped recording and alert rules, as the compose config does for the
    compose services. `targets` is a list, or a mapping role -> targets (one job per
    role). Targets off the loopback range are refused."""
    if isinstance(targets, Mapping):
        jobs = {f"facestage-{role}": list(ts) for role, ts in targets.items()}
    else:
        jobs = {"facestage": list(targets)}
    for job_targets in jobs.values():
        for target in job_targets:
            host = target.rsplit(":", 1)[0].strip("[]")
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"{target}: a local test config scrapes loopback targets only")
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "static_configs": [{"targets": job_targets, "labels": {"namespace": namespace}}],
            }
            for job, job_targets in jobs.items()
        ],
    }


def write_local_prometheus_config(
    directory: Path, targets: Mapping[str, Iterable[str]] | Iterable[str], **kwargs: Any
) -> Path:
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(local_prometheus_config(targets, **kwargs), sort_keys=False))
    return path
