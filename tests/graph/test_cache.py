"""The compile cache's key: one entry whether or not the caller hashed the model already."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from service.graph.cache import CompileCache
from service.models.spec import Layout

ZOO = Path(__file__).resolve().parents[1] / "data" / "zoo"


def test_a_given_digest_names_the_entry_the_bytes_name() -> None:
    raw = (ZOO / "vgg.onnx").read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    options = (Layout.NCHW, "sigmoid", None, (1, 3, 32, 32))
    assert CompileCache.key(raw, *options, digest=digest) == CompileCache.key(raw, *options)
    other = hashlib.sha256(raw + b"\0").hexdigest()
    assert CompileCache.key(raw, *options, digest=other) != CompileCache.key(raw, *options)
    assert CompileCache.key(raw, Layout.NHWC, *options[1:], digest=digest) != \
        CompileCache.key(raw, *options, digest=digest)


def test_a_load_through_the_disk_cache_hits_the_entry_a_first_load_wrote(
        tmp_path: Path) -> None:
    """load_model hands the cache the digest it computed; the entry is the one a compile
    without it would name, so the second start reads it instead of compiling."""
    from service.models.repository import load_model
    from tests.api.conftest import MODELS

    first = load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                       head_batch=256, cache=CompileCache(tmp_path))
    raw = (MODELS / "demo-cxr" / "model.onnx").read_bytes()
    spec = first.config.input
    key = CompileCache.key(raw, spec.layout, first.config.activation.value,
                           first.config.target_layer, (1, spec.channels, spec.height,
                                                       spec.width))
    assert [p.name for p in tmp_path.iterdir()] == [key]
    assert (tmp_path / key / "split.json").is_file()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / key).iterdir()}
    second = load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                        head_batch=256, cache=CompileCache(tmp_path))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / key).iterdir()} == written
    assert second.engine.compiled.split == first.engine.compiled.split
    x = np.random.default_rng(5).normal(size=(2, 3, 256, 256)).astype(np.float32)
    for a, b in zip(second.engine.forward(x), first.engine.forward(x), strict=True):
        np.testing.assert_array_equal(a, b)
