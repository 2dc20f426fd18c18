"""Loading operators' Python files (API apps, task types) from a directory on disk.

The frozen binary has no site-packages of the operator's; these files are
imported by path under a private package name so they never shadow a module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_module(path: Path, package: str) -> ModuleType:
    """Import `path` as `<package>.<stem>`; any exception of the file's code propagates."""
    name = f"{package}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
