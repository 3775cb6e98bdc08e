"""Particle Device OS firmware module images: parse, validate and build.

Layout (dynalib/inc/module_info.h, build/module.mk, binary-version-reader):

* prefix ``module_info_t``, 24 bytes little-endian, at offset 0 of the image or at an explicit
  offset after a vector table: start address u32, end address u32 (exclusive: where the
  trailing CRC-32 starts), reserved u8, flags u8, module version u16, platform id u16,
  function u8, index u8, dependency {function u8, index u8, version u16}, dependency2;
* with flag 0x10, prefix extension records {type u16, length u16 (including these 4 bytes)}
  follow the prefix, ending with a record of type 0;
* suffix at the end: [product id u16][product version u16][reserved u16][SHA-256][suffix size
  u16][CRC-32 big-endian]. ``suffix_size`` counts from the product id (40) or from the reserved
  field when there is no product data (36). The CRC covers all but the last 4 bytes, the SHA-256
  all but the last 38.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from otacore.errors import (
    AddressRangeError,
    CrcMismatchError,
    ModuleTooLargeError,
    PrefixExtensionError,
    Sha256MismatchError,
    SuffixSizeError,
    TruncatedModuleError,
    UnknownFunctionError,
)
from otacore.integrity import module_digests
from otacore.platforms import ModuleFunction, max_module_size, platform_name

PREFIX = struct.Struct("<IIBBHHBBBBHBBH")
PREFIX_SIZE = PREFIX.size  # 24
EXTENSION_HEADER = struct.Struct("<HH")
CRC_SIZE = 4
SHA_SIZE = 32
#: suffix_size without product data: reserved u16 + SHA-256 + suffix_size u16.
SUFFIX_SIZE_MIN = 36
#: suffix_size with product data: product id u16 + product version u16 in front.
SUFFIX_SIZE_PRODUCT = 40
#: Extended suffixes carry extension records in front; refuse anything beyond this.
SUFFIX_SIZE_MAX = 1024
MAX_PREFIX_EXTENSIONS = 64

FLAG_DROP_MODULE_INFO = 0x01
FLAG_COMPRESSED = 0x02
FLAG_COMBINED = 0x04
FLAG_ENCRYPTED = 0x08
FLAG_PREFIX_EXTENSIONS = 0x10

_DEFAULT_START = {
    ModuleFunction.BOOTLOADER: 0x000F4000,
    ModuleFunction.SYSTEM_PART: 0x00030000,
    ModuleFunction.USER_PART: 0x000B4000,
}


@dataclass(frozen=True)
class ModuleDependency:
    """A module this one needs: same function and index with at least this version."""

    function: int
    index: int
    version: int

    def to_json(self) -> dict[str, int]:
        """The dependency as a JSON object."""
        return {"function": self.function, "index": self.index, "version": self.version}


@dataclass(frozen=True)
class PrefixExtension:
    """One prefix extension record (flag 0x10): its type and payload (header excluded)."""

    type: int
    data: bytes


@dataclass(frozen=True)
class ModuleInfo:
    """Everything the prefix and suffix of a module image say, plus the computed digests."""

    start_address: int
    end_address: int
    reserved: int
    flags: int
    module_version: int
    platform_id: int
    module_function: int
    module_index: int
    dependencies: tuple[ModuleDependency, ...]
    product_id: int | None
    product_version: int | None
    suffix_size: int
    stored_sha256: bytes
    stored_crc32: int
    computed_sha256: bytes
    computed_crc32: int
    size: int
    prefix_offset: int
    extensions: tuple[PrefixExtension, ...] = ()

    @property
    def crc_ok(self) -> bool:
        """True when the stored CRC-32 matches the image."""
        return self.stored_crc32 == self.computed_crc32

    @property
    def sha256_ok(self) -> bool:
        """True when the stored SHA-256 matches the image."""
        return self.stored_sha256 == self.computed_sha256

    @property
    def named_product_id(self) -> int | None:
        """The product the module was built for; None when it names none: no product data,
        or the field holds the platform id (Device OS defaults ``PRODUCT_ID`` to it, and
        since 4.0 always writes it there; particle-facts.md, "Module image layout")."""
        if self.product_id is None or self.product_id == self.platform_id:
            return None
        return self.product_id

    @property
    def max_size(self) -> int:
        """Size limit of this module's function on its platform."""
        return max_module_size(self.platform_id, self.module_function)

    @property
    def size_ok(self) -> bool:
        """True when the image fits the limit of its function on its platform."""
        return self.size <= self.max_size

    @property
    def valid(self) -> bool:
        """True when CRC-32, SHA-256 and size limit all pass."""
        return self.crc_ok and self.sha256_ok and self.size_ok

    def problem(self) -> str | None:
        """One line naming the first integrity problem, or None when the module is valid."""
        try:
            check_integrity(self)
        except (CrcMismatchError, Sha256MismatchError, ModuleTooLargeError) as exc:
            return str(exc)
        return None

    def to_json(self) -> dict[str, Any]:
        """The object ``ota module inspect --json`` prints."""
        return {
            "platform_id": self.platform_id,
            "platform": platform_name(self.platform_id),
            "module_function": self.module_function,
            "function": _function_name(self.module_function),
            "module_index": self.module_index,
            "module_version": self.module_version,
            "product_id": self.product_id,
            "product_version": self.product_version,
            "dependencies": [dep.to_json() for dep in self.dependencies],
            "flags": self.flags,
            "start_address": self.start_address,
            "end_address": self.end_address,
            "prefix_offset": self.prefix_offset,
            "suffix_size": self.suffix_size,
            "size": self.size,
            "max_size": self.max_size,
            "sha256": self.stored_sha256.hex(),
            "crc32": f"0x{self.stored_crc32:08x}",
            "crc_ok": self.crc_ok,
            "sha256_ok": self.sha256_ok,
            "valid": self.valid,
        }


def _function_name(function: int) -> str:
    try:
        return ModuleFunction(function).name.lower()
    except ValueError:
        return f"function-{function}"


def _parse_extensions(image: bytes, start: int, limit: int) -> tuple[PrefixExtension, ...]:
    """Read the {type, length} records after the prefix up to the END record (type 0)."""
    records: list[PrefixExtension] = []
    offset = start
    for _ in range(MAX_PREFIX_EXTENSIONS):
        if offset + EXTENSION_HEADER.size > limit:
            raise PrefixExtensionError(
                f"prefix extension at offset {offset} runs past the module body"
            )
        ext_type, length = EXTENSION_HEADER.unpack_from(image, offset)
        if length < EXTENSION_HEADER.size or offset + length > limit:
            raise PrefixExtensionError(
                f"prefix extension type {ext_type} at offset {offset} has bad length {length}"
            )
        if ext_type == 0:
            return tuple(records)
        records.append(PrefixExtension(ext_type, bytes(image[offset + 4 : offset + length])))
        offset += length
    raise PrefixExtensionError(
        f"more than {MAX_PREFIX_EXTENSIONS} prefix extensions without an END record"
    )


def parse_module(image: bytes | bytearray | memoryview, prefix_offset: int = 0) -> ModuleInfo:
    """Parse a module image's prefix and suffix and compute its digests.

    Raises a specific ModuleFormatError for a structural problem (truncated image, suffix
    size out of range, addresses inconsistent with the length, unknown function, broken
    prefix extensions). CRC-32 and SHA-256 mismatches are reported in the result, not raised:
    use :func:`validate_module` to refuse them.
    """
    data = bytes(image)
    n = len(data)
    if prefix_offset < 0:
        raise ValueError("prefix offset must not be negative")
    prefix_end = prefix_offset + PREFIX_SIZE
    if n < max(prefix_end, 0) + SUFFIX_SIZE_MIN + CRC_SIZE:
        raise TruncatedModuleError(
            f"truncated module: {n} bytes cannot hold a {PREFIX_SIZE}-byte prefix at offset "
            f"{prefix_offset} and a {SUFFIX_SIZE_MIN + CRC_SIZE}-byte suffix"
        )
    (suffix_size,) = struct.unpack_from("<H", data, n - CRC_SIZE - 2)
    if not SUFFIX_SIZE_MIN <= suffix_size <= SUFFIX_SIZE_MAX:
        raise SuffixSizeError(
            f"suffix size {suffix_size} out of range {SUFFIX_SIZE_MIN}..{SUFFIX_SIZE_MAX}"
        )
    suffix_start = n - CRC_SIZE - suffix_size
    if suffix_start < prefix_end:
        raise SuffixSizeError(
            f"suffix size {suffix_size} overlaps the prefix in a {n}-byte module"
        )
    (
        start_address,
        end_address,
        reserved,
        flags,
        module_version,
        platform_id,
        function,
        index,
        dep1_function,
        dep1_index,
        dep1_version,
        dep2_function,
        dep2_index,
        dep2_version,
    ) = PREFIX.unpack_from(data, prefix_offset)
    if end_address < start_address or end_address - start_address != n - CRC_SIZE:
        raise AddressRangeError(
            f"module addresses 0x{start_address:08x}..0x{end_address:08x} span "
            f"{end_address - start_address} bytes but the image holds {n - CRC_SIZE} "
            "(end - start must equal the file length - 4)"
        )
    if function not in ModuleFunction._value2member_map_:
        raise UnknownFunctionError(f"unknown module function {function} (known: 0..9)")
    extensions: tuple[PrefixExtension, ...] = ()
    if flags & FLAG_PREFIX_EXTENSIONS:
        extensions = _parse_extensions(data, prefix_end, suffix_start)
    dependencies = tuple(
        ModuleDependency(f, i, v)
        for f, i, v in ((dep1_function, dep1_index, dep1_version),
                        (dep2_function, dep2_index, dep2_version))
        if f != ModuleFunction.NONE
    )
    product_id: int | None = None
    product_version: int | None = None
    if suffix_size >= SUFFIX_SIZE_PRODUCT:
        product_id, product_version = struct.unpack_from("<HH", data, n - 44)
    stored_sha = data[n - 38 : n - 6]
    (stored_crc,) = struct.unpack_from(">I", data, n - CRC_SIZE)
    computed_crc, computed_sha = module_digests(data)
    return ModuleInfo(
        start_address=start_address,
        end_address=end_address,
        reserved=reserved,
        flags=flags,
        module_version=module_version,
        platform_id=platform_id,
        module_function=function,
        module_index=index,
        dependencies=dependencies,
        product_id=product_id,
        product_version=product_version,
        suffix_size=suffix_size,
        stored_sha256=stored_sha,
        stored_crc32=stored_crc,
        computed_sha256=computed_sha,
        computed_crc32=computed_crc,
        size=n,
        prefix_offset=prefix_offset,
        extensions=extensions,
    )


def check_integrity(info: ModuleInfo) -> None:
    """Raise the specific error for a CRC-32, SHA-256 or size-limit failure of ``info``."""
    if not info.crc_ok:
        raise CrcMismatchError(
            f"CRC-32 mismatch: stored 0x{info.stored_crc32:08x}, "
            f"computed 0x{info.computed_crc32:08x}"
        )
    if not info.sha256_ok:
        raise Sha256MismatchError(
            f"SHA-256 mismatch: stored {info.stored_sha256.hex()}, "
            f"computed {info.computed_sha256.hex()}"
        )
    if not info.size_ok:
        raise ModuleTooLargeError(
            f"module of {info.size} bytes exceeds the {info.max_size}-byte limit for "
            f"{_function_name(info.module_function)} on {platform_name(info.platform_id)}"
        )


def validate_module(image: bytes | bytearray | memoryview, prefix_offset: int = 0) -> ModuleInfo:
    """Parse ``image`` and raise unless its CRC-32, SHA-256 and size limit all pass."""
    info = parse_module(image, prefix_offset)
    check_integrity(info)
    return info


def build_module(
    payload: bytes,
    *,
    platform_id: int,
    function: int,
    version: int,
    index: int = 1,
    product_id: int | None = None,
    product_version: int | None = None,
    dependencies: Sequence[ModuleDependency] = (),
    start_address: int | None = None,
    flags: int = 0,
    prefix_offset: int = 0,
    reserved: int = 0,
    extensions: Sequence[PrefixExtension] = (),
) -> bytes:
    """Build a valid module image around ``payload``, as Device OS's build does.

    With ``prefix_offset`` > 0 the prefix is placed inside the payload at that offset (after
    a vector table). ``product_id``/``product_version`` add product data (suffix size 40).
    """
    if function not in ModuleFunction._value2member_map_:
        raise UnknownFunctionError(f"unknown module function {function} (known: 0..9)")
    if len(dependencies) > 2:
        raise ValueError("a module prefix holds at most two dependencies")
    if not 0 <= prefix_offset <= len(payload):
        raise ValueError(
            f"prefix offset {prefix_offset} lies outside the {len(payload)}-byte payload"
        )
    if (product_id is None) != (product_version is None):
        raise ValueError("product id and product version go together")
    for name, value, bits in (("version", version, 16), ("platform id", platform_id, 16),
                              ("index", index, 8)):
        if not 0 <= value < (1 << bits):
            raise ValueError(f"{name} {value} does not fit in {bits} bits")
    if extensions:
        flags |= FLAG_PREFIX_EXTENSIONS
    ext_bytes = b""
    if flags & FLAG_PREFIX_EXTENSIONS:
        parts = [
            EXTENSION_HEADER.pack(ext.type, len(ext.data) + 4) + ext.data for ext in extensions
        ]
        ext_bytes = b"".join(parts) + EXTENSION_HEADER.pack(0, 4)
    suffix_size = SUFFIX_SIZE_PRODUCT if product_id is not None else SUFFIX_SIZE_MIN
    total = len(payload) + PREFIX_SIZE + len(ext_bytes) + suffix_size + CRC_SIZE
    start = start_address
    if start is None:
        start = _DEFAULT_START.get(ModuleFunction(function), 0)
    deps = list(dependencies) + [ModuleDependency(0, 0, 0)] * (2 - len(dependencies))
    prefix = PREFIX.pack(
        start, start + total - CRC_SIZE, reserved, flags, version, platform_id, function, index,
        deps[0].function, deps[0].index, deps[0].version,
        deps[1].function, deps[1].index, deps[1].version,
    )
    body = bytearray(payload[:prefix_offset] + prefix + ext_bytes + payload[prefix_offset:])
    if product_id is not None:
        body += struct.pack("<HH", product_id, product_version)
    body += b"\x00\x00"  # reserved
    digest_placeholder = len(body)
    body += bytes(SHA_SIZE) + struct.pack("<H", suffix_size)
    body += bytes(CRC_SIZE)
    _, sha = module_digests(body)
    body[digest_placeholder : digest_placeholder + SHA_SIZE] = sha
    crc, _ = module_digests(body)
    body[-CRC_SIZE:] = struct.pack(">I", crc)
    return bytes(body)


def dependency_met(dep: ModuleDependency, installed: Iterable[tuple[int, int, int]]) -> bool:
    """True when an installed (function, index, version) has the same function and index as
    ``dep`` and a version >= its version (the check is not transitive)."""
    return any(
        function == dep.function and index == dep.index and version >= dep.version
        for function, index, version in installed
    )
