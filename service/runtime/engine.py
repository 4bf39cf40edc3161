"""Runs one compiled model: the only place that calls ONNX Runtime for inference."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from service.graph.autodiff import SEED, grad_name
from service.graph.build import GUIDED_PREFIX, CompiledModel
from service.models.spec import Layout
from service.runtime.sessions import ORT_ERRORS, make_session

log = logging.getLogger(__name__)


class Engine:
    """Sessions for the backbone, head and head VJP of one model (and the guided and
    fixations graphs); a graph the compiler could not build gets no session.

    All arrays crossing this class's boundary hold target-layer activations channel-first,
    (B, C, H, W), whatever the model stores; the head runs in chunks of at most
    ``max_batch`` copies so CRM's H·W masked copies never need one huge buffer.
    """

    def __init__(self, compiled: CompiledModel, providers: list[str], threads: int,
                 max_batch: int = 256) -> None:
        self.compiled = compiled
        self.split = compiled.split
        self._backbone = make_session(compiled.backbone, providers, threads)
        # The backbone runs on every request and keeps ONNX Runtime's repacked weights; the
        # other graphs share the plain ones (a private packed copy each cost the size of
        # the network's weights again, per graph).
        self._head = make_session(compiled.head, providers, threads, prepack=False)
        self._head_vjp = (make_session(compiled.head_vjp, providers, threads, prepack=False)
                          if compiled.head_vjp is not None else None)
        self._guided = (make_session(compiled.guided, providers, threads, prepack=False)
                        if compiled.guided is not None else None)
        self._guided_batches = True
        self._fixations = (make_session(compiled.fixations, providers, threads, prepack=False)
                           if compiled.fixations is not None else None)
        self.providers = self._backbone.get_providers()
        self._nhwc = self.split.target_layout is Layout.NHWC
        self.max_batch = max_batch if self._head_batches() else 1

    @property
    def has_head_vjp(self) -> bool:
        return self._head_vjp is not None

    @property
    def has_guided(self) -> bool:
        return self._guided is not None

    @property
    def has_fixations(self) -> bool:
        return self._fixations is not None

    def all_activations(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """The tensors CNN Fixations reads (``fixations_plan.needed``) for one image (1, ...),
        each in the model's own layout; the image itself is ``tensor``."""
        plan = self.compiled.fixations_plan
        if self._fixations is None or plan is None:
            raise RuntimeError("this model has no fixations graph")
        names = [n for n in plan.needed if n != plan.image]
        values = self._fixations.run(names, {plan.image: tensor}) if names else []
        found = dict(zip(names, values))
        if plan.image in plan.needed:
            found[plan.image] = tensor
        return found

    def _to_native(self, acts: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(acts.transpose(0, 2, 3, 1)) if self._nhwc else acts

    def _from_native(self, acts: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(acts.transpose(0, 3, 1, 2)) if self._nhwc else acts

    def _head_batches(self) -> bool:
        """Whether the head graph accepts batches (a Reshape to a fixed batch of 1 cannot)."""
        c, h, w = self.split.target_shape
        probe = np.zeros((2, c, h, w), dtype=np.float32)
        try:
            out = self._head.run([self.split.logits], {self.split.target: self._to_native(probe)})
        except ORT_ERRORS as exc:
            log.info("head of %s does not batch (%s); running copies one at a time",
                     self.split.logits, type(exc).__name__)
            return False
        return bool(out[0].shape[0] == 2)

    def forward(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image tensor (1, ...) → (activations (1, C, H, W), logits (1, K))."""
        acts, logits = self._backbone.run(
            [self.split.target, self.split.logits], {self.split.image: tensor}
        )
        return self._from_native(acts), logits

    def _chunked(self, fn: Callable[..., np.ndarray], *arrays: np.ndarray) -> np.ndarray:
        n = arrays[0].shape[0]
        parts = [fn(*(a[i:i + self.max_batch] for a in arrays))
                 for i in range(0, n, self.max_batch)]
        return np.concatenate(parts, axis=0)

    def head(self, acts: np.ndarray) -> np.ndarray:
        """Activations (B, C, H, W) → logits (B, K)."""
        def run(a: np.ndarray) -> np.ndarray:
            return self._head.run([self.split.logits],
                                  {self.split.target: self._to_native(a)})[0]
        return self._chunked(run, acts.astype(np.float32, copy=False))

    def head_vjp(self, acts: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """Σ_k seed[b, k] · ∂logit_k/∂acts[b] for each b: (B, C, H, W)."""
        session = self._head_vjp
        if session is None:
            raise RuntimeError("this model has no head VJP graph")

        def run(a: np.ndarray, s: np.ndarray) -> np.ndarray:
            out = session.run([grad_name(self.split.target)],
                              {self.split.target: self._to_native(a), SEED: s})[0]
            return self._from_native(out)
        return self._chunked(run, acts.astype(np.float32, copy=False),
                             seed.astype(np.float32, copy=False))

    def guided(self, tensor: np.ndarray,
               seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Guided backprop for one image tensor (1, ...), with its forward pass.

        Returns (activations (1, C, H, W), logits (1, K), gradients (B, ...)), the gradients
        being Σ_k seed[b, k]·∂logit_k/∂input under the guided rule, shaped like the input.
        The graph computes the forward pass anyway, so callers that know their classes
        up front need no separate ``forward``.
        """
        if self._guided is None:
            raise RuntimeError("this model has no guided graph")
        outputs = [self.split.target, self.split.logits, grad_name(self.split.image, GUIDED_PREFIX)]
        seed_name = f"{GUIDED_PREFIX}seed"
        seeds = seeds.astype(np.float32, copy=False)
        if self._guided_batches and len(seeds) > 1:
            copies = np.repeat(tensor, len(seeds), axis=0)
            try:
                acts, logits, grads = self._guided.run(
                    outputs, {self.split.image: copies, seed_name: seeds})
                return self._from_native(acts[:1]), logits[:1], grads
            except ORT_ERRORS:
                # A graph with a fixed batch of 1 (e.g. a Reshape to [1, -1]): one at a time.
                self._guided_batches = False
        runs = [self._guided.run(outputs, {self.split.image: tensor, seed_name: s[None]})
                for s in seeds]
        return (self._from_native(runs[0][0]), runs[0][1],
                np.concatenate([r[2] for r in runs]))
