"""Which build of the request path runs: the modules mypyc compiled (`setup.py`), or their source.

The compiled modules sit beside their `.py` files, and Python prefers them. `setup.py` records a
hash of each source it compiled (`tether/_native_build.py`); if a source has changed since (an edit
in a checkout installed with `pip install -e .`), or `TETHER_PURE_PYTHON=1` is set, every one of
them is loaded from its source instead. All or none: compiled modules call each other directly, so
a mix would run old code. Imported first by `actors` and `gateway`, before any of them loads.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules of a request's path, in the gateway and in the node (callgrind: `loadtest.instructions`).
COMPILED = (
    "actors.events",
    "actors.http_client",
    "actors.ids",
    "actors.lease",
    "actors.mcp",
    "actors.mux",
    "actors.node",
    "actors.node_api",
    "actors.placement",
    "actors.upstream_http",
    "actors.waiting",
    "actors.wheel",
    "actors.wire",
    "gateway.app",
    "gateway.edge",
    "gateway.link",
    "gateway.rules",
)
# Not gateway.metrics: its collector extends prometheus_client's, whose types the build does not
# have (setup.py), and a compiled class cannot extend a class it knows nothing of.
ROOT = Path(__file__).resolve().parent.parent
PURE_ENV = "TETHER_PURE_PYTHON"

log = logging.getLogger("tether.native")


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Sources(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' `.py` files, ahead of the compiled modules themselves."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(name, source(name))


def _built(module: str) -> bool:
    path = source(module)
    return any(path.with_suffix(suffix).exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _stale() -> list[str]:
    """The compiled modules whose source is not what was compiled."""
    try:  # written by setup.py: what it compiled, by hash
        built: dict[str, str] = importlib.import_module("tether._native_build").SOURCES
    except ImportError:
        built = {}
    return [m for m in COMPILED if _built(m) and built.get(m) != digest(source(m))]


def compiled() -> bool:
    """Whether the request path, once loaded, runs compiled."""
    return getattr(sys.modules.get("gateway.edge") or sys.modules.get("actors.mux"), "__file__", "").endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES))


def choose() -> None:
    """Load the compiled modules from source if asked to, or if a source changed since its compile."""
    if any(isinstance(f, _Sources) for f in sys.meta_path):
        return
    if os.environ.get(PURE_ENV) == "1":
        sys.meta_path.insert(0, _Sources())
        return
    stale = _stale()
    if stale:
        # logging may not be set up yet: the message says it all
        log.warning("native.stale: %s changed since compiled; every compiled module runs from its source "
                    "(rebuild: pip install -e .)", ", ".join(stale), extra={"modules": stale})
        sys.meta_path.insert(0, _Sources())
