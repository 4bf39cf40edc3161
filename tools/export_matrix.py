"""Real architectures through real exporters: does the service load them, and are its
gradients exact?

Usage (the tools extra, ``make tools``, plus timm; see "Installs" below):
    .venv/bin/python tools/export_matrix.py [--arch NAME ...] [--exporter dynamo|legacy ...]
        [--checkout DIR] [--out results.json] [--md results.md] [--keep]
    .venv/bin/python tools/export_matrix.py --list

For every (architecture, exporter) row, in a fresh process of its own:

1. The architecture is built with seeded random weights (``pretrained=False``; nothing is
   downloaded), 3 channels, a 4-class linear head (re-initialised N(0, 1/fan_in)), 224²
   input (inception_v3: 299²). BatchNorm layers get random affine parameters and running
   statistics from one train-mode pass over 4 random images, so activations stay O(1) as
   in a trained network (tools/make_fixtures.py does the same).
2. It is exported to a temporary folder (never the repository) with one exporter:
   ``dynamo``: ``torch.onnx.export(..., dynamo=True, opset_version=20, external_data=False)``
   (the default exporter and opset; weights inside model.onnx); ``legacy``:
   ``torch.onnx.export(..., dynamo=False, opset_version=17)``; ``dynamo-extdata`` (not in
   the default set): the dynamo export with every default, i.e. weights in
   ``model.onnx.data`` beside ``model.onnx``. Input ``image``, output ``logits`` (raw
   logits: the sigmoid is applied by model.toml's ``activation = "sigmoid"``), batch axis
   dynamic (``dynamic_axes``) unless ``--static-batch``.
3. A model.toml is written (4 labels, input size, 3 channels, ImageNet mean/std, NCHW,
   sigmoid) and the folder is loaded by the service's own loader
   (``service.models.repository.load_model``) in a *second* fresh process that never imports
   torch, with ``--checkout`` first on ``sys.path`` (``service.__file__`` is checked to lie in
   it). That process records: whether it compiles (else the error text), load seconds
   (``LoadedModel.load_seconds``: read, compile, sessions), the RSS the load added (psutil,
   or /proc/self/status VmRSS; peak from VmHWM), the methods available and
   ``LoadedModel.unavailable``, the time of a plain ONNX Runtime session on the same file,
   and the service's own results on one input: target activations and logits
   (``Engine.forward``), Grad-CAM (``METHODS["gradcam"]`` on ``Engine.capture``, logit target) and
   the guided-backprop gradient w.r.t. the network input (``Engine.guided``).
4. Back in the torch process, the same weights in float64 give the references for the
   class the float64 network scores highest:

   * **Grad-CAM at the service's own target layer.** The ONNX target tensor is mapped back
     to torch by value: the forward pass runs under a ``TorchFunctionMode`` that keeps the
     output of every torch call (functional ops too: torchvision's DenseNet applies its last
     ReLU with ``F.relu``, not a module) whose shape is the target's, (1, C, H, W) or
     (1, H, W, C); the one whose values are closest to the service's activations (ties: the
     latest) is the torch target, and its module path, op and activation error are
     recorded (``target_act_err``; rows above 1e-3 are flagged, and no Grad-CAM is compared
     when nothing matches). The gradient of the class logit w.r.t. that very tensor
     (``torch.autograd.grad``; a tensor modified in place after it is skipped) gives
     α and the map ReLU(Σ α_k A_k), compared on the target grid.
   * **Guided backprop**: the gradient of the class logit w.r.t. the network input, with the
     guided rule (backward = ReLU(incoming) · [0 < x (< max)]) applied, by the same function
     mode, to torch's real rectifiers: ``relu``, ``relu6``, ``hardtanh``/``clamp`` with min 0,
     ``leaky_relu``, ``prelu`` (functional, method and in-place forms; modules reach them
     through ``F.*``). A call made inside a hard-sigmoid/hard-swish module is not a
     rectifier and keeps its true derivative, as do GELU, SiLU, HardSwish, Sigmoid.
     ``guided_gated`` counts the gated torch calls; ``onnx_rectifiers`` the ONNX nodes the
     service may treat as rectifiers (Relu, LeakyRelu, PRelu, Clip with min 0).
   * **Scores**: max |sigmoid(service logits) − sigmoid(torch float64 logits)|.

   Relative error = max |ours − torch| / max |torch|. The same references computed by torch
   in float32 give the float32 floor of each error (``*_f32_floor``): an error near its
   floor is float32 rounding (e.g. a ReLU input within rounding of 0), not a wrong rule.

Output: the rows as JSON (``--out``) and a markdown table (``--md``, default: ``--out`` with
.md) headed by the machine, the versions and the exact command; both are rewritten after
every row, so an interrupted run keeps what it measured.

Installs: ``make tools`` (pyproject.toml's ``tools`` extra: torch 2.13.0 CPU, torchvision
0.28.0, timm, onnxscript for the dynamo exporter, psutil). torchvision must stay pinned to
the release built for torch 2.13 (unpinned, timm's dependency on it makes pip replace torch
with a newer CUDA build). That wheel is built against CUDA torch: its compiled ops
(``_C.so``) need libtorch_cuda and do not load under CPU torch, and ``import torchvision``
then fails in ``_meta_registrations`` on ``torchvision::nms``. The model code needs none of
those ops, so when ``_C.so`` cannot load this tool declares the two op schemas that import
needs (nms, qnms; no kernels: calling them raises) before importing torchvision or timm.
``HF_HUB_OFFLINE=1`` is set and every model is built with ``pretrained=False``: nothing
touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LABELS = ("Class A", "Class B", "Class C", "Class D")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SEED = 20240
METHOD_NAMES = ("crm", "crm_combined", "gradcam", "guided_backprop", "guided_gradcam",
                "fixations")
EXPORTERS = ("dynamo", "legacy", "dynamo-extdata")
DEFAULT_EXPORTERS = ("dynamo", "legacy")
# A torch tensor "is" the ONNX target when its values agree to float32 precision.
ACT_TOL = 1e-3
ROW_TIMEOUT_S = 1800
SERVICE_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Arch:
    """One architecture: where it comes from and its input size."""

    name: str             # the row's name, "<source>/<model>"
    source: str           # "torchvision" or "timm"
    builder: str          # torchvision.models.<builder> or timm.create_model(<builder>)
    size: int = 224
    kwargs: dict[str, object] = field(default_factory=dict)


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("tv/resnet50", "torchvision", "resnet50"),
    Arch("tv/densenet121", "torchvision", "densenet121"),
    Arch("tv/vgg16", "torchvision", "vgg16"),
    Arch("tv/efficientnet_b0", "torchvision", "efficientnet_b0"),
    Arch("tv/inception_v3", "torchvision", "inception_v3", 299,
         {"aux_logits": False, "init_weights": True}),
    Arch("tv/shufflenet_v2_x1_0", "torchvision", "shufflenet_v2_x1_0"),
    Arch("tv/mobilenet_v2", "torchvision", "mobilenet_v2"),
    Arch("tv/mnasnet1_0", "torchvision", "mnasnet1_0"),
    Arch("tv/mobilenet_v3_large", "torchvision", "mobilenet_v3_large"),
    Arch("timm/convnext_tiny", "timm", "convnext_tiny"),
    Arch("timm/ghostnet_100", "timm", "ghostnet_100"),
    Arch("timm/mobilenetv3_large_100", "timm", "mobilenetv3_large_100"),
    Arch("timm/regnety_008", "timm", "regnety_008"),
    Arch("timm/vit_tiny_patch16_224", "timm", "vit_tiny_patch16_224"),
    # Not in the default set.
    Arch("timm/efficientnet_b0", "timm", "efficientnet_b0"),
    Arch("timm/resnet50", "timm", "resnet50"),
    Arch("tv/regnet_y_800mf", "torchvision", "regnet_y_800mf"),
    Arch("timm/deit_tiny_patch16_224", "timm", "deit_tiny_patch16_224"),
    Arch("timm/deit_tiny_distilled_patch16_224", "timm", "deit_tiny_distilled_patch16_224"),
    Arch("timm/swin_tiny_patch4_window7_224", "timm", "swin_tiny_patch4_window7_224"),
)}
DEFAULT_ARCHS = tuple(list(ARCHS)[:14])


def resolve_arch(name: str) -> Arch:
    """An architecture by row name, or by its bare model name when that is unambiguous."""
    if name in ARCHS:
        return ARCHS[name]
    hits = [a for a in ARCHS.values() if a.builder == name or a.name.split("/", 1)[1] == name]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise SystemExit(f"unknown architecture {name!r}; --list shows them")
    raise SystemExit(f"{name!r} is ambiguous: {', '.join(a.name for a in hits)}")


# --- pure helpers (tested without torch) --------------------------------------------------


def rel_err(got: object, want: object) -> float:
    """max |got - want| / max |want| over whole arrays (inf when the shapes differ)."""
    import numpy as np

    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return float("inf")
    scale = float(np.abs(w).max()) if w.size else 0.0
    diff = float(np.abs(g - w).max()) if w.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def model_toml(size: tuple[int, int], *, channels: int = 3, labels: Sequence[str] = LABELS,
               mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
               layout: str = "NCHW", activation: str = "sigmoid") -> str:
    """The model.toml of one exported row."""
    def floats(xs: Sequence[float]) -> str:
        return "[" + ", ".join(repr(float(x)) for x in xs) + "]"
    names = ", ".join(json.dumps(label) for label in labels)
    return (f"labels = [{names}]\n"
            "[input]\n"
            f"size = [{int(size[0])}, {int(size[1])}]\n"
            f"channels = {int(channels)}\n"
            f"mean = {floats(mean)}\n"
            f"std = {floats(std)}\n"
            f'layout = "{layout}"\n'
            "[output]\n"
            f'activation = "{activation}"\n')


def parse_status_kb(text: str, key: str) -> float | None:
    """A ``Key:  123 kB`` line of /proc/<pid>/status, in MB (None when absent)."""
    m = re.search(rf"^{re.escape(key)}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024.0 if m else None


def rss_mb() -> tuple[float | None, float | None]:
    """(current RSS, peak RSS) of this process in MB: psutil for the first when it is there,
    /proc/self/status (VmRSS, VmHWM) otherwise and for the peak."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        text = ""
    now, peak = parse_status_kb(text, "VmRSS"), parse_status_kb(text, "VmHWM")
    try:
        import psutil
        now = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    return now, peak


def shorten(text: str | None, limit: int = 110) -> str:
    """One line, at most ``limit`` characters, for a table cell."""
    if not text:
        return ""
    one = " ".join(str(text).split())
    one = one.replace("|", "/")
    return one if len(one) <= limit else one[:limit - 1] + "…"


def failure_reason(row: dict[str, object]) -> str:
    """The row's first problem, shortened: export, load, or the unavailable methods."""
    for key in ("export_error", "load_error", "worker_error", "service_error"):
        if row.get(key):
            return shorten(str(row[key]))
    notes = []
    unavailable = row.get("unavailable") or {}
    assert isinstance(unavailable, dict)
    seen: set[str] = set()
    for method, reason in unavailable.items():
        reason = str(reason)
        if reason in seen:
            continue
        seen.add(reason)
        notes.append(f"{method}: {shorten(reason, 90)}")
    for key in ("reference_error", "target_note", "gradcam_error", "guided_error_text"):
        if row.get(key):
            notes.append(shorten(str(row[key]), 90))
    return shorten("; ".join(notes), 200)


def methods_cell(row: dict[str, object]) -> str:
    """``6/6``, or ``3/6 (no guided_backprop, ...)``, or ``–`` when the model did not load."""
    available = row.get("methods_available")
    if not isinstance(available, list):
        return "–"
    missing = [m for m in METHOD_NAMES if m not in available]
    # The six the matrix has always counted (fixations_summed shares fixations' graph).
    cell = f"{len(METHOD_NAMES) - len(missing)}/{len(METHOD_NAMES)}"
    short = {"guided_backprop": "gb", "guided_gradcam": "ggc", "fixations": "fix",
             "crm": "crm", "crm_combined": "crmc", "gradcam": "gc"}
    return cell + (f" (no {','.join(short.get(m, m) for m in missing)})" if missing else "")


def fmt_err(value: object, floor: object = None) -> str:
    if value is None:
        return "–"
    v = float(value)  # type: ignore[arg-type]
    cell = "inf" if v == float("inf") else f"{v:.1e}"
    if floor is not None:
        cell += f" ({float(floor):.0e})"  # type: ignore[arg-type]
    return cell


def fmt_num(value: object, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{float(value):,.{digits}f}"  # type: ignore[arg-type]


def compiles_cell(row: dict[str, object]) -> str:
    if row.get("export_error"):
        return "export fails"
    if row.get("compiles") is True:
        return "yes"
    if row.get("compiles") is False:
        return "**no**"
    if row.get("service_error"):
        return "**crash**"  # the loader raised something other than a ModelError
    return "?"


TABLE_HEADER = ("| architecture | exporter | opset | MB | compiles | methods | Grad-CAM err (f32 floor) "
                "| guided err (f32 floor) | guided q99 | scores Δ | load s | ORT s | RSS MB (peak) | export s "
                "| row s | failure / unavailable (shortened) |")


def table_row(row: dict[str, object]) -> str:
    rss = fmt_num(row.get("rss_added_mb"), 0)
    if row.get("rss_peak_added_mb") is not None:
        rss += f" ({fmt_num(row.get('rss_peak_added_mb'), 0)})"
    gc = fmt_err(row.get("gradcam_err"), row.get("gradcam_f32_floor"))
    if row.get("target_act_err") is not None and float(row["target_act_err"]) > ACT_TOL:  # type: ignore[arg-type]
        gc += " ⚠ target"
    cells = [
        str(row.get("arch", "?")), str(row.get("exporter", "?")),
        str(row.get("opset") or "–"), fmt_num(row.get("onnx_mb"), 1), compiles_cell(row),
        methods_cell(row), gc, fmt_err(row.get("guided_err"), row.get("guided_f32_floor")),
        fmt_err(row.get("guided_err_q99")),
        fmt_err(row.get("scores_max_abs_diff")), fmt_num(row.get("load_s"), 2),
        fmt_num(row.get("ort_session_s"), 2), rss, fmt_num(row.get("export_s"), 1),
        fmt_num(row.get("row_s"), 0), failure_reason(row),
    ]
    return "| " + " | ".join(cells) + " |"


def render_markdown(rows: Sequence[dict[str, object]], meta: dict[str, object]) -> str:
    """The table with its header: command, machine, versions, service checkout."""
    lines = ["# Export matrix", ""]
    lines.append(f"Command: `{meta.get('command', '')}`")
    lines.append("")
    for key in ("service", "machine", "versions", "started", "finished"):
        if key in meta:
            value = meta[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"- {key}: {value}")
    lines += ["",
              ("Relative error = max |ours − torch float64| / max |torch float64| for the "
              "class the network scores highest; in brackets the same error of torch's own "
              "float32 run (the float32 floor); guided q99 = the 99th percentile of "
              "|ours − torch| / max |torch| over the input (small: the error sits in a few "
              "pixels, e.g. units at a kink; large: everywhere). Grad-CAM at the service's "
              "auto-detected "
              "target layer; guided = guided-backprop gradient w.r.t. the network input; "
              "scores Δ = max |Δ sigmoid|. load s = the service's load (read, compile, "
              "sessions); ORT s = one plain ONNX Runtime session on the same file; RSS = "
              "what the load added to the process (peak in brackets). Methods: gc = gradcam, "
              "gb = guided_backprop, ggc = guided_gradcam, fix = fixations."),
              "", TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    lines += [table_row(r) for r in rows]
    lines.append("")
    return "\n".join(lines)


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = parse_status_kb(Path("/proc/meminfo").read_text().replace("MemTotal", "MemTotal"),
                              "MemTotal")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 1024, 1) if mem else None,
            "os": platform.platform(), "python": platform.python_version()}


# --- the orchestrator (no torch here) -----------------------------------------------------


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=20, check=True)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--",
                                "service"], capture_output=True, text=True, timeout=20,
                               check=False)
        return out.stdout.strip() + (" (service/ modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    """Package versions, read without importing torch."""
    from importlib import metadata
    out = {}
    for dist in ("torch", "torchvision", "timm", "onnx", "onnxruntime-gpu", "onnxruntime",
                 "onnxscript", "numpy", "psutil"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_matrix(args: argparse.Namespace) -> int:
    archs = [resolve_arch(a) for a in (args.arch or DEFAULT_ARCHS)]
    exporters = args.exporter or list(DEFAULT_EXPORTERS)
    checkout = Path(args.checkout).resolve()
    if not (checkout / "service" / "__init__.py").is_file():
        raise SystemExit(f"--checkout {checkout}: no service/ package there")
    out = Path(args.out).resolve()
    md = Path(args.md).resolve() if args.md else out.with_suffix(".md")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="export-matrix-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if work == ROOT or ROOT in work.parents:
        raise SystemExit("--workdir must lie outside the repository")
    meta: dict[str, object] = {
        "command": shlex.join(["python", *sys.argv]),
        "service": f"checkout {checkout.name} at {_git_commit(checkout)}",
        "machine": machine_info(),
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows: list[dict[str, object]] = []
    if args.resume and out.is_file():
        rows = json.loads(out.read_text()).get("rows", [])
    done = {(r["arch"], r["exporter"]) for r in rows}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        md.write_text(render_markdown(rows, meta))

    for arch in archs:
        for exporter in exporters:
            if (arch.name, exporter) in done:
                continue
            folder = work / f"{arch.name.replace('/', '_')}-{exporter}"
            folder.mkdir(parents=True, exist_ok=True)
            spec = {"arch": arch.name, "exporter": exporter, "folder": str(folder),
                    "checkout": str(checkout), "static_batch": args.static_batch,
                    "service_timeout": args.service_timeout}
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads)}
            row = run_row(Path(__file__).resolve(), spec, folder, env=env,
                          timeout=args.row_timeout, keep=args.keep)
            rows.append(row)
            save()
            print(f"  {table_row(row)}", flush=True)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(f"wrote {out} and {md}")
    return 0


def run_row(script: Path, spec: dict[str, object], folder: Path, *,
            env: dict[str, str] | None, timeout: float, keep: bool) -> dict[str, object]:
    """One row in a process of its own (``script --_row``): its spec in, its result out.

    A row process that fails or times out still gives a row, with the end of its log.
    Without ``keep`` the exported model and arrays are removed afterwards.
    """
    spec_path = folder / "row.json"
    spec_path.write_text(json.dumps(spec))
    log = folder / "row.log"
    start = time.perf_counter()
    print(f"{spec['arch']} / {spec['exporter']} ...", flush=True)
    try:
        with log.open("w") as fh:
            rc: int | str = subprocess.run(
                [sys.executable, str(script), "--_row", str(spec_path)], stdout=fh,
                stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    row: dict[str, object] = {"arch": spec["arch"], "exporter": spec["exporter"]}
    if (folder / "result.json").is_file():
        row.update(json.loads((folder / "result.json").read_text()))
    if rc != 0 and not row.get("worker_error"):
        ended = "timed out" if rc == "timeout" else f"exited {rc}"
        row["worker_error"] = f"row process {ended}: {_tail(log, 400)}"
    row["row_s"] = round(time.perf_counter() - start, 1)
    if not keep:
        shutil.rmtree(folder / "model", ignore_errors=True)
        for p in [*folder.glob("*.npz"), *folder.glob("*.npy")]:
            p.unlink()
    return row


# --- the service process (no torch here) --------------------------------------------------


def service_worker(spec_path: Path) -> None:
    """Load one exported folder with the service of ``spec['checkout']``; write what it says."""
    spec = json.loads(spec_path.read_text())
    folder = Path(spec["folder"])
    checkout = Path(spec["checkout"]).resolve()
    out: dict[str, object] = {}
    result = folder / "service.json"
    try:
        sys.path.insert(0, str(checkout))
        import numpy as np
        import onnxruntime as ort

        import service
        where = Path(service.__file__).resolve()
        if checkout not in where.parents:
            raise RuntimeError(f"service imported from {where}, not from {checkout}")
        from service.errors import ModelError
        from service.methods import METHODS, Target, rows
        from service.models.activation import Activation
        from service.models.repository import load_model

        data = np.load(folder / "input.npz")
        x, cls = data["x"], int(data["cls"])
        rss0, _ = rss_mb()
        start = time.perf_counter()
        try:
            loaded = load_model(folder / "model", providers=["CPUExecutionProvider"],
                                threads=int(spec.get("threads", 2)), head_batch=256)
        except ModelError as exc:
            out["compiles"] = False
            out["load_error"] = f"{type(exc).__name__}: {exc}"
            out["load_wall_s"] = round(time.perf_counter() - start, 3)
            loaded = None
        if loaded is not None:
            rss1, peak1 = rss_mb()
            out["compiles"] = True
            out["load_s"] = round(loaded.load_seconds, 3)
            out["load_wall_s"] = round(time.perf_counter() - start, 3)
            out["rss_added_mb"] = round(rss1 - rss0, 1) if rss1 and rss0 else None
            out["rss_peak_added_mb"] = round(peak1 - rss0, 1) if peak1 and rss0 else None
            engine = loaded.engine
            unavailable = dict(loaded.unavailable)
            out["unavailable"] = unavailable
            out["methods_available"] = [m for m in METHODS if m not in unavailable]
            sp = engine.split
            out["target"] = sp.target
            out["target_shape"] = list(sp.target_shape)
            out["target_layout"] = str(getattr(sp.target_layout, "value", sp.target_layout))
            out["logits_tensor"] = sp.logits
            out["graph_activation"] = sp.graph_activation
            out["head_batches"] = engine.max_batch > 1
            arrays: dict[str, np.ndarray] = {}
            t = time.perf_counter()
            acts, logits = engine.forward(x)
            out["forward_ms"] = round((time.perf_counter() - t) * 1e3, 1)
            arrays["acts"], arrays["logits"] = acts[0], logits[0]
            try:
                t = time.perf_counter()
                captures = engine.capture(x, Activation("sigmoid"))
                (cam,) = METHODS["gradcam"].compute(captures, rows([cls], Target.LOGIT))
                out["gradcam_ms"] = round((time.perf_counter() - t) * 1e3, 1)
                arrays["gradcam"] = cam.values
            except Exception as exc:  # noqa: BLE001 - recorded, the row goes on
                out["gradcam_error"] = f"{type(exc).__name__}: {exc}"
            if engine.has_guided:
                try:
                    seed = np.zeros((1, logits.shape[1]), dtype=np.float32)
                    seed[0, cls] = 1.0
                    t = time.perf_counter()
                    _, g_logits, grads = engine.guided(x, seed)
                    out["guided_ms"] = round((time.perf_counter() - t) * 1e3, 1)
                    arrays["guided"] = grads[0]
                    arrays["guided_logits"] = g_logits[0]
                except Exception as exc:  # noqa: BLE001
                    out["guided_error_text"] = f"{type(exc).__name__}: {exc}"
            np.savez(folder / "service.npz", **arrays)
        # A plain ONNX Runtime session on the same file, for the load-cost ratio.
        try:
            def plain_session(shared_pool: bool) -> ort.InferenceSession:
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                opts.use_per_session_threads = not shared_pool
                return ort.InferenceSession(str(folder / "model" / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
            t = time.perf_counter()
            try:  # on the global pool when the service made one (it refuses to mix)
                sess = plain_session(True)
            except Exception:  # noqa: BLE001
                t = time.perf_counter()
                sess = plain_session(False)
            out["ort_session_s"] = round(time.perf_counter() - t, 3)
            (plain,) = sess.run([sess.get_outputs()[0].name], {sess.get_inputs()[0].name: x})
            np.save(folder / "ort_logits.npy", plain[0])
        except Exception as exc:  # noqa: BLE001
            out["ort_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        out["service_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    result.write_text(json.dumps(out, default=str))


# --- the torch process --------------------------------------------------------------------

_TV_SHIM: object = None


def import_torchvision():  # type: ignore[no-untyped-def]
    """torchvision, importable even when its compiled ops cannot load (see the docstring)."""
    global _TV_SHIM
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed")
    lib_dir = Path(next(iter(spec.submodule_search_locations)))
    so = next(iter(lib_dir.glob("_C*.so")), None)
    try:
        if so is None:
            raise OSError("no _C.so")
        torch.ops.load_library(str(so))
    except OSError:
        if _TV_SHIM is None:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _TV_SHIM = lib
    import torchvision
    return torchvision


def build(arch: Arch, classes: int):  # type: ignore[no-untyped-def]
    import torch
    torch.manual_seed(SEED)
    import_torchvision()  # timm imports torchvision too
    if arch.source == "torchvision":
        import torchvision
        ctor = getattr(torchvision.models, arch.builder)
        return ctor(weights=None, num_classes=classes, **arch.kwargs)
    import timm
    return timm.create_model(arch.builder, pretrained=False, num_classes=classes, **arch.kwargs)


def randomize(model, size: int, classes: int) -> None:  # type: ignore[no-untyped-def]
    """Random BN affine + running statistics from one train-mode batch; a fresh head."""
    import torch
    from torch import nn
    gen = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    with torch.no_grad():
        for head in heads[-1:]:
            head.weight.normal_(0.0, head.in_features ** -0.5, generator=gen)
            if head.bias is not None:
                head.bias.normal_(0.0, 0.1, generator=gen)
    model.train()
    with torch.no_grad():
        model(make_images(4, size, SEED + 2))
    model.eval()


def make_images(n: int, size: int, seed: int):  # type: ignore[no-untyped-def]
    """n uniform-noise images in [0, 1], normalised with MEAN/STD, (n, 3, size, size)."""
    import numpy as np
    import torch
    rng = np.random.default_rng(seed)
    u = rng.random((n, 3, size, size))
    x = (u - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    return torch.from_numpy(x.astype(np.float32))


def export(model, x, path: Path, exporter: str, static_batch: bool) -> None:  # type: ignore[no-untyped-def]
    import torch
    dyn = None if static_batch else {"image": {0: "N"}, "logits": {0: "N"}}
    common = {"input_names": ["image"], "output_names": ["logits"], "dynamic_axes": dyn}
    if exporter == "legacy":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, **common)
    elif exporter == "dynamo":
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=20,
                          external_data=False, **common)
        strip_traces(path)
    elif exporter == "dynamo-extdata":
        torch.onnx.export(model, (x,), str(path), dynamo=True, **common)
    else:
        raise ValueError(f"unknown exporter {exporter!r}")


def strip_traces(path: Path) -> None:
    """Drop the dynamo exporter's per-node metadata (FX node, module stack, Python stack
    trace): it names the exporting machine's source files, and nothing reads it. The
    graph and its values stay as exported."""
    import onnx

    model = onnx.load(str(path))
    for nodes in [model.graph.node, *(f.node for f in model.functions)]:
        for node in nodes:
            del node.metadata_props[:]
    onnx.save(model, str(path))


_RECT_SKIP = re.compile(r"hard.?(sig|swish)|h_?sig|h_?swish|hsig|hswish", re.IGNORECASE)


def _guided_fn():  # type: ignore[no-untyped-def]
    """make_fixtures' guided rectifier (imported late: only the torch processes need it)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_fixtures import _GuidedRectifier

    return _GuidedRectifier


def make_mode(*, guided: bool, shapes: Sequence[tuple[int, ...]] = (),
              replace=None):  # type: ignore[no-untyped-def]
    """A TorchFunctionMode that records outputs of the given shapes (with the module path
    and op that made them) and, when ``guided``, applies the guided rule to rectifiers.

    ``replace(index, tensor)``, when given, is called on each output of those shapes (its
    index: the count of such outputs before it) and returns what the network goes on with
    (e.g. a masked copy of the target, for CRM's re-evaluation of the real head).
    """
    import inspect

    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    T = torch.Tensor
    # rectifier -> (out-of-place function, how to read (high) from the call)
    rect: dict[object, tuple[object, str]] = {
        F.relu: (F.relu, "relu"), torch.relu: (torch.relu, "relu"), T.relu: (torch.relu, "relu"),
        torch.relu_: (torch.relu, "relu"), T.relu_: (torch.relu, "relu"),
        F.relu6: (F.relu6, "relu6"), F.hardtanh: (F.hardtanh, "hardtanh"),
        F.hardtanh_: (F.hardtanh, "hardtanh"), F.leaky_relu: (F.leaky_relu, "leaky"),
        F.leaky_relu_: (F.leaky_relu, "leaky"), F.prelu: (F.prelu, "prelu"),
        torch.prelu: (torch.prelu, "prelu"),
        torch.clamp: (torch.clamp, "clamp"), torch.clip: (torch.clamp, "clamp"),
        T.clamp: (torch.clamp, "clamp"), T.clip: (torch.clamp, "clamp"),
        T.clamp_: (torch.clamp, "clamp"), torch.clamp_: (torch.clamp, "clamp"),
    }
    stack: list[str] = []
    names: dict[int, str] = {}

    def pre(module, inputs):  # type: ignore[no-untyped-def]
        stack.append(names.get(id(module), type(module).__name__))

    def post(module, inputs, output):  # type: ignore[no-untyped-def]
        if stack:
            stack.pop()

    class Mode(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[dict[str, object]] = []
            self.gated = 0
            self.calls = 0
            self.hooks: list[object] = []

        def name_modules(self, model) -> None:  # type: ignore[no-untyped-def]
            for n, m in model.named_modules():
                names[id(m)] = f"{n or '<root>'}({type(m).__name__})"

        def __enter__(self):  # type: ignore[no-untyped-def]
            self.hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                          torch.nn.modules.module.register_module_forward_hook(post)]
            return super().__enter__()

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            for h in self.hooks:
                h.remove()  # type: ignore[attr-defined]
            stack.clear()
            return super().__exit__(*exc)

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = dict(kwargs or {})
            self.calls += 1
            if kwargs.get("inplace"):
                kwargs["inplace"] = False
            out = None
            if guided and func in rect and not any(_RECT_SKIP.search(s) for s in stack):
                impl, kind = rect[func]
                high = self._rectifier_high(impl, kind, args, kwargs, inspect)
                if high is not False:
                    x, rest = args[0], args[1:]
                    if kind in ("relu", "relu6", "hardtanh", "leaky"):
                        # Drop the inplace flag (the only bool these take): out of place.
                        kwargs.pop("inplace", None)
                        rest = tuple(a for a in rest if not isinstance(a, bool))
                    self.gated += 1
                    out = _guided_fn().apply(
                        x, lambda t, impl=impl, rest=rest, kw=kwargs: impl(t, *rest, **kw), high)
            if out is None:
                if func in (F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.silu, F.hardswish,
                            F.hardsigmoid, F.elu, F.selu) and len(args) > 1 \
                        and isinstance(args[-1], bool) and args[-1]:
                    args = (*args[:-1], False)
                out = func(*args, **kwargs)
            if shapes and isinstance(out, torch.Tensor) and tuple(out.shape) in shapes:
                if replace is not None:
                    out = replace(len(self.records), out)
                self.records.append({"tensor": out, "version": out._version,
                                     "value": out.detach().clone(),
                                     "op": getattr(func, "__qualname__", None) or str(func),
                                     "module": stack[-1] if stack else "<root>",
                                     "index": len(self.records)})
            return out

        @staticmethod
        def _rectifier_high(impl, kind, args, kwargs, inspect):  # type: ignore[no-untyped-def]
            """The guided mask's upper bound (None: none), or False when not a rectifier."""
            if kind in ("relu", "leaky", "prelu"):
                return None
            if kind == "relu6":
                return 6.0
            if kind == "hardtanh":
                lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
                return float(hi) if float(lo) == 0.0 else False
            if kind == "clamp":
                lo = args[1] if len(args) > 1 else kwargs.get("min")
                hi = args[2] if len(args) > 2 else kwargs.get("max")
                if isinstance(lo, (int, float)) and float(lo) == 0.0:
                    return float(hi) if isinstance(hi, (int, float)) else None
                return False
            return False

    return Mode()


def torch_refs(model, x, cls: int, acts, dtype):  # type: ignore[no-untyped-def]
    """Grad-CAM at the tensor matching ``acts`` (C, H, W), the guided input gradient and the
    logits, for class ``cls``, in ``dtype``."""
    import torch
    m = model.to(dtype)
    xt = x.to(dtype)
    res: dict[str, object] = {}
    c, h, w = acts.shape
    # A transformer's target is the patch grid of tokens (1, prefix + h·w, C), prefix ≤ 16
    # (service.graph.target.MAX_PREFIX_TOKENS): compared with the prefix dropped.
    tokens = [(1, p + h * w, c) for p in range(17)]
    mode = make_mode(guided=False, shapes=[(1, c, h, w), (1, h, w, c), *tokens])
    mode.name_modules(m)
    with mode:
        z = m(xt)
    res["logits"] = z[0].detach().double().numpy()
    best = None
    for rec in mode.records:
        v = rec["value"].double().numpy()[0]
        if v.ndim == 2:
            v = v[-h * w:].reshape(h, w, c).transpose(2, 0, 1)
        elif v.shape != (c, h, w):
            v = v.transpose(2, 0, 1)
        err = rel_err(v, acts)
        rec["err"] = err
        if rec["tensor"]._version != rec["version"]:
            continue
        if best is None or err <= best["err"]:  # the closest; among equals, the latest
            best = rec
    res["candidates"] = len(mode.records)
    if best is not None:
        res["target_act_err"] = best["err"]
        res["torch_target"] = f"{best['module']} -> {best['op']} (#{best['index']})"
        res["target_index"] = best["index"]
        if best["err"] <= ACT_TOL:
            (ga,) = torch.autograd.grad(z[0, cls], best["tensor"], retain_graph=False)
            a = best["value"].double()
            g = ga.double()
            if a.dim() == 3:  # pytorch-grad-cam's ViT reshape_transform
                a, g = (t[:, -h * w:].reshape(1, h, w, c).permute(0, 3, 1, 2) for t in (a, g))
            elif a.shape[1:] != (c, h, w):
                a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
            weights = g[0].mean(dim=(1, 2))
            res["gradcam"] = torch.relu(torch.einsum("c,chw->hw", weights, a[0])).numpy()
    del z, mode
    gmode = make_mode(guided=True)
    gmode.name_modules(m)
    xg = xt.clone().requires_grad_(True)
    with gmode:
        zg = m(xg)
    (gx,) = torch.autograd.grad(zg[0, cls], xg)
    res["guided"] = gx[0].detach().double().numpy()
    res["guided_logits"] = zg[0].detach().double().numpy()
    res["guided_gated"] = gmode.gated
    model.float()
    return res


def onnx_facts(path: Path) -> dict[str, object]:
    from collections import Counter

    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:  # Constant nodes (legacy exports) hold Clip bounds too
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits[n.output[0]] = n.attribute[0].t
    rect = ops.get("Relu", 0) + ops.get("LeakyRelu", 0) + ops.get("PRelu", 0)
    for n in proto.graph.node:
        if n.op_type == "Clip":
            lo = None
            if len(n.input) > 1 and n.input[1] in inits:
                lo = float(numpy_helper.to_array(inits[n.input[1]]))
            for a in n.attribute:
                if a.name == "min":
                    lo = a.f
            if lo == 0.0:
                rect += 1
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return {"opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
            "nodes": len(proto.graph.node), "ops": dict(sorted(ops.items())),
            "onnx_rectifiers": rect,
            "batch_dim": dim0.dim_param or dim0.dim_value,
            "external_data": any(i.data_location == onnx.TensorProto.EXTERNAL
                                 for i in proto.graph.initializer)}


def row_worker(spec_path: Path) -> None:
    """Build, export, load in a service process, compare; writes result.json."""
    spec = json.loads(spec_path.read_text())
    folder = Path(spec["folder"])
    res: dict[str, object] = {}
    result = folder / "result.json"

    def save() -> None:
        result.write_text(json.dumps(res, default=float))

    try:
        import copy

        import numpy as np
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        import warnings
        warnings.filterwarnings("ignore")
        arch = ARCHS[spec["arch"]]
        model = build(arch, len(LABELS))
        randomize(model, arch.size, len(LABELS))
        res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        x = make_images(1, arch.size, SEED + 3)
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            z64 = m64(x.double())[0].numpy()
        del m64
        cls = int(np.argmax(z64))
        res["class"] = cls
        mdir = folder / "model"
        mdir.mkdir(parents=True, exist_ok=True)
        onnx_path = mdir / "model.onnx"
        t = time.perf_counter()
        try:
            export(copy.deepcopy(model), x, onnx_path, spec["exporter"], spec["static_batch"])
        except Exception as exc:  # noqa: BLE001
            res["export_s"] = round(time.perf_counter() - t, 1)
            res["export_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            save()
            return
        res["export_s"] = round(time.perf_counter() - t, 1)
        res["onnx_mb"] = round(sum(p.stat().st_size for p in mdir.iterdir()) / 2**20, 1)
        res.update(onnx_facts(onnx_path))
        (mdir / "model.toml").write_text(model_toml((arch.size, arch.size)))
        np.savez(folder / "input.npz", x=x.numpy(), cls=np.int64(cls))
        save()
        # The service, in its own process, importing the checkout's code.
        t = time.perf_counter()
        try:
            with (folder / "service.log").open("w") as fh:
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_service",
                                str(spec_path)], stdout=fh, stderr=subprocess.STDOUT,
                               timeout=int(spec.get("service_timeout", SERVICE_TIMEOUT_S)),
                               check=False)
        except subprocess.TimeoutExpired:
            res["service_error"] = "service process timed out"
        res["service_s"] = round(time.perf_counter() - t, 1)
        sj = folder / "service.json"
        if sj.is_file():
            res.update(json.loads(sj.read_text()))
        elif "service_error" not in res:
            res["service_error"] = "service process wrote nothing: " + _tail(folder / "service.log", 400)
        if (folder / "ort_logits.npy").is_file():
            ort_logits = np.load(folder / "ort_logits.npy")
            res["ort_scores_max_abs_diff"] = float(np.abs(_sigmoid(ort_logits) - _sigmoid(z64)).max())
        save()
        if not res.get("compiles") or not (folder / "service.npz").is_file():
            return
        ours = dict(np.load(folder / "service.npz"))
        res["scores_max_abs_diff"] = float(np.abs(_sigmoid(ours["logits"]) - _sigmoid(z64)).max())
        t = time.perf_counter()
        ref: dict[str, dict[str, object]] = {}
        try:
            for label, dtype in (("f64", torch.float64), ("f32", torch.float32)):
                ref[label] = torch_refs(model, x, cls, ours["acts"], dtype)
        except Exception as exc:  # noqa: BLE001
            res["reference_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        res["reference_s"] = round(time.perf_counter() - t, 1)
        r64, r32 = ref.get("f64"), ref.get("f32")
        if r64:
            res["torch_target"] = r64.get("torch_target")
            res["target_act_err"] = r64.get("target_act_err")
            res["target_candidates"] = r64.get("candidates")
            res["guided_gated"] = r64.get("guided_gated")
            res["guided_logits_check"] = rel_err(r64["guided_logits"], z64)
            if "gradcam" not in r64:
                res["target_note"] = (f"no torch tensor matches the ONNX target {res.get('target')}"
                                      f" (best rel. error {r64.get('target_act_err')}, "
                                      f"{r64.get('candidates')} candidates)")
            elif "gradcam" in ours:
                res["gradcam_err"] = rel_err(ours["gradcam"], r64["gradcam"])
                if r32 and "gradcam" in r32:
                    res["gradcam_f32_floor"] = rel_err(r32["gradcam"], r64["gradcam"])
            if "guided" in ours:
                res["guided_err"] = rel_err(ours["guided"], r64["guided"])
                # A local error (a few pixels: a unit near a kink) or a diffuse one?
                diff = np.abs(ours["guided"] - r64["guided"]) / np.abs(r64["guided"]).max()
                res["guided_err_q99"] = float(np.quantile(diff, 0.99))
                if r32:
                    res["guided_f32_floor"] = rel_err(r32["guided"], r64["guided"])
    except Exception as exc:  # noqa: BLE001
        res["worker_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    save()


def _sigmoid(z):  # type: ignore[no-untyped-def]
    import numpy as np
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


# --- CLI ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", metavar="NAME",
                    help="architecture (repeatable; default: the first 14 of --list)")
    ap.add_argument("--exporter", action="append", choices=EXPORTERS,
                    help="exporter (repeatable; default: dynamo and legacy)")
    ap.add_argument("--checkout", default=str(ROOT),
                    help="the service checkout to load the models with (default: this one)")
    ap.add_argument("--out", default="export-matrix.json", help="results JSON")
    ap.add_argument("--md", default=None, help="markdown table (default: --out with .md)")
    ap.add_argument("--workdir", default=None,
                    help="where exports go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the exported models")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and run only the missing ones")
    ap.add_argument("--static-batch", action="store_true",
                    help="export with a fixed batch of 1 instead of a dynamic batch axis")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row-timeout", type=int, default=ROW_TIMEOUT_S)
    ap.add_argument("--service-timeout", type=int, default=SERVICE_TIMEOUT_S)
    ap.add_argument("--list", action="store_true", help="list the architectures and exit")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the markdown (--md) from the rows in --out")
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_service", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._row:
        row_worker(Path(args._row))
        return 0
    if args._service:
        service_worker(Path(args._service))
        return 0
    if args.render:
        data = json.loads(Path(args.out).read_text())
        md = Path(args.md) if args.md else Path(args.out).with_suffix(".md")
        title = "# Export matrix (Keras)" if data["rows"] and str(
            data["rows"][0].get("arch", "")).startswith("keras/") else "# Export matrix"
        md.write_text(render_markdown(data["rows"], data["meta"]).replace(
            "# Export matrix", title, 1))
        return 0
    if args.list:
        for name, arch in ARCHS.items():
            default = "default" if name in DEFAULT_ARCHS else ""
            print(f"{name:32s} {arch.size}x{arch.size}  {default}")
        return 0
    return run_matrix(args)


if __name__ == "__main__":
    sys.exit(main())
