"""Type aliases shared across otacore."""

from __future__ import annotations

from typing import TypeAlias

#: Anything exposing a contiguous byte buffer.
Buffer: TypeAlias = bytes | bytearray | memoryview
