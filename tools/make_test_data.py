"""Regenerate the image fixtures under tests/data/ from fixed seeds.

Usage:
    .venv/bin/python tools/make_test_data.py [--out tests/data]

Writes
  phantoms/  8-bit grey PNG phantoms at 256x256 (normal, each finding alone,
             combinations), one PNG mask per present finding and manifest.json
  raster/    one larger, non-square phantom as 16-bit PNG and as JPEG, with masks
             and its own manifest.json
  dicom/     the nodule phantom as DX DICOM: MONOCHROME2, MONOCHROME1 and
             JPEG 2000 lossless

All images are synthetic (tools/phantoms.py): no patient data. NumPy, OpenCV and
pydicom only, so fixtures can be rebuilt without the training stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phantoms  # tools/ is a folder of scripts, not a package: found through sys.path above

# (name, findings, seed); "_" joins findings, "-" joins words. Seeds are fixed
# so the fixtures are byte-stable across runs on the same library versions.
PHANTOMS: list[tuple[str, tuple[str, ...], int]] = [
    ("normal", (), 1001),
    ("cardiomegaly", ("Cardiomegaly",), 1002),
    ("nodule", ("Nodule",), 1003),
    ("pleural-effusion", ("Pleural Effusion",), 1004),
    ("pneumothorax", ("Pneumothorax",), 1005),
    ("nodule_pneumothorax", ("Nodule", "Pneumothorax"), 1006),
    ("cardiomegaly_pleural-effusion", ("Cardiomegaly", "Pleural Effusion"), 1007),
    ("all-findings", phantoms.LABELS, 1008),
]

RASTER = ("nodule_pleural-effusion_400x512", ("Nodule", "Pleural Effusion"), 2001)
RASTER_SIZE = 512
RASTER_WIDTH = 400  # portrait crop of the 512x512 phantom: 400 wide x 512 high

DICOM_SOURCE = "nodule"  # which phantom in PHANTOMS is wrapped as DICOM
BITS_STORED = 12
_UID_ENTROPY = "medexplain-synthetic-phantom"


def slug(label: str) -> str:
    return label.lower().replace(" ", "-")


def _write_png(path: Path, array: np.ndarray) -> None:
    # Maximum zlib effort: fixtures are written once and read many times.
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"could not write {path}")


def _write_masks(folder: Path, name: str, masks: dict[str, np.ndarray]) -> dict[str, str]:
    files: dict[str, str] = {}
    for label in phantoms.LABELS:  # network output order, for a stable manifest
        if label in masks:
            file = f"{name}.mask-{slug(label)}.png"
            _write_png(folder / file, masks[label].astype(np.uint8) * 255)
            files[label] = file
    return files


def make_phantoms(folder: Path) -> dict[str, phantoms.Phantom]:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    made: dict[str, phantoms.Phantom] = {}
    for name, findings, seed in PHANTOMS:
        ph = phantoms.generate(np.random.default_rng(seed), 256, findings=findings)
        _write_png(folder / f"{name}.png", np.round(ph.image * 255.0).astype(np.uint8))
        manifest.append({"file": f"{name}.png", "findings": _write_masks(folder, name, ph.masks)})
        made[name] = ph
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return made


def make_raster(folder: Path) -> None:
    """A non-square, larger phantom as 16-bit PNG and as JPEG, the other raster inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    name, findings, seed = RASTER
    ph = phantoms.generate(np.random.default_rng(seed), RASTER_SIZE, findings=findings)
    x0 = (RASTER_SIZE - RASTER_WIDTH) // 2
    crop = np.s_[:, x0 : x0 + RASTER_WIDTH]
    masks = {label: m[crop] for label, m in ph.masks.items()}
    for label, m in ph.masks.items():
        if masks[label].sum() != m.sum():
            raise RuntimeError(f"the crop cuts into the {label} mask; pick another seed")
    image = ph.image[crop]
    # 12 significant bits like a typical detector, scaled to the 16-bit range:
    # real 16-bit PNGs rarely use all 16 bits, and the empty low bits compress.
    _write_png(folder / f"{name}.png", (np.round(image * 4095.0).astype(np.uint16) << 4))
    jpeg = np.round(image * 255.0).astype(np.uint8)
    if not cv2.imwrite(str(folder / f"{name}.jpg"), jpeg, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError("could not write the JPEG fixture")
    mask_files = _write_masks(folder, name, masks)
    manifest = [
        {"file": f"{name}.png", "findings": mask_files},
        {"file": f"{name}.jpg", "findings": mask_files},
    ]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _uid(*parts: str) -> str:
    # Deterministic UIDs: reruns produce identical files, and the fixtures never
    # collide with UIDs minted elsewhere.
    return generate_uid(entropy_srcs=[_UID_ENTROPY, *parts])


def _dx_dataset(pixels: np.ndarray, photometric: str, variant: str) -> Dataset:
    """A minimal but valid DX 'for presentation' dataset around a uint16 image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = _uid("instance", variant)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "MEDEXPLAIN_FIX"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "medexplain synthetic phantom generator"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic chest phantom"
    ds.SeriesDescription = f"PA chest phantom ({variant})"
    ds.PatientName = "PHANTOM^SYNTHETIC"
    ds.PatientID = "PHANTOM-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # radiological PA view: image right = patient left
    ds.StudyInstanceUID = _uid("study")
    # Each encoding is its own series so a viewer or PACS keeps all three apart.
    ds.SeriesInstanceUID = _uid("series", variant)
    ds.StudyID = "1"
    ds.SeriesNumber = {"mono2": 1, "mono1": 2, "j2k": 3}[variant]
    ds.InstanceNumber = 1
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT PATIENT DATA - NOT FOR DIAGNOSIS"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    # The phantom covers ~36 cm of chest in 256 px.
    ds.ImagerPixelSpacing = ds.PixelSpacing = [1.4, 1.4]
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower values = less X-ray intensity (bone dark, i.e. MONOCHROME1 here); -1 the reverse.
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    full = 1 << BITS_STORED
    ds.WindowCenter = full // 2
    ds.WindowWidth = full
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def make_dicom(folder: Path, source: phantoms.Phantom) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    top = (1 << BITS_STORED) - 1
    mono2 = np.round(source.image * top).astype(np.uint16)
    mono1 = (top - mono2).astype(np.uint16)

    outputs = {
        "phantom_nodule.dcm": (_dx_dataset(mono2, "MONOCHROME2", "mono2"), mono2),
        "phantom_nodule_mono1.dcm": (_dx_dataset(mono1, "MONOCHROME1", "mono1"), mono1),
    }
    j2k = _dx_dataset(mono2, "MONOCHROME2", "j2k")
    # Needs an encoder plugin (pylibjpeg-openjpeg); lossless, so pixels round-trip exactly.
    # Keep our deterministic SOP Instance UID instead of a random new one.
    j2k.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    outputs["phantom_nodule_j2k.dcm"] = (j2k, mono2)

    for file, (ds, expected) in outputs.items():
        path = folder / file
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        if not np.array_equal(back.pixel_array, expected):
            raise RuntimeError(f"{file}: pixel data does not round-trip")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("tests/data"))
    args = ap.parse_args(argv)

    made = make_phantoms(args.out / "phantoms")
    make_raster(args.out / "raster")
    make_dicom(args.out / "dicom", made[DICOM_SOURCE])

    total = 0
    for path in sorted(args.out.rglob("*")):
        if path.is_file() and path.parent.name in {"phantoms", "raster", "dicom"}:
            total += path.stat().st_size
            print(f"{path.stat().st_size:>8}  {path}")
    print(f"{total:>8}  total bytes")


if __name__ == "__main__":
    main()
