"""
The optional on-disk DICOM cache (``--dicom-cache-dir``): a study, series or
instance fetched from a PACS once is read from local disk the next time any
model asks for it, so the PACS is not asked twice.

- ``files``: the entry files (names, layout, reading, writing, scanning).
- ``fill``: one retrieve being written while it flows on to the model.
- ``cache``: the service (index, LRU, TTL, eviction, I/O thread pool).
- ``source``: the ``IDicomSource`` wrapper serving hits and filling misses.
"""
from zhiva.dicom_cache.cache import DEFAULT_MAX_BYTES, DEFAULT_TTL, DicomCache, parse_size
from zhiva.dicom_cache.files import PARTIAL_PREFIX, SUFFIX
from zhiva.dicom_cache.source import LOCAL_SCHEMES, CachedSource

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_TTL", "LOCAL_SCHEMES", "PARTIAL_PREFIX", "SUFFIX",
    "CachedSource", "DicomCache", "parse_size",
]
