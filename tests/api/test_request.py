"""The request models: one place for every /predict and /explain parameter."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.request import ExplainParams, PredictParams, parameter_schemas, parse_params
from service.errors import InvalidParameter, UnknownMethod
from service.methods import METHODS, Target
from service.outputs import DICOM_OUTPUTS, DicomObject
from service.outputs.render import Encoding, Size


def test_defaults() -> None:
    params = parse_params(ExplainParams, [])
    assert params == ExplainParams()
    assert (params.methods, params.classes, params.heatmap, params.size, params.target) == (
        ("gradcam", "crm"), None, Encoding.PNG, Size.MODEL, Target.LOGIT)
    assert (params.region_threshold, params.score_threshold, params.frame) == (0.5, 0.5, 0)
    assert (params.model, params.window, params.dicom) == (None, None, DicomObject.SC)
    options = params.options()
    assert (options.methods, options.classes, options.target) == (("gradcam", "crm"), None,
                                                                   Target.LOGIT)


def test_values_are_read_from_strings() -> None:
    params = parse_params(ExplainParams, [
        ("methods", " CRM , gradcam,gradcam,, "), ("classes", "Nodule, 2"),
        ("heatmap", "OverLay"), ("size", " original "), ("target", "Probability"),
        ("region_threshold", "0.25"), ("score_threshold", "1"), ("frame", "3"),
        ("window", "40, 400"), ("dicom", "SR"), ("model", "demo-cxr")])
    assert params.methods == ("crm", "gradcam")  # duplicates dropped, order kept
    assert params.classes == ("Nodule", "2")
    assert (params.heatmap, params.size, params.target, params.dicom) == (
        Encoding.OVERLAY, Size.ORIGINAL, Target.PROBABILITY, DicomObject.SR)
    assert (params.region_threshold, params.score_threshold, params.frame) == (0.25, 1.0, 3)
    assert (params.window, params.model) == ((40.0, 400.0), "demo-cxr")
    assert parse_params(PredictParams, [("window", "NONE")]).window == "none"


def test_empty_values_mean_the_default() -> None:
    params = parse_params(ExplainParams, [("methods", ""), ("classes", " "), ("size", ""),
                                          ("frame", "")])
    assert params == ExplainParams()
    assert parse_params(ExplainParams, [("methods", ",,")]).methods == ("gradcam", "crm")


@pytest.mark.parametrize(("pairs", "error", "message"), [
    ([("methods", "gradcam,lime")], UnknownMethod, "unknown method 'lime'; available: crm"),
    ([("heatmap", "gif")], InvalidParameter, "heatmap='gif' is not one of png, npy, overlay"),
    ([("size", "huge")], InvalidParameter, "size='huge' is not one of model, original, feature"),
    ([("dicom", "pm")], InvalidParameter, "dicom='pm' is not one of sc, sr"),
    ([("region_threshold", "1.5")], InvalidParameter,
     "region_threshold='1.5' must be between 0.0 and 1.0"),
    ([("score_threshold", "nan")], InvalidParameter, "score_threshold='nan'"),
    ([("score_threshold", "x")], InvalidParameter, "score_threshold='x' is not a number"),
    ([("frame", "1.5")], InvalidParameter, "frame='1.5' must be an integer from 0 to"),
    ([("frame", "\u00b2")], InvalidParameter, "frame='\u00b2' must be an integer from 0 to"),
    ([("frame", "9" * 5000)], InvalidParameter, "must be an integer from 0 to 2147483647"),
    ([("window", "40")], InvalidParameter, "window='40': must be 'center,width' or 'none'"),
    ([("window", "40,-1")], InvalidParameter, "width must be > 0"),
    ([("mehtods", "crm")], InvalidParameter, "unknown parameter 'mehtods'; this endpoint takes"),
    ([("methods", "crm"), ("methods", "gradcam")], InvalidParameter,
     "parameter 'methods' is given more than once"),
])
def test_bad_values(pairs: list[tuple[str, str]], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        parse_params(ExplainParams, pairs)
    assert type(caught.value) is error
    assert message in str(caught.value.detail)  # type: ignore[attr-defined]


def test_predict_takes_only_its_own_parameters() -> None:
    with pytest.raises(InvalidParameter, match="unknown parameter 'methods'"):
        parse_params(PredictParams, [("methods", "crm")])


def test_the_openapi_document_comes_from_the_models(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, kind in (("/explain", ExplainParams), ("/predict", PredictParams)):
        operation = spec["paths"][path]["post"]
        query = {p["name"]: p["schema"] for p in operation["parameters"]}
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert query == parameter_schemas(kind)
        # The form fields declare no defaults (generators would send them twice).
        assert {k: v for k, v in form["properties"].items() if k != "file"} == {
            name: {k: v for k, v in schema.items() if k != "default"}
            for name, schema in query.items()}
        assert list(query) == list(kind.model_fields)
    query = parameter_schemas(ExplainParams)
    assert query["methods"]["default"] == "gradcam,crm"
    assert set(METHODS) <= set(query["methods"]["description"].replace(",", " ").split())
    assert (query["size"]["enum"], query["size"]["default"]) == (list(Size), "model")
    assert query["heatmap"]["enum"] == list(Encoding)
    assert query["dicom"]["enum"] == list(DICOM_OUTPUTS)
    assert (query["region_threshold"]["minimum"], query["region_threshold"]["maximum"]) == (0, 1)
