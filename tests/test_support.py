"""
The test infrastructure itself works: every other test's meaning depends on
the synthetic study, the Orthancs and the model server being what they claim.
"""
from __future__ import annotations

import base64
import http.client
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.support.dicomgen import StudyInfo
from tests.support.model_server import ModelServer
from tests.support.orthanc import Orthanc

UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def zhiva_instance(path: Path) -> str:
    """One instance in zhiva-json: a string holding the JSON array of its bytes."""
    return json.dumps(list(path.read_bytes()), separators=(",", ":"))


def zhiva_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def post(url: str, body: bytes) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_study_files_read_back(study: StudyInfo) -> None:
    assert len(study.series[study.big_series_uid]) == 120
    assert len(study.series[study.small_series_uid]) == 3
    assert len(study.files) == len(study.all_sops()) == 123
    for uid in [study.study_uid, *study.series, *study.all_sops()]:
        assert len(uid) <= 64 and UID.match(uid), uid
    for series_uid, sops in study.series.items():
        for number, (sop, path) in enumerate(zip(sops, study.series_files(series_uid)), 1):
            assert path.read_bytes()[128:132] == b"DICM"
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == sop
            assert ds.SOPClassUID == CTImageStorage
            assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
                study.study_uid, series_uid, sop,
            )
            assert ds.InstanceNumber == number
    pixels = pydicom.dcmread(study.files[0]).pixel_array
    assert pixels.shape == (512, 512) and pixels.dtype.itemsize == 2 and pixels.any()


def test_orthanc_serves_wado_rs(orthanc: Orthanc, study: StudyInfo) -> None:
    url = f"{orthanc.dicomweb}/studies/{study.study_uid}/series/{study.small_series_uid}"
    request = urllib.request.Request(url, headers={"Accept": WADO_ACCEPT})
    with urllib.request.urlopen(request, timeout=30) as response:
        content_type = response.headers["Content-Type"]
        body = response.read()
    assert content_type.startswith("multipart/related")
    boundary = re.search(r'boundary="?([^";]+)', content_type).group(1)
    assert body.count(b"--" + boundary.encode()) == 3 + 1
    for sop in study.series[study.small_series_uid]:
        assert sop.encode() in body
    # QIDO proves the big series arrived whole.
    qido = f"{orthanc.dicomweb}/studies/{study.study_uid}/series/{study.big_series_uid}/instances"
    with urllib.request.urlopen(qido, timeout=30) as response:
        assert len(json.load(response)) == 120


def test_orthanc_basic_auth(orthanc_auth: Orthanc, study: StudyInfo) -> None:
    url = f"{orthanc_auth.dicomweb}/studies/{study.study_uid}/series/{study.small_series_uid}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": WADO_ACCEPT}))
    assert refused.value.code == 401
    token = base64.b64encode(b"alice:s3cret-pw").decode()
    request = urllib.request.Request(
        url, headers={"Accept": WADO_ACCEPT, "Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("multipart/related")
        body = response.read()
    assert all(sop.encode() in body for sop in study.series[study.small_series_uid])
    assert orthanc_auth.auth_header() == {"Authorization": f"Basic {token}"}


def test_model_server_decodes_list_body(model_server: ModelServer, study: StudyInfo) -> None:
    sops = study.series[study.small_series_uid]
    body = zhiva_body([zhiva_instance(p) for p in study.series_files(study.small_series_uid)])
    status, content_type, answer = post(model_server.url + "/prediction", body)
    assert (status, content_type) == (200, "application/json")
    result = json.loads(answer)
    series = result[study.study_uid][study.small_series_uid]
    assert result[study.study_uid]["metadata"][0]["value"] == 3
    assert series["metadata"][0]["value"] == 3
    assert set(series) == {"metadata", *sops}
    last = model_server.last()
    assert last is not None
    assert (last["path"], last["sops"], last["keys"], last["count"]) == (
        "/prediction", sops, sops, 3,
    )
    assert last["content_type"] == "application/json" and last["error"] is None

    status, _, answer = post(model_server.url + "/segmentation?double=1", body)
    decoded = json.loads(json.loads(answer))
    assert status == 200 and decoded[study.study_uid][study.small_series_uid][sops[0]]["segments"]


def test_model_server_chunked_filtered_body(model_server: ModelServer, study: StudyInfo) -> None:
    first, second, third = study.series_files(study.small_series_uid)
    sops = study.series[study.small_series_uid]
    value = {
        "ct": {"data": [zhiva_instance(first)]},
        "pair": {
            "data": {"a": {"data": zhiva_instance(second)}, "b": {"data": zhiva_instance(third)}}
        },
    }
    body = zhiva_body(value)
    connection = http.client.HTTPConnection("127.0.0.1", model_server.port, timeout=30)
    chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))
    connection.request(
        "POST", "/annotation", body=chunks, headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    response = connection.getresponse()
    result = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert result[study.study_uid][study.small_series_uid][sops[2]]["rois"]
    last = model_server.last()
    assert last is not None and last["transfer_encoding"] == "chunked"
    assert last["keys"] == {
        "ct": {"data": [sops[0]]},
        "pair": {"data": {"a": {"data": sops[1]}, "b": {"data": sops[2]}}},
    }


def test_model_server_failure_routes(model_server: ModelServer, study: StudyInfo) -> None:
    body = zhiva_body([zhiva_instance(study.files[-1])])
    assert post(model_server.url + "/fail500", body)[0] == 500
    assert post(model_server.url + "/nonjson", body)[:2] == (200, "text/html")
    assert json.loads(post(model_server.url + "/badshape", body)[2]) == {"not-a-uid": 1}
    before = model_server.last()
    assert before is not None and before["path"] == "/badshape"
    assert post(model_server.url + "/prediction", b"[]")[0] == 500
    last = model_server.last()
    assert last is not None and (last["seq"], last["count"]) == (before["seq"] + 1, 0)
