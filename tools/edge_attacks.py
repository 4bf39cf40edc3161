"""What careless clients and attackers do to the HTTP edge, measured on a live server.

Starts ``medexplain serve`` from a source tree (default: this one) with MAX_CONCURRENCY=1,
MAX_QUEUE=2, THREADS=1 and the given timeouts, runs each attack of tests/api/attacks.py
against it and prints one Markdown row per check: run it on an older tree (``git archive
<commit> | tar -x -C DIR``) and on this one for before → after.

    python tools/edge_attacks.py [--tree DIR] [--timeout-s 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.api import attacks
from tests.api.live import live_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="source tree to serve")
    parser.add_argument("--timeout-s", default="1",
                        help="header, body and keep-alive timeouts (a tree without them "
                             "ignores the settings)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="how long a client waits for the server to act")
    args = parser.parse_args()
    t = args.timeout_s
    rows: list[tuple[str, str]] = []
    with live_server(args.tree, max_concurrency="1", max_queue="2", header_timeout_s=t,
                     body_timeout_s=t, keep_alive_timeout_s=t) as live:
        for multipart in (False, True):
            r = attacks.concurrent_uploads(live, clients=16, size=60 * attacks.MIB,
                                           multipart=multipart)
            rows.append((f"16 concurrent 60 MB uploads ({'multipart' if multipart else 'raw'})",
                         (f"{dict(sorted(r.statuses.items()))}, RSS {r.rss_before_mib:.0f} → "
                          f"peak {r.peak_mib:.0f} MiB (+{r.growth_mib:.0f}), {r.seconds:.1f} s")))
        s = attacks.empty_parts(live, size=57 * attacks.MIB, wait=30.0)
        rows.append(("57 MB of empty multipart parts",
                     (f"answer {s.upload_status} after {s.upload_seconds:.1f} s; /healthz max "
                      f"{s.healthz_max_s:.2f} s")))
        lifetimes = attacks.slow_heads(live, clients=20, wait=args.wait)
        rows.append(("20 clients dripping headers at 1 byte/s",
                     (f"kept {min(lifetimes):.1f}-{max(lifetimes):.1f} s (client gives up at "
                      f"{args.wait:g} s)")))
        rows.append(("a connection that sends nothing",
                     f"kept {attacks.silent_connection(live, wait=args.wait):.1f} s"))
        rows.append(("an idle kept-alive connection",
                     f"kept {attacks.idle_keep_alive(live, wait=args.wait):.1f} s"))
        status, seconds = attacks.slow_body(live, wait=args.wait)
        rows.append(("a body at 1 byte/s",
                     f"answer {status} after {seconds:.1f} s" if status else
                     f"no answer within {args.wait:g} s"))
        status, taken, seconds = attacks.after_too_large(live, declared=3 * 10**9,
                                                         budget=512 * attacks.MIB)
        rows.append(("3 GB declared, the client keeps sending after the answer",
                     (f"answer {status}; then {taken / attacks.MIB:.1f} MiB taken "
                      f"(client stops at 512) in {seconds:.1f} s")))
    print(f"| check | {args.tree.name or args.tree} |\n|---|---|")
    for check, result in rows:
        print(f"| {check} | {result} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
