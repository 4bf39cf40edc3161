"""A real radiograph through the C-STORE SCP and on to a PACS, several checkouts at once.

    .venv/bin/python tools/bench_dimse.py [--server LABEL=CHECKOUT_DIR ...] [--rounds 5]
        [--outputs sc,sr] [--query methods=gradcam,crm] [--threads 2] [--port-base 8700]

What it measures: the wall time of DCMTK's ``storescu`` sending pydicom-data's computed
radiograph ``RG1_UNCR.dcm`` (1841x1955, 7.2 MB) to a ``medexplain serve`` with its DICOM
SCP on (``MEDEXPLAIN_DICOM_PORT``), from the command's start to its exit: the
association, the C-STORE, the service explaining the image through its own /explain, and
delivering every result by C-STORE to DCMTK's ``storescp`` (the destination, writing to a
temporary folder) before it answers the status. Also the SCP's own time for the image (its
log line), the status and how many objects arrived at the destination.

How it is run: each ``--server`` is a checkout started as its own process (tools/
bench_http.py's child, same settings: ``MEDEXPLAIN_THREADS`` and the DICOM settings below;
any other ``MEDEXPLAIN_*`` of the caller's environment is dropped). One untimed send to
each, then rounds, each sending once to every server in rotated order. Everything is on
127.0.0.1. A benchmark, not a test: it asserts nothing about the numbers.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tools import bench_http as http
from tools.bench_load import free_port

DESTINATION = "BENCHPACS"
CALLING = "BENCHSCU"
SEND_TIMEOUT_S = 600
_RESPONSE = re.compile(r"Received Store Response \((.*)\)")
_LINE = re.compile(rf"C-STORE from {CALLING}: (0x[0-9A-F]{{4}}) (.*) \((\d+\.\d) s\)$")


def _listening(port: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((http.HOST, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"bench_dimse: {name} not found (DCMTK: `bash scripts/system-deps.sh`)")
    return path


def send(storescu: str, port: int, path: Path) -> tuple[float, str]:
    """storescu's wall seconds, and the response it reports (or its exit code)."""
    start = time.perf_counter()
    done = subprocess.run([storescu, "-v", "-aet", CALLING, "-aec", "MEDEXPLAIN", http.HOST,
                           str(port), str(path)], capture_output=True, text=True,
                          timeout=SEND_TIMEOUT_S, check=False)
    seconds = time.perf_counter() - start
    response = _RESPONSE.search(done.stdout + done.stderr)
    return seconds, response.group(1) if response else f"no response, exit {done.returncode}"


def scp_lines(server: http.Server) -> list[tuple[str, str, float]]:
    """(status, what, seconds) of every C-STORE the server's log reports so far."""
    found = []
    for line in http.log_tail(server, 10_000_000).splitlines():
        match = _LINE.search(line)
        if match:
            found.append((match.group(1), match.group(2), float(match.group(3))))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", type=http.parse_server, default=None,
                        help="LABEL=CHECKOUT_DIR (repeatable; default: this checkout)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outputs", default="sc,sr", help="MEDEXPLAIN_DICOM_OUTPUTS")
    parser.add_argument("--query", default="methods=gradcam,crm", help="MEDEXPLAIN_DICOM_QUERY")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="MEDEXPLAIN_DICOM_TIMEOUT_S (default: the service's)")
    parser.add_argument("--destination-options", default="",
                        help="more storescp options, e.g. '--sleep-during 60' for a "
                             "destination that holds its C-STORE responses")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port-base", type=int, default=8700)
    args = parser.parse_args(argv)
    storescu, storescp = _tool("storescu"), _tool("storescp")
    image = http.radiograph_path()
    servers = [http.Server(label, checkout, args.port_base + 2 * i)
               for i, (label, checkout) in enumerate(args.server or [("this", ROOT)])]
    command = shlex.join(["python", "tools/bench_dimse.py", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="bench_dimse-") as scratch:
        received = Path(scratch) / "received"
        received.mkdir()
        pacs_port = free_port()
        pacs = subprocess.Popen([storescp, "-aet", DESTINATION, "-od", str(received),
                                 *shlex.split(args.destination_options), str(pacs_port)],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            if not _listening(pacs_port):
                sys.exit("bench_dimse: storescp did not start listening")
            for server in servers:
                server.revision = http.git_revision(server.checkout)
                env = http.child_env(args.threads) | {
                    "MEDEXPLAIN_DICOM_PORT": str(server.port + 1),
                    "MEDEXPLAIN_DICOM_DESTINATION": f"{DESTINATION}@{http.HOST}:{pacs_port}",
                    "MEDEXPLAIN_DICOM_OUTPUTS": args.outputs,
                    "MEDEXPLAIN_DICOM_QUERY": args.query,
                } | ({} if args.timeout_s is None else
                     {"MEDEXPLAIN_DICOM_TIMEOUT_S": f"{args.timeout_s:g}"})
                http.start_server(server, env, Path(scratch))
            for server in servers:
                http.wait_ready(server)
                server.service_file = http.imported_from(server)
            samples: dict[str, list[tuple[float, str, int]]] = {s.label: [] for s in servers}
            for round_ in range(args.rounds + 1):  # round 0: the untimed warm-up
                for server in http.rotated(servers, round_):
                    before = len(list(received.iterdir()))
                    seconds, response = send(storescu, server.port + 1, image)
                    arrived = len(list(received.iterdir())) - before
                    if round_:
                        samples[server.label].append((seconds, response, arrived))
        finally:
            for server in servers:
                http.stop_server(server)
            pacs.kill()
            pacs.wait(timeout=10)
        info = http.machine()
        print(f"Machine: {info['cpu']}, nproc {info['nproc']}; Python {info['python']}, "
              f"onnxruntime {info['onnxruntime']}")
        print(f"Command: `{command}`")
        print(f"MEDEXPLAIN_THREADS={args.threads}, MEDEXPLAIN_DICOM_OUTPUTS={args.outputs}, "
              f"MEDEXPLAIN_DICOM_QUERY={args.query}"
              + ("" if args.timeout_s is None else
                 f", MEDEXPLAIN_DICOM_TIMEOUT_S={args.timeout_s:g}")
              + (f"; storescp {args.destination_options}" if args.destination_options else "")
              + f"; {args.rounds} round(s) after one warm-up send")
        for server in servers:
            print(f"- {server.label}: {server.revision or 'no git'}, service from "
                  f"{server.service_file}")
        print()
        print("| server | storescu s (median) | min – max | SCP s (median) | SCP's status | "
              "storescu's response | objects arrived per image |")
        print("|---|---:|---:|---:|---|---|---:|")
        for server in servers:
            walls = [s for s, _, _ in samples[server.label]]
            lines = scp_lines(server)[1:]  # the warm-up's first
            statuses = sorted({status for status, _, _ in lines}) or ["?"]
            responses = sorted({r for _, r, _ in samples[server.label]})
            arrived = sorted({n for _, _, n in samples[server.label]})
            print(f"| {server.label} | {statistics.median(walls):.2f} | {min(walls):.2f} – "
                  f"{max(walls):.2f} | "
                  f"{statistics.median(s for _, _, s in lines) if lines else float('nan'):.1f} "
                  f"| {', '.join(statuses)} | {', '.join(responses)} | "
                  f"{', '.join(map(str, arrived))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
