"""model.toml ``[accepts]``: which DICOM images a model is meant for, checked on the header
(service.models.spec) and read from model.toml (service.models.repository)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from service.errors import ModelError
from service.models.repository import load_model
from service.models.spec import Accepts

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-cxr"
CHEST = Accepts(modalities=frozenset({"CR", "DX"}), body_parts=frozenset({"CHEST"}),
                presentation_intents=frozenset({"FOR PRESENTATION"}))


def _header(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the installed pydicom-data"
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.mark.parametrize(("name", "refusal"), [
    ("RG1_UNCR.dcm", None),  # CR, CHEST, PA
    ("CT_small.dcm", "Modality is CT; the model accepts CR, DX"),
    ("MR_small.dcm", "Modality is MR; the model accepts CR, DX"),
    ("RG3_UNCR.dcm", "BodyPartExamined is EXTREMITY; the model accepts CHEST"),  # CR
], ids=lambda v: v if isinstance(v, str) and v.endswith(".dcm") else "")
def test_the_chest_rules_on_pydicom_data(name: str, refusal: str | None) -> None:
    assert CHEST.refusal(_header(name)) == refusal


def test_absent_modality_is_refused_absent_body_part_and_view_accepted() -> None:
    ds = _header("RG1_UNCR.dcm")
    rules = Accepts(modalities=frozenset({"CR"}), body_parts=frozenset({"CHEST"}),
                    view_positions=frozenset({"AP"}))
    assert rules.refusal(ds) == "ViewPosition is PA; the model accepts AP"
    del ds.ViewPosition
    del ds.BodyPartExamined
    assert rules.refusal(ds) is None
    ds.BodyPartExamined = ""  # Type 2 elements may be present and empty
    assert rules.refusal(ds) is None
    del ds.Modality
    assert rules.refusal(ds) == "Modality is absent; the model accepts CR"
    assert Accepts().refusal(ds) is None  # no rules: anything goes


def test_a_dx_for_processing_is_refused_for_presentation_and_cr_accepted() -> None:
    """DX carries Presentation Intent Type (Type 1); its FOR PROCESSING images are the
    detector's raw values. CR has no such attribute: accepted."""
    ds = pydicom.dcmread(ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm",
                         stop_before_pixels=True)
    assert (ds.Modality, ds.PresentationIntentType) == ("DX", "FOR PRESENTATION")
    assert CHEST.refusal(ds) is None
    ds.PresentationIntentType = "FOR PROCESSING"
    assert CHEST.refusal(ds) == ("PresentationIntentType is FOR PROCESSING; the model "
                                 "accepts FOR PRESENTATION")
    cr = _header("RG1_UNCR.dcm")
    assert "PresentationIntentType" not in cr
    assert CHEST.refusal(cr) is None


def test_values_compare_as_code_strings_and_odd_ones_are_not_quoted() -> None:
    ds = _header("RG1_UNCR.dcm")
    ds.BodyPartExamined = "chest "  # lower case, padded: still the Defined Term CHEST
    assert CHEST.refusal(ds) is None
    ds.BodyPartExamined = "Doe^John"
    assert CHEST.refusal(ds) == "BodyPartExamined is not a code string; the model accepts CHEST"


def _model(tmp_path: Path, accepts: str) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(DEMO / "model.onnx", folder / "model.onnx")
    text = (DEMO / "model.toml").read_text(encoding="utf-8").split("[accepts]")[0]
    (folder / "model.toml").write_text(text + accepts, encoding="utf-8")
    return folder


def _load(folder: Path):  # type: ignore[no-untyped-def]
    return load_model(folder, providers=["CPUExecutionProvider"], threads=1, head_batch=64)


def test_the_bundled_model_declares_chest_radiographs() -> None:
    assert _load(DEMO).config.accepts == CHEST


def test_model_toml_values_are_upper_cased_and_absent_table_accepts_anything(
        tmp_path: Path) -> None:
    loaded = _load(_model(tmp_path, '[accepts]\nview_positions = ["pa", " AP"]\n'))
    assert loaded.config.accepts == Accepts(view_positions=frozenset({"PA", "AP"}))
    shutil.rmtree(tmp_path / "m")
    assert _load(_model(tmp_path, "")).config.accepts == Accepts()


@pytest.mark.parametrize(("table", "message"), [
    ('[accepts]\nmodality = ["CR"]\n',
     ("m/model.toml: [accepts] has unknown keys modality; known: modalities, body_parts, "
      "view_positions, presentation_intents")),
    ('[accepts]\nmodalities = "CR"\n',
     "m/model.toml: accepts.modalities must be a list of code strings"),
    ('[accepts]\nbody_parts = ["CHEST", ""]\n',
     "m/model.toml: accepts.body_parts must be a list of code strings"),
    ('accepts = 1\n', "m/model.toml: [accepts] must be a table"),
])
def test_bad_accepts_tables_stop_the_start_up(tmp_path: Path, table: str,
                                              message: str) -> None:
    folder = _model(tmp_path, "")
    text = (folder / "model.toml").read_text(encoding="utf-8")
    if not table.startswith("["):  # a top-level key must come before the first table
        text = table + text
    else:
        text += table
    (folder / "model.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ModelError, match=f"^{re.escape(message)}$"):
        _load(folder)
