"""Payload schemas of the device protocol's own messages (msgpack), checked strictly at the edge.

Every message is a frozen dataclass with ``to_payload() -> bytes`` and
``from_payload(bytes) -> cls``. ``from_payload`` raises :class:`PayloadSchemaError` (and
nothing else) for anything but a well-formed payload: not msgpack, trailing bytes, wrong
types (a bool is not an int), missing or unknown fields, out-of-range numbers, over-long
strings or lists, or a payload above the message's size limit. ``to_payload`` runs the
same checks, so a message the peer would refuse is never sent.

:data:`ROUTES` is the one table mapping each message to its CoAP code and Uri-Path, after
Device OS (``communication/src/``): POST ``h`` hello, POST ``d`` describe, GET ``d``
describe request, POST ``e/<name>`` events. The v3 firmware update paths (``S``, ``C``,
``F``, ``A``) carry binary payloads and belong to the update layer; they are listed in
:data:`FIRMWARE_UPDATE_PATHS` only so nothing else claims them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

import msgpack

from otacore.coap import Code, Message, MessageType
from otacore.errors import PayloadSchemaError, ProtocolError

_UINT8 = 0xFF
_UINT16 = 0xFFFF
_UINT32 = 0xFFFF_FFFF
_UINT64 = 0xFFFF_FFFF_FFFF_FFFF

#: Module functions (0 none .. 9 asset) and stores (0 main .. 3 scratchpad), module_info.h.
MODULE_FUNCTIONS = range(10)
MODULE_STORES = range(4)
MAX_MODULES = 32
MAX_DEPENDENCIES = 8
EVENT_NAME_MAX_CHARS = 64
EVENT_DATA_MAX_BYTES = 1024

_DEVICE_ID = re.compile(r"[0-9a-f]{24}")
# Printable ASCII without spaces, e.g. "particle/device/updates/pending".
_EVENT_NAME = re.compile(r"[!-~]{1,64}")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: What event names may contain, for error messages.
EVENT_NAME_RULE = "1-64 printable ASCII characters without spaces ('!' to '~')"


def is_event_name(name: object) -> bool:
    """True when ``name`` is a valid event name: the rule devices' events follow
    (:data:`EVENT_NAME_RULE`), which API clients' events must follow too."""
    return isinstance(name, str) and _EVENT_NAME.fullmatch(name) is not None

P = TypeVar("P", bound="Payload")


class UnknownMessageError(ProtocolError):
    """A CoAP request whose code and Uri-Path match no message in ROUTES."""


def _kind(value: object) -> str:
    """Msgpack-level name of a decoded value's type, for error messages."""
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", bytes: "bin", list: "array", dict: "map"}.get(
        type(value), type(value).__name__
    )


class _Fields:
    """Typed reads from one decoded msgpack map; every error names the field's path."""

    def __init__(
        self, data: object, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> None:
        if type(data) is not dict:
            raise PayloadSchemaError(f"{path} must be a map, got {_kind(data)}")
        allowed = set(required) | set(optional)
        for key in data:
            if key not in allowed:
                raise PayloadSchemaError(f"{path} has unknown field {key!r}")
        for key in required:
            if key not in data:
                raise PayloadSchemaError(f"{path}.{key} is missing")
        self._data: dict[Any, Any] = data
        self._path = path

    def has(self, name: str) -> bool:
        return name in self._data

    def path(self, name: str) -> str:
        return f"{self._path}.{name}"

    def uint(self, name: str, high: int, low: int = 0) -> int:
        value = self._data[name]
        if type(value) is not int:  # bool is a subclass of int: refuse it here
            raise PayloadSchemaError(f"{self.path(name)} must be an int, got {_kind(value)}")
        if not low <= value <= high:
            raise PayloadSchemaError(f"{self.path(name)} is {value}, outside {low}..{high}")
        return value

    def boolean(self, name: str) -> bool:
        value = self._data[name]
        if type(value) is not bool:
            raise PayloadSchemaError(f"{self.path(name)} must be a bool, got {_kind(value)}")
        return value

    def text(self, name: str, pattern: re.Pattern[str] | None = None, max_bytes: int = 0) -> str:
        value = self._data[name]
        if type(value) is not str:
            raise PayloadSchemaError(f"{self.path(name)} must be a str, got {_kind(value)}")
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadSchemaError(f"{self.path(name)} is not valid Unicode text") from None
        if max_bytes and len(encoded) > max_bytes:
            raise PayloadSchemaError(
                f"{self.path(name)} has {len(encoded)} bytes of UTF-8, at most {max_bytes} allowed"
            )
        if pattern is not None and not pattern.fullmatch(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise PayloadSchemaError(f"{self.path(name)} {shown!r} must match {pattern.pattern}")
        return value

    def blob(self, name: str, length: int) -> bytes:
        value = self._data[name]
        if type(value) is not bytes:
            raise PayloadSchemaError(f"{self.path(name)} must be bin, got {_kind(value)}")
        if len(value) != length:
            raise PayloadSchemaError(f"{self.path(name)} has {len(value)} bytes, needs {length}")
        return value

    def array(self, name: str, max_items: int) -> list[Any]:
        value = self._data[name]
        if type(value) is not list:
            raise PayloadSchemaError(f"{self.path(name)} must be an array, got {_kind(value)}")
        if len(value) > max_items:
            raise PayloadSchemaError(
                f"{self.path(name)} has {len(value)} items, at most {max_items} allowed"
            )
        return value


class Payload:
    """Base of every message schema: msgpack encoding and the strict check at the edge."""

    __slots__ = ()
    KIND: ClassVar[str]
    #: Largest payload accepted, in bytes; also bounds every msgpack string, bin and array.
    MAX_SIZE: ClassVar[int]
    MAX_ITEMS: ClassVar[int] = 16

    def to_map(self) -> dict[str, Any]:
        """The msgpack map this message encodes to."""
        raise NotImplementedError

    @classmethod
    def from_map(cls: type[P], data: object) -> P:
        """Check a decoded msgpack value against the schema and build the message."""
        raise NotImplementedError

    def to_payload(self) -> bytes:
        """Msgpack bytes; raises PayloadSchemaError if the message breaks its own schema."""
        data = self.to_map()
        type(self).from_map(data)  # the same checks the receiver runs
        packed: bytes = msgpack.packb(data, use_bin_type=True)
        if len(packed) > self.MAX_SIZE:
            raise PayloadSchemaError(
                f"{self.KIND} payload of {len(packed)} bytes exceeds the {self.MAX_SIZE}-byte limit"
            )
        return packed

    @classmethod
    def from_payload(cls: type[P], payload: bytes | bytearray | memoryview) -> P:
        """Parse and check a payload; any problem raises PayloadSchemaError naming the field."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise PayloadSchemaError(
                f"{cls.KIND} payload must be bytes, got {type(payload).__name__}"
            )
        if len(payload) > cls.MAX_SIZE:
            raise PayloadSchemaError(
                f"{cls.KIND} payload of {len(payload)} bytes exceeds the {cls.MAX_SIZE}-byte limit"
            )
        try:
            data = msgpack.unpackb(
                payload,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=cls.MAX_SIZE,
                max_bin_len=cls.MAX_SIZE,
                max_array_len=cls.MAX_ITEMS,
                max_map_len=cls.MAX_ITEMS,
                max_ext_len=0,
            )
        except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
            # ValueError covers ExtraData, invalid UTF-8 and the max_*_len limits.
            raise PayloadSchemaError(f"{cls.KIND} payload is not valid msgpack: {exc}") from None
        return cls.from_map(data)


# --- device -> cloud --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Payload):
    """First message of a session: who the device is and what it can do (Device OS hello)."""

    KIND: ClassVar[str] = "hello"
    MAX_SIZE: ClassVar[int] = 512
    #: A map entry per field (17 with every optional one), with room for a few more.
    MAX_ITEMS: ClassVar[int] = 24

    device_id: str
    platform_id: int
    product_id: int
    product_version: int
    system_version: int
    supports_immediate_updates: bool
    updates_enabled: bool
    reset_pending: bool
    max_message_size: int
    #: Chunk size the device wants for OTA (512-1136, a multiple of 4).
    ota_chunk_size: int | None = None
    #: Largest firmware binary the device accepts.
    max_binary_size: int | None = None
    #: The device can take compressed modules (hello flag 0x40).
    compressed_ota: bool = False
    #: The previous update was applied (hello flag 0x01); the server can close it out.
    ota_succeeded: bool = False
    #: The key rotation sequence the device's trust store is at (otacore.signing): the
    #: answer carries only the statements after it. None (omitted): taken as 0, and the
    #: answer is the legacy array (ota_wire point 5).
    key_sequence: int | None = None
    #: The device's application anti-rollback floor (otacore.downgrade): a downgrade
    #: authorisation must be issued from at least this version. None: the running version.
    app_version_floor: int | None = None
    #: The device takes key rotation statements mid-session (the server's ``POST k``,
    #: ota_wire point 5). False (omitted): older firmware, which learns them only from a
    #: Hello's answer.
    key_push: bool = False
    #: The newest delta patch format version the device's applier reads (otacore.delta
    #: SUPPORTED_VERSIONS): the server makes no newer patch for it. None (omitted): older
    #: firmware, taken as otacore.transfer.planner.UNNAMED_DELTA_FORMAT.
    delta_format: int | None = None

    _REQUIRED: ClassVar[tuple[str, ...]] = (
        "device_id",
        "platform_id",
        "product_id",
        "product_version",
        "system_version",
        "supports_immediate_updates",
        "updates_enabled",
        "reset_pending",
        "max_message_size",
    )
    _OPTIONAL: ClassVar[tuple[str, ...]] = (
        "ota_chunk_size",
        "max_binary_size",
        "compressed_ota",
        "ota_succeeded",
        "key_sequence",
        "app_version_floor",
        "key_push",
        "delta_format",
    )

    def to_map(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self._REQUIRED + self._OPTIONAL}
        if not self.key_push:
            del data["key_push"]  # a device without it sends what older firmware sent
        return {key: value for key, value in data.items() if value is not None}

    @classmethod
    def from_map(cls, data: object) -> Hello:
        f = _Fields(data, "hello", cls._REQUIRED, cls._OPTIONAL)
        chunk = None
        if f.has("ota_chunk_size"):
            chunk = f.uint("ota_chunk_size", 1136, 512)
            if chunk % 4:
                raise PayloadSchemaError(f"hello.ota_chunk_size {chunk} is not a multiple of 4")
        return cls(
            device_id=f.text("device_id", _DEVICE_ID),
            platform_id=f.uint("platform_id", _UINT16),
            product_id=f.uint("product_id", _UINT16),
            product_version=f.uint("product_version", _UINT16),
            system_version=f.uint("system_version", _UINT16),
            supports_immediate_updates=f.boolean("supports_immediate_updates"),
            updates_enabled=f.boolean("updates_enabled"),
            reset_pending=f.boolean("reset_pending"),
            max_message_size=f.uint("max_message_size", _UINT16, 64),
            ota_chunk_size=chunk,
            max_binary_size=f.uint("max_binary_size", _UINT32)
            if f.has("max_binary_size")
            else None,
            compressed_ota=f.boolean("compressed_ota") if f.has("compressed_ota") else False,
            ota_succeeded=f.boolean("ota_succeeded") if f.has("ota_succeeded") else False,
            key_sequence=f.uint("key_sequence", _UINT64) if f.has("key_sequence") else None,
            app_version_floor=f.uint("app_version_floor", _UINT32)
            if f.has("app_version_floor")
            else None,
            key_push=f.boolean("key_push") if f.has("key_push") else False,
            delta_format=f.uint("delta_format", 255, 1) if f.has("delta_format") else None,
        )


@dataclass(frozen=True, slots=True)
class Dependency:
    """A module another module needs: same function and index, at least this version."""

    function: int
    index: int
    version: int

    def to_map(self) -> dict[str, Any]:
        return {"function": self.function, "index": self.index, "version": self.version}

    @classmethod
    def from_map(cls, data: object, path: str) -> Dependency:
        f = _Fields(data, path, ("function", "index", "version"))
        return cls(
            function=f.uint("function", MODULE_FUNCTIONS[-1]),
            index=f.uint("index", _UINT8),
            version=f.uint("version", _UINT16),
        )


@dataclass(frozen=True, slots=True)
class ModuleDescription:
    """One installed module as the device reports it."""

    function: int
    index: int
    version: int
    store: int
    size: int
    sha256: bytes
    dependencies: tuple[Dependency, ...] = ()

    def to_map(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "index": self.index,
            "version": self.version,
            "store": self.store,
            "size": self.size,
            "sha256": self.sha256,
            "dependencies": [dependency.to_map() for dependency in self.dependencies],
        }

    @classmethod
    def from_map(cls, data: object, path: str) -> ModuleDescription:
        f = _Fields(
            data, path, ("function", "index", "version", "store", "size", "sha256", "dependencies")
        )
        dependencies = f.array("dependencies", MAX_DEPENDENCIES)
        return cls(
            function=f.uint("function", MODULE_FUNCTIONS[-1]),
            index=f.uint("index", _UINT8),
            version=f.uint("version", _UINT16),
            store=f.uint("store", MODULE_STORES[-1]),
            size=f.uint("size", _UINT32),
            sha256=f.blob("sha256", 32),
            dependencies=tuple(
                Dependency.from_map(item, f"{path}.dependencies[{i}]")
                for i, item in enumerate(dependencies)
            ),
        )


@dataclass(frozen=True, slots=True)
class Describe(Payload):
    """The modules installed on the device (sent on request or after a change)."""

    KIND: ClassVar[str] = "describe"
    MAX_SIZE: ClassVar[int] = 16384
    MAX_ITEMS: ClassVar[int] = MAX_MODULES

    modules: tuple[ModuleDescription, ...]

    def to_map(self) -> dict[str, Any]:
        return {"modules": [module.to_map() for module in self.modules]}

    @classmethod
    def from_map(cls, data: object) -> Describe:
        f = _Fields(data, "describe", ("modules",))
        modules = tuple(
            ModuleDescription.from_map(item, f"describe.modules[{i}]")
            for i, item in enumerate(f.array("modules", MAX_MODULES))
        )
        seen: dict[tuple[int, int, int], int] = {}
        for i, module in enumerate(modules):
            key = (module.function, module.index, module.store)
            if key in seen:
                raise PayloadSchemaError(
                    f"describe.modules[{i}] repeats function {key[0]} index {key[1]} in store "
                    f"{key[2]} (already modules[{seen[key]}])"
                )
            seen[key] = i
        return cls(modules=modules)


def _event_fields(data: object, kind: str, optional: tuple[str, ...] = ()) -> _Fields:
    return _Fields(data, kind, ("name", "data", "ttl"), optional)


@dataclass(frozen=True, slots=True)
class Event(Payload):
    """An event the device publishes (``POST e/<name>``)."""

    KIND: ClassVar[str] = "event"
    MAX_SIZE: ClassVar[int] = 2048

    name: str
    data: str
    ttl: int

    def to_map(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.data, "ttl": self.ttl}

    @classmethod
    def from_map(cls, data: object) -> Event:
        f = _event_fields(data, "event")
        return cls(
            name=f.text("name", _EVENT_NAME),
            data=f.text("data", max_bytes=EVENT_DATA_MAX_BYTES),
            ttl=f.uint("ttl", _UINT32),
        )


@dataclass(frozen=True, slots=True)
class Ping(Payload):
    """Keep-alive: the CoAP ping itself (an Empty CON, RFC 7252 4.3), so it has no payload."""

    KIND: ClassVar[str] = "ping"
    MAX_SIZE: ClassVar[int] = 0

    def to_map(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_map(cls, data: object) -> Ping:
        _Fields(data, "ping", ())
        return cls()

    def to_payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, payload: bytes | bytearray | memoryview) -> Ping:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise PayloadSchemaError(f"ping payload must be bytes, got {type(payload).__name__}")
        if len(payload):
            raise PayloadSchemaError(
                f"ping carries no payload (it is an Empty CoAP message), got {len(payload)} bytes"
            )
        return cls()


@dataclass(frozen=True, slots=True)
class Goodbye(Payload):
    """The device is closing the session on purpose (``POST g``)."""

    KIND: ClassVar[str] = "goodbye"
    MAX_SIZE: ClassVar[int] = 128

    #: Why, e.g. "user", "reset", "update", "sleep", "network_off".
    reason: str
    #: For "sleep": how long the device expects to be away, so the server can keep state.
    sleep_seconds: int | None = None

    def to_map(self) -> dict[str, Any]:
        data: dict[str, Any] = {"reason": self.reason}
        if self.sleep_seconds is not None:
            data["sleep_seconds"] = self.sleep_seconds
        return data

    @classmethod
    def from_map(cls, data: object) -> Goodbye:
        f = _Fields(data, "goodbye", ("reason",), ("sleep_seconds",))
        return cls(
            reason=f.text("reason", _REASON),
            sleep_seconds=f.uint("sleep_seconds", _UINT32) if f.has("sleep_seconds") else None,
        )


# --- cloud -> device --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DescribeRequest(Payload):
    """The server asks for a Describe (``GET d``)."""

    KIND: ClassVar[str] = "describe request"
    MAX_SIZE: ClassVar[int] = 64

    system: bool = True
    application: bool = True

    def to_map(self) -> dict[str, Any]:
        return {"system": self.system, "application": self.application}

    @classmethod
    def from_map(cls, data: object) -> DescribeRequest:
        f = _Fields(data, "describe request", ("system", "application"))
        request = cls(system=f.boolean("system"), application=f.boolean("application"))
        if not (request.system or request.application):
            raise PayloadSchemaError("describe request asks for neither system nor application")
        return request


@dataclass(frozen=True, slots=True)
class ServerEvent(Payload):
    """An event the server delivers to a subscribed device (``POST e/<name>``)."""

    KIND: ClassVar[str] = "server event"
    MAX_SIZE: ClassVar[int] = 2048

    name: str
    data: str
    ttl: int
    #: Unix time (seconds) the event was published, when known.
    published_at: int | None = None

    def to_map(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "data": self.data, "ttl": self.ttl}
        if self.published_at is not None:
            data["published_at"] = self.published_at
        return data

    @classmethod
    def from_map(cls, data: object) -> ServerEvent:
        f = _event_fields(data, "server event", ("published_at",))
        return cls(
            name=f.text("name", _EVENT_NAME),
            data=f.text("data", max_bytes=EVENT_DATA_MAX_BYTES),
            ttl=f.uint("ttl", _UINT32),
            published_at=f.uint("published_at", _UINT32) if f.has("published_at") else None,
        )


# --- routing ------------------------------------------------------------------------------


class Direction(Enum):
    """Who sends the message."""

    TO_CLOUD = "device->cloud"
    TO_DEVICE = "cloud->device"


@dataclass(frozen=True, slots=True)
class Route:
    """How one message travels: its CoAP code and first Uri-Path segment."""

    payload_type: type[Payload]
    direction: Direction
    code: Code
    #: First Uri-Path segment; None for the CoAP ping, which has no options.
    path: str | None
    #: A second Uri-Path segment carries the event name.
    named: bool = False


ROUTES: tuple[Route, ...] = (
    Route(Hello, Direction.TO_CLOUD, Code.POST, "h"),
    Route(Describe, Direction.TO_CLOUD, Code.POST, "d"),
    Route(Event, Direction.TO_CLOUD, Code.POST, "e", named=True),
    Route(Goodbye, Direction.TO_CLOUD, Code.POST, "g"),
    Route(Ping, Direction.TO_CLOUD, Code.EMPTY, None),
    Route(DescribeRequest, Direction.TO_DEVICE, Code.GET, "d"),
    Route(ServerEvent, Direction.TO_DEVICE, Code.POST, "e", named=True),
    Route(Ping, Direction.TO_DEVICE, Code.EMPTY, None),
)

#: v3 firmware update (Device OS firmware_update.cpp): POST start/chunk/finish, device ack.
FIRMWARE_UPDATE_PATHS: dict[str, str] = {"S": "start", "C": "chunk", "F": "finish", "A": "ack"}

_BY_TYPE: dict[tuple[type[Payload], Direction], Route] = {
    (route.payload_type, route.direction): route for route in ROUTES
}
_BY_WIRE: dict[tuple[Direction, int, str | None], Route] = {
    (route.direction, int(route.code), route.path): route for route in ROUTES
}


def route_of(payload_type: type[Payload], direction: Direction | None = None) -> Route:
    """The route of a message type (Ping needs ``direction``: it goes both ways)."""
    for route in ROUTES:
        if route.payload_type is payload_type and direction in (None, route.direction):
            return route
    raise KeyError(f"{payload_type.__name__} has no route")


def find_route(direction: Direction, code: int, uri_path: list[str]) -> Route | None:
    """The route matching a received message's code and Uri-Path, or None."""
    route = _BY_WIRE.get((direction, code, uri_path[0] if uri_path else None))
    if route is None:
        return None
    expected = 2 if route.named else (1 if route.path is not None else 0)
    return route if len(uri_path) == expected else None


def to_message(
    payload: Payload, direction: Direction, msg_type: MessageType = MessageType.CON
) -> Message:
    """A CoAP message carrying ``payload`` along its route (message id and token unset)."""
    route = _BY_TYPE[(type(payload), direction)]
    message = Message(msg_type, int(route.code), payload=payload.to_payload())
    if route.path is not None:
        segments = [route.path]
        if route.named:
            assert isinstance(payload, Event | ServerEvent)
            segments.append(payload.name)
        message.set_uri_path(*segments)
    return message


def from_message(message: Message, direction: Direction) -> Payload:
    """Parse the payload of a received message by its route.

    Raises UnknownMessageError when no route matches, PayloadSchemaError when the payload
    breaks its schema or an event's name differs from its Uri-Path.
    """
    uri_path = message.uri_path
    route = find_route(direction, message.code, uri_path)
    if route is None:
        shown = "/".join(uri_path)
        raise UnknownMessageError(
            f"no {direction.value} message is sent as code {message.code >> 5}."
            f"{message.code & 0x1F:02d} to /{shown}"
        )
    parsed = route.payload_type.from_payload(message.payload)
    if route.named and isinstance(parsed, Event | ServerEvent) and parsed.name != uri_path[1]:
        raise PayloadSchemaError(
            f"{parsed.KIND}.name {parsed.name!r} differs from its Uri-Path {uri_path[1]!r}"
        )
    return parsed
