"""Weights held once outside the graph protos: the bytes, the references, shared sessions."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.graph import weights
from service.graph.build import Capability, compile_model
from service.graph.cache import CompileCache
from service.graph.report import write
from service.models.spec import Layout
from service.runtime.engine import Engine
from service.runtime.sessions import make_session

ZOO = Path(__file__).resolve().parents[1] / "data" / "zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())


def _offload(name: str = "vgg") -> tuple[bytes, onnx.ModelProto, weights.Weights]:
    raw = (ZOO / f"{name}.onnx").read_bytes()
    skeleton, held = weights.offload(raw, ZOO, f"{name}.onnx",
                                     hashlib.sha256(raw).hexdigest())
    return raw, skeleton, held


def test_offload_keeps_every_value_and_only_references_in_the_proto() -> None:
    raw, skeleton, held = _offload()
    original = onnx.load_from_string(raw)
    big = [t for t in original.graph.initializer if len(t.raw_data) >= weights.MIN_BYTES]
    assert big and set(held.arrays) == {t.name for t in big}
    for tensor, kept in zip(original.graph.initializer, skeleton.graph.initializer,
                            strict=True):
        expected = numpy_helper.to_array(tensor)
        np.testing.assert_array_equal(weights.to_array(kept), expected)
        if tensor.name in held.arrays:
            assert weights.is_offloaded(kept) and not kept.HasField("raw_data")
            array = held.arrays[tensor.name]
            assert not array.flags.writeable and array.ctypes.data % 64 == 0
            _file, offset, length = held.sources[tensor.name]
            # The reference is the truth: those bytes of the file are the tensor's.
            assert raw[offset:offset + length] == tensor.raw_data
        else:
            assert not weights.is_offloaded(kept)
    offloaded_bytes = sum(len(t.raw_data) for t in big)
    assert skeleton.ByteSize() < len(raw) - offloaded_bytes + 200 * len(big)  # the refs
    assert weights.owner(next(weights.offloaded(skeleton))) is held


def test_embed_restores_a_self_contained_model() -> None:
    raw, skeleton, _held = _offload()
    restored = weights.embed(skeleton)
    assert not any(True for _ in weights.offloaded(restored))
    original = onnx.load_from_string(raw)
    for a, b in zip(original.graph.initializer, restored.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    onnx.checker.check_model(restored, full_check=True)


def test_sessions_share_the_arrays_and_compute_the_same() -> None:
    raw, skeleton, held = _offload()
    x = np.random.default_rng(0).normal(size=(2, *MANIFEST["vgg"]["input_shape"]))
    x = x.astype(np.float32)
    reference = make_session(raw, ["CPUExecutionProvider"], 1).run(None, {"image": x})[0]
    first = make_session(skeleton, ["CPUExecutionProvider"], 1)
    second = make_session(skeleton, ["CPUExecutionProvider"], 1, prepack=False)
    assert first.shared_weights is held and second.shared_weights is held
    for session in (first, second):
        np.testing.assert_allclose(session.run(None, {"image": x})[0], reference,
                                   rtol=1e-5, atol=1e-6)
    name = next(iter(held.arrays))
    # No copy on our side: the OrtValue every session gets is the array's own memory.
    assert held.ort_value(name).data_ptr() == held.arrays[name].ctypes.data


def test_compiled_graphs_from_offloaded_weights_equal_the_inline_ones(
        tmp_path: Path) -> None:
    raw, skeleton, held = _offload()
    shape = (1, *MANIFEST["vgg"]["input_shape"])
    inline = compile_model(onnx.load_from_string(raw), layout=Layout.NCHW, input_shape=shape)
    light = CompileCache(tmp_path).compile(raw, skeleton, layout=Layout.NCHW, activation=None,
                                           target_layer=None, input_shape=shape)
    for name, graph in light.graphs.items():
        for tensor in graph.graph.initializer:
            # The model's own weights are references in every graph; only what a rule
            # computes from them (a Conv's flipped kernel for its input gradient) is inline.
            assert weights.is_offloaded(tensor) == (tensor.name in held.arrays), name
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    seed = np.eye(MANIFEST["vgg"]["classes"], dtype=np.float32)[:1]
    feeds = {"image": x, "xai/guided/seed": seed}
    a = make_session(inline.guided, ["CPUExecutionProvider"], 1).run(None, feeds)
    b = make_session(light.guided, ["CPUExecutionProvider"], 1).run(None, feeds)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-6)
    # The disk cache keeps the references, and the loader's weights fill them again.
    again = CompileCache(tmp_path).compile(raw, skeleton, layout=Layout.NCHW, activation=None,
                                           target_layer=None, input_shape=shape)
    c = make_session(again.guided, ["CPUExecutionProvider"], 1).run(None, feeds)
    np.testing.assert_array_equal(c[-1], b[-1])
    # Written graphs are self-contained.
    for path in write(tmp_path / "out", light):
        written = onnx.load(path)
        assert not any(True for _ in weights.offloaded(written))
        onnx.checker.check_model(written)
    assert held.arrays


def test_weights_no_longer_held_are_a_clear_error() -> None:
    _raw, skeleton, held = _offload("resnet")
    tensor = next(weights.offloaded(skeleton))
    del held
    gc.collect()
    with pytest.raises(LookupError, match="are no longer loaded"):
        weights.to_array(tensor)


def test_weights_in_an_external_data_file_beside_the_model(tmp_path: Path) -> None:
    """torch's dynamo exporter writes model.onnx plus model.onnx.data by default."""
    original = onnx.load(ZOO / "vgg.onnx")
    onnx.save(onnx.load(ZOO / "vgg.onnx"), tmp_path / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    raw = (tmp_path / "model.onnx").read_bytes()
    assert len(raw) < 20_000
    skeleton, held = weights.offload(raw, tmp_path, "model.onnx", "external-test")
    for tensor in original.graph.initializer:
        kept = next(t for t in skeleton.graph.initializer if t.name == tensor.name)
        np.testing.assert_array_equal(weights.to_array(kept), numpy_helper.to_array(tensor))
    assert {source for source, _, _ in held.sources.values()} == {"model.onnx.data"}
    x = np.ones((1, *MANIFEST["vgg"]["input_shape"]), np.float32)
    expected = make_session(original, ["CPUExecutionProvider"], 1).run(None, {"image": x})
    got = make_session(skeleton, ["CPUExecutionProvider"], 1).run(None, {"image": x})
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    original = onnx.load(ZOO / "vgg.onnx")
    (tmp_path / "m").mkdir()
    onnx.save(original, tmp_path / "m" / "model.onnx", save_as_external_data=True,
              location="weights.bin", size_threshold=1024)
    model = onnx.load(tmp_path / "m" / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    with pytest.raises(ValueError, match="is not a file beside the model"):
        weights.offload(model.SerializeToString(), tmp_path / "m", "model.onnx", "escape")


def test_the_same_file_loaded_twice_shares_one_copy_and_outlives_either() -> None:
    """A second load of a file reuses the weights held for the first; dropping the second
    leaves the first copy's graphs working (they used to lose their registry entry)."""
    raw, first, held = _offload()
    _raw, second, again = _offload()
    assert again is held
    del second, again
    gc.collect()
    shape = (1, *MANIFEST["vgg"]["input_shape"])
    compiled = compile_model(first, layout=Layout.NCHW, input_shape=shape)
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    expected = make_session(raw, ["CPUExecutionProvider"], 1).run(None, {"image": x})[0]
    got = make_session(compiled.backbone, ["CPUExecutionProvider"], 1).run(
        [compiled.split.logits], {"image": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_same_model_file_with_other_external_data_is_another_model(tmp_path: Path
                                                                        ) -> None:
    """A dynamo export's model.onnx is the same file for every set of weights of an
    architecture (they are in model.onnx.data): two such models get their own keys and
    their own weights; the same folder loaded again shares the first copy."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        onnx.save(onnx.load(ZOO / "vgg.onnx"), tmp_path / name / "model.onnx",
                  save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
    data = bytearray((tmp_path / "b" / "model.onnx.data").read_bytes())
    data[:4] = np.float32(7.0).tobytes()
    (tmp_path / "b" / "model.onnx.data").write_bytes(bytes(data))
    raw = (tmp_path / "a" / "model.onnx").read_bytes()
    assert raw == (tmp_path / "b" / "model.onnx").read_bytes()
    _skeleton_a, held_a = weights.offload(raw, tmp_path / "a", "model.onnx")
    _again, same = weights.offload(raw, tmp_path / "a", "model.onnx")
    skeleton_b, held_b = weights.offload(raw, tmp_path / "b", "model.onnx")
    assert same is held_a and held_b is not held_a
    assert held_a.key == weights.content_digest(
        raw, [(tmp_path / "a" / "model.onnx.data").read_bytes()])
    assert held_a.key != held_b.key != hashlib.sha256(raw).hexdigest()
    first = next(t for t in skeleton_b.graph.initializer if weights.is_offloaded(t))
    assert weights.to_array(first).reshape(-1)[0] == 7.0
    # A model file without external data keeps its plain SHA-256.
    _skeleton, inline = weights.offload((ZOO / "resnet.onnx").read_bytes(), ZOO, "resnet.onnx")
    assert inline.key == hashlib.sha256((ZOO / "resnet.onnx").read_bytes()).hexdigest()


def test_every_engine_session_computes_with_the_shared_memory() -> None:
    """Zeroing the first FC matrix in the held buffer, after the sessions exist, changes
    what every graph but the backbone computes: none of them holds a copy of it (a
    repacked or re-read one would still give the old values). The backbone's repacked
    copy is the one kept on purpose (service.runtime.engine.session_options_for)."""
    raw = (ZOO / "vgg.onnx").read_bytes()
    skeleton, held = weights.offload(raw, ZOO, "vgg.onnx", "shared-memory-test")
    shape = (1, *MANIFEST["vgg"]["input_shape"])
    compiled = compile_model(skeleton, layout=Layout.NCHW, input_shape=shape)
    engine = Engine(compiled, ["CPUExecutionProvider"], 1, lazy=())
    # VGG's head flattens the activations: no spatial mean to start a pooled head from.
    pooled = {Capability.POOLED_HEAD, Capability.POOLED_HEAD_VJP}
    assert engine.available == set(Capability) - pooled
    assert "spatial mean" in compiled.errors[Capability.POOLED_HEAD]
    assert compiled.errors[Capability.POOLED_HEAD_VJP] == "no pooled head"
    sessions = engine._sessions.values()
    assert len(sessions) == len(Capability) - len(pooled)
    assert all(s.shared_weights is held for s in sessions)
    x = np.random.default_rng(3).normal(size=(2, *shape[1:])).astype(np.float32)
    acts, logits = engine.forward(x)
    assert np.ptp(logits, axis=0).max() > 1e-3  # the images' scores differ before
    matrix = held.arrays["classifier.0.weight"]
    ctypes.memset(matrix.ctypes.data, 0, matrix.nbytes)
    source = onnx.load_from_string(raw)
    inline = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    hidden = np.maximum(inline["classifier.0.bias"], 0)
    constant = inline["classifier.3.weight"] @ hidden + inline["classifier.3.bias"]
    expected = np.repeat(constant[None], 2, axis=0)
    np.testing.assert_array_equal(engine.forward(x)[1], logits)
    np.testing.assert_allclose(engine.head(acts), expected, rtol=1e-6, atol=1e-6)
    seeds = np.eye(3, dtype=np.float32)[[0, 1]]
    np.testing.assert_array_equal(engine.head_vjp(acts, seeds), np.zeros_like(acts))
    _acts, guided_logits, grads = engine.guided(x, seeds)
    np.testing.assert_allclose(guided_logits, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(grads, np.zeros_like(grads))
    logits_name = compiled.split.logits
    fixations = engine.run(Capability.FIXATIONS, [logits_name], {"image": x[:1]})[0]
    np.testing.assert_allclose(fixations, expected[:1], rtol=1e-6, atol=1e-6)
