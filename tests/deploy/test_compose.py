"""compose.yaml against the Compose Specification schema, and what it must contain."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import yaml

from .helpers import COMPOSE, DOCS, ROOT, STAGES, load_yaml

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
SERVICES = {*STAGES, "orchestrator", "models", "prometheus", "grafana"}
MODELS = {"det_10g", "w600k_r50", "inswapper_128", "gfpgan_1.4"}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def test_compose_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_rejects_a_wrong_compose_file() -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    broken = compose()
    broken["services"]["detector"]["depends_on"]["models"]["condition"] = "service_done"
    assert list(validator.iter_errors(broken))


def test_services() -> None:
    services = compose()["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        if name != "models":
            assert "healthcheck" in svc, name


def test_stages_reserve_a_gpu_and_wait_for_the_models() -> None:
    services = compose()["services"]
    for stage in STAGES:
        svc = services[stage]
        assert svc["command"][0] == stage
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device.get("count") or device.get("device_ids")
        assert svc["depends_on"]["models"]["condition"] == "service_completed_successfully"
        assert "models:/models:ro" in svc["volumes"]
        assert svc["environment"]["FACESTAGE_MODEL_DIR"] == "/models"
        assert int(svc["environment"][f"FACESTAGE_{stage.upper()}_MAX_CONNECTION_AGE_S"]) > 0
        drain = int(svc["environment"][f"FACESTAGE_{stage.upper()}_DRAIN_GRACE_S"])
        assert int(svc["stop_grace_period"].removesuffix("s")) > drain
        assert svc["healthcheck"]["test"][:2] == ["CMD", "facestage-healthcheck"]
    assert "deploy" not in services["orchestrator"]


def test_models_service_pulls_every_model_into_the_shared_volume() -> None:
    models = compose()["services"]["models"]
    assert models["command"][0] == "pull-models"
    assert set(models["command"][1:]) == MODELS
    assert "models:/models" in models["volumes"]
    assert models["environment"]["FACESTAGE_MODEL_DIR"] == "/models"


def test_orchestrator_uses_dns_targets_of_the_stage_services() -> None:
    services = compose()["services"]
    args = services["orchestrator"]["command"]
    assert args[0] == "orchestrator"
    for stage in STAGES:
        assert f"--{stage}=dns:///{stage}:50051" in args
        assert services["orchestrator"]["depends_on"][stage]["condition"] == "service_healthy"


def test_mounted_files_and_build_context_exist() -> None:
    services = compose()["services"]
    base = COMPOSE.parent
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (base / source).exists(), f"{name}: {source}"
    build = services["detector"]["build"]
    assert (base / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file()


def test_every_service_the_docs_mention_exists() -> None:
    text = (DOCS / "deploy.md").read_text()
    services = set(compose()["services"])
    mentioned: set[str] = set()
    subcommands = {
        "up",
        "logs",
        "restart",
        "stop",
        "start",
        "ps",
        "exec",
        "run",
        "pull",
        "build",
        "rm",
        "kill",
        "top",
    }
    for line in re.findall(r"docker compose [^\n`]*", text):
        words = shlex.split(line.split("#")[0].rstrip("\\ "))
        sub = next((w for w in words[2:] if w in subcommands), None)
        if sub is None:
            continue
        rest = words[words.index(sub) + 1 :]
        skip_next = False
        for word in rest:
            if skip_next:
                skip_next = False
                continue
            if word.startswith("-"):
                skip_next = word in {
                    "--scale",
                    "-f",
                    "--file",
                    "--tail",
                    "-e",
                    "--env",
                    "-u",
                    "--user",
                    "-w",
                    "--workdir",
                    "-t",
                    "--timeout",
                }
                continue
            if not re.fullmatch(r"<[\w-]+>", word):  # <stage>: a placeholder, not a name
                mentioned.add(word)
            if sub in {"exec", "run"}:
                break  # the rest is the command run inside the container
    mentioned |= set(re.findall(r"--scale\s+(\w+)=", text))
    assert mentioned, "docs/deploy.md names no compose service"
    assert mentioned <= services, (
        f"docs name services compose lacks: {sorted(mentioned - services)}"
    )


def test_compose_yaml_is_plain_yaml() -> None:
    # Anchors and merge keys are resolved by every YAML 1.1 loader Compose uses.
    assert yaml.safe_load(COMPOSE.read_text())["name"] == "facestage"
