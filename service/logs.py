"""Logging: plain text or JSON lines, a request id on every line, and nothing from uploads.

Two layers:

- :func:`install` (called by the app factory, so it holds wherever the app runs) keeps
  library output from carrying upload data: records of the libraries that read uploads
  (pydicom, Pillow, OpenJPEG, ...) keep their logger, level and source line but lose their
  text, which quotes attribute values (``Invalid value for VR UI: '...'``), and the
  decoders' errors (an upload that does not decode: the client gets a 4xx) are logged as
  warnings; warnings become
  such scrubbed log lines instead of stderr text; and pydicom stops validating the values
  it converts (it only warned, quoting them: the decoder validates what it uses itself).
- :func:`configure` (called by ``medexplain serve``) writes every record to stderr as plain
  text (the default, for a terminal) or as one JSON object per line (``log_format=json``,
  for collectors), each with the request id of the request it belongs to. Tracebacks are
  rendered as the exception's type and frames only: an exception's message may quote what
  a client sent.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import warnings
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, Literal, TextIO

# The request a line belongs to; "-" outside requests (start-up, shutdown).
request_id: ContextVar[str] = ContextVar("request_id", default="-")

# Loggers of the libraries that parse uploads (over HTTP or DICOM networking), and Python's
# warnings: their text is never kept. Children (PIL.PngImagePlugin, ...) included.
UNTRUSTED_LOGGERS: Final[tuple[str, ...]] = (
    "pydicom", "pynetdicom", "PIL", "highdicom", "pylibjpeg", "openjpeg", "libjpeg", "rle",
    "cv2", "py.warnings",
)
WITHHELD: Final[str] = "(message withheld: library text may quote upload data)"
# Of those, the decoders: their errors are about an upload that cannot be decoded, which
# the client is told of (a 4xx), not faults of the service, so they are logged as warnings
# (pydicom logged two ERROR lines for each such JPEG, noise for whoever alerts on ERROR).
DECODER_LOGGERS: Final[tuple[str, ...]] = (
    "pydicom", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "rle", "cv2",
)
WARNINGS_LOGGER: Final[str] = "medexplain.warnings"


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _scrubbing_factory(base: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = base(*args, **kwargs)
        if _under(record.name, UNTRUSTED_LOGGERS):
            record.msg, record.args = WITHHELD, ()
            if record.levelno > logging.WARNING and _under(record.name, DECODER_LOGGERS):
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            if record.exc_info is not None and record.exc_info[0] is not None:
                record.msg = f"{WITHHELD}; {record.exc_info[0].__qualname__} raised"
                record.exc_info = None
        return record

    factory.scrubbing = True  # type: ignore[attr-defined]
    return factory


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """Every warning as a log line naming its category and origin, never its text."""
    logging.getLogger(WARNINGS_LOGGER).warning(
        "%s from %s:%d %s", category.__name__, filename, lineno, WITHHELD)


def install() -> None:
    """Keep library text out of every log line and off stderr (process-wide; each call
    puts back what a ``warnings.catch_warnings`` block entered before the first undid)."""
    base = logging.getLogRecordFactory()
    if not getattr(base, "scrubbing", False):
        logging.setLogRecordFactory(_scrubbing_factory(base))
    warnings.showwarning = _show_warning
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


_CAUSE: Final[str] = "The above exception was the direct cause of the following exception:"
_CONTEXT: Final[str] = "During handling of the above exception, another exception occurred:"


def scrubbed_traceback(exc_info: tuple[type[BaseException], BaseException,
                                       TracebackType | None]) -> str:
    """A traceback with the exception types and frames, without any exception's message.

    Chained causes and contexts come first, as Python prints them.
    """
    chain: list[tuple[BaseException, str | None]] = []  # outermost first, with its link
    seen: set[int] = set()
    current: BaseException | None = exc_info[1]
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            inner, how = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            inner, how = current.__context__, _CONTEXT
        else:
            inner, how = None, None
        chain.append((current, how))
        current = inner
    lines: list[str] = []
    for item, how in reversed(chain):
        if how is not None:  # how this one relates to the one printed before it
            lines += ["", how, ""]
        lines.append("Traceback (most recent call last):")
        lines.extend(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}'
                     for frame in traceback.extract_tb(item.__traceback__))
        kind = type(item)
        lines.append(f"{kind.__module__}.{kind.__qualname__} {WITHHELD}")
    return "\n".join(lines)


class _RequestId(logging.Filter):
    """Puts the current request's id on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """``time level logger [request id]: message``, tracebacks scrubbed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):  # a handler without the request-id filter
            record.request_id = request_id.get()
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        return scrubbed_traceback(ei)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message (+ traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", request_id.get()),
            "message": record.getMessage(),
        }
        for key in ("method", "route", "status", "duration_ms"):  # access lines
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["traceback"] = scrubbed_traceback(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: Literal["text", "json"], stream: TextIO | None = None) -> None:
    """Route every logger (uvicorn's included) to one stderr handler in ``fmt``.

    Args:
        level: "debug", "info", "warning" or "error".
        fmt: "text" (default of the service: readable on a terminal) or "json".
        stream: where to write (stderr by default).
    """
    install()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RequestId())
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    formatter.converter = time.gmtime  # the JSON times say Z
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


__all__ = ["JsonFormatter", "TextFormatter", "configure", "install", "request_id",
           "scrubbed_traceback"]
