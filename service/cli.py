"""The medexplain command: serve the HTTP API, explain one file, compile a model, write the
OpenAPI document."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service import __version__
from service.config import Settings, ValidationError

if TYPE_CHECKING:
    import onnx

    from service.api.request import ExplainParams
    from service.models.repository import Served
    from service.models.spec import Layout
    from service.outputs.base import DicomOutput
    from service.outputs.transfer_syntax import TransferSyntax
    from service.pipeline import ExplainOptions


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
    from service.errors import TlsError
    from service.main import create_app
    from service.server import serve
    from service.tls import server_context

    if args.ray and settings.tls_pair is not None:
        # Serve's proxies (or HAProxy) take the connections there, and a joined cluster's
        # were started with their own options: TLS ends in front of the cluster.
        print("medexplain: MEDEXPLAIN_TLS_* are for the plain server; under Ray Serve end "
              "TLS in front of the cluster (a load balancer, a Kubernetes Ingress)",
              file=sys.stderr)
        return 2
    try:  # before the models load: a bad certificate fails in a moment
        tls = server_context(settings)
    except TlsError as exc:
        print(f"medexplain: TLS: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.ray:
        return _serve_ray(settings)
    from service.runtime.memory import keep_freed_memory

    keep_freed_memory()
    admission = Admission(settings)
    serve(create_app(settings, admission=admission), settings, admission, tls)
    return 0


def _serve_ray(settings: Settings) -> int:
    try:
        from service.scaleout import ray_serve
    except ImportError as exc:
        print(f"medexplain: --ray needs the optional extra: pip install 'medexplain[ray]' "
              f"({exc})", file=sys.stderr)
        return 2
    return ray_serve.serve_forever(settings)


# The explain subcommand's options that are /explain's parameters (flag -> parameter).
_EXPLAIN_PARAMETERS = ("model", "methods", "classes", "heatmap", "size", "target",
                       "region_threshold", "score_threshold", "frame", "window")


def _explain(args: argparse.Namespace) -> int:
    """Files through the pipeline /explain runs, with no server: for each, the JSON answer,
    each map as its own file, and the DICOM objects asked for. The model loads once."""
    from service import outputs
    from service.api.request import ExplainParams, parse_params
    from service.errors import ModelError, ServiceError
    from service.main import open_repository
    from service.outputs.base import Packaging
    from service.outputs.transfer_syntax import TRANSFER_SYNTAXES

    try:
        settings = Settings.from_env(models=args.models)
    except ValidationError as exc:
        print(f"medexplain explain: bad settings: {exc}", file=sys.stderr)
        return 2
    pairs = [(name, str(getattr(args, name))) for name in _EXPLAIN_PARAMETERS
             if getattr(args, name) is not None]
    try:
        params: ExplainParams = parse_params(ExplainParams, pairs)
        repository = open_repository(settings)
        model = repository.get(params.model)
        options = outputs.JSON_OUTPUT.options(params, model, Packaging.JSON)
    except (ServiceError, ModelError) as exc:
        print(f"medexplain explain: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 2
    wanted = [outputs.DICOM_OUTPUTS[name] for name in dict.fromkeys(args.dicom or ())]
    syntax = TRANSFER_SYNTAXES[args.transfer_syntax]
    sources = [Path(name) for name in args.file]
    failed = 0
    for source, folder in zip(sources, _folders(sources, Path(args.out)), strict=True):
        files = _explain_file(source, wanted, syntax, params, options, settings, model)
        if files is None:
            failed += 1
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (folder / name).write_bytes(content)
            print(folder / name)
    return 2 if failed else 0


def _folders(sources: list[Path], out: Path) -> list[Path]:
    """Where each file's answer goes: ``out`` itself for one file; for several, a folder
    per file named after it (``-2``, ``-3``, ... when names repeat)."""
    if len(sources) == 1:
        return [out]
    names: list[str] = []
    for source in sources:
        stem = name = _file_part(source.stem) or "image"
        n = 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return [out / name for name in names]


def _explain_file(source: Path, wanted: list[DicomOutput], syntax: TransferSyntax,
                  params: ExplainParams, options: ExplainOptions, settings: Settings,
                  model: Served) -> dict[str, bytes] | None:
    """One file's answer as named files (the DICOM objects of ``wanted`` in ``syntax``);
    None (said on stderr) when it has none."""
    from service import outputs, pipeline
    from service.api.routes.explain import decode_upload, input_size
    from service.errors import ModelError, ServiceError
    from service.outputs.base import Packaging

    try:
        data = source.read_bytes()
    except OSError as exc:
        print(f"medexplain explain: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return None
    try:
        full = any(o.full_resolution for o in wanted)
        image = decode_upload(data, None, params, settings, model,
                              None if full else input_size(model, settings))
        refused = [o for o in wanted if not o.accepts(image)]
        if refused:
            print(f"medexplain explain: dicom {refused[0].name} needs {refused[0].needs}; "
                  f"{source.name} is {image.format}", file=sys.stderr)
            return None
        result = pipeline.explain(model, image, options, pipeline.Stopwatch())
        answer = bytes(outputs.JSON_OUTPUT.render(result, params, Packaging.JSON).body)
        files = {"explanation.json": answer}
        for number, item in enumerate(json.loads(answer)["explanations"], start=1):
            stem = "-".join([f"{number:02d}", item["method"],
                             *([_file_part(item["label"])] if item["label"] else [])])
            suffix = {"png": ".png", "npy": ".npy", "overlay": ".jpg"}[item["heatmap"]["encoding"]]
            files[stem + suffix] = base64.b64decode(item["heatmap"]["data"])
        for output in wanted:
            parts = output.objects(result, params, Packaging.MULTIPART, syntax)
            for number, part in enumerate(parts, start=1):
                name = output.name if len(parts) == 1 else f"{output.name}-{number:02d}"
                files[f"{name}.dcm"] = part.data
    except (ServiceError, ModelError) as exc:
        print(f"medexplain explain: {source.name}: {getattr(exc, 'detail', exc)}",
              file=sys.stderr)
        return None
    return files


def _file_part(label: str) -> str:
    """A label as part of a file name: letters, digits, '-' and '_' only."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


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
    from service.graph.build import Capability, compile_model
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
    if Capability.POOLED_HEAD not in compiled.graphs:
        print(f"  no pooled head graph: {compiled.errors.get(Capability.POOLED_HEAD)}")
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
    parser = argparse.ArgumentParser(
        prog="medexplain", description=__doc__,
        epilog="Run 'medexplain COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"medexplain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    _explain_parser(sub)
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


def _explain_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from service.methods import METHODS
    from service.outputs import DICOM_OUTPUTS
    from service.outputs.transfer_syntax import DEFAULT as DEFAULT_SYNTAX
    from service.outputs.transfer_syntax import TRANSFER_SYNTAXES

    exp = sub.add_parser(
        "explain", help="explain image files, with no server",
        description="Explain DICOM, PNG or JPEG files as POST /explain would, with no "
                    "server (the model loads once): writes explanation.json (the /explain "
                    "answer), each map as a file (NN-method-label.png), and the DICOM "
                    "objects --dicom names; for several files, each into a folder of its "
                    "own named after it. Exit status 2 when any file got no answer.")
    exp.add_argument("file", nargs="+", help="the images: DICOM, PNG or JPEG")
    exp.add_argument("--out", default=".", help="folder to write into (default: here)")
    exp.add_argument("--models", default=None,
                     help="model repository folder (default: the bundled models/)")
    exp.add_argument("--model", default=None, help="model name (default: the default model)")
    exp.add_argument("--methods", default=None,
                     help=f"comma list of {', '.join(METHODS)} (default: gradcam,crm)")
    exp.add_argument("--classes", default=None,
                     help="comma list of labels or indices (default: labels scoring at least "
                          "--score-threshold, at least the top one)")
    exp.add_argument("--heatmap", default=None, choices=["png", "npy", "overlay"],
                     help="map files: png (8-bit, default), npy (float32 raw) or overlay (JPEG)")
    exp.add_argument("--size", default=None, choices=["model", "original", "feature"],
                     help="grid of the maps (default: model)")
    exp.add_argument("--target", default=None, choices=["logit", "probability"],
                     help="score differentiated or perturbed (default: logit)")
    exp.add_argument("--region-threshold", dest="region_threshold", default=None, type=float,
                     help="cut on the normalised map for region boxes (default 0.5)")
    exp.add_argument("--score-threshold", dest="score_threshold", default=None, type=float,
                     help="score from which a label is explained by default (default 0.5)")
    exp.add_argument("--frame", default=None, type=int,
                     help="0-based frame of a multi-frame DICOM (default 0)")
    exp.add_argument("--window", default=None,
                     help="DICOM window 'center,width', or 'none' for min-max scaling")
    exp.add_argument("--dicom", action="append", choices=list(DICOM_OUTPUTS),
                     help="also write DICOM objects in the source study (DICOM files "
                          "only): " + "; ".join(f"{name}, {output.summary}"
                                                for name, output in DICOM_OUTPUTS.items())
                          + "; repeat for several")
    exp.add_argument("--transfer-syntax", dest="transfer_syntax",
                     default=str(DEFAULT_SYNTAX.uid), choices=list(TRANSFER_SYNTAXES),
                     metavar="UID",
                     help="transfer syntax of the captures' pixels: "
                          + ", ".join(f"{uid} ({uid.name})" for uid in TRANSFER_SYNTAXES)
                          + f"; default {DEFAULT_SYNTAX.uid}")
    exp.set_defaults(run=_explain)


if __name__ == "__main__":
    raise SystemExit(main())
