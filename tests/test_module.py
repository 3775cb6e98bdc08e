"""Firmware module images: field-by-field parsing, building, and rejection of bad images."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore import errors
from otacore.module import (
    ModuleDependency,
    PrefixExtension,
    build_module,
    dependency_met,
    parse_module,
    validate_module,
)
from otacore.platforms import ModuleFunction, max_module_size
from tests.particle_layout import particle_layout_module

BODY = bytes(range(256)) * 40


def _independent(**overrides: object) -> bytes:
    args: dict[str, object] = dict(
        start=0x000D4000, platform=13, function=5, index=1, version=6,
        deps=((4, 1, 5003), (0, 0, 0)), product=(13, 42), mcu_target=2,
    )
    args.update(overrides)
    return particle_layout_module(BODY, **args)  # type: ignore[arg-type]


def test_independent_image_inspects_field_by_field() -> None:
    image = _independent()
    info = validate_module(image)
    assert info.start_address == 0x000D4000
    assert info.end_address == 0x000D4000 + len(image) - 4
    assert info.reserved == 2
    assert info.flags == 0
    assert info.module_version == 6
    assert info.platform_id == 13
    assert info.module_function == ModuleFunction.USER_PART
    assert info.module_index == 1
    assert info.dependencies == (ModuleDependency(4, 1, 5003),)
    assert (info.product_id, info.product_version) == (13, 42)
    assert info.suffix_size == 40
    assert info.size == len(image)
    assert info.crc_ok and info.sha256_ok and info.valid
    assert info.stored_crc32 == struct.unpack(">I", image[-4:])[0]


def test_independent_image_without_product_data_and_two_dependencies() -> None:
    image = _independent(product=None, function=4, deps=((2, 0, 1101), (8, 0, 7)))
    info = validate_module(image)
    assert info.suffix_size == 36
    assert info.product_id is None and info.product_version is None
    assert info.dependencies == (ModuleDependency(2, 0, 1101), ModuleDependency(8, 0, 7))


def test_prefix_after_vector_table() -> None:
    image = _independent(prefix_offset=0x184, platform=6, function=4, product=None)
    with pytest.raises(errors.ModuleFormatError):
        validate_module(image)  # the prefix is not at offset 0
    info = validate_module(image, prefix_offset=0x184)
    assert info.platform_id == 6 and info.module_function == 4 and info.prefix_offset == 0x184


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(platform_id=13, function=5, version=6, product_id=13, product_version=42,
             dependencies=[ModuleDependency(4, 1, 5003)], start_address=0x000D4000, reserved=2),
        dict(platform_id=13, function=4, version=6, dependencies=[ModuleDependency(2, 0, 1101),
             ModuleDependency(8, 0, 7)], start_address=0x000D4000, reserved=2),
    ],
    ids=["user-part", "system-part"],
)
def test_our_builder_matches_the_independent_layout(kwargs: dict[str, object]) -> None:
    ours = build_module(BODY, **kwargs)  # type: ignore[arg-type]
    deps = [(d.function, d.index, d.version) for d in kwargs.get("dependencies", [])]  # type: ignore[attr-defined]
    deps += [(0, 0, 0)] * (2 - len(deps))
    product = (kwargs["product_id"], kwargs["product_version"]) if "product_id" in kwargs else None
    theirs = particle_layout_module(
        BODY, start=kwargs["start_address"], platform=kwargs["platform_id"],  # type: ignore[arg-type]
        function=kwargs["function"], index=1, version=kwargs["version"],  # type: ignore[arg-type]
        deps=(deps[0], deps[1]), product=product, mcu_target=2,  # type: ignore[arg-type]
    )
    assert ours == theirs


def test_prefix_extensions_round_trip() -> None:
    image = build_module(b"\xaa" * 64, platform_id=32, function=5, version=1,
                         extensions=[PrefixExtension(0x11, b"my-app"), PrefixExtension(3, b"\1\2")])
    info = validate_module(image)
    assert info.flags & 0x10
    assert info.extensions == (PrefixExtension(0x11, b"my-app"), PrefixExtension(3, b"\1\2"))


def _flip(image: bytes, offset: int) -> bytes:
    return image[:offset] + bytes([image[offset] ^ 0x01]) + image[offset + 1 :]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda im: im[:50], errors.TruncatedModuleError, "truncated"),
        (lambda im: im[:-1], errors.ModuleFormatError, None),
        (lambda im: _flip(im, 100), errors.CrcMismatchError, "CRC-32 mismatch: stored 0x"),
        (lambda im: _flip(im, len(im) - 1), errors.CrcMismatchError, "CRC-32 mismatch"),
        (lambda im: _flip(im, len(im) - 20), errors.CrcMismatchError, "CRC-32"),
        (lambda im: im[:-6] + struct.pack("<H", 35) + im[-4:], errors.SuffixSizeError, "35"),
        (lambda im: im[:-6] + struct.pack("<H", 5000) + im[-4:], errors.SuffixSizeError, "5000"),
        (lambda im: im[:4] + struct.pack("<I", 0xD4000 + 10) + im[8:], errors.AddressRangeError,
         "end - start must equal"),
        (lambda im: im[:14] + bytes([42]) + im[15:], errors.UnknownFunctionError, "42"),
    ],
    ids=["truncated", "one-byte-short", "body-bit", "crc-bit", "sha-bit", "suffix-small",
         "suffix-large", "addresses", "function"],
)
def test_corrupt_images_are_rejected_specifically(mutate, error, message) -> None:  # type: ignore[no-untyped-def]
    image = mutate(_independent())
    with pytest.raises(error, match=message):
        validate_module(image)


def test_sha_mismatch_with_recomputed_crc_is_reported_as_sha() -> None:
    import zlib

    image = bytearray(_independent())
    image[200] ^= 0xFF
    image[-4:] = struct.pack(">I", zlib.crc32(bytes(image[:-4])))
    with pytest.raises(errors.Sha256MismatchError, match="SHA-256 mismatch"):
        validate_module(bytes(image))


def test_oversized_module_is_refused() -> None:
    limit = max_module_size(13, ModuleFunction.USER_PART)
    image = build_module(bytes(limit), platform_id=13, function=5, version=1)
    info = parse_module(image)
    assert info.crc_ok and info.sha256_ok and not info.size_ok and not info.valid
    with pytest.raises(errors.ModuleTooLargeError, match="exceeds the 262144-byte limit"):
        validate_module(image)


def test_older_platform_has_the_smaller_user_part_limit() -> None:
    assert max_module_size(6, ModuleFunction.USER_PART) == 128 * 1024
    assert max_module_size(12, ModuleFunction.USER_PART) == 256 * 1024
    assert max_module_size(13, ModuleFunction.SYSTEM_PART) == 656 * 1024


@pytest.mark.parametrize(
    ("installed", "met"),
    [
        ([(4, 1, 5003)], True),
        ([(4, 1, 6000)], True),
        ([(4, 1, 5002)], False),
        ([(4, 2, 9999)], False),
        ([(5, 1, 9999)], False),
        ([], False),
    ],
)
def test_dependency_met(installed: list[tuple[int, int, int]], met: bool) -> None:
    assert dependency_met(ModuleDependency(4, 1, 5003), installed) is met


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(0, 64))
def test_random_bytes_never_crash_the_parser(data: bytes, offset: int) -> None:
    try:
        info = parse_module(data, offset)
    except errors.ModuleFormatError:
        return
    assert info.size == len(data)


@settings(max_examples=300)
@given(st.data())
def test_mutated_valid_images_are_rejected_or_flagged(data: st.DataObject) -> None:
    image = bytearray(_independent())
    positions = data.draw(st.lists(st.integers(0, len(image) - 1), min_size=1, max_size=4))
    for pos in positions:
        image[pos] ^= data.draw(st.integers(1, 255))
    try:
        info = validate_module(bytes(image))
    except errors.ModuleFormatError:
        return
    # Only a mutation that cancelled itself out can still validate.
    assert bytes(image) == _independent() and info.valid
