"""Tether's build: the modules every request passes through are compiled to C by mypyc.

mypyc (part of mypy; it compiles mypy and black) turns type-annotated Python into a C extension:
an attribute of one of its classes is a struct field, a call between compiled functions a C call.
The modules stay plain Python. `TETHER_PURE_PYTHON=1` at build time skips the compiler; at run
time it loads the sources instead. `tether/native.py` lists the modules and runs the sources
whenever they have changed since they were compiled.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tether.native import COMPILED, PURE_ENV, digest, source  # noqa: E402  (plain stdlib module)


def record(modules: tuple[str, ...]) -> None:
    """`tether/_native_build.py`: each compiled module's source hash, for `tether.native` to check."""
    sources = {m: digest(source(m)) for m in modules}
    text = "# Written by setup.py: the sources mypyc compiled, by SHA-256. Not in git.\n"
    text += f"SOURCES = {sources!r}\n"
    (HERE / "tether" / "_native_build.py").write_text(text)


def forget_dropped() -> None:
    """Remove a checkout's compiled modules that are no longer compiled: each would load in place of
    its source and look for its code in a group library that no longer has it."""
    for package in ("actors", "gateway"):
        for path in (HERE / package).glob("*.so"):
            if f"{package}.{path.name.split('.', 1)[0]}" not in COMPILED:
                path.unlink()


def ext_modules() -> list:
    forget_dropped()
    if os.environ.get(PURE_ENV) == "1":
        record(())
        return []
    from mypyc.build import mypycify

    record(COMPILED)
    # Not the project's [tool.mypy] (strict for some modules: a type-checking matter, for `mypy`):
    # the build's isolated environment has no aiohttp or prometheus_client, whose types are Any
    # here, as they are wherever Tether is built.
    options = ["--config-file", os.devnull, "--ignore-missing-imports"]
    return mypycify(options + [str(source(m).relative_to(HERE)) for m in COMPILED], opt_level="3",
                    group_name="tether_native")


class OptionalBuildExt(build_ext):
    """Without a C compiler Tether still installs, as plain Python, and says so."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CCompilerError, DistutilsExecError, ... : no compiler, or no Python headers
            record(())
            print(f"WARNING: Tether's request path was not compiled ({exc}); it runs as plain Python, "
                  "slower. Install gcc and the Python headers, then reinstall.", file=sys.stderr)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
