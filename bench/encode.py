"""
Throughput of the zhiva-json encoder (zhiva.decimal_bytes.encode_chunk), in MB/s
of DICOM input on one core, with json.dumps as the naive reference.

    python bench/encode.py [total_MB]
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from zhiva.decimal_bytes import encode_chunk  # noqa: E402

MB = 1_000_000


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / MB:8.0f} MB/s"


def encode_all(chunks: list[bytes]) -> tuple[float, int]:
    start = time.perf_counter()
    out = 0
    for i, chunk in enumerate(chunks):
        out += len(encode_chunk(chunk, i == 0))  # result dropped, as after a write
    return time.perf_counter() - start, out


def main() -> None:
    total = int(float(sys.argv[1]) * MB) if len(sys.argv) > 1 else 100 * MB
    data = os.urandom(total)
    view = memoryview(data)
    print(f"encode_chunk, {total / MB:.0f} MB of random bytes (best of 3 runs):")
    for size in (1 << 20, 1 << 16, 1 << 14):
        chunks = [bytes(view[i:i + size]) for i in range(0, total, size)]
        best, out = min(encode_all(chunks) for _ in range(3))
        print(f"  {size >> 10:5d} KiB chunks {rate(total, best)}   (output {out / total:.2f}x input)")
    sample = data[: 5 * MB]
    start = time.perf_counter()
    json.dumps(list(sample), separators=(",", ":")).encode()
    print(f"json.dumps(list(b)), 5 MB sample  {rate(len(sample), time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
