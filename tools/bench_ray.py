"""What Ray Serve adds per request: the plain server and Ray Serve replicas, side by side.

    .venv/bin/python tools/bench_ray.py [--rounds 300] [--replicas 2] [--threads 1]
        [--ingress proxy [haproxy]] [--out results.json]

What it measures: the client-side wall time of each request in ``REQUESTS`` (``/predict``
and the default ``/explain`` on a 256x256 phantom PNG sent as multipart, and on
pydicom-data's computed radiograph ``RG1_UNCR.dcm``, 7.2 MB, as a raw ``application/dicom``
body), over one keep-alive connection per server on 127.0.0.1, to servers of this checkout
running at the same time: ``medexplain serve`` (plain) and, per ``--ingress`` variant,
``medexplain serve --ray --replicas N`` (a local Ray cluster of its own): ``proxy`` is Ray
Serve as it comes (its proxy actor in front of N replicas), ``haproxy`` the same with Ray
2.60's experimental HAProxy mode switched on (``VARIANT_ENV``). All run with
``MEDEXPLAIN_THREADS`` (default 1: each replica and the plain server compute on one thread,
so the difference is the path through Ray, not the compute).

How it is run: Ray binds its control plane to the machine's interface address, so the
script re-runs itself in a network namespace that has only loopback (``unshare -n``, or
``unshare -r -n`` when not root) and starts both servers there. Every server gets
``--warmup`` untimed passes of every request; then, round after round, each request goes
once to each server, one at a time, the order of the servers and of the requests rotated
every round (tools/bench_http.py's scheme), so that drifts of a shared machine hit both.

How to read it: per request, p50 and p99 of each server and, for the Ray ones, the
difference of the p50s (Ray's overhead per request) and their ratio. A benchmark, not a
test: it asserts nothing about the numbers; non-200 answers are counted and listed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tools import bench_http as http  # noqa: E402

INSIDE_MARK = "--inside-namespace"
# Ray Serve's own switches (ray.serve._private.constants), inherited by the processes of the
# local cluster `serve --ray` starts: "haproxy" is Ray 2.60's experimental HAProxy mode,
# where HAProxy replaces Serve's proxy actors and the replicas take HTTP themselves.
VARIANT_ENV: dict[str, dict[str, str]] = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
}
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
    """``python -m service.cli serve`` of this checkout on the server's port, plus ``extra``."""
    if not http.port_is_free(server.port):
        raise RuntimeError(f"port {server.port} is in use (pick another --port-base)")
    server.log_path = logs / f"{server.label}.log"
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", http.HOST,
             "--port", str(server.port), *extra],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


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


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (1..99), inclusive method; None without values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(samples: list[http.Sample], labels: list[str]) -> list[dict[str, Any]]:
    """Per request and server: p50/p99, and for Ray the p50 over the plain one's."""
    rows = []
    for req in REQUESTS:
        row: dict[str, Any] = {"request": req.name}
        for label in labels:
            mine = [s for s in samples if s.server == label and s.request == req.name]
            ok = [s.wall_ms for s in mine if s.status == 200]
            row[label] = {"n": len(ok), "p50": percentile(ok, 50), "p99": percentile(ok, 99),
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
    lines = ["| request | server | p50 ms | p99 ms | p50 over plain, ms | p50 ÷ plain |",
             "|---|---|---:|---:|---:|---:|"]
    notes = []
    for row in rows:
        for label in labels:
            cell = row[label]
            ratio = "–" if cell.get("ratio_p50") is None else f"{cell['ratio_p50']:.2f}"
            extra = "–" if label == "plain" else fmt(cell["overhead_p50_ms"], 1)
            lines.append(f"| {row['request']} | {label} | {fmt(cell['p50'], 1)} | "
                         f"{fmt(cell['p99'], 1)} | {extra} | {ratio} |")
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
    # HAProxy's files (config, admin socket, state) go there instead of /tmp/haproxy-serve;
    # short, as HAProxy takes socket paths of at most 97 bytes (and adds the node id).
    haproxy_dir = Path(tempfile.mkdtemp(prefix="hx-", dir="/tmp"))
    haproxy_env = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
                   "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
                   "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
                   "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
                   "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy_dir / "metrics.sock")}
    servers = [http.Server("plain", ROOT, args.port_base)]
    servers += [http.Server(f"ray {ingress}", ROOT, args.port_base + 1 + i)
                for i, ingress in enumerate(args.ingress)]
    labels = [s.label for s in servers]
    logs = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    bodies = payloads()
    try:
        for server, ingress in zip(servers[1:], args.ingress, strict=True):
            # One local Ray cluster per server, each with its own Serve.
            start(server, ["--ray", "--replicas", str(args.replicas)],
                  env | VARIANT_ENV[ingress] | (haproxy_env if ingress == "haproxy" else {}),
                  logs)
        start(servers[0], [], env, logs)
        for server in servers:
            print(f"{server.label} ready in {http.wait_ready(server):.1f} s", file=sys.stderr)
        for server in servers:
            for pass_ in range(args.warmup):
                for req in REQUESTS:
                    http.send_safely(server, req, bodies[req.name], -1 - pass_)
        samples: list[http.Sample] = []
        for round_ in range(args.rounds):
            order = http.rotated(servers, round_)
            for req in http.rotated(REQUESTS, round_):
                for server in order:
                    samples.append(http.send_safely(server, req, bodies[req.name], round_))
            if (round_ + 1) % 50 == 0:
                print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
    finally:
        stop(servers[0], http.STOP_TIMEOUT_S)
        for server in servers[1:]:
            stop(server, RAY_STOP_TIMEOUT_S)
        ray_logs = {s.label: s.log_path.read_text(errors="replace")[-20_000:]
                    for s in servers[1:] if s.log_path and s.log_path.exists()}
        shutil.rmtree(logs, ignore_errors=True)
        # Ray 2.60 leaves HAProxy running when its cluster stops; ours name our folder.
        for pid in processes_mentioning(str(haproxy_dir)):
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(haproxy_dir, ignore_errors=True)
    rows = summarize(samples, labels)
    info = versions()
    command = "python tools/bench_ray.py " + shlex.join(args.argv)
    print(f"Machine: {info['cpu']}, nproc {info['nproc']}; Python {info['python']}, "
          f"ray {info['ray']}, onnxruntime {info['onnxruntime']}, numpy {info['numpy']}")
    print(f"Command: `{command}`; MEDEXPLAIN_THREADS={args.threads}, {args.rounds} rounds "
          f"after {args.warmup} warm-up passes")
    print()
    print(markdown(rows, labels))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"machine": info, "command": command, "rows": rows,
             "samples": [s.__dict__ for s in samples], "ray_log_tails": ray_logs},
            indent=1), encoding="utf-8")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=5, help="untimed passes per server")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--ingress", nargs="+", default=["proxy"],
                        choices=sorted(VARIANT_ENV),
                        help="a Ray Serve server per variant: Serve's proxy (Ray's "
                             "default) and Ray's experimental HAProxy mode")
    parser.add_argument("--threads", type=int, default=1, help="MEDEXPLAIN_THREADS of both")
    parser.add_argument("--port-base", type=int, default=8700,
                        help="plain server on this port, the Ray Serve ones on the next")
    parser.add_argument("--out", default=None, help="JSON file for rows and samples")
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != INSIDE_MARK]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if INSIDE_MARK in argv:
        return inside(parse_args([a for a in argv if a != INSIDE_MARK]))
    parse_args(argv)  # errors in the arguments before the namespace
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    command = [sys.executable, str(Path(__file__).resolve()), INSIDE_MARK, *argv]
    return subprocess.call([*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                            *command], cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
