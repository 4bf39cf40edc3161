"""model.toml ``[codes]``: what the labels mean in a coding scheme (service.models.spec's
LabelCode, read by service.models.repository), checked against pydicom's DICOM code
dictionary for the bundled model, and refused with the key at fault when malformed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import onnx
import pytest
from pydicom.sr.codedict import codes

from service.errors import ModelError
from service.models.repository import read_config
from service.models.spec import LabelCode

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-cxr"
GRAPH = onnx.load(str(DEMO / "model.onnx"), load_external_data=False)


def _config(tmp_path: Path, table: str):  # type: ignore[no-untyped-def]
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    text = (DEMO / "model.toml").read_text(encoding="utf-8").split("[codes]")[0]
    (folder / "model.toml").write_text(text + table, encoding="utf-8")
    return read_config(folder, GRAPH)


def test_the_bundled_model_codes_its_labels_as_dicom_knows_them() -> None:
    config = read_config(DEMO, GRAPH)
    expected = {"Cardiomegaly": codes.SCT.Cardiomegaly, "Nodule": codes.SCT.Nodule,
                "Pleural Effusion": codes.SCT.PleuralEffusion,
                "Pneumothorax": codes.SCT.Pneumothorax}
    assert config.codes == {label: LabelCode(c.scheme_designator, c.value, c.meaning)
                            for label, c in expected.items()}


def test_codes_are_optional_and_may_cover_some_labels(tmp_path: Path) -> None:
    assert _config(tmp_path, "").codes == {}
    some = _config(tmp_path, '[codes]\nNodule = { scheme = "SCT", value = " 27925004 ", '
                             'meaning = "Nodule" }\n')
    assert some.codes == {"Nodule": LabelCode("SCT", "27925004", "Nodule")}


NOT_A_TABLE = ("m/model.toml: codes.'Nodule' must be a table of scheme, value and meaning, "
               'e.g. { scheme = "SCT", value = "287272002", meaning = "Cardiomegaly" }')


def _too_long(key: str, limit: int) -> str:
    return (f"m/model.toml: codes.'Nodule'.{key} must be ASCII text of 1 to {limit} "
            "characters without a backslash")


@pytest.mark.parametrize(("table", "message"), [
    ('[codes]\nFracture = { scheme = "SCT", value = "1", meaning = "x" }\n',
     "m/model.toml: [codes] names 'Fracture', which is not one of labels"),
    ('[codes]\nNodule = "SCT:27925004"\n', NOT_A_TABLE),
    ('[codes]\nNodule = { scheme = "SCT", value = "27925004" }\n', NOT_A_TABLE),
    ('[codes]\nNodule = { scheme = "SCT", value = "12345678901234567", meaning = "x" }\n',
     _too_long("value", 16)),
    ('[codes]\nNodule = { scheme = "SCT", value = "1", meaning = "a\\\\b" }\n',
     _too_long("meaning", 64)),
    ('[codes]\nNodule = { scheme = " ", value = "1", meaning = "x" }\n', _too_long("scheme", 16)),
])
def test_bad_codes_stop_the_start_up(tmp_path: Path, table: str, message: str) -> None:
    assert tomllib.loads(table)  # the TOML itself is good: what it says is not
    with pytest.raises(ModelError, match=f"^{re.escape(message)}$"):
        _config(tmp_path, table)
