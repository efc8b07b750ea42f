"""Modules imported on first use, so that a cold `vqret search` doesn't pay for what it
never calls (the stdlib recipe, importlib.util.LazyLoader)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """`name` as a module object that runs its import on the first attribute access."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def skip_pyarrow_pandas_probe() -> None:
    """Keep pyarrow from importing pandas (~0.5 s) just to ask whether an input is a pandas
    object, which it does the first time it builds any array from Python or numpy values.

    The first probe is made to find no pandas; pyarrow then answers "not a pandas object"
    and, where it really needs pandas (`Table.to_pandas()`), imports it after all (its
    shim retries an import that must succeed). For a process of ours that builds rows, not
    data frames (the CLI); a pandas Series given to `pa.array` afterwards is read as a
    sequence, which is why a library import never does this.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(blocker)


class _NoPandas:
    """A meta path finder under which `import pandas` fails (ModuleNotFoundError)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"no module named {name!r} (skipped)", name=name)
        return None
