"""Known Device OS platforms and the size limit of each module function on each.

One table, so upload validation, the emulator and the CLI agree. Figures follow Particle's
published memory maps (particle-facts.md): Gen3 nRF52840 user part 256 KB (128 KB before Device
OS 3.1), system part up to 656 KB, bootloader 48 KB; Photon/Electron user part 128 KB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType

KIB = 1024


class ModuleFunction(IntEnum):
    """module_function values of module_info_t (dynalib/inc/module_info.h)."""

    NONE = 0
    RESOURCE = 1
    BOOTLOADER = 2
    MONOLITHIC = 3
    SYSTEM_PART = 4
    USER_PART = 5
    SETTINGS = 6
    NCP_FIRMWARE = 7
    RADIO_STACK = 8
    ASSET = 9


#: Limits for a platform this table does not know: generous, but still bounded.
DEFAULT_LIMITS: Mapping[int, int] = MappingProxyType(
    {
        ModuleFunction.RESOURCE: 4096 * KIB,
        ModuleFunction.BOOTLOADER: 64 * KIB,
        ModuleFunction.MONOLITHIC: 2048 * KIB,
        ModuleFunction.SYSTEM_PART: 656 * KIB,
        ModuleFunction.USER_PART: 256 * KIB,
        ModuleFunction.SETTINGS: 16 * KIB,
        ModuleFunction.NCP_FIRMWARE: 2048 * KIB,
        ModuleFunction.RADIO_STACK: 256 * KIB,
        ModuleFunction.ASSET: 4096 * KIB,
    }
)


@dataclass(frozen=True)
class Platform:
    """A Device OS platform: its id, name, generation and per-function size limits."""

    id: int
    name: str
    generation: int
    limits: Mapping[int, int] = field(default_factory=lambda: DEFAULT_LIMITS)

    def max_size(self, function: int) -> int:
        """Largest module image (bytes, suffix and CRC included) allowed for ``function``."""
        return self.limits.get(function, DEFAULT_LIMITS.get(function, 0))


def _limits(**overrides: int) -> Mapping[int, int]:
    table = dict(DEFAULT_LIMITS)
    for name, size in overrides.items():
        table[ModuleFunction[name.upper()]] = size
    return MappingProxyType(table)


_GEN2 = _limits(user_part=128 * KIB, system_part=512 * KIB, bootloader=16 * KIB)
_GEN3 = _limits(user_part=256 * KIB, system_part=656 * KIB, bootloader=48 * KIB,
                radio_stack=192 * KIB)
_GEN4 = _limits(user_part=1536 * KIB, system_part=656 * KIB, bootloader=64 * KIB)

PLATFORMS: Mapping[int, Platform] = MappingProxyType(
    {
        p.id: p
        for p in (
            Platform(6, "photon", 2, _GEN2),
            Platform(8, "p1", 2, _GEN2),
            Platform(10, "electron", 2, _GEN2),
            Platform(12, "argon", 3, _GEN3),
            Platform(13, "boron", 3, _GEN3),
            Platform(15, "esomx", 3, _GEN3),
            Platform(22, "asom", 3, _GEN3),
            Platform(23, "bsom", 3, _GEN3),
            Platform(25, "b5som", 3, _GEN3),
            Platform(26, "tracker", 3, _GEN3),
            Platform(28, "trackerm", 4, _GEN4),
            Platform(32, "p2", 4, _GEN4),
            Platform(35, "msom", 4, _GEN4),
        )
    }
)


def platform_name(platform_id: int) -> str:
    """Human name of a platform id ("boron"), or "platform-<id>" when unknown."""
    known = PLATFORMS.get(platform_id)
    return known.name if known else f"platform-{platform_id}"


def max_module_size(platform_id: int, function: int) -> int:
    """Largest module image allowed for ``function`` on ``platform_id`` (bytes)."""
    known = PLATFORMS.get(platform_id)
    if known is not None:
        return known.max_size(function)
    return DEFAULT_LIMITS.get(function, 0)
