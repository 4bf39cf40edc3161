"""Runs one compiled model: the only place that calls ONNX Runtime for inference, and the
one place an image batch becomes the captures every method reads (:meth:`Engine.capture`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from service.errors import CompileError, UnknownMethod
from service.graph.autodiff import SEED, grad_name
from service.graph.build import GUIDED_PREFIX, RARELY_USED, Capability, CompiledModel
from service.graph.fixations import FixationPlan, exposed
from service.methods.base import Captures, Row, Target
from service.models.activation import Activation
from service.models.spec import InputSpec, Layout
from service.runtime.memory import release_freed_memory
from service.runtime.sessions import CPU, CUDA, ORT_ERRORS, make_session

log = logging.getLogger(__name__)

Feed = np.ndarray | ort.OrtValue


def session_options_for(cap: Capability) -> dict[str, bool]:
    """The make_session options of one capability's graph.

    Only the backbone repacks its weights (MLAS's panel layout for MatMul/Gemm, a private
    copy of those matrices): it runs on every request, and its packed kernels give each
    image of a batch the same bits as alone (unpacked, one row runs as a matrix-vector
    product that rounds differently, and CRM magnifies the logits' last bits). The other
    graphs compute with the shared weights; packed, the guided graph alone held 1.2 GB on
    VGG-16 beside the 0.51 GB of shared weights.

    Every graph gets the NCHWc layout. On requests asking for guided backprop or CNN
    Fixations, the guided or fixations graph's forward pass stands in for the backbone's,
    so it must compute the same (im2col convolutions would round differently):
    - the guided graph's target activations are the backbone's bit for bit, its logits
      within float rounding (the unpacked GEMM: 2.4e-7 on DenseNet-121);
    - the fixations graph's are bit for bit too where exposing every layer blocks no
      fusion (DenseNet, VGG, Inception), else within float rounding (ResNet's Conv fuses
      the residual Add only when the sum is no output: 3.6e-6 on the test zoo's, maps
      ≤ 8e-6 of their peak apart).
    Measured in BENCHMARKS.md, "Load memory".
    """
    return {"prepack": cap is Capability.BACKBONE}


class Traced(NamedTuple):
    """The fixations graph's forward pass of one image (:meth:`Engine.all_activations`)."""

    acts: np.ndarray                   # (1, C, H, W) } the backbone's within float rounding
    logits: np.ndarray                 # (1, K)       } (session_options_for)
    activations: dict[str, np.ndarray]  # what the walk reads, by tensor name


class Engine:
    """One session per compiled graph of a model; a graph the compiler could not build gets
    none (``available`` says which there are).

    All arrays crossing this class's boundary hold target-layer activations channel-first,
    (B, C, H, W), whatever the model stores. A vision transformer's head also reads a
    context beside them, its prefix tokens (``split.context``): the forward pass gives it
    (:meth:`forward_context`) and the head graphs take one context row per activation row.
    Every graph runs batches: the head in chunks of at most ``max_batch`` copies (CRM's
    H·W masked copies never need one huge buffer), the graphs fed with images in chunks of
    at most ``image_batch``. A graph whose batch axis is fixed at 1 (a Reshape to [1, -1]
    the specialisation could not free) is found out at its first batch and from then on
    runs one row at a time.

    On CUDA the sessions run through I/O binding: inputs are bound as device values and
    outputs allocated on the device, then copied back once (``io_binding`` forces it on or
    off, e.g. to exercise it on CPU).

    The sessions of the graphs in ``lazy`` (by default the rarely used ones) are made at
    their first run: the guided graph's was the largest step of a small network's load
    (0.7 s of DenseNet-121's 1.5 s, of ResNet-50's 1.5 s), paid by every start for methods
    few requests ask for. The first request of such a method pays it instead
    (BENCHMARKS.md, "Load memory").
    """

    def __init__(self, compiled: CompiledModel, providers: Sequence[str], threads: int,
                 max_batch: int = 256, *, image_batch: int = 8,
                 conv_algo_search: str = "EXHAUSTIVE", io_binding: bool | None = None,
                 lazy: Iterable[Capability] = RARELY_USED) -> None:
        self.compiled = compiled
        self.split = compiled.split
        self._session_args = (list(providers), threads, conv_algo_search)
        self._lazy = frozenset(lazy) - {Capability.BACKBONE}
        self._session_lock = threading.Lock()
        self._refused: dict[Capability, str] = {}
        self._sessions = {cap: self._make_session(cap) for cap in compiled.graphs
                          if cap not in self._lazy}
        for cap in self._sessions:  # a session holds its graph: the proto may go
            compiled.release(cap)
        self.providers: list[str] = self._sessions[Capability.BACKBONE].get_providers()
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        # Why the model runs elsewhere than asked (ONNX Runtime quietly drops a provider it
        # cannot start), for GET /models/{name}; None when it runs where asked.
        self.fallback = (f"{providers[0]} was requested but is not usable here; running on "
                         f"{CPU}" if providers and providers[0] != self.providers[0] else None)
        self._bind = self.device == "cuda" if io_binding is None else io_binding
        # No graph hands its memory back after a run: re-growing it on every run made guided
        # backprop ~1.5× slower (DenseNet-121 224: 180-210 against 119-137 ms, fresh
        # processes, 2026-12-02) and the fixations graph ~2× (161 against 82 ms). Every
        # session draws on one CPU arena (sessions._ensure_thread_pool), so what is kept is
        # the largest graph's peak, not the sum of them all.
        self._nhwc = self.split.target_layout is Layout.NHWC
        self.image_batch = max(1, image_batch)
        self._batches: dict[Capability, bool] = {}
        # The logits' width when the graph states it (one-hot seeds before any forward pass).
        logits = compiled.backbone.graph.output[1].type.tensor_type.shape.dim
        self.n_classes = logits[-1].dim_value if len(logits) else 0
        self.max_batch = max_batch if self._head_batches() else 1

    def _make_session(self, cap: Capability,
                      graph: onnx.ModelProto | None = None) -> ort.InferenceSession:
        providers, threads, conv_algo_search = self._session_args
        return make_session(self.compiled.graphs[cap] if graph is None else graph, providers,
                            threads, **session_options_for(cap),
                            conv_algo_search=conv_algo_search)

    def _session(self, cap: Capability) -> ort.InferenceSession:
        """The session of ``cap``'s graph, made now if it is a lazy one not made yet."""
        session = self._sessions.get(cap)
        if session is not None:
            return session
        if cap not in self.compiled.graphs:
            raise UnknownMethod(f"this model has no {cap.title} (see GET /models)")
        with self._session_lock:  # two first requests at once make one session
            session = self._sessions.get(cap)
            if session is None and cap not in self._refused:
                try:
                    # A graph assembled at its first lookup (build.RARELY_USED) is made here.
                    graph = self.compiled.graphs[cap]
                except CompileError as exc:
                    self._refused[cap] = "cannot be built: " + " ".join(str(exc).split())[:300]
                else:
                    try:
                        session = self._sessions[cap] = self._make_session(cap, graph)
                    except ORT_ERRORS as exc:
                        self._refused[cap] = ("cannot be loaded by ONNX Runtime: "
                                              + " ".join(str(exc).split())[:300])
                    else:
                        del graph  # the proto goes before the heap is trimmed below
                        self.compiled.release(cap)
                # As at the end of a load: what assembling and making the session freed
                # goes back.
                release_freed_memory()
                if cap in self._refused:
                    # Once: a graph refused is refused on every request.
                    log.warning("the %s of %s %s", cap.title, self.split.logits,
                                self._refused[cap])
        if session is None:
            raise UnknownMethod(f"this model's {cap.title} {self._refused[cap]}")
        return session

    @property
    def available(self) -> frozenset[Capability]:
        return frozenset(self.compiled.graphs)

    @property
    def has_head_vjp(self) -> bool:
        return Capability.HEAD_VJP in self.compiled.graphs

    @property
    def has_guided(self) -> bool:
        return Capability.GUIDED in self.compiled.graphs

    @property
    def has_fixations(self) -> bool:
        return Capability.FIXATIONS in self.compiled.graphs

    def run(self, cap: Capability, outputs: Sequence[str],
            feeds: Mapping[str, Feed]) -> list[np.ndarray]:
        """One graph run: the only call into ONNX Runtime for inference."""
        session = self._session(cap)
        if not self._bind:
            return session.run(list(outputs), dict(feeds))
        binding = session.io_binding()
        for name, value in feeds.items():
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value),
                                                         self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())

    def warm_up(self, image_shape: Sequence[int]) -> None:
        """Run the backbone on blank images once at one image and once at a full batch, so
        cuDNN's convolution search (per input shape) and ONNX Runtime's allocations happen
        at load, not in a request; on CPU, only the one-image check."""
        blank = np.zeros((1, *image_shape[1:]), dtype=np.float32)
        self.forward(blank)
        if self.device == "cuda" and self.image_batch > 1:
            self.forward(np.repeat(blank, self.image_batch, axis=0))
        # The end of the load: what compiling and opening the sessions freed goes back.
        release_freed_memory()

    def _rows(self, cap: Capability, fn: Callable[..., list[np.ndarray]], arrays:
              Sequence[np.ndarray], chunk: int) -> list[np.ndarray]:
        """``fn`` over row chunks of ``arrays`` (all with the same first axis), results
        concatenated; one row at a time for a graph that refuses batches."""
        n = arrays[0].shape[0]
        step = chunk if self._batches.get(cap, True) else 1
        parts: list[list[np.ndarray]] = []
        start = 0
        while start < n:
            stop = min(start + step, n)
            try:
                parts.append(fn(*(a[start:stop] for a in arrays)))
            except ORT_ERRORS as exc:
                if stop - start == 1:
                    raise
                # A batch axis fixed at 1 somewhere in the graph: row by row from now on.
                log.info("the %s graph of %s does not batch (%s); running rows one at a time",
                         cap, self.split.logits, type(exc).__name__)
                self._batches[cap] = False
                step = 1
                continue
            start = stop
        return [np.concatenate(out, axis=0) for out in zip(*parts)]

    def _to_native(self, acts: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(acts.transpose(0, 2, 3, 1)) if self._nhwc else acts

    def _from_native(self, acts: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(acts.transpose(0, 3, 1, 2)) if self._nhwc else acts

    def _head_batches(self) -> bool:
        """Whether the head graph accepts batches (a Reshape to a fixed batch of 1 cannot)."""
        c, h, w = self.split.target_shape
        probe = np.zeros((2, c, h, w), dtype=np.float32)
        try:
            out = self.run(Capability.HEAD, [self.split.logits], self._head_feeds(
                probe, np.zeros((2, self.split.prefix_tokens, c), dtype=np.float32)))
        except ORT_ERRORS as exc:
            log.info("head of %s does not batch (%s); running copies one at a time",
                     self.split.logits, type(exc).__name__)
            return False
        return bool(out[0].shape[0] == 2)

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image tensors (B, ...) → (activations (B, C, H, W), logits (B, K))."""
        acts, logits, _ = self.forward_context(images)
        return acts, logits

    def forward_context(self, images: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`forward`, plus the context the head reads beside the activations (a
        transformer's prefix tokens, (B, P, C); None for a CNN)."""
        names = [self.split.target, self.split.logits]
        if self.split.context:
            names.append(self.split.context)
        out = self._rows(Capability.BACKBONE, lambda x: self.run(
            Capability.BACKBONE, names, {self.split.image: x}), [images], self.image_batch)
        return self._from_native(out[0]), out[1], out[2] if len(out) > 2 else None

    def _context_rows(self, context: np.ndarray | None) -> list[np.ndarray]:
        """The context as extra row arrays for :meth:`_rows`: none for a CNN."""
        if not self.split.context:
            return []
        if context is None:
            raise ValueError("this model's head reads a context beside the activations "
                             "(a transformer's prefix tokens): pass the forward pass's")
        return [context.astype(np.float32, copy=False)]

    def _head_feeds(self, acts: np.ndarray, context: np.ndarray | None = None
                    ) -> dict[str, Feed]:
        feeds: dict[str, Feed] = {self.split.target: self._to_native(acts)}
        if self.split.context and context is not None:
            feeds[self.split.context] = context
        return feeds

    def head(self, acts: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """Activations (B, C, H, W), with their context rows for a model that has one (see
        :meth:`forward_context`) → logits (B, K)."""
        return self._rows(Capability.HEAD, lambda a, *c: self.run(
            Capability.HEAD, [self.split.logits], self._head_feeds(a, *c)),
            [acts.astype(np.float32, copy=False), *self._context_rows(context)],
            self.max_batch)[0]

    def _pooled_feed(self, cap: Capability, means: np.ndarray) -> tuple[str, np.ndarray]:
        """The pooled graphs' input: its name, and (R, C) means in its shape."""
        graph_input = next(i for i in self._session(cap).get_inputs() if i.name != SEED)
        return graph_input.name, means.astype(np.float32, copy=False).reshape(
            len(means), *graph_input.shape[1:])

    def pooled_head(self, means: np.ndarray) -> np.ndarray:
        """Spatial means of activations (R, C) → logits (R, K), for a head whose first step
        is that mean (a POOLED_HEAD graph in :attr:`available`)."""
        name, means = self._pooled_feed(Capability.POOLED_HEAD, means)
        return self._rows(Capability.POOLED_HEAD, lambda m: self.run(
            Capability.POOLED_HEAD, [self.split.logits], {name: m}), [means], self.max_batch)[0]

    def pooled_head_vjp(self, means: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """Σ_k seed[r, k] · ∂logit_k/∂means[r] for spatial means (R, C): (R, C)
        (a POOLED_HEAD_VJP graph in :attr:`available`)."""
        name, means = self._pooled_feed(Capability.POOLED_HEAD_VJP, means)
        out = self._rows(Capability.POOLED_HEAD_VJP, lambda m, s: self.run(
            Capability.POOLED_HEAD_VJP, [grad_name(name)], {name: m, SEED: s}),
            [means, seed.astype(np.float32, copy=False)], self.max_batch)[0]
        return out.reshape(len(out), -1)

    def head_vjp(self, acts: np.ndarray, seed: np.ndarray,
                 context: np.ndarray | None = None) -> np.ndarray:
        """Σ_k seed[b, k] · ∂logit_k/∂acts[b] for each b: (B, C, H, W)."""
        out = self._rows(Capability.HEAD_VJP, lambda a, s, *c: self.run(
            Capability.HEAD_VJP, [grad_name(self.split.target)],
            {**self._head_feeds(a, *c), SEED: s}),
            [acts.astype(np.float32, copy=False), seed.astype(np.float32, copy=False),
             *self._context_rows(context)], self.max_batch)[0]
        return self._from_native(out)

    def guided(self, images: np.ndarray,
               seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Guided backprop of rows (image r, seed r), with their forward pass.

        ``images`` holds one image tensor per seed row (R, ...), or one (1, ...) for all.
        Returns (activations (R, C, H, W), logits (R, K), gradients (R, ...)), the gradients
        being Σ_k seed[r, k]·∂logit_k/∂input under the guided rule, shaped like the input.
        The graph computes the forward pass anyway, so callers that know their classes
        up front need no separate ``forward``.
        """
        seeds = seeds.astype(np.float32, copy=False)
        if len(images) == 1 and len(seeds) > 1:
            images = np.repeat(images, len(seeds), axis=0)
        outputs = [self.split.target, self.split.logits,
                   grad_name(self.split.image, GUIDED_PREFIX)]
        acts, logits, grads = self._rows(Capability.GUIDED, lambda x, s: self.run(
            Capability.GUIDED, outputs, {self.split.image: x, f"{GUIDED_PREFIX}seed": s}),
            [images, seeds], self.image_batch)
        return self._from_native(acts), logits, grads

    def all_activations(self, tensor: np.ndarray) -> Traced:
        """The forward pass of one image (1, ...) through the fixations graph: the
        activations, logits and the tensors CNN Fixations reads (``fixations_plan.needed``,
        each in the model's own layout; the image itself is ``tensor``)."""
        plan = self.compiled.fixations_plan
        if plan is None:
            raise UnknownMethod(f"this model has no {Capability.FIXATIONS.title} "
                                "(see GET /models)")
        names = exposed(plan, self.split.target)
        values = dict(zip(names, self.run(Capability.FIXATIONS, names, {plan.image: tensor})))
        found = {n: values[n] for n in plan.needed if n != plan.image}
        if plan.image in plan.needed:
            found[plan.image] = tensor
        return Traced(self._from_native(values[self.split.target]), values[self.split.logits],
                      found)

    def capture(self, images: np.ndarray, activation: Activation,
                spec: InputSpec | None = None, prefetch: Sequence[Row] = (),
                fixations: Iterable[int] = ()) -> Captures:
        """The forward pass of an image batch (B, ...) as the captures methods read.

        Args:
            images: the network inputs, one per image, normalised.
            activation: how the logits become scores.
            spec: how the images were normalised (guided maps are taken w.r.t. the image
                before normalisation) and their layout; None: as fed, NCHW.
            prefetch: guided rows (logit target) known before the forward pass: their images'
                forward pass is the guided graph's, which leaves their maps in the memo.
            fixations: images whose requests ask for CNN Fixations: unless the guided graph
                runs them, their forward pass is the fixations graph's, which leaves the
                tensors the walk reads with the batch's graphs.
        """
        graphs = BatchGraphs(self, images, spec)
        rows = list(dict.fromkeys(r for r in prefetch if r.cls is not None)) \
            if self.has_guided and self.n_classes else []
        assert all(r.target is Target.LOGIT for r in rows), "prefetched seeds are one-hot"
        guided_images = {r.image for r in rows}
        traced: dict[int, Traced] = {}
        if self.has_fixations and not self.split.context:
            for image in dict.fromkeys(fixations):
                if image in guided_images:
                    continue
                try:
                    traced[image] = self.all_activations(images[image:image + 1])
                except UnknownMethod:
                    break  # the graph cannot run: the method says so, to its requests only
        plain = [i for i in range(len(images)) if i not in guided_images and i not in traced]
        acts: list[np.ndarray | None] = [None] * len(images)
        logits: list[np.ndarray | None] = [None] * len(images)
        if plain:
            a, z, context = self.forward_context(images[plain])
            for k, i in enumerate(plain):
                acts[i], logits[i] = a[k], z[k]
            if context is not None:
                # A model with context has no guided graph (the compiler refuses it for
                # transformers), so every image of the batch went through this forward.
                graphs.context = context
        for image, trace in traced.items():
            acts[image], logits[image] = trace.acts[0], trace.logits[0]
            graphs.traced[image] = trace.activations
        memo: dict[object, object] = {}
        # One guided run per image, of that image's rows only: its activations and logits
        # then never depend on batch-mates (CRM magnifies the last bits of the logits).
        for image in dict.fromkeys(r.image for r in rows):
            mine = [r for r in rows if r.image == image]
            seeds = np.eye(self.n_classes, dtype=np.float32)[[r.cls for r in mine]]
            a, z, grads = self.guided(images[image:image + 1], seeds)
            acts[image], logits[image] = a[0], z[0]
            for row, values in zip(mine, graphs.to_image(grads).sum(axis=1)):
                memo["guided", row] = values
        return Captures(np.stack(acts), np.stack(logits), activation, graphs, memo)  # type: ignore[arg-type]


class BatchGraphs:
    """The graphs of one engine bound to one image batch (service.methods.base.Graphs)."""

    def __init__(self, engine: Engine, images: np.ndarray, spec: InputSpec | None) -> None:
        self.engine = engine
        self.images = images
        self._nhwc = spec is not None and spec.layout is Layout.NHWC
        channels = images.shape[-1] if self._nhwc else images.shape[1]
        std = np.asarray(spec.std if spec is not None else [1.0] * channels, dtype=np.float32)
        self._inv_std = (1.0 / std)[None, :, None, None]
        # Per image, the tensors the fixations walk reads, once its graph has run.
        self.traced: dict[int, dict[str, np.ndarray]] = {}
        # The batch's context rows (a transformer's prefix tokens), set by the forward pass.
        self.context: np.ndarray | None = None

    def _context(self, images: Sequence[int]) -> np.ndarray | None:
        return None if self.context is None else self.context[list(images)]

    def head(self, acts: np.ndarray, images: Sequence[int]) -> np.ndarray:
        return self.engine.head(acts, self._context(images))

    @property
    def pooled(self) -> bool:
        return Capability.POOLED_HEAD in self.engine.available

    def pooled_head(self, means: np.ndarray) -> np.ndarray:
        return self.engine.pooled_head(means)

    @property
    def pooled_vjp(self) -> bool:
        return Capability.POOLED_HEAD_VJP in self.engine.available

    def pooled_head_vjp(self, means: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        return self.engine.pooled_head_vjp(means, seeds)

    def head_vjp(self, acts: np.ndarray, seeds: np.ndarray,
                 images: Sequence[int]) -> np.ndarray:
        return self.engine.head_vjp(acts, seeds, self._context(images))

    def to_image(self, grads: np.ndarray) -> np.ndarray:
        """Gradients w.r.t. the network input → w.r.t. the image before normalisation,
        channel-first: x_norm = (x − mean) / std, so d/dx = d/dx_norm / std per channel."""
        if self._nhwc:
            grads = grads.transpose(0, 3, 1, 2)
        return grads * self._inv_std

    def guided(self, images: Sequence[int], seeds: np.ndarray) -> np.ndarray:
        return self.to_image(self.engine.guided(self.images[list(images)], seeds)[2])

    def fixations(self, image: int) -> tuple[Mapping[str, np.ndarray], FixationPlan]:
        plan = self.engine.compiled.fixations_plan
        if plan is None:
            raise UnknownMethod(f"this model has no {Capability.FIXATIONS.title} "
                                "(see GET /models)")
        if image not in self.traced:
            self.traced[image] = self.engine.all_activations(
                self.images[image:image + 1]).activations
        return self.traced[image], plan
