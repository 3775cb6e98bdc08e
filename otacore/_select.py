"""Choose between a compiled Cython kernel and its pure-Python twin.

Every kernel ``ext/<name>.pyx`` is built into ``otacore._<name>``; its twin lives in
``otacore/_<name>_py.py`` and exposes the same functions. ``OTA_PURE_PYTHON=1`` forces the
twins (the test suite uses it to check that both behave the same).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: Kernels the project ships; ``ota info`` reports whether each one is native.
KERNEL_NAMES: tuple[str, ...] = ("integrity", "coap", "delta", "chunk_framing")

_loaded: dict[str, bool] = {}


def pure_python_forced() -> bool:
    """True when the environment asks for the pure-Python twins."""
    return os.environ.get("OTA_PURE_PYTHON", "").strip().lower() in {"1", "true", "yes"}


def load_kernel(name: str) -> ModuleType:
    """Return the native kernel ``otacore._<name>`` if built and allowed, else its twin."""
    if not pure_python_forced():
        try:
            module = importlib.import_module(f"otacore._{name}")
        except ImportError:
            pass
        else:
            _loaded[name] = True
            return module
    _loaded[name] = False
    return importlib.import_module(f"otacore._{name}_py")


def load_twin(name: str) -> ModuleType:
    """Return the pure-Python twin of kernel ``name`` (for equivalence tests)."""
    return importlib.import_module(f"otacore._{name}_py")


def load_native(name: str) -> ModuleType | None:
    """Return the compiled kernel ``name``, or None when it was not built."""
    try:
        return importlib.import_module(f"otacore._{name}")
    except ImportError:
        return None


def native_status() -> dict[str, bool]:
    """Map each shipped kernel to whether its compiled form is the one in use."""
    status: dict[str, bool] = {}
    for name in KERNEL_NAMES:
        if pure_python_forced():
            status[name] = False
        else:
            status[name] = load_native(name) is not None
    return status
