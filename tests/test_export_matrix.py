"""tools/export_matrix.py's pure parts: no torch, no export (the matrix itself is a tool run)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tools import export_matrix as em


def test_module_imports_without_torch() -> None:
    code = ("import sys; import tools.export_matrix; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_keras_script_imports_without_tensorflow() -> None:
    code = ("import sys; import tools.export_matrix_keras as k; "
            "assert set(k.DEFAULT_ARCHS) >= {'MobileNetV3Small', 'MobileNetV3Large', "
            "'EfficientNetB0', 'ConvNeXtTiny', 'NASNetMobile'}; "
            "sys.exit(1 if {'tensorflow', 'keras', 'torch'} & set(sys.modules) else 0)")
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_rel_err() -> None:
    want = np.array([[1.0, -4.0], [2.0, 0.0]])
    assert em.rel_err(want, want) == 0.0
    assert em.rel_err(want + np.array([[0.0, 0.0], [0.0, 0.4]]), want) == pytest.approx(0.1)
    assert em.rel_err(np.zeros(3), np.zeros(3)) == 0.0
    assert em.rel_err(np.ones(3), np.zeros(3)) == float("inf")
    assert em.rel_err(np.ones((2, 2)), np.ones(4)) == float("inf")


def test_model_toml_has_what_the_service_reads() -> None:
    data = tomllib.loads(em.model_toml((299, 299)))
    assert data["labels"] == list(em.LABELS)
    assert data["input"] == {"size": [299, 299], "channels": 3, "mean": list(em.MEAN),
                             "std": list(em.STD), "layout": "NCHW"}
    assert data["output"] == {"activation": "sigmoid"}
    assert "explain" not in data  # the service detects the target layer itself


def test_model_toml_options() -> None:
    text = em.model_toml((224, 200), channels=1, labels=['a "quoted" b'], mean=[0.5],
                         std=[0.25], layout="NHWC", activation="none")
    data = tomllib.loads(text)
    assert data["labels"] == ['a "quoted" b']
    assert data["input"] == {"size": [224, 200], "channels": 1, "mean": [0.5], "std": [0.25],
                             "layout": "NHWC"}
    assert data["output"]["activation"] == "none"


def test_parse_status_kb() -> None:
    text = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert em.parse_status_kb(text, "VmRSS") == 100.0
    assert em.parse_status_kb(text, "VmHWM") == 200.0
    assert em.parse_status_kb(text, "VmSwap") is None


def test_rss_mb_reads_this_process() -> None:
    now, peak = em.rss_mb()
    assert now is not None and now > 1
    if peak is not None:
        assert peak >= now * 0.5


def test_shorten() -> None:
    assert em.shorten(None) == ""
    assert em.shorten("a\n  b |c") == "a b /c"
    long = "x" * 300
    out = em.shorten(long, 50)
    assert len(out) == 50 and out.endswith("…")


def test_arch_registry() -> None:
    assert len(em.DEFAULT_ARCHS) >= 12
    defaults = set(em.DEFAULT_ARCHS)
    for name in ("timm/convnext_tiny", "tv/shufflenet_v2_x1_0", "timm/ghostnet_100",
                 "timm/mobilenetv3_large_100", "tv/resnet50", "tv/densenet121", "tv/vgg16",
                 "tv/efficientnet_b0", "tv/inception_v3", "timm/regnety_008",
                 "tv/mobilenet_v2", "timm/vit_tiny_patch16_224"):
        assert name in defaults, name
    assert em.ARCHS["tv/inception_v3"].size == 299
    assert em.resolve_arch("convnext_tiny").name == "timm/convnext_tiny"
    assert em.resolve_arch("tv/resnet50").source == "torchvision"
    with pytest.raises(SystemExit, match="ambiguous"):
        em.resolve_arch("resnet50")  # both timm and torchvision have one
    with pytest.raises(SystemExit, match="unknown"):
        em.resolve_arch("alexnet9000")


def test_parse_args_defaults_and_choices() -> None:
    args = em.parse_args([])
    assert args.arch is None and args.exporter is None
    assert Path(args.checkout) == em.ROOT
    args = em.parse_args(["--arch", "tv/vgg16", "--arch", "timm/ghostnet_100", "--exporter",
                          "legacy", "--checkout", "/somewhere", "--out", "r.json"])
    assert args.arch == ["tv/vgg16", "timm/ghostnet_100"]
    assert args.exporter == ["legacy"]
    assert args.checkout == "/somewhere" and args.out == "r.json"
    with pytest.raises(SystemExit):
        em.parse_args(["--exporter", "tflite"])


def _row(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"arch": "tv/resnet50", "exporter": "legacy", "opset": 17,
                               "onnx_mb": 89.7, "export_s": 5.0, "row_s": 40.0}
    base.update(kw)
    return base


def test_methods_and_failure_cells() -> None:
    ok = _row(compiles=True, methods_available=list(em.METHOD_NAMES), unavailable={})
    assert em.methods_cell(ok) == "6/6"
    assert em.failure_reason(ok) == ""
    reason = "no gradient rule for op type(s) Erf"
    part = _row(compiles=True, methods_available=["crm", "crm_combined", "gradcam", "fixations"],
                unavailable={"guided_backprop": reason, "guided_gradcam": reason})
    assert em.methods_cell(part) == "4/6 (no gb,ggc)"
    assert em.failure_reason(part) == f"guided_backprop: {reason}"  # the same reason once
    failed = _row(compiles=False, load_error="CompileError: " + "y" * 400)
    assert em.methods_cell(failed) == "–"
    assert em.failure_reason(failed).startswith("CompileError: yyy")
    assert len(em.failure_reason(failed)) <= 110
    assert em.compiles_cell(failed) == "**no**"
    assert em.compiles_cell(_row(export_error="TorchExportError: boom")) == "export fails"
    crashed = _row(service_error="ValidationError: data should be stored in model.onnx.data")
    assert em.compiles_cell(crashed) == "**crash**"
    assert em.failure_reason(crashed).startswith("ValidationError: data should")


def test_render_markdown() -> None:
    rows = [
        _row(compiles=True, methods_available=list(em.METHOD_NAMES), unavailable={},
             gradcam_err=1.25e-6, gradcam_f32_floor=2e-6, guided_err=3.1e-4,
             guided_f32_floor=1e-5, guided_err_q99=2e-6, scores_max_abs_diff=4e-7, load_s=1.234, ort_session_s=0.3,
             rss_added_mb=175.4, rss_peak_added_mb=190.0, target_act_err=1e-6),
        _row(exporter="dynamo", compiles=False, load_error="CompileError: no rule | Erf"),
        _row(arch="timm/x", compiles=True, methods_available=["crm"], unavailable={},
             gradcam_err=1e-6, target_act_err=0.5),
    ]
    meta = {"command": "python tools/export_matrix.py --arch tv/resnet50",
            "machine": {"cores": 2}, "versions": {"torch": "2.13.0+cpu"}}
    text = em.render_markdown(rows, meta)
    lines = text.splitlines()
    assert "Command: `python tools/export_matrix.py --arch tv/resnet50`" in lines
    assert "- versions: torch 2.13.0+cpu" in lines
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    width = table[0].count("|")
    assert all(line.count("|") == width for line in table), "every row has every column"
    assert "| 1.3e-06 (2e-06) | 3.1e-04 (1e-05) | 2.0e-06 | 4.0e-07 | 1.23 | 0.30 | 175 (190) |" in table[2]
    assert "CompileError: no rule / Erf" in table[3]  # a '|' would break the table
    assert "⚠ target" in table[4]
