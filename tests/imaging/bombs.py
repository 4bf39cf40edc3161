"""Hostile uploads, generated on the fly (never committed): small files that decode huge.

Each builder returns the upload's bytes; the tests and ``tools/bench_hostile.py`` use the
same ones. Nothing here allocates the size a bomb declares.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import JPEG2000Lossless

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JP2_SIGNATURE_BOX = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@cache  # the same bombs serve several tests
def png_bomb(width: int, height: int, *, colour_type: int = 0, bit_depth: int = 8) -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels, deflated row by row (~1000:1).

    Args:
        colour_type: 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA (PNG's IHDR codes).
        bit_depth: 8 or 16.
    """
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(width * samples * bit_depth // 8)  # filter type 0, then zeros
    squeezer = zlib.compressobj(9)
    idat = b"".join(squeezer.compress(row) for _ in range(height)) + squeezer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def with_siz(codestream: bytes, width: int, height: int) -> bytes:
    """The codestream with its SIZ image and tile size set to ``width`` x ``height``."""
    assert codestream.startswith(b"\xff\x4f\xff\x51")
    # SOC, SIZ, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz (ISO 15444-1 A.5.1).
    size = struct.pack(">IIIIII", width, height, 0, 0, width, height)
    return codestream[:8] + size + codestream[32:]


def jp2(codestream: bytes, *, before: bytes = b"") -> bytes:
    """A JP2 file around a raw codestream; ``before``: boxes placed ahead of the header."""
    siz = struct.unpack(">II", codestream[8:16])
    components = struct.unpack(">H", codestream[40:42])[0]
    depth = codestream[42]
    ihdr = struct.pack(">IIHBBBB", siz[1], siz[0], components, depth, 7, 0, 0)
    colr = struct.pack(">BBBI", 1, 0, 0, 17 if components == 1 else 16)
    return (
        JP2_SIGNATURE_BOX
        + box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ")
        + before
        + box(b"jp2h", box(b"ihdr", ihdr) + box(b"colr", colr))
        + box(b"jp2c", codestream)
    )


@cache  # the same bombs serve several tests
def j2k_decoy_dicom(side: int) -> bytes:
    """A JPEG 2000 DICOM whose JP2 frame declares side x side in the codestream it decodes,
    with an ``xml `` box ahead of it that holds a decoy SOC/SIZ agreeing with Rows/Columns.

    A check that reads the first SOC/SIZ pattern anywhere in the frame sees the decoy
    (64 x 64, the file's Rows/Columns); OpenJPEG decodes the ``jp2c`` box's codestream and
    allocates side x side samples. It is dressed as a chest radiograph (CR, CHEST): an
    attacker passes a model's ``[accepts]`` as easily, and only the size checks are left.
    """
    ds = pydicom.dcmread(testdata("MR_small_jp2klossless.dcm"))
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    decoy = box(b"xml ", b"<x>" + frame[:64] + b"</x>")
    ds.PixelData = encapsulate([jp2(with_siz(frame, side, side), before=decoy)])
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@cache  # the same bombs serve several tests
def deflate_bomb(inflated_bytes: int) -> bytes:
    """A deflated-syntax DICOM whose dataset inflates to ``inflated_bytes`` of zeros."""
    data = testdata("image_dfl.dcm").read_bytes()
    # The File Meta ends where the deflated dataset starts: its group length says where.
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = bytes(1 << 20)
    whole, rest = divmod(inflated_bytes, len(block))
    body = b"".join(squeezer.compress(block) for _ in range(whole))
    body += squeezer.compress(bytes(rest)) + squeezer.flush()
    return data[:meta_end] + body
