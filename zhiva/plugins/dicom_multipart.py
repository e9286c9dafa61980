"""
The ``dicom-multipart`` model wire protocol: the instances travel as a
STOW-RS body, so a model API can reuse any STOW-RS / ``multipart/related``
parser and gets each Part 10 file byte for byte, with no re-encoding.

Body (``Content-Type: multipart/related; type="application/dicom";
boundary=<random>``)::

    --B
    Content-Type: application/json          (only with data filters)
    Content-ID: <request@zhiva>

    {"zhiva": "dicom-multipart/1",
     "fetches": [{"study": ..., "series": ..., "instance": ..., "single": ...}, ...],
     "data": <the SPEC.md data-filter structure, each instance (or list of
              instances) replaced by {"fetch": <index in fetches>}>}
    --B
    Content-Type: application/dicom
    Content-ID: <f<fetch>.i<ordinal>@zhiva>

    <Part 10 file>
    --B
    ...
    --B--

The DICOM parts come fetch after fetch, in the order of ``fetches``; part
``<fN.iM@zhiva>`` is the M-th (from 0) instance of fetch N. A model
reassembles the zhiva-json structure by replacing ``{"fetch": N}`` with the
list of fetch N's datasets (its only dataset when ``single``). Without data
filters there is no JSON part: the body is a plain STOW-RS body of the
requested study, series or instance. See the README, "dicom-multipart", and
``examples/dicom_multipart_model.py``.
"""
from __future__ import annotations

import json
import uuid

from twisted.plugin import IPlugin
from zope.interface import implementer

from zhiva.interfaces import IModelProtocol, IPlanEncoder
from zhiva.selection import Fetch, Node, Plan, Target

VERSION = "dicom-multipart/1"


def _target(target: Target) -> dict[str, str | None]:
    return {"study": target.study, "series": target.series, "instance": target.instance}


def describe(plan: Plan) -> dict | None:
    """The leading JSON part's content, or None when the plan has no data filters."""
    if isinstance(plan.root, Fetch):
        return None
    fetches: list[dict] = []

    def walk(node: Node):
        if isinstance(node, Fetch):
            fetches.append({**_target(node.target), "single": node.single})
            return {"fetch": len(fetches) - 1}
        return {key: {"data": walk(child)} for key, child in node.entries}

    data = walk(plan.root)
    return {"zhiva": VERSION, "fetches": fetches, "data": data}


@implementer(IPlanEncoder)
class DicomMultipartEncoder:
    def __init__(self, plan: Plan, boundary: bytes | None = None) -> None:
        self.boundary = boundary or b"zhiva-" + uuid.uuid4().hex.encode("ascii")
        self.contentType = (
            b'multipart/related; type="application/dicom"; boundary=' + self.boundary
        )
        self._description = describe(plan)
        self._fetch = -1
        self._parts = 0

    def _delimiter(self) -> bytes:
        # The first delimiter needs no leading CRLF (empty preamble).
        prefix = b"\r\n--" if self._parts else b"--"
        self._parts += 1
        return prefix + self.boundary + b"\r\n"

    def begin(self) -> bytes:
        if self._description is None:
            return b""
        text = json.dumps(self._description, separators=(",", ":")).encode("utf-8")
        return (
            self._delimiter()
            + b"Content-Type: application/json\r\nContent-ID: <request@zhiva>\r\n\r\n"
            + text
        )

    def beginFetch(self, index: int) -> bytes:
        self._fetch = index
        return b""

    def beginInstance(self, index: int) -> bytes:
        return (
            self._delimiter()
            + b"Content-Type: application/dicom\r\nContent-ID: <f%d.i%d@zhiva>\r\n\r\n"
            % (self._fetch, index)
        )

    def instanceData(self, data: bytes) -> bytes:
        return data  # the Part 10 bytes as they are: no copy, no encoding

    def endInstance(self) -> bytes:
        return b""

    def endFetch(self) -> bytes:
        return b""

    def end(self) -> bytes:
        return b"\r\n--" + self.boundary + b"--\r\n"


@implementer(IPlugin, IModelProtocol)
class DicomMultipart:
    name = "dicom-multipart"

    def encoder(self, plan: Plan) -> IPlanEncoder:
        return DicomMultipartEncoder(plan)


protocol = DicomMultipart()
