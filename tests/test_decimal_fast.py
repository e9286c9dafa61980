"""
Both zhiva-json encoder paths are byte-identical to ``json.dumps``: the C
extension (``_zhiva_decimal``, when built) and the numpy fallback, whichever
of them ``encode_chunk`` picks on this install.
"""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_decimal_bytes import dicom_file
from zhiva import decimal_bytes

IMPLEMENTATIONS = {"numpy": decimal_bytes._numpy_encode_chunk}
if decimal_bytes._c_encode is not None:
    IMPLEMENTATIONS["c"] = decimal_bytes._c_encode


def reference(data: bytes) -> bytes:
    return json.dumps(list(data), separators=(",", ":")).encode()


def split_encode(encode, data: bytes, cuts) -> bytes:
    edges = [0, *sorted(cuts), len(data)]
    out, first = [b"["], True
    for a, b in zip(edges, edges[1:]):
        out.append(encode(data[a:b], first))
        first = first and a == b
    return b"".join(out) + b"]"


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=3000), draw=st.data())
def test_any_bytes_any_split_numpy(data, draw):
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=6))
    assert split_encode(decimal_bytes._numpy_encode_chunk, data, cuts) == reference(data)


@pytest.mark.skipif(decimal_bytes._c_encode is None, reason="_zhiva_decimal not built")
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), draw=st.data())
def test_any_bytes_any_split_c(data, draw):
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=6))
    assert split_encode(decimal_bytes._c_encode, data, cuts) == reference(data)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 159, 160, 65_537, (1 << 20) + 3])
def test_sizes(name, size):
    data = random.Random(size).randbytes(size)
    encode = IMPLEMENTATIONS[name]
    assert encode(data, True) == reference(data)[1:-1]
    assert encode(data, False) == b"," + reference(data)[1:-1]
    assert encode(memoryview(data), True) == reference(data)[1:-1]  # any buffer


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_every_byte_value_and_real_dicom(name):
    encode = IMPLEMENTATIONS[name]
    every = bytes(range(256)) * 3
    assert b"[" + encode(every, True) + b"]" == reference(every)
    data = dicom_file()
    streamed = b"[" + b"".join(encode(data[i:i + 999], i == 0) for i in range(0, len(data), 999)) + b"]"
    assert streamed == reference(data)


def test_the_c_path_is_used_when_built():
    if decimal_bytes._c_encode is None:
        pytest.skip("_zhiva_decimal not built (no C compiler at install): numpy path in use")
    assert decimal_bytes.encode_chunk(b"\x00\xff", True) == b"0,255"
