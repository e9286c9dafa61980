"""
The demo's in-process models (``"uri": "plugin:lung-threshold"`` and
``"plugin:lung-volume"`` in models.json): lungs found by Hounsfield threshold
and connected components, see ``zhiva.demo.lungs``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from twisted.plugin import IPlugin
from zope.interface import implementer

from zhiva.demo import lungs
from zhiva.interfaces import IModel


def datasets_in(inputs: Any) -> Iterator[Dataset]:
    """Every Dataset of the inputs, whether a list or a data-filter structure."""
    if isinstance(inputs, Dataset):
        yield inputs
    elif isinstance(inputs, list):
        for item in inputs:
            yield from datasets_in(item)
    elif isinstance(inputs, dict):
        for value in inputs.values():
            yield from datasets_in(value)


def per_series(inputs: Any, run: Callable[[list[Dataset]], dict]) -> dict:
    """Run a one-series model on each series and merge the results by UID."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets_in(inputs):
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    merged: dict = {}
    for group in groups.values():
        for study, content in run(group).items():
            into = merged.setdefault(study, {})
            for key, value in content.items():
                if key == "metadata":
                    into.setdefault("metadata", []).extend(value)
                else:
                    into[key] = value
    return merged


@implementer(IPlugin, IModel)
@dataclass(frozen=True)
class SeriesModel:
    name: str
    run: Callable[[list[Dataset]], dict]

    def infer(self, inputs, target) -> dict:
        return per_series(inputs, self.run)


lung_threshold = SeriesModel("lung-threshold", lungs.segment)
lung_volume = SeriesModel("lung-volume", lungs.measure)
