"""The three model tasks of SPEC.md and their result checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from zhiva.interfaces import ITask
from zhiva.results import InstanceCheck, check_rois, check_segments, check_tree


@implementer(IPlugin, ITask)
@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    instance_check: InstanceCheck | None

    def check(self, result: Any, route) -> None:
        check_tree(result, route, self.instance_check)


segmentation = Task("segmentation", "segmentations", check_segments)
annotation = Task("annotation", "annotations", check_rois)
prediction = Task("prediction", "predictions", None)
