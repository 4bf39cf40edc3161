"""Status, peak RSS and latency of hostile uploads, several checkouts side by side.

    .venv/bin/python tools/bench_hostile.py --server LABEL=CHECKOUT_DIR [...] [--rounds 2]
        [--port-base 8700] [--threads 2]

What it measures: for each upload in ``cases()`` (decompression bombs generated on the fly by
``tests/imaging/bombs.py``, and one ordinary radiograph as a control), the answer's status,
the client-side wall time, and the server process's peak resident memory while it handled
that request (Linux ``VmHWM`` after resetting it through ``/proc/PID/clear_refs``), next to
the resident memory just before. Each ``--server`` is a checkout started as its own
``medexplain serve`` on 127.0.0.1 (only ``MEDEXPLAIN_THREADS`` is set), importing that
checkout's ``service`` package.

How it is run: every server is up at once; each round sends every case to each server, one
request at a time, the server order alternating every round. Medians over the rounds. A
benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.imaging import bombs

READY_TIMEOUT_S = 180.0
CHILD_CODE = """\
import sys
checkout = sys.argv.pop(1)
sys.path.insert(0, checkout)
from service.cli import main
sys.argv[0] = "medexplain"
raise SystemExit(main())
"""


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes
    content_type: str


def cases() -> list[Case]:
    """The uploads, each a few KB to a few hundred KB."""
    control = (ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm").read_bytes()
    return [
        Case("control: phantom DICOM 256x256", "/explain", control, "application/dicom"),
        Case("PNG 7000x7000 grey", "/explain", bombs.png_bomb(7000, 7000), "image/png"),
        Case("PNG 7000x7000 RGB", "/explain", bombs.png_bomb(7000, 7000, colour_type=2),
             "image/png"),
        Case("JP2 decoy SIZ, 16000x16000 codestream", "/explain",
             bombs.j2k_decoy_dicom(16000), "application/dicom"),
        Case("deflated DICOM inflating to 500 MiB", "/explain", bombs.deflate_bomb(500 << 20),
             "application/dicom"),
    ]


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Server:
    label: str
    checkout: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self, threads: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDEXPLAIN_")}
        env["MEDEXPLAIN_THREADS"] = str(threads)
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, str(self.checkout), "serve", "--port",
             str(self.port)], cwd=self.checkout, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} did not become ready")

    def send(self, case: Case) -> tuple[int, float, int, int]:
        """(status, wall ms, RSS before MiB, peak RSS MiB) of one request."""
        assert self.process is not None
        pid = self.process.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _proc_kib(pid, "VmRSS")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", case.path, body=case.body,
                     headers={"content-type": case.content_type})
        response = conn.getresponse()
        response.read()
        wall = (time.perf_counter() - start) * 1000
        conn.close()
        peak = _proc_kib(pid, "VmHWM")
        return response.status, wall, before // 1024, peak // 1024

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port-base", type=int, default=8700)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    servers = []
    for i, spec in enumerate(args.server):
        label, _, directory = spec.partition("=")
        servers.append(Server(label, Path(directory).resolve(), args.port_base + i))
    uploads = cases()
    results: dict[tuple[str, str], list[tuple[int, float, int, int]]] = {}
    try:
        for server in servers:
            server.start(args.threads)
        for server in servers:
            server.wait_ready()
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for case in uploads:
                for server in order:
                    results.setdefault((server.label, case.name), []).append(server.send(case))
    finally:
        for server in servers:
            server.stop()
    print(f"python {platform.python_version()}, {platform.machine()}, rounds {args.rounds}, "
          f"threads {args.threads}")
    print("| upload | bytes | " + " | ".join(
        f"{s.label}: status, ms, RSS before → peak MiB" for s in servers) + " |")
    print("|---|---:|" + "---|" * len(servers))
    for case in uploads:
        cells = []
        for server in servers:
            samples = results[(server.label, case.name)]
            statuses = sorted({s[0] for s in samples})
            wall = statistics.median(s[1] for s in samples)
            before = statistics.median(s[2] for s in samples)
            peak = max(s[3] for s in samples)
            cells.append(f"{'/'.join(map(str, statuses))}, {wall:.0f}, "
                         f"{before:.0f} → {peak:.0f}")
        print(f"| {case.name} | {len(case.body):,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
