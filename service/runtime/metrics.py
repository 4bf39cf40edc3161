"""The compute stream's metrics, on prometheus_client's default registry.

Named after Triton's (nv_inference_count, nv_inference_exec_count,
nv_inference_queue_duration_us, nv_inference_compute_infer_duration_us): durations are
cumulative microseconds per model, the compute time of a batch counted once for every
request in it, so queue ÷ count and compute ÷ count are per-request means.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INFERENCE_COUNT = Counter(
    "medexplain_inference_count", "requests computed (each request of a batch counts)",
    ["model"])
EXEC_COUNT = Counter(
    "medexplain_inference_exec_count", "batches computed", ["model"])
QUEUE_DURATION_US = Counter(
    "medexplain_inference_queue_duration_us",
    "cumulative time requests waited in the batcher's queue, microseconds", ["model"])
COMPUTE_DURATION_US = Counter(
    "medexplain_inference_compute_infer_duration_us",
    "cumulative compute time of the batches, once per request in them, microseconds",
    ["model"])
BATCH_SIZE = Histogram(
    "medexplain_inference_batch_size", "requests per computed batch", ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
PENDING = Gauge(
    "medexplain_inference_pending_request_count",
    "requests waiting in the batcher's queue", ["model"])

__all__ = ["BATCH_SIZE", "COMPUTE_DURATION_US", "EXEC_COUNT", "INFERENCE_COUNT", "PENDING",
           "QUEUE_DURATION_US"]
