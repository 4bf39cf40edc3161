"""Ensembles over HTTP: mean scores, mean of max-normalised maps, /models, start-up errors."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper
from pydicom.data import get_testdata_file

from service.config import Settings
from service.errors import ModelError
from service.main import create_app
from service.methods.maps import normalise
from tests.api.conftest import MODELS, assert_problem, phantom_bytes

IMAGE = "all-findings.png"


def _copy(root: Path, name: str, *, perturb: bool = False) -> Path:
    folder = root / name
    shutil.copytree(MODELS / "demo-cxr", folder)
    toml = folder / "model.toml"
    toml.write_text(toml.read_text().replace('name = "demo-cxr"', f'name = "{name}"'))
    if perturb:
        # The final Gemm's bias moves the scores; its weights move the maps too (a bias
        # alone leaves every gradient and every logit difference unchanged).
        model = onnx.load(str(folder / "model.onnx"))
        rng = np.random.default_rng(5)
        for init in model.graph.initializer:
            if init.name in ("classifier.4.bias", "classifier.4.weight"):
                value = numpy_helper.to_array(init)
                value = value + rng.normal(0, 0.5 * float(np.abs(value).std()), value.shape)
                init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
        onnx.save(model, str(folder / "model.onnx"))
    return folder


def _ensemble(root: Path, folder: str, text: str) -> None:
    (root / folder).mkdir()
    (root / folder / "ensemble.toml").write_text(text)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    _copy(root, "a")
    _copy(root, "b", perturb=True)
    _ensemble(root, "ens", 'members = ["a", "b"]\nversion = "2"\ndescription = "a and b"\n')
    return root


@pytest.fixture(scope="module")
def ens_client(repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models=repo, default_model="ens", threads=1))) as c:
        yield c


def _post(client: TestClient, route: str, **params: str) -> dict[str, object]:
    r = client.post(route, params=params, content=phantom_bytes(IMAGE),
                    headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _scores(body: dict[str, object]) -> np.ndarray:
    return np.array([p["score"] for p in body["predictions"]])  # type: ignore[attr-defined, index]


def _npy(explanation: dict[str, object]) -> np.ndarray:
    data = base64.b64decode(explanation["heatmap"]["data"])  # type: ignore[index]
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_scores_are_the_members_mean(ens_client: TestClient) -> None:
    a, b = (_scores(_post(ens_client, "/predict", model=m)) for m in ("a", "b"))
    assert np.abs(a - b).max() > 1e-3, "the members should differ"
    default = _post(ens_client, "/predict")  # MEDEXPLAIN_DEFAULT_MODEL names the ensemble
    assert default["model"] == {"name": "ens", "version": "2"}
    # Scores are rounded to 1e-6 in responses.
    np.testing.assert_allclose(_scores(default), (a + b) / 2, atol=1.5e-6)
    explained = _post(ens_client, "/explain", methods="gradcam")
    np.testing.assert_allclose(_scores(explained), (a + b) / 2, atol=1.5e-6)


def test_maps_are_the_mean_of_max_normalised_member_maps(ens_client: TestClient) -> None:
    params = {"methods": "gradcam,crm,fixations", "classes": "Nodule,Pneumothorax",
              "heatmap": "npy", "size": "model"}
    bodies = {m: _post(ens_client, "/explain", model=m, **params) for m in ("a", "b", "ens")}
    explanations = {m: body["explanations"] for m, body in bodies.items()}
    assert len(explanations["ens"]) == 6  # type: ignore[arg-type]
    differ = False
    for ea, eb, ee in zip(explanations["a"], explanations["b"], explanations["ens"]):  # type: ignore[call-overload]
        assert ea["method"] == eb["method"] == ee["method"]
        assert ea["label"] == eb["label"] == ee["label"]
        ma, mb, me = _npy(ea), _npy(eb), _npy(ee)
        assert me.shape == (256, 256)
        differ |= float(np.abs(normalise(ma) - normalise(mb)).max()) > 1e-2
        np.testing.assert_allclose(me, (normalise(ma) + normalise(mb)) / 2, atol=1e-6)
        if ee["method"] == "fixations":
            union = {tuple(p) for p in ea["points"]} | {tuple(p) for p in eb["points"]}
            assert {tuple(p) for p in ee["points"]} == union
        else:
            assert ee["points"] is None
        assert ee["regions"], "the combined map highlights something"
    assert differ, "the members' maps should differ"


def test_models_lists_the_ensemble(ens_client: TestClient) -> None:
    body = ens_client.get("/models").json()
    assert body["default"] == "ens"
    assert [m["name"] for m in body["models"]] == ["a", "b", "ens"]
    info = ens_client.get("/models/ens").json()
    assert info == body["models"][2]
    assert info["members"] == ["a", "b"]
    assert info["labels"] == ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]
    assert (info["input"], info["activation"], info["target_layer"]) == (None, None, None)
    assert info["methods"] == ens_client.get("/models/a").json()["methods"]
    assert info["execution_providers"] == ["CPUExecutionProvider"]
    assert (info["version"], info["description"], info["default"]) == ("2", "a and b", True)
    assert body["models"][0]["members"] is None


def test_ensembles_have_no_feature_grid(ens_client: TestClient) -> None:
    r = ens_client.post("/explain", params={"methods": "gradcam", "size": "feature"},
                        content=phantom_bytes(IMAGE), headers={"content-type": "image/png"})
    body = assert_problem(r, 422, "incompatible_parameters")
    assert "ensemble 'ens'" in str(body["detail"])


BAD = [
    ('members = ["a", "zeta"]', "ens/ensemble.toml: unknown member 'zeta'; models: a, b"),
    ('members = ["a"]', "ens/ensemble.toml: an ensemble needs at least two members"),
    ('members = "a"', "ens/ensemble.toml: members must be a list of model names"),
    ('members = ["a", "a"]', "ens/ensemble.toml: member 'a' is listed twice"),
    ('members = ["a", "ens"]', "ensemble 'ens' lists itself as a member"),
    ('members = ["a", "other"]', ("ens/ensemble.toml: member 'other' is itself an ensemble; "
                                  "ensembles of ensembles are not supported")),
    ('members = ["a", "odd"]', ("members must have identical labels in the same order; 'a' has "
                                "Cardiomegaly, Nodule, Pleural Effusion, Pneumothorax but 'odd' "
                                "has Cardiomegaly, Nodule, Pleural Effusion, PTX")),
    ('members = ["a", "recoded"]', ("ens/ensemble.toml: members code label 'Nodule' "
                                    "differently (model.toml [codes]); 'recoded' has SCT "
                                    "1, another SCT 27925004")),
    ('members = ["a", "b"]\nname = "a"', "two model folders are named 'a'"),
    ("members = [", "ens/ensemble.toml: "),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_ensembles_are_unavailable_and_the_rest_serves(tmp_path: Path, text: str,
                                                           message: str) -> None:
    _copy(tmp_path, "a")
    _copy(tmp_path, "b")
    odd = _copy(tmp_path, "odd")
    toml = odd / "model.toml"
    toml.write_text(toml.read_text().replace('"Pneumothorax"]', '"PTX"]')
                    .replace("Pneumothorax = {", "PTX = {"))
    recoded = _copy(tmp_path, "recoded") / "model.toml"
    recoded.write_text(recoded.read_text().replace('value = "27925004"', 'value = "1"'))
    _ensemble(tmp_path, "other", 'members = ["a", "b"]')
    _ensemble(tmp_path, "ens", text)
    with TestClient(create_app(Settings(models=tmp_path, threads=1))) as client:
        listed = client.get("/models").json()
        assert [m["name"] for m in listed["models"]] == ["a", "b", "odd", "other", "recoded"]
        [broken] = listed["unavailable"]
        assert broken["name"] == "ens" and broken["state"] == "UNAVAILABLE"
        assert message in broken["reason"]
        r = client.post("/predict", params={"model": "ens"}, content=phantom_bytes(IMAGE),
                        headers={"content-type": "image/png"})
        assert message in assert_problem(r, 503, "model_unavailable")["detail"]
        r = client.post("/predict", params={"model": "other"}, content=phantom_bytes(IMAGE),
                        headers={"content-type": "image/png"})
        assert r.status_code == 200


def test_a_folder_is_a_model_or_an_ensemble(tmp_path: Path) -> None:
    _copy(tmp_path, "a")
    (tmp_path / "a" / "ensemble.toml").write_text('members = ["a", "a"]')
    with (pytest.raises(ModelError, match="a holds both model.toml and ensemble.toml"),
          TestClient(create_app(Settings(models=tmp_path, threads=1)))):
        pass


def test_ensemble_answers_with_dicom_too(ens_client: TestClient) -> None:
    import pydicom

    from tests.api.conftest import DATA

    source = DATA / "dicom" / "phantom_nodule.dcm"
    r = ens_client.post("/explain", content=source.read_bytes(),
                        params={"methods": "gradcam", "classes": "Nodule"},
                        headers={"content-type": "application/dicom",
                                 "accept": "application/dicom"})
    assert r.status_code == 200, r.text
    capture = pydicom.dcmread(io.BytesIO(r.content))
    assert capture.StudyInstanceUID == pydicom.dcmread(source).StudyInstanceUID
    assert "gradcam Nodule" in capture.SeriesDescription


def test_an_ensemble_refuses_what_a_member_is_not_for(ens_client: TestClient) -> None:
    ct = get_testdata_file("CT_small.dcm", download=False)
    assert ct is not None
    r = ens_client.post("/predict", content=Path(ct).read_bytes(),
                        headers={"content-type": "application/dicom"})
    body = assert_problem(r, 422, "dicom_not_accepted")
    assert body["detail"] == ("model ens is not for this image: Modality is CT; the model "
                              "accepts CR, DX")
    assert ens_client.get("/models/ens").json()["accepts"] is None  # see its members
    assert ens_client.get("/models/a").json()["accepts"]["modalities"] == ["CR", "DX"]


def test_an_ensemble_codes_labels_as_its_members_do(ens_client: TestClient) -> None:
    member = ens_client.get("/models/a").json()["codes"]
    assert member["Pleural Effusion"] == {"scheme": "SCT", "value": "60046008",
                                          "meaning": "Pleural effusion"}
    assert sorted(member) == ["Cardiomegaly", "Nodule", "Pleural Effusion", "Pneumothorax"]
    assert ens_client.get("/models/ens").json()["codes"] == member
