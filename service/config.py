"""All configuration: one Settings class, read from MEDEXPLAIN_* environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

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

    # Errors never quote the values (a bad MEDEXPLAIN_API_KEYS must not print the keys).
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    models: Path = Field(BUNDLED_MODELS, description="the model repository folder")
    default_model: str | None = Field(
        None, description="default model name; else the only one, or the first by name"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime providers; auto = CUDA when a GPU is usable"
    )
    # 0: as many as the container's CPU quota allows (cgroup cpu.max / cfs_quota, see
    # resolve_threads), or every core when there is none; a service sharing a machine
    # should set it.
    threads: int = Field(0, ge=0)
    # Radiographs as DICOM are ~10-50 MB; 64 MB leaves room for big ones without letting a
    # client make the service hold arbitrary amounts of memory.
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Pixel cap checked from headers before decoding (decompression bombs).
    max_pixels: int = Field(50_000_000, ge=1024)
    # Memory one request's decode may take, estimated from the headers before decoding:
    # the decoder's output (rows x columns x samples x bytes), codec buffers, the 0..1
    # float32 image and the parsed DICOM dataset (service.imaging.budget). 224 MiB fits
    # the largest chest radiographs (~4300 x 4300 x 16 bits: ~150 MB native, ~205 MB as
    # JPEG 2000) and refuses a 7000 x 7000 image; a deflated dataset inflates to at most
    # half of it.
    max_decode_bytes: int = Field(224 << 20, ge=1 << 20)
    # Frame cap of multi-frame DICOM, checked from the header before decoding. One frame
    # is explained per request, but the whole object is parsed and, without an offset
    # table, every fragment before the frame is walked; cine loops and tomosynthesis run
    # to a few hundred frames, so 1000 refuses only the pathological ones.
    max_frames: int = Field(1000, ge=1)
    # Bytes one request's answer may hold (service.outputs.limit), counted as its maps and
    # captures are encoded: past it, 422 answer_too_large. 256 MiB holds a chest
    # radiograph's eight uncompressed captures (101 MB for RG1_UNCR) or eight npy maps at
    # its full size (154 MB); a 27-megapixel image's eight captures (746 MB) need a
    # compressed transfer syntax, or fewer maps.
    max_answer_bytes: int = Field(256 << 20, ge=64 << 10)
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
    # Open the sessions of the graphs few requests use (guided backprop, CNN Fixations) at
    # their first request instead of at load: a shorter start and less memory for models
    # whose clients never ask for them; that first request pays ~0.6-0.8 s once
    # (BENCHMARKS.md, "Load memory"). False opens every session at load.
    lazy_sessions: bool = True
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
    # text: one readable line per record, for a terminal; json: one object per line
    # (time, level, logger, request_id, message; access lines add method, route, status,
    # duration_ms), for log collectors (service.logs).
    log_format: Literal["text", "json"] = "text"

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
    # On SIGTERM: /readyz answers 503 draining at once, uploads arriving after it get 503
    # draining, and requests the server already had get this long to finish before they are
    # cancelled and the process exits. Below Kubernetes' default grace period (30 s).
    shutdown_timeout_s: float = Field(25.0, gt=0)
    # With api_keys set, also require a key for /metrics, and for /docs, /redoc and
    # /openapi.json (off: monitoring and documentation stay open on a private network).
    protect_metrics: bool = False
    protect_docs: bool = False

    # --- TLS (service.tls) ---
    # The service's certificate (PEM, followed by its chain) and its unencrypted private key
    # (PEM, readable by the service alone). With both set, the HTTP API is HTTPS and the
    # DICOM SCP speaks DICOM TLS (PS3.15 Annex B), TLS 1.2 or later, on the same ports.
    # Unset: plain TCP, for a private network or behind a proxy that terminates TLS.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # CA certificates (PEM) that sign the clients' certificates: when set, every HTTPS and
    # DICOM TLS client must present one (mutual TLS; IHE ATNA's node authentication).
    tls_client_ca: Path | None = None
    # CA certificates (PEM) trusted when the service connects out (C-STORE over DICOM TLS,
    # STOW-RS to an https URL); unset: the system's. The service's own certificate, when
    # set, is shown to those servers.
    tls_ca: Path | None = None

    # DICOM networking (service.dimse): a C-STORE SCP listening on ``host`` at this port,
    # explaining what it receives through the service's own /explain. Off when unset.
    dicom_port: int | None = Field(None, ge=1, le=65535)
    dicom_ae_title: str = "MEDEXPLAIN"
    # Calling AE titles allowed to associate; empty: any (the called AE title must be ours).
    dicom_allowed_callers: tuple[str, ...] = ()
    # Where the results go: "AET@host:port" by C-STORE, and/or a DICOMweb base URL
    # (e.g. http://pacs:8042/dicom-web) by STOW-RS. Neither: received images are still
    # explained (and checked) but the results go nowhere, which is only useful for tests.
    dicom_destination: str | None = None
    dicom_stow_url: str | None = None
    # Results by C-STORE over DICOM TLS (verified against tls_ca, the host name checked).
    dicom_destination_tls: bool = False
    # Which DICOM objects are sent for each received image (sc: a Secondary Capture per
    # explanation, one series per method; sr: one Structured Report; gsps: one Grayscale
    # Softcopy Presentation State; seg: one Segmentation), all from one /explain.
    dicom_outputs: tuple[Literal["sc", "sr", "gsps", "seg"], ...] = ("sc",)
    # The transfer syntax of the captures' pixels sent on (one of
    # service.outputs.transfer_syntax's, e.g. 1.2.840.10008.1.2.4.80 for JPEG-LS lossless);
    # a C-STORE destination that takes only uncompressed ones gets them decompressed.
    dicom_transfer_syntax: str = "1.2.840.10008.1.2.1"
    # /explain parameters for received images (model, methods, classes, ...); not dicom=.
    dicom_query: str = "methods=gradcam"
    # Seconds for one received image's explanation and delivery before it gets a failure.
    dicom_timeout_s: float = Field(120.0, gt=0)

    # Scale-out on Ray Serve (`medexplain serve --ray`, the optional extra `ray`); read by
    # service/scaleout/ray_serve.py only. Every replica runs the whole app with the settings
    # above (its own models, scheduler, limiter and metrics), except the DICOM SCP; Ray's
    # router holds MAX_QUEUE (per proxy) in front of the replicas.
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
    # How HTTP reaches the replicas in a local cluster: "proxy", Serve's proxy actor (Ray's
    # supported default; 12-15 ms a request here even for a no-op app), or "haproxy", Ray
    # 2.60's direct ingress (HAProxy in front, each replica takes HTTP itself: 2 ms on the
    # smallest request). A cluster that is joined keeps the ingress it was started with.
    ray_ingress: Literal["proxy", "haproxy"] = "proxy"

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

    @model_validator(mode="after")
    def _budget_holds_one_upload(self) -> Settings:
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise ValueError("max_inflight_bytes must be at least max_upload_bytes, or the "
                             "largest allowed upload could never be admitted")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile are set together (the certificate "
                             "and its private key)")
        if self.tls_client_ca is not None and self.tls_certfile is None:
            raise ValueError("tls_client_ca needs tls_certfile and tls_keyfile: clients are "
                             "asked for a certificate only over TLS")
        if self.dicom_destination_tls and self.dicom_destination is None:
            raise ValueError("dicom_destination_tls needs dicom_destination")
        for name in ("tls_certfile", "tls_keyfile", "tls_client_ca", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} is not a file")
        return self

    @property
    def tls_pair(self) -> tuple[Path, Path] | None:
        """The service's (certificate, key) files when TLS is on (_tls_complete keeps the
        two set together), else None."""
        if self.tls_certfile is None or self.tls_keyfile is None:
            return None
        return self.tls_certfile, self.tls_keyfile

    @field_validator("dicom_allowed_callers", "dicom_outputs", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("dicom_allowed_callers")
    @classmethod
    def _ae_titles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_ae_title(v) for v in value)

    @field_validator("dicom_destination")
    @classmethod
    def _destination(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _DESTINATION.fullmatch(value.strip())
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise ValueError("dicom_destination must be AET@host:port")
        _ae_title(match["aet"])
        return value.strip()

    @field_validator("dicom_stow_url")
    @classmethod
    def _stow_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("dicom_stow_url must be an http(s) DICOMweb base URL")
        return value.rstrip("/") if value else None

    @field_validator("dicom_transfer_syntax")
    @classmethod
    def _transfer_syntax(cls, value: str) -> str:
        from service.outputs.transfer_syntax import TRANSFER_SYNTAXES  # the outputs' registry

        value = value.strip()
        if value not in TRANSFER_SYNTAXES:
            raise ValueError(f"dicom_transfer_syntax must be one of "
                             f"{', '.join(TRANSFER_SYNTAXES)}")
        return value

    @field_validator("dicom_query")
    @classmethod
    def _query(cls, value: str) -> str:
        try:
            pairs = parse_qsl(value, strict_parsing=bool(value))
        except ValueError as exc:
            raise ValueError(f"dicom_query is not a query string: {exc}") from exc
        if any(key == "dicom" for key, _ in pairs):
            raise ValueError("dicom_query must not set dicom=; dicom_outputs chooses")
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


CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP, own: str | None = None) -> int | None:
    """Whole CPUs the process's cgroup lets it use (the quota rounded up), None if unlimited.

    ONNX Runtime sizes its pool from the host's cores, which under a container's CPU limit
    (``docker run --cpus``, a Kubernetes CPU limit) means more threads than CPU time and a
    throttled, slower service. cgroup v2: ``cpu.max`` ("quota period" or "max period") of
    the process's group and its ancestors, the smallest wins; cgroup v1:
    ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (-1: none).

    Args:
        root: where the cgroup file system is mounted.
        own: the contents of ``/proc/self/cgroup`` (read when None).
    """
    if own is None:
        try:
            own = Path("/proc/self/cgroup").read_text(encoding="ascii")
        except OSError:
            own = ""
    if (root / "cgroup.controllers").is_file():  # v2: one unified hierarchy
        path = next((line[3:].strip() for line in own.splitlines() if line.startswith("0::")),
                    "/")
        folder = root / path.lstrip("/")
        limits = []
        # Inside a container's cgroup namespace the own path is "/" and only root counts.
        while True:
            limits.append(_quota_v2(folder / "cpu.max"))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
        found = [limit for limit in limits if limit is not None]
        return min(found) if found else None
    # v1: the cpu controller's group ("3:cpu,cpuacct:/path"), else its mount's root.
    parts = [line.split(":", 2) for line in own.splitlines()]
    path = next((p[2].strip() for p in parts if len(p) == 3 and "cpu" in p[1].split(",")), "/")
    for name in ("cpu", "cpu,cpuacct"):
        for folder in (root / name / path.lstrip("/"), root / name):
            quota = _read_int(folder / "cpu.cfs_quota_us")
            period = _read_int(folder / "cpu.cfs_period_us")
            if quota is not None and period:
                return None if quota < 0 else max(1, -(-quota // period))
    return None


def _quota_v2(path: Path) -> int | None:
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return max(1, -(-int(quota) // int(period)))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def resolve_threads(threads: int, root: Path = CGROUP) -> int:
    """The compute threads to use: ``threads`` when set, else the CPU quota, else 0 (ONNX
    Runtime's choice: every core)."""
    if threads:
        return threads
    return cpu_quota(root) or 0


_DESTINATION = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})")


def _ae_title(value: str) -> str:
    """An AE title: 1-16 printable ASCII characters, not only spaces, no backslash."""
    text = value.strip()
    if not 1 <= len(text) <= 16 or not all(" " <= c <= "~" and c != "\\" for c in text):
        raise ValueError(f"{value!r} is not an AE title (1-16 ASCII characters, no backslash)")
    return text


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests override the dependency instead)."""
    return Settings.from_env()


__all__ = ["Settings", "ValidationError", "cpu_quota", "get_settings", "resolve_threads"]
