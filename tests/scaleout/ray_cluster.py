"""Two Ray nodes on loopback, the app served by two replicas, one per node; answers as JSON.

    python -m tests.scaleout.ray_cluster OUT.json [proxy|haproxy]

Run by tests/scaleout/test_ray.py inside a network namespace that has only loopback
(``unshare -n``, then ``ip link set lo up``): Ray binds its control plane to the machine's
interface address, and there the only one is 127.0.0.1. Each node offers one CPU and each
replica asks for one, so the two replicas can only start on different nodes. With the
``haproxy`` ingress it first waits until HAProxy shows both replicas UP. It sends
``CONCURRENT`` all at once and ``SEQUENTIAL`` one by one to Serve's HTTP proxy, then
``OVERLOAD`` all at once (more than the replicas take and Ray queues, so Ray answers some
of them itself), and writes, per request, the status, the headers, the body and (for
``CONCURRENT``) the replica that answered (from the replicas' access logs, by the
``X-Request-ID`` the proxy gave the request), and the node of every replica. Everything it starts it stops, its Ray folder included: the cluster's
shutdown kills every process of both nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PHANTOMS = ROOT / "tests" / "data" / "phantoms"
HOST = "127.0.0.1"
TIMEOUT_S = 60.0
LOG_WAIT_S = 15.0
# The app's settings, here and in the plain server the test compares with. No dynamic
# batching: requests sent at once would be computed in batches here and alone there, and
# batched kernels round differently in the last bits (tests/runtime/test_batching.py);
# computed alone on both sides, every answer must be identical.
PLAIN_SETTINGS: dict[str, Any] = {"models": ROOT / "models", "threads": 1, "max_batch_size": 1}


@dataclass(frozen=True)
class Call:
    """One request: a phantom PNG as a multipart upload to ``path``, with form fields;
    without a phantom, a GET."""

    path: str
    phantom: str | None = None
    form: dict[str, str] = field(default_factory=dict)

    def send(self, client: httpx.Client) -> httpx.Response:
        if self.phantom is None:
            return client.get(self.path)
        files = {"file": (self.phantom, (PHANTOMS / self.phantom).read_bytes(), "image/png")}
        return client.post(self.path, files=files, data=self.form)


_IMAGES = ["normal.png", "cardiomegaly.png", "nodule.png", "pleural-effusion.png",
           "pneumothorax.png", "nodule_pneumothorax.png", "cardiomegaly_pleural-effusion.png",
           "all-findings.png"]
# 8 /predict and 8 /explain, every phantom twice, sent at once.
CONCURRENT: list[Call] = (
    [Call("/predict", image) for image in _IMAGES]
    + [Call("/explain", image, {"methods": "gradcam,crm", "heatmap": "npy"})
       for image in _IMAGES[:4]]
    + [Call("/explain", image, {"methods": "guided_backprop,fixations", "classes": "0,1",
                                "heatmap": "npy"})
       for image in _IMAGES[4:]]
)
# What a client gets wrong, and the other routes, answered as by the plain server.
SEQUENTIAL: list[Call] = [
    Call("/predict", "nodule.png", {"model": "no-such-model"}),
    Call("/explain", "nodule.png", {"methods": "no-such-method"}),
    Call("/models/demo-cxr"),
    Call("/openapi.json"),
    Call("/"),
]
# Each replica takes max(MAX_CONCURRENCY, MAX_BATCH_SIZE) = 2 at once and Ray's router
# queues MAX_QUEUE = 16 more: 20 of these at most are answered 200, the rest 503 by Ray.
OVERLOAD: list[Call] = [
    Call("/explain", "all-findings.png", {"methods": "gradcam,crm,guided_backprop,fixations"})
] * 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _answer(response: httpx.Response) -> dict[str, Any]:
    json_body = "json" in response.headers.get("content-type", "")
    return {"status": response.status_code, "headers": dict(response.headers),
            "request_ids": response.headers.get_list("x-request-id"),
            "body": response.json() if json_body else response.text}


def _wait_for_haproxy_servers(count: int) -> None:
    """Until HAProxy's stats page shows ``count`` replica servers UP (bounded).

    serve.run returns once the replicas are running, before HAProxy's health checks
    (Ray's template: two, 250 ms apart) have marked both UP: sent right then, all 16
    concurrent requests went to one replica.
    """
    port = int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"))
    deadline = time.monotonic() + LOG_WAIT_S
    up = 0
    while time.monotonic() < deadline:
        try:
            rows = httpx.get(f"http://{HOST}:{port}/stats;csv", timeout=2.0).text.splitlines()
        except httpx.HTTPError:
            rows = []
        fields = rows[0].lstrip("# ").split(",") if rows else []
        if "svname" in fields and "status" in fields:
            name, status = fields.index("svname"), fields.index("status")
            up = sum(1 for row in rows[1:] if (cells := row.split(",")) and len(cells) > status
                     and cells[name].startswith("SERVE_REPLICA") and cells[status] == "UP")
            if up >= count:
                return
        time.sleep(0.1)
    raise TimeoutError(f"HAProxy showed {up} of {count} replicas UP after {LOG_WAIT_S} s")


def _answered_by(ray_dir: Path) -> dict[str, str]:
    """request id → replica id, from the replicas' access logs.

    A line reads ``INFO <time> medexplain_medexplain <replica> <request id> -- POST / 200 ..``.
    """
    answered: dict[str, str] = {}
    for log in (ray_dir / "logs" / "serve").glob("replica_*.log"):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if "--" in words and words.index("--") >= 3:
                at = words.index("--")
                answered[words[at - 1]] = words[at - 2]
    return answered


def run(ingress: str = "proxy") -> dict[str, Any]:
    # Imported here: the test imports this module for its requests only, and Ray stays out
    # of the test process (importing ray.serve warns under pytest's warnings-as-errors).
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from service.scaleout import ray_serve

    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Short, ours, removed at the end: Ray's sockets live under it (paths ≤ 107 bytes).
    temp = tempfile.mkdtemp(prefix="mxray-")
    # Ray also writes the cluster's address under RAY_TMPDIR (default /tmp), in a "ray"
    # folder it does not create when the session lives elsewhere: keep that ours as well.
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"))
    # Serve's switches, as `serve --ray` gives a local cluster (and the manifest its pods),
    # for the ingress asked for: the nodes' processes inherit them.
    haproxy_dir = os.path.join(temp, "hx")
    os.makedirs(haproxy_dir)
    os.environ.update(ray_serve.local_cluster_env(Settings(ray_ingress=ingress), haproxy_dir))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": temp, "_system_config": ray_serve.LOCAL_SYSTEM_CONFIG})
    try:
        cluster.add_node(num_cpus=1)
        timings["nodes_up_s"] = time.perf_counter() - start
        settings = Settings(**PLAIN_SETTINGS, port=_free_port(),
                            ray_address=cluster.address, ray_replicas=2, ray_num_cpus=1,
                            ray_proxy_location="HeadOnly", ray_access_log=True)
        ray_serve.start(settings)
        serve.run(ray_serve.application(settings), name=ray_serve.APP_NAME)
        if ingress == "haproxy":
            _wait_for_haproxy_servers(settings.ray_replicas)
        timings["serving_s"] = time.perf_counter() - start
        nodes = {a.name.rsplit("#", 1)[-1]: a.node_id
                 for a in list_actors(filters=[("state", "=", "ALIVE")])
                 if a.class_name.startswith("ServeReplica:")}
        base = f"http://{HOST}:{settings.port}"
        with httpx.Client(base_url=base, timeout=TIMEOUT_S) as client:
            with ThreadPoolExecutor(len(CONCURRENT)) as pool:
                concurrent = list(pool.map(lambda c: c.send(client), CONCURRENT))
            sequential = [c.send(client) for c in SEQUENTIAL]
            with ThreadPoolExecutor(len(OVERLOAD)) as pool:
                overload = list(pool.map(lambda c: c.send(client), OVERLOAD))
        timings["answered_s"] = time.perf_counter() - start
        # A replica writes its access-log line once the answer has left: wait for them.
        ids = {r.headers["x-request-id"] for r in concurrent}
        ray_dir = Path(cluster.head_node.get_session_dir_path())
        deadline = time.monotonic() + LOG_WAIT_S
        while not ids <= (answered := _answered_by(ray_dir)).keys():
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return {
            "nodes": nodes,
            "concurrent": [_answer(r) | {"replica": answered.get(r.headers["x-request-id"])}
                           for r in concurrent],
            "sequential": [_answer(r) for r in sequential],
            "overload": [_answer(r) for r in overload],
            "timings": timings,
            # What every process of both nodes names in its command line: the test looks
            # for any left running once this process has exited.
            "ray_tmpdir": temp,
        }
    finally:
        ray.shutdown()  # the driver first; the cluster's processes then go with the nodes
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def main(argv: list[str]) -> int:
    out = Path(argv[1])
    out.write_text(json.dumps(run(*argv[2:3])), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
