"""HTTP throughput and latency under concurrent load, dynamic batching off against on.

    apt-get install wrk    # the load generator (Debian's package)
    .venv/bin/python tools/make_fixtures.py --bench --bench-out /tmp/densenet121.onnx
    .venv/bin/python tools/bench_load.py [--model demo] [--model densenet121=/tmp/densenet121.onnx]
        [--concurrency 1 4 16] [--duration 20] [--rounds 1] [--threads 2] [--on 8 ...]

For each model, ``medexplain serve`` processes run side by side on 127.0.0.1, the same
settings (``MEDEXPLAIN_THREADS``, default 2) except ``MEDEXPLAIN_MAX_BATCH_SIZE``: 1 (off:
one request per compute batch) and each ``--on`` value (on; 8 by default, the service's
default; ``MAX_QUEUE_DELAY_MS`` 0 in all).
wrk (one thread, ``-c`` connections, ``--latency``) POSTs the same 256×256 phantom PNG as a
raw ``image/png`` body to ``/explain`` with the default parameters (Grad-CAM and CRM of the
labels over the threshold). Only one server is under load at a time: for each round and
concurrency, off then on (the order rotated every round), after an untimed warm-up of each
at the highest concurrency; after every cell the server is let finish what wrk left in
flight (until /metrics shows no request in progress) before the next begins.
Reported per cell: requests per second of 2xx answers, p50 / p99 latency (wrk's
distribution), non-2xx answers, and the server's peak RSS during the cell (VmRSS sampled
every 50 ms). A benchmark, not a test: it asserts nothing about the numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
IMAGE = ROOT / "tests" / "data" / "phantoms" / "cardiomegaly.png"
DENSENET_TOML = """\
name = "densenet121"
description = "DenseNet-121, random weights: a benchmark model"
labels = [{labels}]
[input]
size = [{size}, {size}]
channels = 3
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[output]
activation = "sigmoid"
"""
LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local f = assert(io.open("{image}", "rb"))
wrk.body = f:read("*a")
f:close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def repository(spec: str, root: Path) -> Path:
    """A model folder for ``demo`` (the bundled one) or ``name=file.onnx`` (14 classes)."""
    if spec == "demo":
        return ROOT / "models"
    name, onnx_file = spec.split("=", 1)
    import onnx

    dims = onnx.load(onnx_file, load_external_data=False).graph.input[0].type.tensor_type
    size = dims.shape.dim[2].dim_value
    folder = root / name / name
    folder.mkdir(parents=True)
    shutil.copy(onnx_file, folder / "model.onnx")
    labels = ", ".join(f'"finding {i}"' for i in range(14))
    (folder / "model.toml").write_text(DENSENET_TOML.format(labels=labels, size=size))
    return folder.parent


class Server:
    def __init__(self, models: Path, batch: int, threads: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDEXPLAIN_")}
        env.update(MEDEXPLAIN_MODELS=str(models), MEDEXPLAIN_THREADS=str(threads),
                   MEDEXPLAIN_MAX_BATCH_SIZE=str(batch), MEDEXPLAIN_LOG_LEVEL="warning",
                   PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", HOST, "--port",
             str(self.port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/readyz", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"server exited with {self.proc.returncode}") from None
                time.sleep(0.5)
        raise SystemExit("server did not become ready")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the server has no request in progress: wrk stops with requests in flight,
        and what the server still does for them must not run into the next cell."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=10) as r:
                text = r.read().decode()
            m = re.search(r"^medexplain_pending_requests ([\d.e+-]+)$", text, re.MULTILINE)
            if m is not None and float(m.group(1)) == 0:
                return
            time.sleep(0.1)
        raise SystemExit("the server did not become idle between cells")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(server: Server, connections: int, duration: int, script: Path) -> dict[str, float]:
    peak = [server.rss_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak.append(server.rss_mb())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "60s",
             "-s", str(script), f"http://{HOST}:{server.port}/explain"],
            capture_output=True, text=True, check=True, timeout=duration + 120).stdout
    finally:
        done.set()
        sampler.join()
    server.wait_idle()
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    seconds = _ms(re.search(r"requests in ([\d.]+\w+),", out).group(1)) / 1e3  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(bad.group(1)) if bad else 0
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.MULTILINE))
    return {"rps": (total - non2xx) / seconds, "p50": _ms(lat["50"]), "p99": _ms(lat["99"]),
            "non2xx": non2xx, "rss": max(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help="demo, or name=path.onnx (a 14-class classifier); repeatable")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--on", type=int, nargs="+", default=[8], metavar="N",
                    help="MEDEXPLAIN_MAX_BATCH_SIZE of the batching servers (default 8); "
                         "each value is one more server beside the unbatched one")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    batches = {"off": 1, **{f"on ({n})" if len(args.on) > 1 else "on": n for n in args.on}}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(LUA.format(image=IMAGE))
        for spec in args.model or ["demo"]:
            models = repository(spec, Path(tmp))
            servers = {mode: Server(models, batch, args.threads)
                       for mode, batch in batches.items()}
            try:
                for server in servers.values():
                    # Warm-up at the highest concurrency: batches of every size a cell
                    # makes have run once (their first run allocates).
                    run_wrk(server, max(args.concurrency), 3, script)
                cells: dict[tuple[str, int], list[dict[str, float]]] = {}
                modes = list(servers)
                for round_ in range(args.rounds):
                    for c in args.concurrency:
                        # The order of the servers rotates every round.
                        shift = round_ % len(modes)
                        for mode in modes[shift:] + modes[:shift]:
                            cells.setdefault((mode, c), []).append(
                                run_wrk(servers[mode], c, args.duration, script))
            finally:
                for server in servers.values():
                    server.close()
            name = spec.split("=")[0]
            print(f"\n{name}: /explain (gradcam,crm), {args.duration} s per cell, "
                  f"{args.rounds} round(s), {args.threads} ONNX Runtime threads")
            print("| concurrency | batching | req/s | p50 ms | p99 ms | non-2xx | peak RSS MB |")
            print("|---:|---|---:|---:|---:|---:|---:|")
            for c in args.concurrency:
                medians = {}
                for mode in modes:
                    runs = cells[(mode, c)]
                    med = medians[mode] = {k: sorted(r[k] for r in runs)[len(runs) // 2]
                                           for k in runs[0]}
                    print(f"| {c} | {mode} | {med['rps']:.2f} | {med['p50']:.0f} | "
                          f"{med['p99']:.0f} | {int(med['non2xx'])} | {med['rss']:.0f} |")
                off = medians["off"]
                for mode in modes[1:]:
                    on = medians[mode]
                    print(f"|  | {mode} ÷ off | {on['rps'] / off['rps']:.2f} | "
                          f"{on['p50'] / off['p50']:.2f} | {on['p99'] / off['p99']:.2f} | | |")


if __name__ == "__main__":
    main()
