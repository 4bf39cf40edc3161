"""The ``medexplain`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.config import Settings, ValidationError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    try:
        settings = Settings.from_env(host=args.host, port=args.port, models=args.models)
    except ValidationError as exc:
        print(f"medexplain: bad settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level)
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from service.main import create_app

    spec = create_app(Settings.from_env()).openapi()
    text = json.dumps(spec, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medexplain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--models", default=None,
                       help="model repository folder (default: the bundled models/)")
    serve.set_defaults(run=_serve)
    spec = sub.add_parser("openapi", help="print or write the OpenAPI document")
    spec.add_argument("--out", default=None, help="file to write (default: stdout)")
    spec.set_defaults(run=_openapi)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
