"""The Kubernetes manifests and the KServe serving runtime in deploy/, validated against the
Kubernetes API schemas (kubernetes-validate's copies, strict: no unknown fields), and held
to what the server really does: the probes use its OIP health routes, the arguments parse
as `tierwise serve`'s."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tierwise.cli import _parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = "1.30"
MANIFESTS = sorted(DEPLOY.glob("*/*.yaml"))


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    if document["kind"] == "Deployment":
        return spec["template"]["spec"]["containers"]
    if document["kind"] == "ServingRuntime":
        return spec["containers"]
    return []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_manifest_is_valid_kubernetes(path: Path) -> None:
    kinds = set()
    for document in _documents(path):
        kinds.add(document["kind"])
        if document["apiVersion"].startswith("serving.kserve.io/"):
            # a custom resource: its pod parts are Kubernetes' own Container type
            for container in _containers(document):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
                       "spec": {"containers": [container]}}
                kubernetes_validate.validate(pod, KUBERNETES, strict=True)
            continue
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    assert kinds, f"{path}: no documents"


def test_the_tiers_have_probes_services_and_autoscalers() -> None:
    for name in ("edge", "cloud"):
        documents = _documents(DEPLOY / "kubernetes" / f"{name}.yaml")
        kinds = {document["kind"] for document in documents}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds, name
        (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
        (container,) = _containers(deployment)
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        (autoscaler,) = [d for d in documents if d["kind"] == "HorizontalPodAutoscaler"]
        assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_every_container_runs_a_command_tierwise_takes() -> None:
    parser = _parser()
    seen = 0
    for path in MANIFESTS:
        for document in _documents(path):
            for container in _containers(document):
                args = parser.parse_args(container["args"])  # SystemExit on a bad one
                assert args.command == "serve"
                seen += 1
    assert seen >= 3
