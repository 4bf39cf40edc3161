"""The request models: one place for every /predict and /explain parameter."""

from __future__ import annotations

import re

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.request import ExplainParams, PredictParams, parameter_schemas, parse_params
from service.errors import InvalidParameter, RepeatedParameter, UnknownMethod
from service.methods import METHODS, Target
from service.outputs import DICOM_OUTPUTS, DicomObject
from service.outputs.render import Encoding, Size


def test_defaults() -> None:
    params = parse_params(ExplainParams, [])
    assert params == ExplainParams()
    assert (params.methods, params.classes, params.heatmap, params.size, params.target) == (
        ("gradcam", "crm"), None, Encoding.PNG, Size.MODEL, Target.LOGIT)
    assert (params.region_threshold, params.score_threshold, params.frame) == (0.5, 0.5, 0)
    assert (params.model, params.window, params.dicom) == (None, None, (DicomObject.SC,))
    options = params.options()
    assert (options.methods, options.classes, options.target) == (("gradcam", "crm"), None,
                                                                   Target.LOGIT)


def test_values_are_read_from_strings() -> None:
    params = parse_params(ExplainParams, [
        ("methods", " crm , gradcam,gradcam "), ("classes", "Nodule, 2"),
        ("heatmap", "overlay"), ("size", "original"), ("target", "probability"),
        ("region_threshold", "0.25"), ("score_threshold", "1"), ("frame", "3"),
        ("window", "40, 400"), ("dicom", "sr , sc,sr"), ("model", "demo-cxr")])
    assert params.methods == ("crm", "gradcam")  # duplicates dropped, order kept
    assert params.classes == ("Nodule", "2")
    assert (params.heatmap, params.size, params.target, params.dicom) == (
        Encoding.OVERLAY, Size.ORIGINAL, Target.PROBABILITY, (DicomObject.SR, DicomObject.SC))
    assert (params.region_threshold, params.score_threshold, params.frame) == (0.25, 1.0, 3)
    assert (params.window, params.model) == ((40.0, 400.0), "demo-cxr")
    assert parse_params(PredictParams, [("window", "none")]).window == "none"
    assert parse_params(PredictParams, [("window", "-.5e2,1e-3")]).window == (-50.0, 0.001)


def test_values_are_read_as_sent() -> None:
    """The document's enums and patterns are lower case and exact; so is the server: a value
    the document refuses is refused (schemathesis' negative_data_rejection)."""
    for name, value in [("heatmap", "PNG"), ("size", " original "), ("target", "Logit"),
                        ("dicom", "SR"), ("dicom", "sc,,sr"), ("dicom", "sc\tsr"),
                        ("methods", "GradCAM"), ("methods", "crm,,gradcam"),
                        ("methods", "crm\tgradcam"), ("window", "NONE"), ("window", "none ")]:
        with pytest.raises(InvalidParameter):
            parse_params(ExplainParams, [(name, value)])


def test_empty_values() -> None:
    """An empty model, class list or window means the default, as the document allows; any
    other empty value is not what the document allows, and is refused."""
    params = parse_params(ExplainParams, [("model", ""), ("classes", ""), ("window", ""),
                                          ("methods", "crm")])
    assert (params.model, params.classes, params.window) == (None, None, None)
    assert parse_params(ExplainParams, [("classes", " , ")]).classes is None
    for name in ("heatmap", "size", "target", "region_threshold", "frame", "dicom",
                 "preview"):  # and methods: see test_bad_values
        with pytest.raises(InvalidParameter, match=f"^{name}"):
            parse_params(ExplainParams, [(name, "")])


@pytest.mark.parametrize(("pairs", "error", "message"), [
    ([("methods", "gradcam,lime")], UnknownMethod, "unknown method 'lime'; available: crm"),
    ([("methods", "")], UnknownMethod, "unknown method ''; available: crm"),
    ([("heatmap", "gif")], InvalidParameter, "heatmap='gif' is not one of png, npy, overlay"),
    ([("size", "huge")], InvalidParameter, "size='huge' is not one of model, original, feature"),
    ([("dicom", "pm")], InvalidParameter, "dicom='pm' is not a comma list of sc, sr"),
    ([("dicom", "sc,pm")], InvalidParameter, "dicom='sc,pm' is not a comma list of sc, sr"),
    ([("region_threshold", "1.5")], InvalidParameter,
     "region_threshold='1.5' must be between 0.0 and 1.0"),
    ([("score_threshold", "nan")], InvalidParameter, "score_threshold='nan'"),
    ([("score_threshold", "x")], InvalidParameter, "score_threshold='x' is not a number"),
    ([("frame", "1.5")], InvalidParameter, "frame='1.5' must be an integer from 0 to"),
    ([("frame", "\u00b2")], InvalidParameter, "frame='\u00b2' must be an integer from 0 to"),
    ([("frame", "9" * 5000)], InvalidParameter, "must be an integer from 0 to 2147483647"),
    ([("window", "40")], InvalidParameter,
     "window='40': must be 'center,width' (numbers, width > 0) or 'none'"),
    ([("window", "40,-1")], InvalidParameter, "width > 0"),
    ([("window", "40,0.0")], InvalidParameter, "width > 0"),
    ([("window", "1_0,400")], InvalidParameter, "width > 0"),  # float() would read it
    ([("window", "inf,400")], InvalidParameter, "width > 0"),
    ([("mehtods", "crm")], InvalidParameter, "unknown parameter 'mehtods'; this endpoint takes"),
    ([("methods", "crm"), ("methods", "gradcam")], RepeatedParameter,
     "parameter 'methods' is given more than once"),
    ([("classes", "Nodule," * 2000)], InvalidParameter,
     "parameter 'classes' is longer than 10000 characters"),
])
def test_bad_values(pairs: list[tuple[str, str]], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        parse_params(ExplainParams, pairs)
    assert type(caught.value) is error
    assert message in str(caught.value.detail)  # type: ignore[attr-defined]


# Strings where the readings of a pattern could differ: Python's \d and \s take non-ASCII
# digits and spaces, its $ a trailing newline, and float() reads '1_0', 'inf' and '٣'.
_PATTERN_PROBES = {
    "methods": ["gradcam", " crm , gradcam ", "crm_combined,crm", "gradcam\n", "gradcam,",
                ",gradcam", "crm\u00a0,gradcam", "CRM", "gradcam,,crm", "crm_", ""],
    "window": ["none", "40,400", "40 , 400", "-40.5,1e-3", ".5,5.", "+1,+1", "40,400\n",
               "\u0663,4", "1_0,4", "inf,4", "40,0", "40,00.000", "40,1e999", "9" * 41 + ",1",
               "9" * 42 + ",1", "40,4e-99", " 40,4", "None", "", " ", "40,\u2003400"],
}


@pytest.mark.parametrize("name", list(_PATTERN_PROBES))
def test_the_server_reads_the_patterns_as_the_document_states_them(name: str) -> None:
    """The server accepts a value exactly when an ECMA 262 JSON Schema validator (the
    document's reading, schemathesis') says the pattern matches it."""
    schema = parameter_schemas(ExplainParams)[name]
    document = jsonschema_rs.validator_for({"type": "string", "pattern": schema["pattern"]})
    for value in _PATTERN_PROBES[name]:
        try:
            parse_params(ExplainParams, [(name, value)])
            accepted = True
        except InvalidParameter:
            accepted = False
        assert accepted == document.is_valid(value), repr(value)


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
    assert query["dicom"]["default"] == "sc"
    assert re.fullmatch(query["dicom"]["pattern"], "sr, sc")
    assert not re.fullmatch(query["dicom"]["pattern"], "sc,pdf")
    assert set(DICOM_OUTPUTS) <= set(query["dicom"]["description"].replace(":", " ").split())
    assert (query["region_threshold"]["minimum"], query["region_threshold"]["maximum"]) == (0, 1)


def test_methods_from_python_are_checked_too() -> None:
    """tools/ and tests build the model from a tuple of names: the same names only."""
    assert ExplainParams(methods=("gradcam", "crm", "gradcam")).methods == ("gradcam", "crm")
    for methods in ((), ("lime",), ("GradCAM",)):
        with pytest.raises(ValidationError, match="unknown method"):
            ExplainParams(methods=methods)
