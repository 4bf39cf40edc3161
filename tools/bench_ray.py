"""What Ray Serve adds per request: the plain server and Ray Serve replicas, side by side.

    .venv/bin/python tools/bench_ray.py [--rounds 300] [--replicas 2] [--threads 1]
        [--ingress proxy [haproxy]] [--before CHECKOUT] [--only N ...] [--access-log]
        [--out results.json]
    .venv/bin/python tools/bench_ray.py --floor [--rounds 300]

What it measures: the client-side wall time of each request in ``REQUESTS`` (``/predict``
and the default ``/explain`` on a 256x256 phantom PNG sent as multipart, and on
pydicom-data's computed radiograph ``RG1_UNCR.dcm``, 7.2 MB, as a raw ``application/dicom``
body), over one keep-alive connection per server on 127.0.0.1, to servers of this checkout
running at the same time: ``medexplain serve`` (plain) and, per ``--ingress`` variant,
``medexplain serve --ray --replicas N`` (a local Ray cluster of its own) with
``MEDEXPLAIN_RAY_INGRESS`` set to it: ``proxy``, Serve's proxy actor in front of N
replicas; ``haproxy``, Ray 2.60's experimental direct ingress (HAProxy in front, each
replica takes HTTP itself). ``--before CHECKOUT`` adds ``serve --ray`` of another checkout
(as it comes, e.g. the tree before a change), measured in the same rounds. All run with
``MEDEXPLAIN_THREADS`` (default 1: each replica and the plain server compute on one thread,
so the difference is the path through Ray, not the compute). ``--only`` keeps the requests
of those indexes; ``--access-log`` switches Ray Serve's access logs on and reports, per Ray
server and route, the median latency its proxy and its replicas logged: the time inside
Ray's proxy (from the request's arrival to the answer's end) and inside the replica's Serve
wrapper around the app, beside the app's own ``timings_ms.total``.

``--floor`` measures what Ray itself costs here, with no app: a no-op ASGI app as a plain
uvicorn server and as a Serve deployment of 2 replicas behind Serve's proxy (GET, and POST
of 1 kB), an awaited deployment-handle call with 1 kB of bytes, and a plain Ray actor call;
once with Serve's switches as they come and once with the service's (``SERVE_ENV`` of
service/scaleout/ray_serve.py), each in a local cluster of its own.

How it is run: Ray binds its control plane to the machine's interface address, so the
script re-runs itself in a network namespace that has only loopback (``unshare -n``, or
``unshare -r -n`` when not root) and starts both servers there. Every server gets
``--warmup`` untimed passes of every request; then, round after round, each request goes
once to each server, one at a time, the order of the servers and of the requests rotated
every round (tools/bench_http.py's scheme), so that drifts of a shared machine hit both.

How to read it: per request, p50 and p99 of each server and, for the Ray ones, the
difference of the p50s (Ray's overhead per request) and their ratio, and the median of
the app's own ``timings_ms.total`` ("server ms"). After the servers have stopped, any
process of their Ray clusters still running is listed (there should be none). A benchmark,
not a test: it asserts nothing about the numbers; non-200 answers are counted and listed.
"""

from __future__ import annotations

import argparse
import http.client as http_client
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tools import bench_http as http

INSIDE_MARK = "--inside-namespace"
FLOOR_MARK = "--floor-child"
INGRESSES = ("proxy", "haproxy")  # MEDEXPLAIN_RAY_INGRESS
PHANTOM = ROOT / "tests" / "data" / "phantoms" / "nodule.png"
RAY_STOP_TIMEOUT_S = 60.0  # the app is deleted and the local cluster stopped on SIGTERM

REQUESTS: list[http.Request] = [
    http.Request("predict, phantom PNG 256²", "/predict", body="phantom"),
    http.Request("explain default, phantom PNG 256²", "/explain", body="phantom"),
    http.Request("predict, RG1_UNCR.dcm 7.2 MB", "/predict", body="dicom"),
    http.Request("explain default, RG1_UNCR.dcm 7.2 MB", "/explain", body="dicom"),
]


def payloads() -> dict[str, tuple[bytes, str]]:
    """(body, Content-Type) by request name."""
    dicom = http.radiograph_path().read_bytes()
    phantom = http.multipart({}, PHANTOM.name, PHANTOM.read_bytes(), "image/png")
    return {r.name: phantom if r.body == "phantom" else (dicom, "application/dicom")
            for r in REQUESTS}


def start(server: http.Server, extra: list[str], env: dict[str, str], logs: Path) -> None:
    """``python -m service.cli serve`` of the server's checkout on its port, plus ``extra``."""
    if not http.port_is_free(server.port):
        raise RuntimeError(f"port {server.port} is in use (pick another --port-base)")
    server.log_path = logs / f"{server.port}.log"
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", http.HOST,
             "--port", str(server.port), *extra],
            cwd=server.checkout, env=env | {"PYTHONPATH": str(server.checkout)},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def ray_tmpdir(logs: Path, server: http.Server) -> Path:
    """A Ray server's own RAY_TMPDIR: its cluster's files, logs and sockets (Ray's socket
    paths take at most 107 bytes: keep it short), and what its processes' command lines
    name, to find any left running."""
    path = logs / str(server.port)
    # Ray writes the cluster's address into a "ray" folder there, which it does not create.
    (path / "ray").mkdir(parents=True, exist_ok=True)
    return path


def access_latencies(tmpdir: Path) -> dict[str, float]:
    """Median latency per (log, method, route) of Ray Serve's access logs under ``tmpdir``.

    A line ends ``-- POST /predict 200 8.1ms``; ``proxy_*.log`` are the proxy's lines,
    ``replica_*.log`` the replicas'.
    """
    found: dict[str, list[float]] = {}
    # Ray's folder per cluster start, without the "_latest" link to the same one.
    starts = [d for d in (tmpdir / "ray").iterdir() if d.is_dir() and not d.is_symlink()]
    for log in (log for d in starts for log in (d / "logs" / "serve").glob("*.log")):
        kind = "proxy" if log.name.startswith("proxy_") else (
            "replica" if log.name.startswith("replica_") else None)
        if kind is None:
            continue
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if "--" not in words or not words[-1].endswith("ms"):
                continue
            at = words.index("--")
            if len(words) - at != 5 or words[at + 1] == "CALL":
                continue
            key = f"{kind} {words[at + 1]} {words[at + 2]}"
            try:
                found.setdefault(key, []).append(float(words[-1][:-2]))
            except ValueError:
                continue
    return {k: statistics.median(v) for k, v in sorted(found.items())}


def stop(server: http.Server, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``."""
    if server.connection is not None:
        server.connection.close()
        server.connection = None
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append((int(entry.name), cmdline))
    return found


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (1..99), inclusive method; None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(samples: list[http.Sample], labels: list[str],
              requests: list[http.Request]) -> list[dict[str, Any]]:
    """Per request and server: p50/p99, and for Ray the p50 over the plain one's."""
    rows = []
    for req in requests:
        row: dict[str, Any] = {"request": req.name}
        for label in labels:
            mine = [s for s in samples if s.server == label and s.request == req.name]
            ok = [s.wall_ms for s in mine if s.status == 200]
            totals = [s.total_ms for s in mine if s.status == 200 and s.total_ms is not None]
            row[label] = {"n": len(ok), "p50": percentile(ok, 50), "p99": percentile(ok, 99),
                          "server_ms": statistics.median(totals) if totals else None,
                          "failed": [(s.round, s.status, s.error) for s in mine
                                     if s.status != 200]}
        plain = row["plain"]["p50"]
        for label in labels[1:]:
            ray = row[label]["p50"]
            row[label]["overhead_p50_ms"] = (ray - plain if plain is not None and ray is not None
                                             else None)
            row[label]["ratio_p50"] = ray / plain if plain and ray is not None else None
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], labels: list[str]) -> str:
    """The table (a row per request and server), then any failures."""
    fmt = http._fmt
    lines = [("| request | server | p50 ms | p99 ms | p50 over plain, ms | p50 ÷ plain "
              "| server ms |"), "|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for row in rows:
        for label in labels:
            cell = row[label]
            ratio = "–" if cell.get("ratio_p50") is None else f"{cell['ratio_p50']:.2f}"
            extra = "–" if label == "plain" else fmt(cell["overhead_p50_ms"], 1)
            lines.append(f"| {row['request']} | {label} | {fmt(cell['p50'], 1)} | "
                         f"{fmt(cell['p99'], 1)} | {extra} | {ratio} | "
                         f"{fmt(cell['server_ms'], 1)} |")
        for label in labels:
            for round_, status, error in row[label]["failed"]:
                notes.append(f"- {label} / {row['request']} round {round_}: HTTP {status} "
                             f"{(error or '')[:http.ERROR_BODY_CHARS]}")
    if notes:
        lines += ["", "Non-200 answers:", *notes]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import ray

    info = http.machine()
    info["ray"] = ray.__version__
    return info


def inside(args: argparse.Namespace) -> int:
    """The benchmark proper, in the namespace."""
    env = http.child_env(args.threads)
    requests = [r for i, r in enumerate(REQUESTS) if args.only is None or i in args.only]
    logs = Path(tempfile.mkdtemp(prefix="br-"))
    servers = [http.Server("plain", ROOT, args.port_base)]
    # (server, its environment) for each Ray server.
    ray_servers: list[tuple[http.Server, dict[str, str]]] = []
    access = {"MEDEXPLAIN_RAY_ACCESS_LOG": "true"} if args.access_log else {}
    if args.before:
        ray_servers.append((http.Server("ray before", Path(args.before).resolve(),
                                        args.port_base + 1), access))
    for ingress in args.ingress:
        ray_servers.append((http.Server(f"ray {ingress}", ROOT,
                                        args.port_base + 1 + len(ray_servers)),
                            access | {"MEDEXPLAIN_RAY_INGRESS": ingress}))
    servers += [server for server, _ in ray_servers]
    labels = [s.label for s in servers]
    bodies = payloads()
    latencies: dict[str, dict[str, float]] = {}
    left: dict[str, list[str]] = {}
    try:
        for server, extra_env in ray_servers:
            # One local Ray cluster per server, each with its own Serve and RAY_TMPDIR.
            tmp = ray_tmpdir(logs, server)
            start(server, ["--ray", "--replicas", str(args.replicas)],
                  env | extra_env | {"RAY_TMPDIR": str(tmp)}, logs)
        start(servers[0], [], env, logs)
        for server in servers:
            print(f"{server.label} ready in {http.wait_ready(server):.1f} s", file=sys.stderr)
        for server in servers:
            for pass_ in range(args.warmup):
                for req in requests:
                    http.send_safely(server, req, bodies[req.name], -1 - pass_)
        samples: list[http.Sample] = []
        for round_ in range(args.rounds):
            order = http.rotated(servers, round_)
            for req in http.rotated(requests, round_):
                for server in order:
                    samples.append(http.send_safely(server, req, bodies[req.name], round_))
            if (round_ + 1) % 50 == 0:
                print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    finally:
        stop(servers[0], http.STOP_TIMEOUT_S)
        for server, _ in ray_servers:
            stop(server, RAY_STOP_TIMEOUT_S)
        ray_logs = {s.label: s.log_path.read_text(errors="replace")[-20_000:]
                    for s, _ in ray_servers if s.log_path and s.log_path.exists()}
        for server, _ in ray_servers:
            tmp = ray_tmpdir(logs, server)
            if args.access_log:
                latencies[server.label] = access_latencies(tmp)
            # Every process of the server's cluster names its RAY_TMPDIR; HAProxy names
            # the folder of its files (the service's "mxhap-" prefix).
            left[server.label] = [
                f"{pid}: {cmd[:160]}" for pid, cmd in processes_mentioning(str(tmp))]
        left["haproxy"] = [f"{pid}: {cmd[:160]}" for pid, cmd in processes_mentioning("mxhap-")]
        shutil.rmtree(logs, ignore_errors=True)
    rows = summarize(samples, labels, requests)
    info = versions()
    command = "python tools/bench_ray.py " + shlex.join(args.argv)
    print(f"Machine: {info['cpu']}, nproc {info['nproc']}; Python {info['python']}, "
          f"ray {info['ray']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}")
    print(f"Command: `{command}`; MEDEXPLAIN_THREADS={args.threads}, {args.rounds} rounds "
          f"after {args.warmup} warm-up passes; load average {os.getloadavg()}")
    print()
    print(markdown(rows, labels))
    for label, found in latencies.items():
        print(f"\n{label}, Ray Serve's access logs (median ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in found.items()))
    print("\nRay processes left after the servers stopped: "
          + ("none" if not any(left.values()) else json.dumps(left, indent=1)))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"machine": info, "command": command, "rows": rows, "access_log_ms": latencies,
             "left": left, "samples": [s.__dict__ for s in samples],
             "ray_log_tails": ray_logs}, indent=1), encoding="utf-8")
    return 0


# --- the floor: what Ray costs with no app ------------------------------------------------

# A no-op ASGI app: reads the body, answers "ok".
NOOP_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
"""
FLOOR_BODY = b"x" * 1000
FLOOR_WARMUP = 20


def _median_ms(call: Any, rounds: int) -> float:
    times = []
    for i in range(FLOOR_WARMUP + rounds):
        t = time.perf_counter()
        call()
        if i >= FLOOR_WARMUP:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _http_median_ms(port: int, body: bytes | None, rounds: int) -> float:
    conn = http_client.HTTPConnection(http.HOST, port, timeout=30)

    def call() -> None:
        if body is None:
            conn.request("GET", "/")
        else:
            conn.request("POST", "/", body=body,
                         headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")

    try:
        return _median_ms(call, rounds)
    finally:
        conn.close()


def floor_child(rounds: int, port_base: int) -> dict[str, float]:
    """One local cluster: the no-op app plain and through Serve, a handle, an actor."""
    import asyncio

    import ray
    from ray import serve

    namespace: dict[str, Any] = {}
    exec(NOOP_APP, namespace)  # noqa: S102 - our own constant: the same app both ways
    noop = namespace["app"]
    plain = subprocess.Popen(
        [sys.executable, "-c", NOOP_APP + "import uvicorn, sys\n"
         "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')",
         str(port_base)], stdin=subprocess.DEVNULL)
    ray.init(address="local", include_dashboard=False)
    try:
        serve.start(http_options={"host": http.HOST, "port": port_base + 1})

        @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
        @serve.ingress(lambda: noop)
        class Noop:
            pass

        @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
        class Echo:
            async def __call__(self, data: bytes) -> bytes:
                return data[:2]

        @ray.remote(num_cpus=0)
        class Actor:
            def call(self, data: bytes) -> bytes:
                return data[:2]

        serve.run(Noop.bind(), name="noop", route_prefix="/")
        serve.run(Echo.bind(), name="echo", route_prefix=None)
        actor = Actor.remote()  # type: ignore[attr-defined]
        ray.get(actor.call.remote(b""))

        async def handle_ms() -> float:
            handle = serve.get_app_handle("echo")
            times = []
            for i in range(FLOOR_WARMUP + rounds):
                t = time.perf_counter()
                await handle.remote(FLOOR_BODY)
                if i >= FLOOR_WARMUP:
                    times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)

        # Interleaved by kind, each kind's rounds at a stretch (they share one cluster).
        return {
            "plain uvicorn GET": _http_median_ms(port_base, None, rounds),
            "Serve proxy GET": _http_median_ms(port_base + 1, None, rounds),
            "plain uvicorn POST 1 kB": _http_median_ms(port_base, FLOOR_BODY, rounds),
            "Serve proxy POST 1 kB": _http_median_ms(port_base + 1, FLOOR_BODY, rounds),
            "Serve handle call, 1 kB bytes": asyncio.run(handle_ms()),
            "Ray actor call, 1 kB bytes": _median_ms(
                lambda: ray.get(actor.call.remote(FLOOR_BODY)), rounds),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        plain.terminate()
        plain.wait(timeout=30)


def floor(args: argparse.Namespace) -> int:
    """The floor, with Serve's switches as they come and with the service's."""
    from service.scaleout.ray_serve import SERVE_ENV

    results = {}
    for label, extra in (("Serve as it comes", {}), ("the service's SERVE_ENV", SERVE_ENV)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | extra
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), FLOOR_MARK,
                              str(args.rounds), str(args.port_base)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=600)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    info = versions()
    print(f"Machine: {info['cpu']}, nproc {info['nproc']}; Python {info['python']}, "
          f"ray {info['ray']}; load average {os.getloadavg()}")
    print(f"Command: `python tools/bench_ray.py {shlex.join(args.argv)}`, medians of "
          f"{args.rounds} after {FLOOR_WARMUP}")
    print()
    kinds = list(next(iter(results.values())))
    print("| no-op | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{r[kind]:.2f} ms" for r in results.values()) + " |")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5, help="untimed passes per server")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--ingress", nargs="*", default=["proxy"], choices=INGRESSES,
                        help="a Ray Serve server per MEDEXPLAIN_RAY_INGRESS: Serve's proxy "
                             "(Ray's default) and Ray's experimental HAProxy direct ingress")
    parser.add_argument("--before", default=None,
                        help="also `serve --ray` of this checkout, as it comes")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="indexes of the requests to send (default: all)")
    parser.add_argument("--access-log", action="store_true",
                        help="Ray Serve's access logs on; their latencies reported")
    parser.add_argument("--floor", action="store_true",
                        help="measure Ray with a no-op app instead of the service")
    parser.add_argument("--threads", type=int, default=1, help="MEDEXPLAIN_THREADS of both")
    parser.add_argument("--port-base", type=int, default=8700,
                        help="plain server on this port, the Ray Serve ones on the next")
    parser.add_argument("--out", default=None, help="JSON file for rows and samples")
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != INSIDE_MARK]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [FLOOR_MARK]:
        print(json.dumps(floor_child(int(argv[1]), int(argv[2]))))
        return 0
    if INSIDE_MARK in argv:
        args = parse_args([a for a in argv if a != INSIDE_MARK])
        return floor(args) if args.floor else inside(args)
    parse_args(argv)  # errors in the arguments before the namespace
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    command = [sys.executable, str(Path(__file__).resolve()), INSIDE_MARK, *argv]
    return subprocess.call([*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                            *command], cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
