"""
Plugin package for zhiva's extension points.

DICOM sources, model wire protocols, PACS auth schemes and tasks are found here
with ``twisted.plugin.getPlugins``. A new one is a new module in any
``zhiva/plugins`` directory on ``sys.path``; no edit to the core.
"""
from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
