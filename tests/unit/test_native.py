"""The request path runs compiled (setup.py, mypyc), and from its source when asked or when changed."""

from __future__ import annotations

import ast
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


def test_no_compiled_function_binds_one_name_to_exceptions_of_different_types() -> None:
    """mypyc gives a variable one type for the whole function: `except A as exc` then `except B as exc`
    makes the second a TypeError when compiled, where Python binds either. The gateway answered 500
    for a node that refused its link (`except LinkRefused as exc` before `except OSError as exc`)."""
    found = []
    for name in native.COMPILED:
        path = native.source(name)
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            bound: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name:
                    bound.setdefault(node.name, set()).add(ast.unparse(node.type) if node.type else "BaseException")
            found += [f"{path.name}:{function.lineno} {function.name}: {var} is {' and '.join(sorted(types))}"
                      for var, types in bound.items() if len(types) > 1]
    assert found == []
