"""Patient data never reaches logs, warnings, metrics or error bodies.

Uploads carry a canary in PatientName, PatientID, PatientBirthDate, AccessionNumber (and
PatientSex, StudyID, ReferringPhysicianName): valid values, invalid ones (pydicom's value
validation quotes invalid values in its warnings and log records), and files that take
every error path the decoder and the routes have. Every log record of every logger at
DEBUG, every warning, everything written to stdout/stderr, every error body and the
/metrics text are searched for the canary.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian

from tests.api.conftest import DATA

CANARY = "QZXCANARY"
# A date canary has to be a date; this one cannot occur in a UID's digits by chance often.
CANARY_DATE = "18670419"
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"


def _dataset(**changes: object) -> pydicom.FileDataset:
    ds = pydicom.dcmread(PHANTOM)
    values: dict[str, object] = {
        "PatientName": f"{CANARY}^Jane", "PatientID": f"{CANARY}-ID",
        "PatientBirthDate": CANARY_DATE, "AccessionNumber": f"A{CANARY}"[:16],
        "StudyID": CANARY[:16], "ReferringPhysicianName": f"{CANARY}^Doc",
    }
    values.update(changes)
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    return ds


def _bytes(ds: pydicom.Dataset, **encoding: bool) -> bytes:
    buf = io.BytesIO()
    if encoding:  # the file's own encoding, or a bare dataset when it has no File Meta
        dcmwrite(buf, ds, force_encoding=True, **encoding)  # type: ignore[arg-type]
    else:
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _valid() -> bytes:
    return _bytes(_dataset())


def _invalid_values() -> bytes:
    # Invalid for their VRs: pydicom's validation would quote each of them.
    return _bytes(_dataset(
        PatientName=f"{CANARY}\x07" * 12, PatientID=f"{CANARY}\\" * 10,
        PatientBirthDate=f"{CANARY}", AccessionNumber=f"{CANARY}\n" * 3,
        PatientSex=CANARY.lower(), StudyDate=CANARY, StudyTime=CANARY,
    ))


def _without_pixels() -> bytes:
    ds = _dataset()
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        delattr(ds, keyword)
    return _bytes(ds)


def _unsupported_syntax() -> bytes:
    data = _valid()
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.4.100\x00"[:20], 1)


def _huge() -> bytes:
    return _bytes(_dataset(Rows=60000, Columns=60000))


def _bad_uids() -> bytes:
    # No study to join: DICOM output is refused (406), JSON still works.
    return _bytes(_dataset(StudyInstanceUID="1.2.x", SOPInstanceUID=""))


def _bare_implicit() -> bytes:
    """Implicit VR, without preamble and File Meta: parsed with force=True."""
    ds = _dataset()
    del ds.file_meta
    ds.preamble = None
    return _bytes(ds, implicit_vr=True, little_endian=True)


def _big_endian() -> bytes:
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    return _bytes(ds, implicit_vr=False, little_endian=False)


def _short_pixels() -> bytes:
    data = _valid()
    return data[: len(data) - 5000]


def _cut_in_patient_module() -> bytes:
    data = _valid()
    return data[: data.index(f"{CANARY}^Jane".encode()) + len(CANARY) + 2]


def _corrupt_preamble() -> bytes:
    data = bytearray(_valid())
    data[128:132] = b"DICX"
    return bytes(data)


@dataclass
class Sink:
    """Everything the service may have written somewhere."""

    records: list[str] = field(default_factory=list)
    caught: list[warnings.WarningMessage] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [f"{w.category.__name__}: {w.message}" for w in self.caught]


class _Collect(logging.Handler):
    def __init__(self, sink: Sink) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.sink.records.append(f"{record.name}: {text}")


@pytest.fixture
def sink() -> Iterator[Sink]:
    """Every logger at DEBUG, with a recording handler on each, and every warning."""
    out = Sink()
    handler = _Collect(out)
    loggers = [logging.getLogger(name) for name in ["", *logging.root.manager.loggerDict]]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        logger.addHandler(handler)  # propagate=False loggers included
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out.caught = caught
            yield out
    finally:
        for logger, level, disabled in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.disabled = disabled


def _assert_clean(texts: list[str], where: str) -> None:
    for text in texts:
        assert CANARY.lower() not in text.lower(), f"canary in {where}: {text[:300]}"
        assert CANARY_DATE not in text, f"birth date in {where}: {text[:300]}"


UPLOADS = {
    "valid": (_valid, 200),
    "invalid-values": (_invalid_values, 200),
    "bare-implicit-vr": (_bare_implicit, 200),
    "big-endian": (_big_endian, 200),
    "without-pixels": (_without_pixels, 415),
    "unsupported-syntax": (_unsupported_syntax, 415),
    "too-many-pixels": (_huge, 413),
    "bad-uids": (_bad_uids, 200),
    "truncated-pixels": (_short_pixels, 400),
    "truncated-in-patient": (_cut_in_patient_module, 400),
    "corrupt-preamble": (_corrupt_preamble, 400),
}

# Parameters and Accept headers that take each route's other error paths with the upload.
VARIANTS = [
    ("/explain", {}, None),
    ("/explain", {"methods": "gradcam,crm"}, 'multipart/related; type="application/dicom"'),
    ("/explain", {"methods": "gradcam"}, "application/dicom"),
    ("/explain", {"classes": "Fracture"}, None),
    ("/explain", {"frame": "7"}, None),
    ("/explain", {"window": "40,400", "methods": "nope"}, None),
    ("/explain", {"size": "feature", "methods": "guided_backprop"}, None),
    ("/explain", {"model": "nope"}, None),
    ("/explain", {}, "text/html"),
    ("/predict", {}, None),
    ("/predict", {"window": "0,0"}, None),
]


@pytest.mark.parametrize("name", list(UPLOADS))
def test_no_patient_data_in_logs_warnings_or_errors(client: TestClient, sink: Sink,
                                                    capfd: pytest.CaptureFixture[str],
                                                    name: str) -> None:
    make, status = UPLOADS[name]
    data = make()
    assert CANARY.encode() in data
    for path, params, accept in VARIANTS:
        headers = {"content-type": "application/dicom"}
        if accept:
            headers["accept"] = accept
        r = client.post(path, content=data, params=params, headers=headers)
        assert r.status_code < 500, r.text
        if r.headers["content-type"].startswith(("application/json",
                                                  "application/problem+json")):
            sink.bodies.append(r.text)
        if not params and path == "/predict":
            assert r.status_code == status, r.text
    # The multipart form, with the canary in the file name too.
    r = client.post("/explain", files={"file": (f"{CANARY}.dcm", data, "application/dicom")},
                    data={"methods": "crm_combined"})
    sink.bodies.append(r.text)
    r = client.post("/explain", content=b"--b\r\n" + data[:300],
                    headers={"content-type": "multipart/form-data; boundary=b"})
    sink.bodies.append(r.text)
    metrics = client.get("/metrics").text
    captured = capfd.readouterr()

    _assert_clean(sink.records, "a log record")
    _assert_clean(sink.warnings, "a warning")
    _assert_clean(sink.bodies, "an error body")
    _assert_clean([metrics], "/metrics")
    _assert_clean([captured.out, captured.err], "stdout/stderr")


def test_the_sink_sees_what_pydicom_says(sink: Sink) -> None:
    """The fixture works: pydicom's own validation quotes invalid values, and is caught."""
    ds = pydicom.Dataset()
    ds.PatientSex = CANARY.lower()
    assert any(CANARY.lower() in text for text in sink.records)
    assert any(CANARY.lower() in text for text in sink.warnings)
