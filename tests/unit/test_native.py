"""The request path runs compiled (setup.py, mypyc), and from its source when asked or when changed."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys

from tether import native

SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
# Prints, for each compiled module, where it was loaded from; `before` runs first.
PROBE = """
import importlib, sys
{before}
from tether import native
for name in native.COMPILED:
    print(name, importlib.import_module(name).__file__)
"""


def _loaded(before: str = "", **env: str) -> tuple[dict[str, str], str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines()), result.stderr


def test_request_path_is_compiled_by_the_install() -> None:
    if os.environ.get(native.PURE_ENV) == "1":  # the suite itself asked for the sources
        assert not native.compiled()
        return
    files = {name: importlib.import_module(name).__file__ or "" for name in native.COMPILED}
    assert [name for name, file in files.items() if not file.endswith(SUFFIXES)] == []
    assert native.compiled()


def test_pure_python_runs_every_module_from_source() -> None:
    files, _ = _loaded(**{native.PURE_ENV: "1"})
    assert sorted(files) == sorted(native.COMPILED)
    assert all(file.endswith(".py") for file in files.values()), files


def test_a_changed_source_runs_all_of_them_from_source() -> None:
    # One module's recorded hash no longer matches its source, as after an edit in a checkout.
    before = """
import types
from tether import _native_build
changed = types.ModuleType("tether._native_build")
changed.SOURCES = {**_native_build.SOURCES, "actors.mux": "0" * 64}
sys.modules["tether._native_build"] = changed
"""
    files, stderr = _loaded(before, **{native.PURE_ENV: "0"})
    assert all(file.endswith(".py") for file in files.values()), files  # all, not only actors.mux
    assert "native.stale: actors.mux changed since compiled" in stderr
    assert "pip install -e ." in stderr
