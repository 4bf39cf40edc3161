"""docs/dicom-conformance.md against the code it describes: its tables of transfer syntaxes,
SOP classes and statuses, and the association defaults it states, read from the same
registries and libraries the service uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from service.dimse import cstore, scp
from service.models.repository import read_config
from service.outputs.transfer_syntax import TRANSFER_SYNTAXES

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "dicom-conformance.md").read_text(encoding="utf-8")


def _table(name: str) -> list[list[str]]:
    """The body rows of the table between ``<!-- name -->`` and ``<!-- end -->``."""
    match = re.search(rf"<!-- {re.escape(name)} -->\n(.*?)<!-- end -->", DOC, re.DOTALL)
    assert match is not None, f"no table {name!r} in the conformance statement"
    lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _decodable() -> list[str]:
    found = []
    for syntax in AllTransferSyntaxes:
        try:
            if get_decoder(syntax).is_available:
                found.append(str(syntax))
        except NotImplementedError:
            continue
    return found


def test_the_decodable_syntaxes_are_those_the_installed_decoders_read() -> None:
    rows = _table("decodable transfer syntaxes")
    assert [uid for uid, _ in rows] == _decodable()
    assert [name for _, name in rows] == [UID(uid).name for uid, _ in rows]


def test_the_statuses_are_the_scps() -> None:
    codes = [int(status, 16) for status, _ in _table("statuses")]
    assert codes == [scp.SUCCESS, scp.CANNOT_UNDERSTAND, scp.DATASET_MISMATCH,
                     scp.OUT_OF_RESOURCES, scp.PROCESSING_FAILURE]


def test_the_results_sop_classes_are_those_cstore_proposes() -> None:
    rows = _table("results SOP classes")
    assert tuple(uid for uid, _, _ in rows) == cstore.SOP_CLASSES
    assert [name for _, name, _ in rows] == [UID(uid).name for uid, _, _ in rows]


def test_the_output_syntaxes_are_the_registry_in_its_order() -> None:
    rows = _table("output transfer syntaxes")
    assert [uid for uid, _ in rows] == list(TRANSFER_SYNTAXES)
    for uid, name in rows:
        assert name.startswith(UID(uid).name), name
        assert ("(lossy)" in name) == (TRANSFER_SYNTAXES[uid].lossy_method is not None)


@pytest.mark.parametrize(("stated", "actual"), [
    (r"every storage SOP class in pynetdicom's list, (\d+) of them",
     len(StoragePresentationContexts)),
    (r"\| simultaneous associations \| (\d+) ", AE().maximum_associations),
    (r"\| maximum PDU received \| (\d+) bytes", AE().maximum_pdu_size),
])
def test_the_numbers_stated_are_pynetdicoms(stated: str, actual: int) -> None:
    match = re.search(stated, DOC)
    assert match is not None, stated
    assert int(match.group(1)) == actual


def test_the_timeouts_stated_are_pynetdicoms_defaults() -> None:
    match = re.search(r"\| ACSE / DIMSE / network timeouts \| (\d+) s / (\d+) s / (\d+) s", DOC)
    assert match is not None
    ae = AE()
    assert tuple(map(int, match.groups())) == (ae.acse_timeout, ae.dimse_timeout,
                                               ae.network_timeout)


def test_the_codes_named_are_the_bundled_models() -> None:
    import onnx

    demo = ROOT / "models" / "demo-cxr"
    config = read_config(demo, onnx.load(str(demo / "model.onnx"), load_external_data=False))
    for code in config.codes.values():
        assert f"{code.meaning} {code.value}" in DOC.replace("\n", " "), code
