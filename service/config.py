"""All configuration: one Settings class, read from MEDEXPLAIN_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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

    # --- The HTTP edge: admission before the body is read, timeouts, drain ---
    # Bytes of request bodies held at once across all requests (each counted at its
    # Content-Length, or at max_upload_bytes when chunked): past it → 503 + Retry-After
    # before a byte of the body is read. Four uploads of the maximum size: together with the
    # request count (max_concurrency + max_queue) it bounds what uploads can make the
    # process hold, whatever their number.
    max_inflight_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # The request line and headers must have arrived this long after the connection opened
    # (or after its first byte on a kept-alive one); else the connection is closed (408).
    header_timeout_s: float = Field(10.0, gt=0)
    # A body must keep up with body_min_rate bytes/s after a grace of body_timeout_s: at any
    # moment t after the headers, received >= body_min_rate * (t - body_timeout_s); else 408
    # and the connection is closed. 16 KiB/s still takes a 64 MB upload in ~70 minutes.
    body_timeout_s: float = Field(10.0, gt=0)
    body_min_rate: int = Field(16 * 1024, ge=1)
    # A kept-alive connection idle this long is closed.
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    # From the end of the body to the start of the answer (queue wait, decode, compute);
    # past it → 503 compute_timeout. Compute already running in a thread cannot be
    # interrupted: it goes on, holding its slot and its bytes, and its answer is dropped.
    request_timeout_s: float = Field(60.0, gt=0)
    # On SIGTERM: /readyz answers 503 draining at once, new uploads get 503 draining, and
    # requests in progress get this long to finish before they are cancelled and the
    # process exits. Below Kubernetes' default terminationGracePeriodSeconds (30).
    shutdown_timeout_s: float = Field(25.0, gt=0)
    # With api_keys set, also require a key for /metrics, and for /docs, /redoc and
    # /openapi.json (off: monitoring and documentation stay open on a private network).
    protect_metrics: bool = False
    protect_docs: bool = False

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
    def _budget_holds_one_upload(self) -> Settings:
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise ValueError("max_inflight_bytes must be at least max_upload_bytes, or the "
                             "largest allowed upload could never be admitted")
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
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests override the dependency instead)."""
    return Settings.from_env()


__all__ = ["Settings", "ValidationError", "get_settings"]
