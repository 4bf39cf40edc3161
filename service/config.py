"""All configuration: one Settings class, read from MEDEXPLAIN_* environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    # Requests admitted at once are max_concurrency + max_queue, beyond → 503. Their CPU
    # work (decode, preprocess, render) runs in max_concurrency threads; their compute runs
    # on one stream per device, in batches (see max_batch_size).
    max_concurrency: int = Field(2, ge=1)
    max_queue: int = Field(16, ge=0)
    # Dynamic batching (Triton's names): requests of one model computed together, at most
    # max_batch_size (1 = no batching); a request waits at most max_queue_delay_ms for
    # batch-mates (0: take what is queued, never wait for more).
    max_batch_size: int = Field(8, ge=1, le=256)
    max_queue_delay_ms: float = Field(0.0, ge=0.0, le=10_000.0)
    # cuDNN's convolution algorithm search on CUDA (EXHAUSTIVE: the fastest kernels, found
    # per input shape at the warm-up; HEURISTIC: a quicker start).
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    # Upper bound of masked/seeded copies per head run (CRM on large target layers).
    head_batch: int = Field(256, ge=1)
    # Compiled graphs are always cached in memory by model hash; a folder here also keeps
    # them across restarts (off by default: the service writes nothing unless told to).
    compile_cache: Path | None = None
    api_keys: tuple[str, ...] = Field((), description="accepted API keys; empty = no auth")
    # Origins a browser frontend may call the API from (CORS), comma-separated; "*" for any.
    # Empty (the default): no CORS headers, so browsers keep other origins out.
    cors_origins: tuple[str, ...] = ()
    # Images in one KServe V1 request ("instances"): each is a full pipeline run in one
    # queue slot, so the bound keeps one request from holding a slot for long.
    max_instances: int = Field(8, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_keys", "cors_origins", mode="before")
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

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [o for o in value if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o)]
        if bad:
            raise ValueError("CORS origins are '*' or scheme://host[:port], with no path")
        return value

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
