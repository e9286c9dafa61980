"""
The ``zhiva-json`` model wire protocol (SPEC.md), the one existing model
APIs speak: every instance is a JSON string holding the JSON array of its
bytes, in a list or, with data filters, in ``{dataKey: {"data": ...}}``
objects. The body is produced chunk by chunk as instances stream in.
"""
from __future__ import annotations

import json

from twisted.plugin import IPlugin
from zope.interface import implementer

from zhiva.decimal_bytes import encode_chunk
from zhiva.interfaces import IModelProtocol, IPlanEncoder
from zhiva.selection import Fetch, Node, Plan


def _frame(plan: Plan) -> tuple[list[bytes], bytes]:
    """The JSON text before each fetch, and after the last one."""
    before: list[bytes] = []
    pending: list[bytes] = []

    def walk(node: Node) -> None:
        if isinstance(node, Fetch):
            if not node.single:
                pending.append(b"[")
            before.append(b"".join(pending))
            pending.clear()
            if not node.single:
                pending.append(b"]")
            return
        pending.append(b"{")
        for i, (key, child) in enumerate(node.entries):
            if i:
                pending.append(b",")
            pending.append(json.dumps(key).encode() + b':{"data":')
            walk(child)
            pending.append(b"}")
        pending.append(b"}")

    walk(plan.root)
    return before, b"".join(pending)


_SLICE = 1 << 16  # input bytes per encoded piece


@implementer(IPlanEncoder)
class ZhivaJsonEncoder:
    contentType = b"application/json"

    def __init__(self, plan: Plan) -> None:
        self._before, self._tail = _frame(plan)
        self._first_chunk = True

    def begin(self) -> bytes:
        return b""

    def beginFetch(self, index: int) -> bytes:
        return self._before[index]

    def beginInstance(self, index: int) -> bytes:
        self._first_chunk = True
        return b',"[' if index else b'"['

    def instanceData(self, data: bytes) -> list[bytes]:
        # Encoded in slices: the text is ~3.6x the input, and one multi-MiB
        # output object costs a fresh mmap and a page fault per 4 KiB, which
        # made 1 MiB reads three times slower to encode than 64 KiB ones.
        first, view = self._first_chunk, memoryview(data)
        pieces = [encode_chunk(view[i : i + _SLICE], first and not i) for i in range(0, len(data), _SLICE)]
        if pieces:
            self._first_chunk = False
        return pieces

    def endInstance(self) -> bytes:
        return b']"'

    def endFetch(self) -> bytes:
        return b""

    def end(self) -> bytes:
        return self._tail


@implementer(IPlugin, IModelProtocol)
class ZhivaJson:
    name = "zhiva-json"

    def encoder(self, plan: Plan) -> IPlanEncoder:
        return ZhivaJsonEncoder(plan)


protocol = ZhivaJson()
