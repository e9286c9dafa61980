"""
What a viewer request selects: the route, its data filters, and the plan of
PACS fetches that feeds the model.

Everything here is checked before any upstream call, and upstream URLs are
only ever built from the validated values held here.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Union

from zhiva.config import ModelConfig
from zhiva.errors import BadRequest

STUDY, SERIES, INSTANCE = "/studies", "/studies/series", "/studies/series/instances"

# PS3.5 9.1: digits and dots, components non-empty, 64 characters at most.
# Leading zeros are tolerated: real archives hold such UIDs.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_FILTERS_LENGTH = 65536


def is_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def check_uid(what: str, value: str) -> str:
    if not is_uid(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise BadRequest(
            f"{what} {shown!r} is not a valid DICOM UID "
            "(1 to 64 characters of digits and dots)"
        )
    return value


@dataclass(frozen=True)
class Target:
    """A study, a series or one instance at a PACS."""

    study: str
    series: str | None = None
    instance: str | None = None

    @property
    def level(self) -> str:
        if self.instance is not None:
            return INSTANCE
        if self.series is not None:
            return SERIES
        return STUDY

    def path(self) -> str:
        """The DICOMweb path below the server's base URI."""
        path = f"/studies/{self.study}"
        if self.series is not None:
            path += f"/series/{self.series}"
        if self.instance is not None:
            path += f"/instances/{self.instance}"
        return path

    def describe(self) -> str:
        if self.instance is not None:
            return f"instance {self.instance} of series {self.series}"
        if self.series is not None:
            return f"series {self.series} of study {self.study}"
        return f"study {self.study}"


@dataclass(frozen=True)
class Route:
    """One inference request as the viewer asked it."""

    kind: str
    model_key: str
    target: Target

    @property
    def level(self) -> str:
        return self.target.level


@dataclass(frozen=True)
class Filter:
    data_key: str
    uid: str
    nested: tuple[Filter, ...] = ()


@dataclass(frozen=True)
class Fetch:
    """One retrieve; ``single`` means exactly one instance, sent bare, not as a list."""

    target: Target
    single: bool = False


@dataclass(frozen=True)
class Keyed:
    """A JSON-object-like grouping: ``{dataKey: {"data": <node>}}``."""

    entries: tuple[tuple[str, Node], ...]


Node = Union[Fetch, Keyed]


@dataclass(frozen=True)
class Plan:
    root: Node

    @property
    def fetches(self) -> tuple[Fetch, ...]:
        found: list[Fetch] = []

        def walk(node: Node) -> None:
            if isinstance(node, Fetch):
                found.append(node)
            else:
                for _, child in node.entries:
                    walk(child)

        walk(self.root)
        return tuple(found)


def parse_filters(raw: str | None, route: Route, model: ModelConfig) -> tuple[Filter, ...]:
    """
    Parse and check the ``data-filters`` query against the model's
    configured inputs; raise ``BadRequest`` saying exactly what is wrong.
    """
    if raw is None:
        return ()
    if len(raw) > MAX_FILTERS_LENGTH:
        raise BadRequest(f"data-filters is longer than {MAX_FILTERS_LENGTH} characters")
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"data-filters is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("data-filters is nested too deeply") from None
    if value == []:
        return ()
    if route.level == INSTANCE:
        raise BadRequest("data-filters applies to study and series routes only")
    if not model.data_filter:
        raise BadRequest(f"model {model.key} takes no data-filters")
    nested_allowed = route.level == STUDY
    return _filters(value, "data-filters", model.data_filter, nested_allowed)


def _filters(value, where: str, specs, nested_allowed: bool) -> tuple[Filter, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where} must be a JSON array of {{dataKey, uuid}} objects")
    known = {spec.data_key: spec for spec in specs}
    filters: list[Filter] = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{here} must be an object with dataKey and uuid")
        data_key, uid = item.get("dataKey"), item.get("uuid")
        if not isinstance(data_key, str):
            raise BadRequest(f"{here}.dataKey is missing or not a string")
        if data_key not in known:
            names = ", ".join(sorted(known)) or "none"
            raise BadRequest(
                f"{here}.dataKey {data_key[:80]!r} is not an input of this model "
                f"(expected one of: {names})"
            )
        if any(f.data_key == data_key for f in filters):
            raise BadRequest(f"{here}.dataKey {data_key!r} is given twice")
        if not isinstance(uid, str):
            raise BadRequest(f"{here}.uuid is missing or not a string")
        check_uid(f"{here}.uuid", uid)
        nested_raw = item.get("dataFilter")
        nested: tuple[Filter, ...] = ()
        if nested_raw not in (None, []):
            if not nested_allowed:
                raise BadRequest(f"{here}.dataFilter: nested filters apply at study level only")
            nested = _filters(
                nested_raw, f"{here}.dataFilter", known[data_key].data_filter, False
            )
        filters.append(Filter(data_key, uid, nested))
    return tuple(filters)


def plan(route: Route, filters: tuple[Filter, ...]) -> Plan:
    """
    The fetches behind a request, shaped as the model protocol needs them.

    With filters at study level a top-level filter names a series (or, when
    nested, instances of it); at series level filters name instances.
    """
    target = route.target
    if not filters:
        return Plan(Fetch(target))
    if route.level == STUDY:
        entries = []
        for f in filters:
            series = Target(target.study, f.uid)
            if f.nested:
                node: Node = Keyed(
                    tuple(
                        (n.data_key, Fetch(Target(target.study, f.uid, n.uid), single=True))
                        for n in f.nested
                    )
                )
            else:
                node = Fetch(series)
            entries.append((f.data_key, node))
        return Plan(Keyed(tuple(entries)))
    return Plan(
        Keyed(
            tuple(
                (f.data_key, Fetch(Target(target.study, target.series, f.uid), single=True))
                for f in filters
            )
        )
    )
