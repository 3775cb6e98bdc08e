"""otacore: the sans-IO core of the OTA firmware delivery cloud.

Module format, integrity kernels, protocol state machines, precedence and delta logic.
Nothing in here opens a socket, reads a clock or starts a thread.
"""

from __future__ import annotations

__version__ = "0.1.0"
