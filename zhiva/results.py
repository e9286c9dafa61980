"""
What a valid model result looks like (SPEC.md "Result shapes").

Results are nested objects keyed by DICOM UIDs (study -> series -> instance),
with ``metadata`` allowed at any level. Each check raises ``ValueError``
naming the JSON path of the first problem. These run in a worker thread:
a segmentation of a big series is ~100 MB of JSON.
"""
from __future__ import annotations

from typing import Any, Callable

from zhiva.selection import Route, is_uid

METADATA_TYPES = frozenset({"percentage", "date", "text", "number"})
_BITS = frozenset({0, 1})
_OPTIONAL_TEXT = ("description", "titleColor", "contentColor", "backgroundColor")

InstanceCheck = Callable[[dict, str], None]


def check_tree(result: Any, route: Route, instance_check: InstanceCheck | None) -> None:
    """
    Check the UID tree, the requested UIDs, metadata everywhere, and each
    instance object with ``instance_check``.
    """
    target = route.target
    if isinstance(result, list):
        raise ValueError("result is a JSON array; expected an object keyed by StudyInstanceUID")
    study = _level(result, "result", "study")
    if target.study not in study:
        raise ValueError(f"result has no entry for the requested study {target.study}")
    for study_uid, study_value in study.items():
        path = f"result[{study_uid}]"
        series_map = _level(study_value, path, "series")
        for series_uid, series_value in series_map.items():
            here = f"{path}[{series_uid}]"
            instances = _level(series_value, here, "instance")
            for sop_uid, instance in instances.items():
                where = f"{here}[{sop_uid}]"
                _only_metadata_or(instance, where, instance_check)
    if target.series is not None:
        series_map = study[target.study]
        if target.series not in series_map:
            raise ValueError(f"result has no entry for the requested series {target.series}")
        if target.instance is not None and target.instance not in series_map[target.series]:
            raise ValueError(f"result has no entry for the requested instance {target.instance}")


def _level(value: Any, path: str, what: str) -> dict:
    """Check a UID-keyed level and its metadata; return it without ``metadata``."""
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be an object keyed by {what} UIDs, not {_kind(value)}")
    children = {}
    for key, child in value.items():
        if key == "metadata":
            check_metadata(child, f"{path}.metadata")
            continue
        if not is_uid(key):
            raise ValueError(f"{path} has key {key[:80]!r}, which is neither a {what} UID nor 'metadata'")
        if not isinstance(child, dict):
            raise ValueError(f"{path}[{key}] must be an object, not {_kind(child)}")
        children[key] = child
    return children


def _only_metadata_or(instance: dict, path: str, instance_check: InstanceCheck | None) -> None:
    if "metadata" in instance:
        check_metadata(instance["metadata"], f"{path}.metadata")
    if instance_check is not None:
        instance_check(instance, path)


def check_metadata(value: Any, path: str) -> None:
    if not isinstance(value, list):
        raise ValueError(f"{path} must be a list of metadata items, not {_kind(value)}")
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object, not {_kind(item)}")
        if item.get("dataType") not in METADATA_TYPES:
            raise ValueError(f"{where}.dataType must be one of {', '.join(sorted(METADATA_TYPES))}")
        value_ = item.get("value")
        if isinstance(value_, bool) or not isinstance(value_, (str, int, float)):
            raise ValueError(f"{where}.value must be a string or a number")
        _text(item, "title", where, required=True)
        for name in _OPTIONAL_TEXT:
            _text(item, name, where)
        if "boldContent" in item and not isinstance(item["boldContent"], bool):
            raise ValueError(f"{where}.boldContent must be true or false")


def check_segments(instance: dict, path: str) -> None:
    segments = instance.get("segments")
    if not isinstance(segments, list):
        raise ValueError(f"{path}.segments must be a list of segments, not {_kind(segments)}")
    for i, segment in enumerate(segments):
        where = f"{path}.segments[{i}]"
        _shape_common(segment, where)
        points = segment.get("points")
        if not isinstance(points, list) or not points:
            raise ValueError(f"{where}.points must be a non-empty 2-D array of 0/1 rows")
        width = len(points[0]) if isinstance(points[0], list) else -1
        for row in points:
            # issuperset walks the row in C: a 512x512 mask checks in ~1 ms.
            if not isinstance(row, list) or len(row) != width or not _BITS.issuperset(row):
                raise ValueError(f"{where}.points must be rows of equal length holding only 0 and 1")


def check_rois(instance: dict, path: str) -> None:
    rois = instance.get("rois")
    if not isinstance(rois, list):
        raise ValueError(f"{path}.rois must be a list of ROIs, not {_kind(rois)}")
    for i, roi in enumerate(rois):
        where = f"{path}.rois[{i}]"
        _shape_common(roi, where)
        points = roi.get("points")
        if not isinstance(points, list) or not points:
            raise ValueError(f"{where}.points must be a non-empty list of [x, y] points")
        for point in points:
            if (
                not isinstance(point, list)
                or len(point) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in point)
            ):
                raise ValueError(f"{where}.points must hold [x, y] pairs of numbers")


def _shape_common(shape: Any, where: str) -> None:
    if not isinstance(shape, dict):
        raise ValueError(f"{where} must be an object, not {_kind(shape)}")
    _text(shape, "color", where, required=True)
    _text(shape, "className", where, required=True)
    for name in ("classColor", "activeColor", "description"):
        _text(shape, name, where)


def _text(item: dict, name: str, where: str, required: bool = False) -> None:
    if name not in item:
        if required:
            raise ValueError(f"{where}.{name} is missing")
        return
    if not isinstance(item[name], str):
        raise ValueError(f"{where}.{name} must be a string, not {_kind(item[name])}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)
