"""Import a module right after another one is first imported (Python has no post-import hook of its own).

``call_after_import("xarray", "geoseg.accessor")`` puts a finder first on ``sys.meta_path`` that, when
``xarray`` is looked up, finds it the usual way and wraps its loader: once xarray's own code has run,
``geoseg.accessor`` is imported (it registers the ``.geoseg`` accessor). The finder takes itself off
the path at that first lookup, so it costs nothing afterwards.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
from typing import Any


class _After(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, then: str) -> None:
        self.name, self.then = name, then
        self._lock = threading.Lock()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        with self._lock:
            if self not in sys.meta_path:  # another thread's lookup took it off already
                return None
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run, then = loader.exec_module, self.then

        def exec_module(module: Any) -> None:
            run(module)
            try:
                importlib.import_module(then)
            except ImportError:  # pragma: no cover - an optional extra that is not installed
                pass

        loader.exec_module = exec_module
        return spec


def call_after_import(name: str, then: str) -> None:
    """Import ``then`` as soon as ``name`` has been imported (at once if it already is)."""
    if name in sys.modules:
        importlib.import_module(then)
        return
    sys.meta_path.insert(0, _After(name, then))
