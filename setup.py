"""Build the Cython kernels in ext/ into the otacore package.

Every ``ext/<name>.pyx`` becomes the extension ``otacore._<name>``. Each kernel has a
pure-Python twin (``otacore/_<name>_py.py``) with the same API, so a machine without a C
compiler still gets a working package: a failed native build is reported, not fatal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


class OptionalBuildExt(build_ext):
    """build_ext that degrades to the pure-Python twins when compilation fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            sys.stderr.write(f"warning: native kernels not built ({exc}); using pure Python\n")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.stderr.write(f"warning: could not build {ext.name} ({exc}); using pure Python\n")


def native_extensions() -> list[Extension]:
    if os.environ.get("OTA_NO_NATIVE_BUILD") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write("warning: Cython not available; using pure Python kernels\n")
        return []
    sources = sorted((HERE / "ext").glob("*.pyx"))
    extensions = [
        Extension(
            f"otacore._{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=["ext"],
            extra_compile_args=["-O3"],
        )
        for pyx in sources
    ]
    return cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
