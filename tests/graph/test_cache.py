"""The compile cache's key: one entry whether or not the caller hashed the model already."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

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


def test_a_disk_hit_reads_the_rarely_used_graphs_at_their_first_use(tmp_path: Path) -> None:
    """A hit reads the backbone, head, head VJP and pooled head (and its VJP) at once and the
    guided and fixations graphs (and the fixations plan) at their first use, giving what the
    compilation gave; a cached file that went bad is that graph's CompileError then, not a
    crash."""
    from service.errors import CompileError
    from service.graph.build import RARELY_USED, Capability, compile_model
    from service.graph.weights import offload

    raw = (ZOO / "resnet.onnx").read_bytes()
    model, _held = offload(raw, ZOO, "resnet.onnx")
    options = {"layout": Layout.NCHW, "activation": "sigmoid", "target_layer": None,
               "input_shape": (1, 3, 32, 32)}
    compiled = CompileCache(tmp_path).compile(raw, model, **options)
    assert set(RARELY_USED) <= set(compiled.graphs)
    # Written to the folder, and not kept assembled for the model's life.
    assert not compiled.graphs.assembled & RARELY_USED  # type: ignore[attr-defined]
    hit = CompileCache(tmp_path).compile(raw, model, **options)
    assert hit is not compiled
    assert hit.graphs.assembled == {Capability.BACKBONE, Capability.HEAD,  # type: ignore[attr-defined]
                                    Capability.HEAD_VJP, Capability.POOLED_HEAD,
                                    Capability.POOLED_HEAD_VJP}
    assert set(hit.graphs) == set(compiled.graphs) and hit.errors == compiled.errors
    for cap in RARELY_USED:
        assert hit.graphs[cap].SerializeToString() == compiled.graphs[cap].SerializeToString()
    assert hit.fixations_plan is not None and compiled.fixations_plan is not None
    assert hit.fixations_plan.needed == compiled.fixations_plan.needed
    fresh = compile_model(model, **options)
    assert fresh.graphs[Capability.GUIDED].SerializeToString() == \
        hit.graphs[Capability.GUIDED].SerializeToString()

    (key,) = [p for p in tmp_path.iterdir()]
    (key / f"{Capability.GUIDED}.onnx").write_bytes(b"not a graph")
    broken = CompileCache(tmp_path).compile(raw, model, **options)
    with pytest.raises(CompileError, match="compile cache's .* cannot be read"):
        broken.graphs[Capability.GUIDED]
    assert broken.graphs[Capability.FIXATIONS] is not None
