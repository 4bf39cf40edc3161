"""The ``medexplain`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.config import Settings, ValidationError

if TYPE_CHECKING:
    import onnx

    from service.models.spec import Layout


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env(host=args.host, port=args.port, models=args.models,
                                     ray_replicas=args.replicas)
    except ValidationError as exc:
        print(f"medexplain: bad settings: {exc}", file=sys.stderr)  # values hidden: Settings
        return 2
    # Imported once the settings are known good: a bad setting fails in a moment.
    from service import logs
    from service.api.admission import Admission
    from service.main import create_app
    from service.server import serve

    logs.configure(settings.log_level, settings.log_format)
    if args.ray:
        return _serve_ray(settings)
    from service.runtime.memory import keep_freed_memory

    keep_freed_memory()
    admission = Admission(settings)
    serve(create_app(settings, admission=admission), settings, admission)
    return 0


def _serve_ray(settings: Settings) -> int:
    try:
        from service.scaleout import ray_serve
    except ImportError as exc:
        print(f"medexplain: --ray needs the optional extra: pip install 'medexplain[ray]' "
              f"({exc})", file=sys.stderr)
        return 2
    return ray_serve.serve_forever(settings)


def _openapi(args: argparse.Namespace) -> int:
    from service.main import create_app

    spec = create_app(Settings.from_env()).openapi()
    text = json.dumps(spec, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _compile(args: argparse.Namespace) -> int:
    import time

    import onnx
    from google.protobuf.message import DecodeError

    from service.errors import CompileError
    from service.graph import report
    from service.graph.build import compile_model
    from service.graph.target import detect_layout
    from service.models.spec import Layout

    try:
        model = onnx.load(args.model)
    except (OSError, DecodeError) as exc:
        print(f"medexplain compile: cannot read {args.model}: {exc}", file=sys.stderr)
        return 2
    layout = Layout(args.layout) if args.layout else detect_layout(model)
    if layout is None:
        print("medexplain compile: the graph does not show whether its image input is NCHW "
              "or NHWC; give --layout", file=sys.stderr)
        return 2
    shape, problem = _input_shape(model, layout, args.input_size, args.channels)
    if problem is not None:
        print(f"medexplain compile: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        compiled = compile_model(model, layout=layout, activation=args.activation,
                                 target_layer=args.target_layer, input_shape=shape)
    except CompileError as exc:
        print(f"medexplain compile: {exc}", file=sys.stderr)
        return 1
    summary = report.report(model, compiled, time.perf_counter() - start)
    summary["input_shape"] = list(shape) if shape is not None else None
    out = Path(args.out)
    written = report.write(out, compiled)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    target = summary["target_layer"]
    print(f"image input {layout.value}" + ("" if args.layout else " (as the graph shows it)")
          + (f", specialised to {'×'.join(map(str, shape))}" if shape is not None else
             ", not specialised (the graph leaves its size open: give --input-size H W)"))
    print(f"target layer {target['name']} ({target['layout']}, C×H×W "
          f"{'×'.join(map(str, target['shape_chw']))}); compiled in "
          f"{summary['compile_seconds']} s")
    for name, info in summary["graphs"].items():
        print(f"  {name}.onnx: {info['nodes']} nodes ({info['generated_nodes']} generated), "
              f"outputs {', '.join(info['outputs'])}")
    if compiled.head_vjp is None:
        print(f"  no head VJP graph (no Grad-CAM, Guided Grad-CAM): {compiled.head_vjp_error}")
    if compiled.guided is None:
        print(f"  no guided graph: {compiled.guided_error}")
    if compiled.fixations is None:
        print(f"  no CNN Fixations graph: {compiled.fixations_error}")
    print(f"wrote {len(written)} graphs and report.json to {out}")
    return 0


def _input_shape(model: onnx.ModelProto, layout: Layout, size: list[int] | None,
                 channels: int | None) -> tuple[tuple[int, ...] | None, str | None]:
    """(the shape to specialise the graph to, or None; a problem to report, or None).

    ``--input-size`` and ``--channels`` win; what they leave out is read from the graph's
    image input where it is static. Neither given and the graph's size open: no
    specialisation.
    """
    from service.graph.specialise import contradiction, declared_input_shape, image_shape
    from service.models.spec import Layout

    declared = declared_input_shape(model)
    if declared is None or len(declared) != 4:
        declared = [None] * 4
    if size is None and channels is None and None in declared[1:]:
        return None, None
    c, h, w = (3, 1, 2) if layout is Layout.NHWC else (1, 2, 3)
    height, width = size if size is not None else (declared[h], declared[w])
    chans = channels if channels is not None else declared[c]
    if height is None or width is None:
        return None, "the graph leaves the image size open; give --input-size H W"
    if chans is None:
        return None, "the graph leaves the channel count open; give --channels C"
    if min(height, width, chans) <= 0:
        return None, "--input-size and --channels must be positive"
    shape = image_shape(layout, height, width, chans)
    problem = contradiction(model, shape)
    return (None, problem) if problem is not None else (shape, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medexplain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--models", default=None,
                       help="model repository folder (default: the bundled models/)")
    serve.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve replicas (extra 'ray'); joins the "
                            "cluster at RAY_ADDRESS, else starts a local one")
    serve.add_argument("--replicas", type=int, default=None,
                       help="with --ray: number of replicas (default 1; "
                            "MEDEXPLAIN_RAY_REPLICAS)")
    serve.set_defaults(run=_serve)
    comp = sub.add_parser("compile", help="write the graphs the service would run for a model")
    comp.add_argument("model", help="an ONNX classifier")
    comp.add_argument("--out", required=True, help="folder for the graphs and report.json")
    comp.add_argument("--target-layer", default=None,
                      help="ONNX tensor to explain at (default: auto-detected)")
    comp.add_argument("--layout", default=None, choices=["NCHW", "NHWC"],
                      help="layout of the image input (default: as the graph shows it)")
    comp.add_argument("--activation", default=None, choices=["sigmoid", "softmax", "none"],
                      help="how logits become scores, if the graph does not end in one")
    comp.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                      help="image height and width to specialise the graph to, as model.toml "
                           "input.size (default: the graph's, when static)")
    comp.add_argument("--channels", type=int, default=None,
                      help="image channels, as model.toml input.channels (default: the "
                           "graph's, when static)")
    comp.set_defaults(run=_compile)
    spec = sub.add_parser("openapi", help="print or write the OpenAPI document")
    spec.add_argument("--out", default=None, help="file to write (default: stdout)")
    spec.set_defaults(run=_openapi)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
