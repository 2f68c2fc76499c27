"""Kustomize overlays render, every object validates against Kubernetes 1.30's schema,
and the objects carry what the architecture asks for (GPU limits, headless Services,
dns:/// targets, gRPC probes, drains, PDBs, HPAs on the adapter's metric)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml

from .helpers import (
    ADAPTER_CONFIGMAP,
    ADAPTER_VALUES,
    K8S,
    K8S_VERSION,
    OVERLAYS,
    STAGES,
    adapter_exprs,
    adapter_rules,
    check_promql,
    load_yaml,
    load_yaml_all,
    render_overlay,
    rule_groups,
)

CRD_GROUPS = ("monitoring.coreos.com/",)
GPU_OVERLAYS = ("gpu", "production", "gpu-sharing")


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def settings(objs: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [
        o
        for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("facestage-settings")
    ]
    data: dict[str, str] = cm["data"]
    return data


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    objs = render_overlay(overlay)
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # no core schema: structure checked in test_monitoring_objects
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {err.message}")
    names = Counter((o["kind"], o["metadata"]["name"]) for o in objs)
    assert max(names.values()) == 1
    assert all(
        o["metadata"].get("namespace") == "facestage" for o in objs if o["kind"] != "Namespace"
    )


def test_strict_validation_catches_a_misspelt_field() -> None:
    objs = render_overlay("gpu")
    dep = next(o for o in objs if o["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stage_deployments(overlay: str) -> None:
    objs = render_overlay(overlay)
    deployments = by_kind(objs, "Deployment")
    services = by_kind(objs, "Service")
    pdbs = by_kind(objs, "PodDisruptionBudget")
    data = settings(objs)
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    for stage in STAGES:
        name = f"facestage-{stage}"
        dep = deployments[name]
        pod = dep["spec"]["template"]["spec"]
        (ctr,) = pod["containers"]
        assert ctr["args"][0] == stage
        # Native gRPC probes on the stage port; a startup probe of >= 10 minutes.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ctr[probe]["grpc"]["port"] == 50051, (name, probe)
        startup = ctr["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 600, name
        # Drain: grace period > preStop + the server's drain.
        drain = int(data[f"FACESTAGE_{stage.upper()}_DRAIN_GRACE_S"])
        pre_stop = int(ctr["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pod["terminationGracePeriodSeconds"] > drain + pre_stop, name
        # Clients re-resolve: max connection age is set.
        assert int(data[f"FACESTAGE_{stage.upper()}_MAX_CONNECTION_AGE_S"]) > 0
        # Models: PVC filled by an initContainer, mounted read-only by the server.
        (init,) = pod["initContainers"]
        assert init["args"][0] == "pull-models"
        assert init["args"][1] == f"$(FACESTAGE_{stage.upper()}_MODEL)"
        claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"][
            "claimName"
        ]
        assert claim in pvcs
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in ctr["volumeMounts"]
        assert data["FACESTAGE_MODEL_DIR"] == "/models"
        # Non-root.
        assert pod["securityContext"]["runAsNonRoot"] is True
        # Headless Service selecting these pods, and a PDB.
        svc = services[name]
        assert svc["spec"]["clusterIP"] == "None"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "appProtocol": "kubernetes.io/h2c",
        } in svc["spec"]["ports"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # GPU: requested on GPU overlays, absent on the CPU one.
        resources = ctr["resources"]
        gpu_keys = {k for k in resources.get("limits", {}) if k.startswith("nvidia.com/")}
        if overlay in GPU_OVERLAYS:
            assert gpu_keys, f"{overlay}: {name} has no nvidia.com GPU limit"
            for key in gpu_keys:
                assert resources["limits"][key] == 1
        else:
            assert not gpu_keys
            assert data[f"FACESTAGE_{stage.upper()}_PROVIDERS"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_orchestrator_targets_headless_services_through_dns(overlay: str) -> None:
    objs = render_overlay(overlay)
    data = settings(objs)
    services = by_kind(objs, "Service")
    dep = by_kind(objs, "Deployment")["facestage-orchestrator"]
    (ctr,) = dep["spec"]["template"]["spec"]["containers"]
    assert ctr["args"][0] == "orchestrator"
    for stage in STAGES:
        key = f"FACESTAGE_ORCHESTRATOR_{stage.upper()}"
        assert f"--{stage}=$({key})" in ctr["args"]
        target = data[key]
        assert target.startswith("dns:///"), target
        host, port = target.removeprefix("dns:///").split(":")
        assert services[host]["spec"]["clusterIP"] == "None"
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ctr[probe]["grpc"]["port"] == int(data["FACESTAGE_ORCHESTRATOR_PORT"])
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > int(data["FACESTAGE_ORCHESTRATOR_DRAIN_GRACE_S"])


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_an_hpa_per_stage_on_the_adapter_metric(overlay: str) -> None:
    objs = render_overlay(overlay)
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    deployments = by_kind(objs, "Deployment")
    served = {rule["name"]["as"] for rule in adapter_rules()}
    for stage in STAGES:
        hpa = hpas[f"facestage-{stage}"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served
    assert "facestage-orchestrator" in hpas


def test_production_sets_replicas_per_stage() -> None:
    deployments = by_kind(render_overlay("production"), "Deployment")
    replicas = {name: d["spec"]["replicas"] for name, d in deployments.items()}
    assert len(set(replicas.values())) > 1, "every stage has the same replica count"
    assert replicas["facestage-swapper"] > replicas["facestage-embedder"]


def test_gpu_sharing_puts_small_stages_on_mig_slices() -> None:
    deployments = by_kind(render_overlay("gpu-sharing"), "Deployment")
    for stage in ("detector", "embedder"):
        limits = deployments[f"facestage-{stage}"]["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]["limits"]
        assert "nvidia.com/mig-1g.10gb" in limits and "nvidia.com/gpu" not in limits


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_monitoring_objects(overlay: str, tmp_path: Path) -> None:
    objs = render_overlay(overlay)
    (pod_monitor,) = [o for o in objs if o["kind"] == "PodMonitor"]
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    for crd in (pod_monitor, rule):
        assert crd["apiVersion"] == "monitoring.coreos.com/v1"
        assert crd["metadata"]["name"] and crd["metadata"]["namespace"] == "facestage"
    # The PodMonitor selects every facestage pod and scrapes a port they all name.
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    for dep in by_kind(objs, "Deployment").values():
        template = dep["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert endpoint["port"] in ports
    # The PrometheusRule carries exactly the rule files' groups, and they parse.
    assert rule["spec"]["groups"] == rule_groups()
    exprs = {
        f"{g['name']} {r.get('record') or r.get('alert')}": r["expr"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
    }
    check_promql(exprs, tmp_path)


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u, sys;"
            f"s=u.spec_from_file_location('g', {str(K8S / 'gen-prometheusrule.py')!r});"
            "m=u.module_from_spec(s); s.loader.exec_module(m); sys.stdout.write(m.render())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    committed = (K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text()
    assert out.stdout == committed, "run: python deploy/k8s/gen-prometheusrule.py"


def test_adapter_rules_are_the_same_in_values_and_configmap(tmp_path: Path) -> None:
    values = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    (cm,) = load_yaml_all(ADAPTER_CONFIGMAP)
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    assert yaml.safe_load(cm["data"]["config.yaml"])["rules"] == values
    for rule in values:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "facestage_requests_in_flight" in rule["metricsQuery"]
        assert "facestage_batcher_queue_depth" in rule["metricsQuery"]
    check_promql(adapter_exprs(), tmp_path)


@pytest.mark.parametrize("path", sorted((K8S / "gpu-sharing").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_sharing_device_plugin_configs(path: Path) -> None:
    (cm,) = load_yaml_all(path)
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    for text in cm["data"].values():
        config = yaml.safe_load(text)
        assert config["version"] == "v1"


def test_every_overlay_the_docs_apply_exists() -> None:
    text = (K8S.parents[1] / "docs" / "deploy.md").read_text()
    applied = set(re.findall(r"kubectl apply -k (deploy/k8s/overlays/[\w-]+)", text))
    assert "deploy/k8s/overlays/production" in applied
    for overlay in applied:
        assert (K8S.parents[1] / overlay / "kustomization.yaml").is_file(), overlay
