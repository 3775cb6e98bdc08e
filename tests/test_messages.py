"""Msgpack payload schemas: round trips, strict rejection, fuzzing and the routing table."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.coap import Code, Message, MessageType, decode_udp, encode_udp
from otacore.errors import PayloadSchemaError
from otacore.messages import (
    ROUTES,
    Dependency,
    Describe,
    DescribeRequest,
    Direction,
    Event,
    Goodbye,
    Hello,
    ModuleDescription,
    Payload,
    Ping,
    ServerEvent,
    UnknownMessageError,
    find_route,
    from_message,
    route_of,
    to_message,
)

ALL_TYPES: list[type[Payload]] = [
    Hello,
    Describe,
    Event,
    Ping,
    Goodbye,
    DescribeRequest,
    ServerEvent,
]

HELLO = Hello(
    device_id="e00fce68" * 3,
    platform_id=13,
    product_id=4242,
    product_version=7,
    system_version=5800,
    supports_immediate_updates=True,
    updates_enabled=True,
    reset_pending=False,
    max_message_size=1024,
    ota_chunk_size=1024,
    compressed_ota=True,
)

SYSTEM_PART = ModuleDescription(
    function=4,
    index=1,
    version=5800,
    store=0,
    size=560 * 1024,
    sha256=bytes(range(32)),
    dependencies=(Dependency(2, 0, 2300), Dependency(8, 0, 202)),
)


def hello_map(**changes: Any) -> dict[str, Any]:
    data = HELLO.to_map()
    data.update(changes)
    return {key: value for key, value in data.items() if value is not ...}


def rejects(cls: type[Payload], data: object, message: str) -> None:
    with pytest.raises(PayloadSchemaError, match=message):
        cls.from_payload(msgpack.packb(data, use_bin_type=True))


# --- strategies -----------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
event_names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)
event_data = st.text(max_size=300)

hellos = st.builds(
    Hello,
    device_id=st.text("0123456789abcdef", min_size=24, max_size=24),
    platform_id=u16,
    product_id=u16,
    product_version=u16,
    system_version=u16,
    supports_immediate_updates=st.booleans(),
    updates_enabled=st.booleans(),
    reset_pending=st.booleans(),
    max_message_size=st.integers(64, 0xFFFF),
    ota_chunk_size=st.none() | st.integers(128, 284).map(lambda n: n * 4),
    max_binary_size=st.none() | st.integers(0, 0xFFFF_FFFF),
    compressed_ota=st.booleans(),
    ota_succeeded=st.booleans(),
    key_sequence=st.none() | st.integers(0, 2**64 - 1),
    app_version_floor=st.none() | st.integers(0, 0xFFFF_FFFF),
)
dependencies = st.builds(
    Dependency, function=st.integers(0, 9), index=st.integers(0, 255), version=u16
)
modules = st.builds(
    ModuleDescription,
    function=st.integers(0, 9),
    index=st.integers(0, 255),
    version=u16,
    store=st.integers(0, 3),
    size=st.integers(0, 0xFFFF_FFFF),
    sha256=st.binary(min_size=32, max_size=32),
    dependencies=st.lists(dependencies, max_size=3).map(tuple),
)
describes = st.lists(modules, max_size=6, unique_by=lambda m: (m.function, m.index, m.store)).map(
    lambda items: Describe(modules=tuple(items))
)
events = st.builds(Event, name=event_names, data=event_data, ttl=st.integers(0, 0xFFFF_FFFF))
server_events = st.builds(
    ServerEvent,
    name=event_names,
    data=event_data,
    ttl=st.integers(0, 0xFFFF_FFFF),
    published_at=st.none() | st.integers(0, 0xFFFF_FFFF),
)
goodbyes = st.builds(
    Goodbye,
    reason=st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
    sleep_seconds=st.none() | st.integers(0, 0xFFFF_FFFF),
)
describe_requests = st.sampled_from(
    [DescribeRequest(True, True), DescribeRequest(True, False), DescribeRequest(False, True)]
)
any_message = st.one_of(
    hellos, describes, events, server_events, goodbyes, describe_requests, st.just(Ping())
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=5)
    ),
    max_leaves=20,
)


# --- round trips ------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(message=any_message)
def test_round_trip(message: Payload) -> None:
    assert type(message).from_payload(message.to_payload()) == message


def test_hello_example_round_trip_and_optional_fields() -> None:
    payload = HELLO.to_payload()
    assert Hello.from_payload(payload) == HELLO
    minimal = hello_map(ota_chunk_size=..., compressed_ota=..., ota_succeeded=...)
    parsed = Hello.from_payload(msgpack.packb(minimal))
    assert parsed.ota_chunk_size is None and parsed.compressed_ota is False
    # A device from before key paging and rollback protection sends neither field.
    assert parsed.key_sequence is None and parsed.app_version_floor is None
    newer = Hello.from_payload(msgpack.packb(hello_map(key_sequence=2**64 - 1,
                                                       app_version_floor=3)))
    assert (newer.key_sequence, newer.app_version_floor) == (2**64 - 1, 3)
    # ... nor the delta format its applier reads (the server takes it as version 4).
    assert parsed.delta_format is None and "delta_format" not in parsed.to_map()
    named = Hello.from_payload(msgpack.packb(hello_map(delta_format=5)))
    assert named.delta_format == 5 and Hello.from_payload(named.to_payload()) == named
    # Every field at once (a device that took an update and names everything).
    full = replace(HELLO, ota_chunk_size=1024, max_binary_size=1 << 20, compressed_ota=True,
                   ota_succeeded=True, key_sequence=7, app_version_floor=3, key_push=True,
                   delta_format=5)
    assert len(full.to_map()) == len(Hello._REQUIRED) + len(Hello._OPTIONAL)
    assert Hello.from_payload(full.to_payload()) == full


def test_describe_example() -> None:
    describe = Describe(modules=(SYSTEM_PART,))
    assert Describe.from_payload(describe.to_payload()) == describe


# --- strict rejection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"device_id": "E00FCE68" * 3}, r"hello.device_id 'E00FCE68.*' must match"),
        ({"device_id": "e00fce68"}, "hello.device_id"),
        ({"device_id": 12}, "hello.device_id must be a str, got int"),
        ({"platform_id": True}, "hello.platform_id must be an int, got bool"),
        ({"platform_id": -1}, r"hello.platform_id is -1, outside 0..65535"),
        ({"product_id": 70000}, r"hello.product_id is 70000, outside 0..65535"),
        ({"system_version": 1.5}, "hello.system_version must be an int, got float"),
        ({"updates_enabled": 1}, "hello.updates_enabled must be a bool, got int"),
        ({"max_message_size": 10}, r"hello.max_message_size is 10, outside 64..65535"),
        ({"ota_chunk_size": 1134}, "hello.ota_chunk_size 1134 is not a multiple of 4"),
        ({"ota_chunk_size": 2048}, r"hello.ota_chunk_size is 2048, outside 512..1136"),
        ({"reset_pending": ...}, "hello.reset_pending is missing"),
        ({"colour": "red"}, "hello has unknown field 'colour'"),
        ({"key_sequence": -1}, r"hello.key_sequence is -1, outside 0..18446744073709551615"),
        ({"key_sequence": True}, "hello.key_sequence must be an int, got bool"),
        ({"app_version_floor": 2**32}, r"hello.app_version_floor is 4294967296, outside"),
        ({"delta_format": 0}, r"hello.delta_format is 0, outside 1..255"),
        ({"delta_format": 256}, r"hello.delta_format is 256, outside 1..255"),
        ({"delta_format": "5"}, "hello.delta_format must be an int, got str"),
    ],
)
def test_hello_rejections(changes: dict[str, Any], message: str) -> None:
    rejects(Hello, hello_map(**changes), message)


@pytest.mark.parametrize(
    ("module_changes", "message"),
    [
        ({"sha256": b"\x00" * 31}, r"describe.modules\[0\].sha256 has 31 bytes, needs 32"),
        ({"sha256": "00" * 32}, r"describe.modules\[0\].sha256 must be bin, got str"),
        ({"function": 10}, r"describe.modules\[0\].function is 10, outside 0..9"),
        ({"store": 4}, r"describe.modules\[0\].store is 4, outside 0..3"),
        ({"size": 2**32}, r"describe.modules\[0\].size is 4294967296"),
        (
            {"dependencies": [{"function": 2, "index": 0}]},
            r"describe.modules\[0\].dependencies\[0\].version is missing",
        ),
        ({"dependencies": [{}] * 9}, r"dependencies has 9 items, at most 8 allowed"),
        ({"dependencies": {}}, r"dependencies must be an array, got map"),
    ],
)
def test_describe_rejections(module_changes: dict[str, Any], message: str) -> None:
    module = SYSTEM_PART.to_map()
    module.update(module_changes)
    rejects(Describe, {"modules": [module]}, message)


def test_describe_rejects_repeated_module() -> None:
    module = SYSTEM_PART.to_map()
    rejects(Describe, {"modules": [module, module]}, r"modules\[1\] repeats function 4 index 1")
    rejects(Describe, {"modules": [module] * 33}, "not valid msgpack")  # over max_array_len


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "", "data": "", "ttl": 60}, "event.name '' must match"),
        ({"name": "x" * 65, "data": "", "ttl": 60}, "event.name"),
        ({"name": "has space", "data": "", "ttl": 60}, "event.name 'has space' must match"),
        ({"name": "t", "data": "é" * 513, "ttl": 60}, "event.data has 1026 bytes of UTF-8"),
        ({"name": "t", "data": b"raw", "ttl": 60}, "event.data must be a str, got bin"),
        ({"name": "t", "data": "", "ttl": -5}, "event.ttl is -5"),
        ({"name": "t", "data": "", "ttl": False}, "event.ttl must be an int, got bool"),
        ({"name": "t", "data": ""}, "event.ttl is missing"),
        (["t", "", 60], "event must be a map, got array"),
    ],
)
def test_event_rejections(data: object, message: str) -> None:
    rejects(Event, data, message)


def test_other_rejections() -> None:
    rejects(Goodbye, {"reason": "Because!"}, "goodbye.reason 'Because!' must match")
    rejects(DescribeRequest, {"system": False, "application": False}, "asks for neither")
    rejects(ServerEvent, {"name": "a", "data": "", "ttl": 1, "published_at": -1}, "published_at")
    with pytest.raises(PayloadSchemaError, match="ping carries no payload"):
        Ping.from_payload(b"\x80")
    assert Ping.from_payload(b"") == Ping() and Ping().to_payload() == b""


def test_not_msgpack_trailing_bytes_and_size_limit() -> None:
    good = HELLO.to_payload()
    with pytest.raises(PayloadSchemaError, match="not valid msgpack"):
        Hello.from_payload(good + b"\x00")
    with pytest.raises(PayloadSchemaError, match="not valid msgpack"):
        Hello.from_payload(good[:-3])
    with pytest.raises(PayloadSchemaError, match="not valid msgpack"):
        Hello.from_payload(b"\xc1")  # never-used msgpack type byte
    with pytest.raises(PayloadSchemaError, match="hello payload of 513 bytes exceeds the 512-byte"):
        Hello.from_payload(bytes(513))
    with pytest.raises(PayloadSchemaError, match="not valid msgpack"):
        Event.from_payload(msgpack.packb({1: "int keys are refused"}))
    with pytest.raises(PayloadSchemaError, match="must be bytes"):
        Event.from_payload("text")  # type: ignore[arg-type]


def test_to_payload_refuses_invalid_messages() -> None:
    with pytest.raises(PayloadSchemaError, match=r"event\.name"):
        Event(name="bad name", data="", ttl=0).to_payload()
    with pytest.raises(PayloadSchemaError, match="is not valid Unicode"):
        Event(name="t", data="\ud800", ttl=0).to_payload()


# --- fuzz ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_schema_errors(cls: type[Payload], data: bytes) -> None:
    with contextlib.suppress(PayloadSchemaError):
        cls.from_payload(data)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=100, deadline=None)
@given(value=msgpack_values)
def test_random_msgpack_values_only_raise_schema_errors(cls: type[Payload], value: object) -> None:
    with contextlib.suppress(PayloadSchemaError):
        cls.from_payload(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=150, deadline=None)
@given(message=any_message, position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_mutated_payloads_parse_or_raise_schema_errors(
    message: Payload, position: int, byte: int
) -> None:
    payload = bytearray(message.to_payload())
    if payload:
        payload[position % len(payload)] = byte
    try:
        parsed = type(message).from_payload(bytes(payload))
    except PayloadSchemaError:
        return
    # Whatever still parses is itself a valid message that round-trips.
    assert type(message).from_payload(parsed.to_payload()) == parsed


# --- routing ------------------------------------------------------------------------------


def test_routes_are_unique_per_direction() -> None:
    keys = [(route.direction, route.code, route.path) for route in ROUTES]
    assert len(keys) == len(set(keys))
    assert route_of(Hello).code == Code.POST and route_of(Hello).path == "h"
    assert route_of(DescribeRequest).code == Code.GET and route_of(DescribeRequest).path == "d"
    assert route_of(Ping, Direction.TO_DEVICE).code == Code.EMPTY


@settings(max_examples=100, deadline=None)
@given(message=any_message)
def test_messages_travel_their_route(message: Payload) -> None:
    direction = (
        Direction.TO_DEVICE
        if isinstance(message, DescribeRequest | ServerEvent)
        else Direction.TO_CLOUD
    )
    coap = to_message(message, direction)
    coap.message_id = 0x0101
    if coap.code == 0:
        assert coap.options == [] and coap.payload == b""
    else:
        coap.token = b"\x07"
    received = decode_udp(encode_udp(coap))
    assert from_message(received, direction) == message


def test_event_path_and_name_must_agree() -> None:
    message = to_message(Event(name="temp/outside", data="21.5", ttl=60), Direction.TO_CLOUD)
    assert message.uri_path == ["e", "temp/outside"]
    message.set_uri_path("e", "other")
    with pytest.raises(PayloadSchemaError, match="differs from its Uri-Path 'other'"):
        from_message(message, Direction.TO_CLOUD)


def test_unknown_routes() -> None:
    message = Message(MessageType.CON, Code.POST, payload=b"\x80")
    message.set_uri_path("z")
    with pytest.raises(
        UnknownMessageError, match=r"no device->cloud message is sent as code 0\.02 to /z"
    ):
        from_message(message, Direction.TO_CLOUD)
    assert find_route(Direction.TO_CLOUD, Code.POST, ["h", "extra"]) is None
    assert find_route(Direction.TO_CLOUD, Code.POST, ["e"]) is None  # events need a name
    assert find_route(Direction.TO_CLOUD, Code.GET, ["d"]) is None  # that one goes to devices
    assert find_route(Direction.TO_DEVICE, Code.GET, ["d"]) == route_of(DescribeRequest)


@settings(max_examples=200, deadline=None)
@given(message=any_message, data=st.data())
def test_field_level_fuzz(message: Payload, data: st.DataObject) -> None:
    # Replace one field (at any depth) of a valid map by a random msgpack value.
    value: Any = message.to_map()
    if not value:
        return
    root = value
    while True:
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = value[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            value = child
            continue
        value[key] = data.draw(msgpack_values)
        break
    try:
        parsed = type(message).from_payload(msgpack.packb(root, use_bin_type=True))
    except PayloadSchemaError:
        return
    assert type(message).from_payload(parsed.to_payload()) == parsed
