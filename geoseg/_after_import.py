"""Import a module right after another one is first imported (Python has no post-import hook of its own).

``call_after_import("xarray", "geoseg.accessor")`` puts a finder first on ``sys.meta_path``. Each time
``xarray`` is looked up before it is imported, the finder finds it the usual way and wraps the loader of
the spec it returns: once xarray's own code has run, ``geoseg.accessor`` is imported (it registers the
``.geoseg`` accessor) and the finder leaves the path. A lookup that only probes (``importlib.util.find_spec``,
as torch and odc-geo do for xarray at import) gets a wrapped loader that never runs, and the finder stays.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any


class _After(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, then: str) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name or fullname in sys.modules:
            return None
        for finder in sys.meta_path:  # the spec the rest of the path gives
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run, then = loader.exec_module, self.then

        def exec_module(module: Any) -> None:
            run(module)
            # a new list, not one changed in place: a thread walking the old one skips no finder
            sys.meta_path = [f for f in sys.meta_path if f is not self]
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
    sys.meta_path = [_After(name, then), *sys.meta_path]
