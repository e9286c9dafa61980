"""Tests for zhiva.decimal_bytes: exact json.dumps equality for any bytes and split."""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from zhiva import decimal_bytes
from zhiva.decimal_bytes import encode_chunk, encode_instance


def reference(data: bytes) -> bytes:
    return json.dumps(list(data), separators=(",", ":")).encode()


def encode_split(data: bytes, cuts) -> bytes:
    edges = [0, *sorted(cuts), len(data)]
    out, first = [b"["], True
    for a, b in zip(edges, edges[1:]):
        out.append(encode_chunk(data[a:b], first))
        first = first and a == b  # empty chunks give b"", so the next is still first
    return b"".join(out) + b"]"


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=2000), draw=st.data())
def test_any_bytes_any_split_equals_json_dumps(data, draw):
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=6))
    assert encode_split(data, cuts) == reference(data)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 300_000), draw=st.data())
def test_large_random_bytes_random_splits(seed, size, draw):
    data = random.Random(seed).randbytes(size)
    cuts = draw.draw(st.lists(st.integers(0, size), max_size=4))
    assert encode_split(data, cuts) == reference(data)


@pytest.mark.parametrize("size", [
    1, 2, 3, decimal_bytes._SMALL - 1, decimal_bytes._SMALL, decimal_bytes._SMALL + 1,
    decimal_bytes._BLOCK - 1, decimal_bytes._BLOCK, decimal_bytes._BLOCK + 1, 3 * decimal_bytes._BLOCK + 7,
    decimal_bytes._SLICE - 1, decimal_bytes._SLICE + 1, 2 * decimal_bytes._SLICE + 3,
])
def test_sizes_around_internal_limits(size):
    data = random.Random(size).randbytes(size)
    inner = reference(data)[1:-1]
    assert encode_chunk(data, True) == inner
    assert encode_chunk(data, False) == b"," + inner
    assert type(encode_chunk(data, True)) is bytes


def test_all_byte_values():
    every = bytes(range(256))
    for data in (every, every[:decimal_bytes._SMALL - 1], every * 300, every[::-1] * 301):
        assert encode_split(data, []) == reference(data)
        assert encode_split(data, [1, len(data) // 2]) == reference(data)


def test_skewed_data_like_pixel_data():
    rng = random.Random(3)
    zeros = bytes(200_000)
    small = bytes(rng.choice(b"\x00\x01\x09\x0a\x63\x64\xff") for _ in range(100_001))
    for data in (zeros, small, b"\xff" * 70_000):
        assert encode_split(data, [77, 65_536]) == reference(data)


def test_empty_chunks():
    assert encode_chunk(b"", True) == b""
    assert encode_chunk(b"", False) == b""
    assert encode_split(b"abc", [0, 0, 3, 3]) == reference(b"abc")
    assert encode_instance(b"") == b'"[]"'


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3000))
def test_encode_instance_is_the_json_string_literal(data):
    assert encode_instance(data) == json.dumps(json.dumps(list(data), separators=(",", ":"))).encode()


def dicom_file() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Zhiva"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = random.Random(5).randbytes(64 * 64 * 2)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_real_dicom_round_trips_like_a_model_api_decodes_it():
    data = dicom_file()
    assert data[128:132] == b"DICM"
    literal = encode_instance(data)
    decoded = bytes(json.loads(json.loads(literal)))  # what the model side does
    assert decoded == data
    ds = pydicom.dcmread(BytesIO(decoded))
    assert ds.PatientName == "Test^Zhiva" and ds.Rows == 64
    streamed = b'"[' + b"".join(encode_chunk(data[i:i + 1000], i == 0) for i in range(0, len(data), 1000)) + b']"'
    assert streamed == literal


def test_threads_do_not_share_scratch():
    datas = [random.Random(i).randbytes(300_000 + i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: encode_chunk(d, True), datas * 3))
    assert results == [reference(d)[1:-1] for d in datas * 3]
