"""DICOM validators from Debian's dicom3tools and DCMTK, as the tests run them, and what
the tests compare in a Structured Report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def dcmtk(tool: str) -> str | None:
    """The path of DCMTK's ``tool`` (storescu, storescp, echoscu), or None.

    pynetdicom installs command-line apps of the same names beside the interpreter; with
    that folder on PATH (an activated virtual environment) a plain lookup finds them, and
    they take none of DCMTK's options.
    """
    own = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
                           if p and os.path.realpath(p) != os.path.realpath(own))
    return shutil.which(tool, path=path)


def dciodvfy(data: bytes, folder: Path, name: str = "object.dcm") -> str:
    """dciodvfy's report (stdout and stderr) on ``data``, written to ``folder/name``."""
    assert shutil.which("dciodvfy"), ("dciodvfy is not installed: `bash scripts/system-deps.sh` "
                                      "(run by `make test`) installs dicom3tools")
    path = folder / name
    path.write_bytes(data)
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True,
                            text=True, timeout=60)
    return result.stdout + result.stderr


def dciodvfy_errors(data: bytes, folder: Path, iod: str) -> list[str]:
    """dciodvfy's Error lines on ``data``, checked to be read as the IOD named ``iod``."""
    report = dciodvfy(data, folder, f"{iod}.dcm")
    assert iod in report, report
    return [line for line in report.splitlines() if line.startswith("Error")]


def pydicom_data(name: str) -> Path:
    """A file of pydicom-data, a pinned test dependency (never downloaded)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the installed pydicom-data"
    return Path(path)


def dcmdump(path: Path) -> subprocess.CompletedProcess[str] | None:
    """DCMTK's dump of ``path``, or None where DCMTK is not installed."""
    if shutil.which("dcmdump") is None:
        return None
    return subprocess.run(["dcmdump", str(path)], check=False, capture_output=True,
                          text=True, timeout=60)


def sr_values(report: pydicom.Dataset) -> list[float | list[float]]:
    """An SR's numbers and region coordinates, depth first (its UIDs are its own)."""
    found: list[float | list[float]] = []
    for item in report.get("ContentSequence", []):
        if item.ValueType == "NUM":
            found.append(float(item.MeasuredValueSequence[0].NumericValue))
        elif item.ValueType == "SCOORD":
            found.append([float(v) for v in item.GraphicData])
        found += sr_values(item)
    return found


def fresh_copy(source: Path, folder: Path) -> tuple[Path, pydicom.Dataset]:
    """A copy of a DICOM file in a new study (new Study, Series and SOP Instance UIDs)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{source.stem}-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds
