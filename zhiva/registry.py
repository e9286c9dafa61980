"""
Plugin discovery: which DICOM sources, protocols, auth schemes and tasks exist.

Config asks here for names so that a plugin added as a new module in
``zhiva/plugins`` is accepted in servers.json / models.json without any edit.
"""
from __future__ import annotations

from functools import cache
from typing import Any

from twisted.plugin import getPlugins

from zhiva.interfaces import (
    IDicomSourceFactory,
    IModel,
    IModelProtocol,
    IPacsAuthScheme,
    ITask,
)


@cache
def by_name(interface) -> dict[str, Any]:
    import zhiva.plugins

    found: dict[str, Any] = {}
    for plugin in getPlugins(interface, zhiva.plugins):
        found.setdefault(plugin.name, plugin)
    return found


def sources_by_scheme() -> dict[str, Any]:
    return {
        scheme: factory
        for factory in by_name(IDicomSourceFactory).values()
        for scheme in factory.schemes
    }


def protocols() -> dict[str, Any]:
    return by_name(IModelProtocol)


def auth_schemes() -> dict[str, Any]:
    return by_name(IPacsAuthScheme)


def tasks() -> dict[str, Any]:
    return by_name(ITask)


def models() -> dict[str, Any]:
    return by_name(IModel)
