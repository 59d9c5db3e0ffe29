"""What operators run: compose.yaml, the HAProxy configuration and the Kubernetes manifests,
checked against their schemas with validators whose schemas ship in their packages (no
download at test time): kubernetes-validate (strict: unknown fields are errors) and
check-jsonschema's copy of the Compose specification."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents() -> dict[str, dict[str, Any]]:
    found = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_validate_strictly(version: str) -> None:
    documents = _documents()
    assert set(documents) == {"Deployment", "Service", "PodDisruptionBudget", "Secret"}
    for document in documents.values():
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The negative control: a typo must fail, or the test above proves nothing."""
    deployment = copy.deepcopy(_documents()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_manifests_fit_together() -> None:
    documents = _documents()
    deployment, service = documents["Deployment"], documents["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert documents["PodDisruptionBudget"]["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    env = {item["name"]: item for item in container["env"]}
    secret_ref = env["TABSERVE_STORE"]["valueFrom"]["secretKeyRef"]
    secret = documents["Secret"]
    assert secret_ref["name"] == secret["metadata"]["name"]
    assert secret_ref["key"] in secret["stringData"]
    assert secret["stringData"]["TABSERVE_STORE"].startswith("postgresql://")


def test_compose_validates_against_the_compose_specification() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_three_health_checked_replicas_behind_haproxy() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    replicas = [name for name in services if name.startswith("tabserve")]
    assert len(replicas) == 3
    for name in [*replicas, "postgres", "haproxy"]:
        assert "healthcheck" in services[name], name
    for name in replicas:
        assert services[name]["environment"]["TABSERVE_STORE"].startswith("postgresql://")
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    haproxy_cfg = (ROOT / "deploy" / "haproxy.cfg").read_text()
    for name in replicas:
        assert f"server {name} {name}:9004 check" in haproxy_cfg


def test_the_haproxy_configuration_is_valid() -> None:
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
