"""service.logs: library records lose their text; the decoders' errors become warnings."""

from __future__ import annotations

import logging

import pytest

from service import logs


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(("name", "level"), [
    ("pydicom.pixels.decoders.base", "WARNING"),  # an upload that does not decode
    ("PIL.PngImagePlugin", "WARNING"),
    ("pynetdicom.assoc", "ERROR"),  # a network peer: kept as the library said
    ("highdicom.sr", "ERROR"),
    ("medexplain.errors", "ERROR"),  # the service's own
])
def test_library_errors_keep_no_text_and_decoders_become_warnings(name: str,
                                                                 level: str) -> None:
    logs.install()
    keep = _Keep()
    logger = logging.getLogger(name)
    logger.addHandler(keep)
    try:
        logger.error("quoted %s", "CANARY-PATIENT")
    finally:
        logger.removeHandler(keep)
    (record,) = keep.records
    assert record.levelname == level and record.levelno == getattr(logging, level)
    text = record.getMessage()
    if name.startswith("medexplain"):
        assert text == "quoted CANARY-PATIENT"
    else:
        assert text == logs.WITHHELD
