"""The outputs' contracts: the registry, what each needs, and what it writes from a Result."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service import pipeline
from service.api.request import ExplainParams
from service.errors import InvalidParameter
from service.imaging import decode
from service.imaging.base import DecodedImage
from service.models.repository import LoadedModel, load_model
from service.outputs import DICOM_OUTPUTS, JSON_OUTPUT, DicomObject, Packaging, for_packaging
from service.outputs.render import Size
from service.outputs.several import SeveralObjects
from tests.dicom_tools import sr_values

ROOT = Path(__file__).resolve().parents[2]
PHANTOM = ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm"


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(ROOT / "models" / "demo-cxr", providers=["CPUExecutionProvider"],
                      threads=1, head_batch=256)


@pytest.fixture(scope="module")
def image() -> DecodedImage:
    return decode(PHANTOM.read_bytes(), "application/dicom")


def _result(demo: LoadedModel, image: DecodedImage, params: ExplainParams) -> pipeline.Result:
    return pipeline.explain(demo, image, params.options(), pipeline.Stopwatch())


def test_registry() -> None:
    assert [o.value for o in DicomObject] == list(DICOM_OUTPUTS) == [
        "sc", "sr", "gsps", "seg"]
    assert for_packaging(Packaging.JSON, ("sr",)) is JSON_OUTPUT
    for packaging in (Packaging.DICOM, Packaging.MULTIPART):
        for name, output in DICOM_OUTPUTS.items():
            assert for_packaging(packaging, (name,)) is output
            assert packaging in output.packagings and output.needs
    # Several objects: multipart/related only; each part's needs, full resolution if any.
    assert for_packaging(Packaging.DICOM, ("sc", "sr")) is None
    several = for_packaging(Packaging.MULTIPART, ("sr", "sc"))
    assert isinstance(several, SeveralObjects)
    assert several.outputs == (DICOM_OUTPUTS["sr"], DICOM_OUTPUTS["sc"])
    assert several.full_resolution and several.packagings == {Packaging.MULTIPART}
    assert several.needs == (f"dicom=sr: {DICOM_OUTPUTS['sr'].needs}; "
                             f"dicom=sc: {DICOM_OUTPUTS['sc'].needs}")
    assert JSON_OUTPUT.packagings == {Packaging.JSON}
    # Only what draws on the image at its own resolution needs the full-resolution pixels.
    assert {name: o.full_resolution for name, o in DICOM_OUTPUTS.items()} == {
        "sc": True, "sr": False, "gsps": False, "seg": False}
    assert not JSON_OUTPUT.full_resolution


def test_the_pipeline_hands_over_arrays(demo: LoadedModel, image: DecodedImage) -> None:
    result = _result(demo, image, ExplainParams(methods=("gradcam", "guided_backprop"),
                                                classes=("Nodule",)))
    gradcam, guided = result.maps
    assert (gradcam.method, gradcam.index, gradcam.gradient) == ("gradcam", 1, False)
    assert gradcam.values.shape == (16, 16), "a CAM stays on the target layer's grid"
    assert (guided.values.shape, guided.gradient) == ((256, 256), True)
    assert result.image01.shape == (256, 256, 3)
    assert result.score(1) == round(float(result.scores[1]), 6) and result.score(None) is None
    assert "render" not in result.watch.timings, "nothing is encoded before the output"


def test_dicom_outputs_accept_only_dicom_with_a_study(image: DecodedImage) -> None:
    png = DecodedImage(image.pixels, "png")
    for output in DICOM_OUTPUTS.values():
        assert output.accepts(image) and not output.accepts(png)
    assert JSON_OUTPUT.accepts(png)


def test_one_secondary_capture_explains_the_first_method(demo: LoadedModel) -> None:
    params = ExplainParams(methods=("crm", "gradcam"))
    sc = DICOM_OUTPUTS["sc"]
    assert sc.options(params, demo, Packaging.DICOM).methods == ("crm",)
    assert sc.options(params, demo, Packaging.MULTIPART).methods == ("crm", "gradcam")
    for one_object in ("sr", "gsps", "seg"):  # every explanation in one object
        assert DICOM_OUTPUTS[one_object].options(params, demo, Packaging.DICOM).methods == (
            "crm", "gradcam")


def test_json_refuses_feature_size_for_pixel_maps(demo: LoadedModel) -> None:
    params = ExplainParams(methods=("gradcam", "fixations"), size=Size.FEATURE)
    with pytest.raises(InvalidParameter, match="size=feature is only for CAM-type maps; "
                                               "fixations produce maps"):
        JSON_OUTPUT.options(params, demo, Packaging.JSON)


def test_each_output_writes_its_answer(demo: LoadedModel, image: DecodedImage) -> None:
    params = ExplainParams(methods=("gradcam", "crm"), classes=("Nodule",), heatmap="npy",
                           size="feature")
    result = _result(demo, image, params)
    body = JSON_OUTPUT.render(result, params, Packaging.JSON)
    assert body.media_type == "application/json"
    answer = json.loads(body.body)
    for e, m in zip(answer["explanations"], result.maps, strict=True):
        values = np.load(io.BytesIO(base64.b64decode(e["heatmap"]["data"])))
        np.testing.assert_array_equal(values, m.values)
        assert e["regions"] == [{"box": list(r.box), "score": r.score} for r in m.regions]
    assert answer["timings_ms"]["render"] >= 0

    capture = DICOM_OUTPUTS["sc"].render(_result(demo, image, params), params, Packaging.DICOM)
    assert capture.media_type == "application/dicom"
    assert pydicom.dcmread(io.BytesIO(capture.body)).SeriesDescription == \
        "medexplain gradcam Nodule"
    report = DICOM_OUTPUTS["sr"].render(_result(demo, image, params), params,
                                        Packaging.MULTIPART)
    assert report.media_type.startswith('multipart/related; type="application/dicom"')
    assert report.body.count(b"Content-Type: application/dicom") == 1


def test_several_objects_come_from_one_result(demo: LoadedModel, image: DecodedImage) -> None:
    """dicom=sc,sr,gsps: the captures, the report, then the presentation state, each what
    its output alone writes from the same result (the objects' own UIDs aside)."""
    params = ExplainParams(methods=("gradcam", "crm"), classes=("Nodule",))
    several = for_packaging(Packaging.MULTIPART, ("sc", "sr", "gsps"))
    assert several is not None
    assert several.options(params, demo, Packaging.MULTIPART) == params.options()
    result = _result(demo, image, params)
    parts = [pydicom.dcmread(io.BytesIO(p.data))
             for p in several.objects(result, params, Packaging.MULTIPART)]
    alone = [pydicom.dcmread(io.BytesIO(p.data)) for name in ("sc", "sr", "gsps")
             for p in DICOM_OUTPUTS[name].objects(result, params, Packaging.MULTIPART)]
    assert [d.Modality for d in parts] == ["OT", "OT", "SR", "PR"]
    for got, want in zip(parts, alone, strict=True):
        assert (got.SOPClassUID, got.SeriesNumber, got.SeriesDescription) == (
            want.SOPClassUID, want.SeriesNumber, want.SeriesDescription)
        assert got.StudyInstanceUID == want.StudyInstanceUID == \
            pydicom.dcmread(PHANTOM).StudyInstanceUID
    for got, want in zip(parts[:2], alone[:2], strict=True):
        np.testing.assert_array_equal(got.pixel_array, want.pixel_array)
    assert sr_values(parts[2]) == sr_values(alone[2]) != []
    graphics = [[list(o.GraphicData) for a in d.GraphicAnnotationSequence
                 for o in a.get("GraphicObjectSequence", [])] for d in (parts[3], alone[3])]
    assert graphics[0] == graphics[1] != []

