"""All configuration: one Settings class, read from MEDEXPLAIN_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PREFIX = "MEDEXPLAIN_"
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseModel):
    """Service settings. Each field is read from ``MEDEXPLAIN_<FIELD>`` (upper case)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: Path = Field(BUNDLED_MODELS, description="the model repository folder")
    default_model: str | None = Field(
        None, description="default model name; else the only one, or the first by name"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime providers; auto = CUDA when a GPU is usable"
    )
    # 0 lets ONNX Runtime use every core; a service sharing a machine should set it.
    threads: int = Field(0, ge=0)
    # Radiographs as DICOM are ~10-50 MB; 64 MB leaves room for big ones without letting a
    # client make the service hold arbitrary amounts of memory.
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Pixel cap checked from headers before decoding (decompression bombs).
    max_pixels: int = Field(50_000_000, ge=1024)
    # Frame cap of multi-frame DICOM, checked from the header before decoding. One frame
    # is explained per request, but the whole object is parsed and, without an offset
    # table, every fragment before the frame is walked; cine loops and tomosynthesis run
    # to a few hundred frames, so 1000 refuses only the pathological ones.
    max_frames: int = Field(1000, ge=1)
    # JPEG 2000 frames decoded at the smallest power-of-two reduction still as large as the
    # network input: ~14x faster on a 2k radiograph, but the pixels (hence the scores) are
    # no longer those of the full image, so a lossless file would stop matching its
    # uncompressed twin. Off by default; see BENCHMARKS.md for the measured trade.
    j2k_reduced_resolution: bool = False
    # Requests computing at once; more wait in the queue, beyond the queue → 503.
    max_concurrency: int = Field(2, ge=1)
    max_queue: int = Field(16, ge=0)
    # Upper bound of masked/seeded copies per head run (CRM on large target layers).
    head_batch: int = Field(256, ge=1)
    # Compiled graphs are always cached in memory by model hash; a folder here also keeps
    # them across restarts (off by default: the service writes nothing unless told to).
    compile_cache: Path | None = None
    api_keys: tuple[str, ...] = Field((), description="accepted API keys; empty = no auth")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Scale-out on Ray Serve (`medexplain serve --ray`, the optional extra `ray`); read by
    # service/scaleout/ray_serve.py only. Every replica runs the whole app with the settings
    # above (its own models, limiter and metrics), so MAX_CONCURRENCY and MAX_QUEUE apply
    # per replica.
    # The Ray cluster to join ("ray://head:10001" or "head:6379"); unset, Ray's own
    # RAY_ADDRESS is taken, and without either a local cluster is started for the process.
    ray_address: str | None = None
    # Fixed replica count when autoscaling is off (`--replicas N`).
    ray_replicas: int = Field(1, ge=1)
    # Resources reserved per replica: ray_actor_options. A GPU fraction (0.5) lets two
    # replicas share one device; 0 keeps replicas on CPU. Set THREADS to match ray_num_cpus,
    # or every replica's ONNX Runtime sizes its pool to the whole node.
    ray_num_cpus: float = Field(1.0, ge=0)
    ray_num_gpus: float = Field(0.0, ge=0)
    # Autoscaling between min and max replicas, aiming at this many requests in flight per
    # replica: MAX_CONCURRENCY's default, i.e. scale up once requests start to queue.
    ray_autoscaling: bool = False
    ray_min_replicas: int = Field(1, ge=0)
    ray_max_replicas: int = Field(4, ge=1)
    ray_target_ongoing_requests: float = Field(2.0, gt=0)
    # Where Ray Serve runs its HTTP proxies: on every node (Ray's default; what a Kubernetes
    # Service in front of the nodes wants) or on the head node only.
    ray_proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    # Ray Serve's access logs, a line per request from the proxy and from the replica
    # (method, route, status, latency; never the query string or a body). Off: each line
    # is a file write, and more on the request path of a small machine.
    ray_access_log: bool = False

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        short = [k for k in value if len(k) < 16]
        if short:
            raise ValueError("API keys must be at least 16 characters long")
        return value

    @model_validator(mode="after")
    def _replica_range(self) -> Settings:
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError("ray_min_replicas must not exceed ray_max_replicas")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``MEDEXPLAIN_*`` variables, then ``overrides`` (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            key = PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        if "ray_address" not in values and env.get("RAY_ADDRESS"):
            values["ray_address"] = env["RAY_ADDRESS"]  # Ray's own name for it
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests override the dependency instead)."""
    return Settings.from_env()


__all__ = ["Settings", "ValidationError", "get_settings"]
